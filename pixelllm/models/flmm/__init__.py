"""F-LMM (grounding a frozen multimodal model): the attention maps of a phrase's tokens over the
image (:mod:`.attention_maps`, from the frozen LLaVA-1.5 of :mod:`.llava`) become a coarse mask
through a small U-Net (:mod:`.mask_head`), which SAM refines (:mod:`.refiner`); :mod:`.flmm` is
the trained head and :mod:`.objective` its loss; :mod:`.checkpoint` loads F-LMM's released
weights."""
