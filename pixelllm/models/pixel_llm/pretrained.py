"""Loads the public pretrained checkpoints into a PixelLLM's parts.

PixelLLM starts from released weights: Segment Anything (``sam_vit_h_4b8939.pth`` or a Hugging
Face ``SamModel`` folder), EVA02 (timm or BAAI files) and the language model (a Hugging Face
folder: Flan-T5, Llama, Gemma). Each argument is a path (file, folder, or sharded index) or an
already read state dict; each part is filled in place by its family's loader (``load(module,
state_dict, *, source)`` of :mod:`pixelllm.encoders`, the language model's ``load_hf_weights``),
strictly: a file of another variant fails with the mismatched keys and the file named.
PixelLLM's own modules (adapters, heads) keep their values, and so do the LM's LoRA adapters.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from pixelllm.checkpoints.state_dict import read_state_dict
from pixelllm.encoders import eva02 as eva02_lib
from pixelllm.encoders.sam import sam as sam_lib
from pixelllm.models.pixel_llm.pixel_llm import PixelLLM

Checkpoint = str | Path | Mapping[str, np.ndarray]


def _read(checkpoint: Checkpoint, what: str) -> tuple[Mapping[str, np.ndarray], str]:
    if isinstance(checkpoint, Mapping):
        return checkpoint, f"{what} state dict"
    return read_state_dict(checkpoint), str(checkpoint)


def load_pretrained(model: PixelLLM, *, sam: Checkpoint | None = None,
                    eva02: Checkpoint | None = None,
                    language_model: Checkpoint | None = None) -> PixelLLM:
    """Fills ``model.sam``, ``model.eva02`` and ``model.lm`` (base weights) from public files;
    returns ``model``. Parts given ``None`` are left as they are."""
    if sam is not None:
        state_dict, source = _read(sam, "SAM")
        sam_lib.load(model.sam, state_dict, source=source)
    if eva02 is not None:
        state_dict, source = _read(eva02, "EVA02")
        eva02_lib.load(model.eva02, state_dict, source=source)
    if language_model is not None:
        state_dict, source = _read(language_model, "language model")
        model.lm.load_hf_weights(state_dict, source=source)
    return model
