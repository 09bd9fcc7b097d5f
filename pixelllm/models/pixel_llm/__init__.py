"""The PixelLLM model: image and language towers joined by prompt, point and proposal heads."""
