"""LISA (reasoning segmentation): a LLaVA whose ``[SEG]`` hidden state prompts SAM's mask
decoder (:mod:`.lisa`), and its loss (:mod:`.objective`)."""
