"""LISA's released checkpoints (``xinlai/LISA-7B-v1``) -> :class:`~pixelllm.models.lisa.lisa.Lisa`,
and the model built from a config's ``model`` field (``configs/lisa.py``).

The released folder is a Hugging Face ``LISAForCausalLM`` written by LISA's
``merge_lora_weights_and_save_hf_model.py``: sharded ``pytorch_model-0000x-of-0000y.bin`` files
with ``pytorch_model.bin.index.json``, the LoRA adapters already merged into the base weights, and
the vision tower's keys left out. Its keys, and where they go:

==============================================================  ===================================
``model.embed_tokens.weight`` ``[32004, D]``                    decoder table (first V rows) +
``lm_head.weight`` ``[32004, D]``                               added token rows (the 4 others)
``model.layers.{i}.*``, ``model.norm.weight``                   decoder (:func:`decoder.load`)
``model.mm_projector.{weight,bias}``                            ``mm_projector``
``model.visual_model.{image_encoder,prompt_encoder,             ``sam`` (:func:`sam.load`,
mask_decoder}.*``                                               segment_anything layout)
``model.text_hidden_fcs.0.{0,2}.{weight,bias}``                 ``text_hidden_fcs.fc1`` / ``fc2``
``model.vision_tower.vision_tower.*`` (absent in the release)   ``vision_tower`` (:func:`clip.load`)
``model.layers.{i}.self_attn.rotary_emb.inv_freq``              ignored (a fixed RoPE buffer older
                                                                transformers saved)
==============================================================  ===================================

The vision tower comes from ``openai/clip-vit-large-patch14`` (the ``clip`` argument), or from
the LISA file when it holds the tower's keys and no ``clip`` is given. Any other key is an error
naming the file and the key. Because the adapters are merged in the file, the model's LoRA
``lora_b`` factors are reset to zero: the loaded model computes the released one, and training
starts its adapters from there as LISA's ``merge_and_unload`` would leave them.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx

from pixelllm.checkpoints import key_map
from pixelllm.checkpoints.assign import CheckpointMismatchError
from pixelllm.checkpoints.key_map import TRANSPOSE, Rule
from pixelllm.checkpoints.state_dict import state_dict_and_source
from pixelllm.encoders import clip as clip_lib
from pixelllm.encoders.sam import sam as sam_lib
from pixelllm.language import decoder
from pixelllm.language.tokenizer import Tokenizer
from pixelllm.models.lisa.lisa import Lisa
from pixelllm.nn import abstract, lora
from pixelllm.tools import param_table

_log = logging.getLogger(__name__)

Checkpoint = str | os.PathLike | Mapping[str, np.ndarray]

SEG_TOKEN = "[SEG]"
# Prefixes of LISA's key groups (see the module docstring).
_EMBEDDING, _HEAD = "model.embed_tokens.weight", "lm_head.weight"
_LANGUAGE = re.compile(
    r"model\.(layers\.\d+\..*|norm\.weight|embed_tokens\.weight)\Z|lm_head\.weight\Z")
_PROJECTOR, _SAM, _FCS = "model.mm_projector.", "model.visual_model.", "model.text_hidden_fcs."
_TOWER = "model.vision_tower.vision_tower."  # LLaVA's CLIPVisionTower around CLIPVisionModel
# (part, key prefix (None: the language model's keys, _LANGUAGE), whether the prefix is cut).
_PARTS = (("language", None, False), ("projector", _PROJECTOR, False), ("fcs", _FCS, False),
          ("sam", _SAM, True), ("tower", _TOWER, True))
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq\Z")

_PROJECTOR_RULES = [Rule(_PROJECTOR + "weight", "kernel", TRANSPOSE),
                    Rule(_PROJECTOR + "bias", "bias")]
_FCS_RULES = [Rule(f"{_FCS}0.{index}.weight", f"{name}/kernel", TRANSPOSE)
              for index, name in ((0, "fc1"), (2, "fc2"))]
_FCS_RULES += [Rule(f"{_FCS}0.{index}.bias", f"{name}/bias")
               for index, name in ((0, "fc1"), (2, "fc2"))]


# ------------------------------------------------------------------------------------- build


def build(model_config: Mapping, *, rngs: nnx.Rngs) -> Lisa:
    """The :class:`Lisa` of a ``configs/lisa.py`` ``model`` field: a :class:`ClipVision` tower,
    a :class:`~pixelllm.language.decoder.DecoderLM` with ``added_tokens`` appended as token rows
    (in order), SAM. ``seg_token_id`` must be the id those rows give ``[SEG]``."""
    config = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    added = list(config["added_tokens"])
    if SEG_TOKEN not in added:
        raise ValueError(f"model.added_tokens {added} lacks {SEG_TOKEN!r}")
    language_model = decoder.DecoderLM(config["language_model"], rngs=rngs)
    seg_token_id = language_model.add_token_rows(len(added)) + added.index(SEG_TOKEN)
    if config["seg_token_id"] != seg_token_id:
        raise ValueError(f"model.seg_token_id={config['seg_token_id']}, but {SEG_TOKEN} is added "
                         f"token {added.index(SEG_TOKEN)} after a vocabulary of "
                         f"{language_model.config.vocab_size}: id {seg_token_id}")
    dtype = jnp.dtype(config["dtype"])
    tower = clip_lib.ClipVision(**config["vision_tower"], dtype=dtype, rngs=rngs)
    sam = sam_lib.Sam(**config["sam"], dtype=dtype, rngs=rngs)
    return Lisa(vision_tower=tower, vision_width=config["vision_tower"]["width"],
                language_model=language_model, sam=sam, seg_token_id=seg_token_id, rngs=rngs)


# ------------------------------------------------------------------------------------- load


def _split(state_dict: Mapping[str, np.ndarray], *, source: str) -> dict[str, dict]:
    """LISA's keys by part (``language``, ``projector``, ``fcs``, ``sam``, ``tower``); raises
    naming ``source`` and every key that belongs to none. SAM's and the tower's keys lose their
    prefix (their loaders read a SAM or CLIP file's names); the others keep the file's names."""
    parts: dict[str, dict] = {name: {} for name, _, _ in _PARTS}
    unknown = []
    for key, value in state_dict.items():
        if _IGNORED.match(key):
            continue
        found = next(((name, prefix, strip) for name, prefix, strip in _PARTS
                      if (key.startswith(prefix) if prefix else _LANGUAGE.match(key))), None)
        if found is None:
            unknown.append(key)
            continue
        name, prefix, strip = found
        parts[name][key[len(prefix):] if strip else key] = value
    if unknown:
        raise CheckpointMismatchError(
            f"{source}: keys that are not part of LISA's checkpoint layout: "
            + ", ".join(sorted(unknown)[:20]) + (" ..." if len(unknown) > 20 else ""))
    return parts


def _split_vocabulary(language: dict[str, np.ndarray], model: Lisa, *, source: str
                      ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """``(decoder state dict with V rows, added embedding rows [n, D], added head rows [n, D])``:
    the file's ``32004`` rows split at the decoder's pretrained vocabulary ``V``."""
    lm = model.language_model
    vocab, total = lm.config.vocab_size, lm.vocab_size
    tables = {}
    for key in (_EMBEDDING, _HEAD):
        if key not in language:
            raise CheckpointMismatchError(f"{source}: missing key {key} (LISA's token table)")
        rows = np.shape(language[key])[0] if np.ndim(language[key]) == 2 else None
        if rows != total:
            raise CheckpointMismatchError(
                f"{source}: {key} has shape {tuple(np.shape(language[key]))}; the model has "
                f"{vocab} vocabulary rows + {total - vocab} added token rows = {total} rows of "
                f"{lm.width}")
        tables[key] = np.asarray(language[key])
    base = {**language, _EMBEDDING: tables[_EMBEDDING][:vocab], _HEAD: tables[_HEAD][:vocab]}
    return base, tables[_EMBEDDING][vocab:], tables[_HEAD][vocab:]


def _reset_adapters(model: nnx.Module) -> None:
    """``lora_b = 0`` everywhere: the file's weights already hold the merged adapters."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, lora.LoRALinear) and module.lora_b is not None:
            module.lora_b.set_value(jnp.zeros_like(module.lora_b.get_value()))


def load(model: Lisa, state_dict: Mapping[str, np.ndarray], *, source: str,
         clip_state_dict: Mapping[str, np.ndarray] | None = None,
         clip_source: str = "CLIP state dict") -> Lisa:
    """Fills ``model`` (in place, strictly) from a LISA state dict (module docstring) and the
    vision tower from ``clip_state_dict`` (a CLIP file's, e.g. ``openai/clip-vit-large-patch14``)
    or, when that is None, from the LISA file's own tower keys. Returns ``model``.

    Keys outside LISA's layout and token tables of another size are refused before anything is
    assigned; then each part loads strictly. A mismatch raises :class:`CheckpointMismatchError`
    naming ``source`` (or ``clip_source``) and the keys; the failing part is left unchanged, the
    parts before it are loaded.
    """
    parts = _split(state_dict, source=source)
    if clip_state_dict is None and not parts["tower"]:
        raise CheckpointMismatchError(
            f"{source}: holds no vision tower keys ({_TOWER}*), as LISA's released files do not; "
            "pass the CLIP checkpoint (openai/clip-vit-large-patch14)")
    base, added_rows, added_head = _split_vocabulary(parts["language"], model, source=source)
    lm = model.language_model
    decoder.load(lm, base, source=source)
    if lm.added_tokens is not None:
        lm.added_tokens.embedding.set_value(jnp.asarray(added_rows, lm.added_tokens.embedding
                                                        .get_value().dtype))
        lm.added_tokens.head.set_value(jnp.asarray(added_head.T, lm.added_tokens.head
                                                   .get_value().dtype))
    _reset_adapters(lm)
    key_map.load(model.mm_projector, parts["projector"], _PROJECTOR_RULES, source=source)
    key_map.load(model.text_hidden_fcs, parts["fcs"], _FCS_RULES, source=source)
    sam_lib.load(model.sam, parts["sam"], source=f"{source} (keys under '{_SAM}')")
    if clip_state_dict is not None:
        if parts["tower"]:
            _log.info("%s: its %d vision tower keys are ignored; the tower comes from %s",
                      source, len(parts["tower"]), clip_source)
        clip_lib.load(model.vision_tower, clip_state_dict, source=clip_source)
    else:
        clip_lib.load(model.vision_tower, parts["tower"],
                      source=f"{source} (keys under '{_TOWER}')")
    return model


def check_seg_token(tokenizer: Tokenizer, seg_token_id: int) -> None:
    """Raises ``ValueError`` naming the tokenizer's file unless it encodes ``[SEG]`` as
    ``seg_token_id``. LISA reads the id as ``tokenizer("[SEG]", add_special_tokens=False)
    .input_ids[0]``; a SentencePiece tokenizer may put its word-prefix piece (``▁``, no text of
    its own) first, which is skipped here rather than taken for the id."""
    ids = tokenizer.encode(SEG_TOKEN)
    pieces = [i for i in ids if tokenizer.decode([i]).strip()]
    if pieces != [seg_token_id]:
        raise ValueError(f"{tokenizer.path}: encodes {SEG_TOKEN!r} as {ids}, not as the model's "
                         f"seg_token_id {seg_token_id} (is {SEG_TOKEN} added to this tokenizer, "
                         "after <im_patch>, <im_start>, <im_end>?)")


def load_pretrained(model: Lisa, *, lisa: Checkpoint, clip: Checkpoint | None = None,
                    tokenizer: Tokenizer | None = None) -> Lisa:
    """:func:`load` from files: ``lisa`` a LISA folder, shard index or file; ``clip`` a CLIP
    folder or file (or state dicts); ``tokenizer``, when given, must encode ``[SEG]`` as the
    model's ``seg_token_id`` (:func:`check_seg_token`)."""
    if tokenizer is not None:
        check_seg_token(tokenizer, model.seg_token_id)
    state_dict, source = state_dict_and_source(lisa, what="LISA")
    clip_state_dict, clip_source = ((None, "") if clip is None
                                    else state_dict_and_source(clip, what="CLIP"))
    return load(model, state_dict, source=source, clip_state_dict=clip_state_dict,
                clip_source=clip_source)


# ------------------------------------------------------------------------------------- table


def parameter_rows(config: ml_collections.ConfigDict, depth: int = 2
                   ) -> list[tuple[str, int, int]]:
    """``[(path prefix, trained, frozen)]`` + ``total`` of ``config.model`` built abstractly
    (``nnx.eval_shape``: no memory), trained = :meth:`Lisa.trainable`."""
    model = abstract.build_abstract(lambda rngs: build(config.model, rngs=rngs))
    return param_table.param_rows(model, depth)


def main(argv):
    """``python -m pixelllm.models.lisa.checkpoint --config=configs/lisa.py:lisa_7b [--depth=2]``:
    the parameter table (the flags are :mod:`pixelllm.tools.param_table`'s, defined on import)."""
    del argv
    print(param_table.format_rows(parameter_rows(flags.FLAGS.config, flags.FLAGS.depth)))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
