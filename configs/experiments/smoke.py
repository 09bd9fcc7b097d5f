"""The multi-task experiment at tiny sizes: tiny encoders and T5 on a 32-pixel canvas, the
``smoke`` data mixture (2 slots, 8 context / 16 text tokens): seconds per step on a CPU.

  --config=configs/experiments/smoke.py            tiny T5
  --config=configs/experiments/smoke.py:decoder    tiny Llama-style decoder
"""

from configs.experiments import experiment

_MODELS = {"t5": "tiny", "decoder": "tiny_decoder"}


def get_config(arg: str | None = None):
    language_model = arg or "t5"
    if language_model not in _MODELS:
        raise ValueError(f"unknown smoke language model {language_model!r}; "
                         f"choose from {sorted(_MODELS)}")
    return experiment.build(model_variant=_MODELS[language_model], data_variant="smoke")
