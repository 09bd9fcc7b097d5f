"""Language models: decoder-only LLMs and T5, with LoRA adapters on a frozen base."""
