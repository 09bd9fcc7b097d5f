"""Loads the public pretrained checkpoints into a PixelLLM's parts.

PixelLLM starts from released weights: Segment Anything (``sam_vit_h_4b8939.pth`` or a Hugging
Face ``SamModel`` folder), EVA02 (timm or BAAI files) and the language model (a Hugging Face
folder: Flan-T5, Llama, Gemma). Each argument is a path (file, folder, or sharded index) or an
already read state dict; each part is filled in place by its family's loader (``load(module,
state_dict, *, source)`` of :mod:`pixelllm.encoders`, the language model's ``load_hf_weights``),
strictly: a file of another variant fails with the mismatched keys and the file named (the file
inside a folder, the index of a sharded checkpoint).

Before its weights are read, a language-model folder's ``config.json`` is compared with the
model's config: a file whose shapes happen to fit (e.g. 32 heads of 64 against 16 of 128) would
otherwise load into the wrong architecture without an error. After them, the tokenizer (the
``tokenizer`` argument, else the one in the language-model folder) is checked against the
model's vocabulary (:func:`pixelllm.language.vocabulary.check_vocabulary`).
PixelLLM's own modules (adapters, heads) keep their values, and so do the LM's LoRA adapters.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pixelllm.checkpoints.assign import CheckpointMismatchError
from pixelllm.checkpoints.state_dict import checkpoint_file, read_state_dict
from pixelllm.encoders import eva02 as eva02_lib
from pixelllm.encoders.sam import sam as sam_lib
from pixelllm.language import hf_config
from pixelllm.language.tokenizer import load_tokenizer
from pixelllm.language.vocabulary import check_vocabulary
from pixelllm.models.pixel_llm.pixel_llm import PixelLLM

Checkpoint = str | Path | Mapping[str, np.ndarray]

# config.json fields that do not change what the weights compute: a training setting, and a
# context length nothing enforces.
_NOT_ARCHITECTURE = ("dropout_rate", "max_position_embeddings")
# The files load_tokenizer looks for in a folder.
_TOKENIZER_FILES = ("tokenizer.model", "spiece.model", "tokenizer.json")


def _read(checkpoint: Checkpoint, what: str) -> tuple[Mapping[str, np.ndarray], str]:
    if isinstance(checkpoint, Mapping):
        return checkpoint, f"{what} state dict"
    return read_state_dict(checkpoint), str(checkpoint_file(checkpoint))


def _differs(in_file: Any, in_model: Any) -> bool:
    """Whether a config.json value differs from the model's; a mapping (RoPE scaling) is
    compared on the keys the file gives, sequences element by element."""
    if dataclasses.is_dataclass(in_model):
        in_model = dataclasses.asdict(in_model)
    if isinstance(in_file, Mapping):
        return not isinstance(in_model, Mapping) or any(
            _differs(value, in_model.get(key)) for key, value in in_file.items())
    if isinstance(in_file, (list, tuple)):
        return in_model is None or tuple(in_file) != tuple(in_model)
    return in_file != in_model


def check_language_model_config(lm_config: Any, config_json: str | os.PathLike) -> None:
    """Raises :class:`~pixelllm.checkpoints.assign.CheckpointMismatchError` naming
    ``config_json`` and every architecture field where it differs from ``lm_config`` (the
    language model's ``T5Config`` / ``DecoderConfig``); training settings are not compared."""
    in_file = hf_config.language_model_config(config_json)["model"]
    ours = dataclasses.asdict(lm_config)
    differ = [f"{key} (config.json {value!r}, model {ours[key]!r})"
              for key, value in in_file.items()
              if key in ours and key not in _NOT_ARCHITECTURE and _differs(value, ours[key])]
    if differ:
        raise CheckpointMismatchError(
            f"{config_json}: the checkpoint's config does not match the language model's: "
            + ", ".join(differ))


def _folder_tokenizer(folder: Path) -> Path | None:
    return folder if any((folder / name).is_file() for name in _TOKENIZER_FILES) else None


def load_pretrained(model: PixelLLM, *, sam: Checkpoint | None = None,
                    eva02: Checkpoint | None = None, language_model: Checkpoint | None = None,
                    tokenizer: str | os.PathLike | None = None) -> PixelLLM:
    """Fills ``model.sam``, ``model.eva02`` and ``model.lm`` (base weights) from public files;
    returns ``model``. Parts given ``None`` are left as they are.

    ``tokenizer`` (a file or folder, as :func:`~pixelllm.language.tokenizer.load_tokenizer`
    reads): the tokenizer the data will be encoded with; default the one in the
    ``language_model`` folder, if it holds one. It must not produce ids past ``model.lm``'s
    vocabulary (added token rows included); a smaller tokenizer (T5: 32,100 ids, 32,128 rows) is
    fine. Raises ``ValueError`` naming the file on any mismatch, the model then partly loaded.
    """
    if sam is not None:
        state_dict, source = _read(sam, "SAM")
        sam_lib.load(model.sam, state_dict, source=source)
    if eva02 is not None:
        state_dict, source = _read(eva02, "EVA02")
        eva02_lib.load(model.eva02, state_dict, source=source)
    lm_config = model.lm.config
    vocab_source = f"the model config's vocab_size {lm_config.vocab_size}"
    if language_model is not None:
        folder = (Path(language_model) if not isinstance(language_model, Mapping)
                  and Path(language_model).is_dir() else None)
        if folder is not None and (folder / "config.json").is_file():
            check_language_model_config(lm_config, folder / "config.json")
        state_dict, source = _read(language_model, "language model")
        model.lm.load_hf_weights(state_dict, source=source)
        vocab_source = f"{lm_config.vocab_size} embedding rows in {source}"
        if tokenizer is None and folder is not None:
            tokenizer = _folder_tokenizer(folder)
    if tokenizer is not None:
        added = model.lm.vocab_size - lm_config.vocab_size
        check_vocabulary(load_tokenizer(tokenizer), model.lm.vocab_size,
                         model_source=vocab_source + (f" + {added} added token rows"
                                                      if added else ""))
    return model
