"""Model families built from the shared parts: PixelLLM today (``pixel_llm``); LISA, F-LMM and
PSALM-style models are planned beside it."""
