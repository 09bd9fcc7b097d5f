"""Segment Anything (Kirillov et al., 2023): ViT image encoder, prompt encoder and mask decoder,
each with the converter for the public ``segment_anything`` and Hugging Face checkpoints."""
