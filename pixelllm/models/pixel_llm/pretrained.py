"""Loads the public pretrained checkpoints into a PixelLLM's parts.

PixelLLM starts from released weights: Segment Anything (``sam_vit_h_4b8939.pth`` or a Hugging
Face ``SamModel`` folder), EVA02 (timm or BAAI files) and the language model (a Hugging Face
folder: Flan-T5, Llama, Gemma). Each argument is a path (file, folder, or sharded index) or an
already read state dict; the part is filled in place by the converters of
:mod:`pixelllm.encoders` and :mod:`pixelllm.language`, strictly: a file of another variant fails
with the mismatched keys and the file named. PixelLLM's own modules (adapters, heads) keep their
values, and so do the LM's LoRA adapters.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from pixelllm.checkpoints import assign as assign_lib
from pixelllm.checkpoints.state_dict import read_state_dict
from pixelllm.encoders import eva02 as eva02_lib
from pixelllm.encoders.sam import sam as sam_lib
from pixelllm.language import decoder as decoder_lib
from pixelllm.language import t5 as t5_lib
from pixelllm.models.pixel_llm.pixel_llm import PixelLLM

Checkpoint = str | Path | Mapping[str, np.ndarray]

# transformers' SAM mask decoder uses LayerNorm eps 1e-6 where segment_anything uses 1e-5.
_HF_SAM_MASK_DECODER_EPS = 1e-6


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
        layout = sam_lib.detect_layout(state_dict, source=source)
        eps = model.sam.mask_decoder.transformer.layers[0].norm1.epsilon
        if layout == "transformers" and eps != _HF_SAM_MASK_DECODER_EPS:
            raise ValueError(
                f"{source} is a Hugging Face SAM, whose mask decoder uses LayerNorm eps 1e-6; "
                f"this model was built with {eps}: set "
                "config.model.sam.mask_decoder.layer_norm_eps=1e-6")
        params = sam_lib.convert_state_dict(state_dict, layout=layout, source=source)
        assign_lib.assign(model.sam, params, source=source)
    if eva02 is not None:
        state_dict, source = _read(eva02, "EVA02")
        eva02_lib.load(state_dict, model.eva02, source=source)
    if language_model is not None:
        state_dict, source = _read(language_model, "language model")
        loader = (t5_lib.load_hf_weights if isinstance(model.lm, t5_lib.T5)
                  else decoder_lib.load_hf_weights)
        loader(model.lm, state_dict, source=source)
    return model
