"""The paper's multi-task PixelLLM: SAM ViT-H + EVA02-L + Flan-T5-XL on the 384 canvas, trained on
Localized Narratives traces, the RefCOCO family and Visual Genome dense captions at the official
multi-task sizes (16 slots, 32 context / 128 text tokens, 2 points per token).

  --config=configs/experiments/pixelllm_t5_xl.py --config.data.tokenizer=flan-t5-xl/spiece.model \
      --config.data.data_dir=~/tensorflow_datasets
"""

from configs.experiments import experiment


def get_config(arg: str | None = None):
    del arg  # One experiment per file.
    return experiment.build(model_variant="t5_xl", data_variant="pixelllm")
