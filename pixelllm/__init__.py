"""PixelLLM: Pixel Aligned Language Models (Xu et al., CVPR 2024) in JAX and Flax NNX."""
