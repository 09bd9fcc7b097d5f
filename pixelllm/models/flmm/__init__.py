"""F-LMM (grounding a frozen multimodal model): the attention maps of a phrase's tokens over the
image become a coarse mask through a small U-Net (:mod:`.mask_head`), which SAM refines."""
