"""Pretrained image encoders (SAM ViT, EVA02) and their checkpoint converters."""
