"""From a Hugging Face ``config.json`` to this project's language-model config mapping.

:func:`language_model_config` reads a ``config.json`` (a file, the folder holding it, or the
already-parsed mapping) and returns ``{"kind", "family", "model"}``: ``kind`` is ``"decoder"``
(:class:`pixelllm.language.decoder.DecoderConfig`) or ``"t5"`` (:class:`pixelllm.language.t5.T5Config`),
``model`` holds the architecture fields of that config under its own names (training settings,
LoRA, frozen, dtypes, are the caller's: merge them in). The ``kind``/``model`` pair is the shape
of ``configs/pixelllm.py``'s ``config.model.language_model``.

Both layouts transformers writes are read:

* 4.x files (the public checkpoints): ``rope_theta`` + ``rope_scaling`` (``rope_type`` or the
  older ``type``), Gemma 3's ``rope_local_base_freq`` and ``sliding_window_pattern``.
* 5.x files: ``rope_parameters``, flat or (Gemma 3) keyed by layer type
  ``{"full_attention": {...}, "sliding_attention": {...}}``, explicit ``layer_types``.

Gemma 3 multimodal files nest the language model under ``text_config``; it is read from there.
Defaults for absent keys are those of transformers' config classes of each family.

**T5's output rescale.** The original T5 multiplies the decoder output by ``d_model ** -0.5``
before the tied output projection; T5 v1.1 / Flan-T5 have an untied ``lm_head`` and no rescale.
transformers 4.x decides both from ``tie_word_embeddings`` (default true). transformers 5.x
(``configuration_t5.py``) keeps the rescale as ``scale_decoder_outputs = tie_word_embeddings is not
False`` and then always writes ``tie_word_embeddings: true`` beside ``scale_decoder_outputs``, so
a 5.x file can say "tied, not rescaled". Here ``scale_decoder_outputs`` is read when the file has
it and derived as 5.x does otherwise; ``tie_word_embeddings`` is read as written (a 5.x re-save of
an untied checkpoint therefore says tied; its weights then carry an ``lm_head.weight`` that
differs from ``shared.weight`` and the T5 loader refuses them by name rather than tying them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_FULL = "full_attention"
_SLIDING = "sliding_attention"

# model_type -> (family, rope_theta default) as in transformers' config classes.
_DECODER_FAMILIES = {
    "llama": ("llama", 10_000.0),
    "gemma": ("gemma", 10_000.0),
    "gemma2": ("gemma2", 10_000.0),
    "gemma3_text": ("gemma3", 1_000_000.0),
}
_GEMMA3_LOCAL_THETA = 10_000.0
_GEMMA3_PATTERN = 6
_GEMMA2_WINDOW = 4096
_GEMMA3_WINDOW = 4096
_MAX_POSITIONS = {"llama": 2048, "gemma": 8192, "gemma2": 8192, "gemma3": 131_072}
# transformers' ACT2FN names -> DecoderConfig.activation.
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


def read_config_json(source: str | os.PathLike | Mapping[str, Any]) -> tuple[dict, str]:
    """``(config, name)``: the parsed ``config.json`` and a name for error messages."""
    if isinstance(source, Mapping):
        return dict(source), "config mapping"
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    with open(path) as f:
        return json.load(f), str(path)


def language_model_config(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """``{"kind": "decoder" | "t5", "family": str, "model": {field: value}}`` from a config.json.

    Raises ``ValueError`` naming the file and key for a model type or setting this project does
    not implement (e.g. attention biases, an unsupported RoPE type or activation).
    """
    config, name = read_config_json(source)
    model_type = config.get("model_type")
    if model_type == "gemma3" and "text_config" in config:
        config = {"model_type": "gemma3_text", **config["text_config"]}
        model_type = "gemma3_text"
    if model_type == "t5":
        return {"kind": "t5", "family": "t5", "model": _t5_fields(config, name)}
    if model_type in _DECODER_FAMILIES:
        family, _ = _DECODER_FAMILIES[model_type]
        return {"kind": "decoder", "family": family,
                "model": _decoder_fields(config, name, model_type)}
    raise ValueError(f"{name}: model_type {model_type!r} is not supported; expected t5 or one of "
                     f"{sorted(_DECODER_FAMILIES)} (or gemma3 with a text_config)")


def _require(config: Mapping, name: str, key: str) -> Any:
    if key not in config:
        raise ValueError(f"{name}: missing key {key!r}")
    return config[key]


def _refuse_if(config: Mapping, name: str, key: str, what: str) -> None:
    if config.get(key):
        raise ValueError(f"{name}: {key}={config[key]!r} ({what}) is not implemented")


def _whole(value: float | int | None) -> int | float | None:
    """JSON writes some integer settings as floats (``256.0``); keep integers integral."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _decoder_fields(config: Mapping, name: str, model_type: str) -> dict[str, Any]:
    family, default_theta = _DECODER_FAMILIES[model_type]
    gemma = family != "llama"
    for key, what in (("attention_bias", "biases on q/k/v/o"), ("mlp_bias", "MLP biases"),
                      ("use_bidirectional_attention", "bidirectional attention")):
        _refuse_if(config, name, key, what)
    num_layers = _require(config, name, "num_hidden_layers")
    num_heads = _require(config, name, "num_attention_heads")
    hidden_size = _require(config, name, "hidden_size")
    layer_types, sliding_window = _layer_types(config, family, num_layers)
    rope_theta, rope_scaling, local_rope_theta = _rope(config, name, family, default_theta)
    post_norms = family in ("gemma2", "gemma3")
    return {
        "vocab_size": _require(config, name, "vocab_size"),
        "hidden_size": hidden_size,
        "intermediate_size": _require(config, name, "intermediate_size"),
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": config.get("num_key_value_heads") or num_heads,
        "head_dim": config.get("head_dim") or (256 if gemma else hidden_size // num_heads),
        "activation": _activation(config, name, family),
        "norm_eps": config.get("rms_norm_eps", 1e-6),
        "norm_plus_one": gemma,
        "scale_embeddings": gemma,
        "tie_word_embeddings": config.get("tie_word_embeddings", gemma),
        "post_norms": post_norms,
        "qk_norm": family == "gemma3",
        "query_pre_attn_scalar": (_whole(config.get("query_pre_attn_scalar", 256)) if post_norms
                                  else None),
        "attn_logit_softcap": config.get("attn_logit_softcapping",
                                         50.0 if family == "gemma2" else None),
        "final_logit_softcap": config.get("final_logit_softcapping",
                                          30.0 if family == "gemma2" else None),
        "layer_types": layer_types,
        "sliding_window": sliding_window,
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "local_rope_theta": local_rope_theta,
        "max_position_embeddings": config.get("max_position_embeddings", _MAX_POSITIONS[family]),
    }


def _activation(config: Mapping, name: str, family: str) -> str:
    if family == "gemma":
        # Gemma 1 files say hidden_act "gelu"; transformers runs the tanh GELU for it (4.x through
        # hidden_activation's default, 5.x by rewriting the legacy value).
        key = "hidden_activation" if config.get("hidden_activation") else "hidden_act"
        value = config.get(key, "gelu_pytorch_tanh")
        value = "gelu_pytorch_tanh" if value == "gelu" else value
    elif family == "llama":
        key, value = "hidden_act", config.get("hidden_act", "silu")
    else:
        key, value = "hidden_activation", config.get("hidden_activation", "gelu_pytorch_tanh")
    if value not in _ACTIVATIONS:
        raise ValueError(f"{name}: {key}={value!r} is not implemented; expected one of "
                         f"{sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[value]


def _layer_types(config: Mapping, family: str,
                 num_layers: int) -> tuple[tuple[str, ...] | None, int | None]:
    """``(layer_types, sliding_window)``; ``(None, None)`` for all-full families."""
    if family in ("llama", "gemma"):
        return None, None
    if config.get("layer_types"):
        types = tuple(config["layer_types"])
    elif family == "gemma2":
        # Gemma2Config: sliding first, then alternating.
        types = tuple(_SLIDING if (i + 1) % 2 else _FULL for i in range(num_layers))
    else:
        pattern = config.get("sliding_window_pattern",
                             config.get("_sliding_window_pattern", _GEMMA3_PATTERN))
        types = tuple(_SLIDING if (i + 1) % pattern else _FULL for i in range(num_layers))
    window = config.get("sliding_window",
                        _GEMMA2_WINDOW if family == "gemma2" else _GEMMA3_WINDOW)
    return types, window


def _rope(config: Mapping, name: str, family: str,
          default_theta: float) -> tuple[float, dict | None, float | None]:
    """``(rope_theta, rope_scaling, local_rope_theta)`` from either file layout."""
    parameters = config.get("rope_parameters")
    if parameters is not None:
        if _FULL in parameters or _SLIDING in parameters:
            full, sliding = dict(parameters.get(_FULL) or {}), parameters.get(_SLIDING)
        else:
            full, sliding = dict(parameters), None
    else:
        full = dict(config.get("rope_scaling") or {})
        full.setdefault("rope_theta", config.get("rope_theta", default_theta))
        sliding = ({"rope_type": "default",
                    "rope_theta": config.get("rope_local_base_freq", _GEMMA3_LOCAL_THETA)}
                   if family == "gemma3" else None)
    if family == "gemma3" and sliding is None:
        sliding = {"rope_type": "default", "rope_theta": _GEMMA3_LOCAL_THETA}
    theta = float(full.get("rope_theta", default_theta))
    scaling = _rope_scaling(full, name, "full-attention" if sliding else "")
    local_theta = None
    if sliding is not None:
        if _rope_scaling(dict(sliding), name, "sliding-attention") is not None:
            raise ValueError(f"{name}: RoPE scaling on sliding-attention layers is not implemented")
        local_theta = float(sliding.get("rope_theta", _GEMMA3_LOCAL_THETA))
    return theta, scaling, local_theta


def _rope_scaling(parameters: Mapping, name: str, where: str) -> dict | None:
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type == "linear":
        return {"rope_type": "linear", "factor": float(parameters["factor"])}
    if rope_type == "llama3":
        return {"rope_type": "llama3", "factor": float(parameters["factor"]),
                "low_freq_factor": float(parameters["low_freq_factor"]),
                "high_freq_factor": float(parameters["high_freq_factor"]),
                "original_max_position_embeddings":
                    int(parameters["original_max_position_embeddings"])}
    raise ValueError(f"{name}: {where + ' ' if where else ''}rope_type {rope_type!r} is not "
                     "implemented; expected default, linear or llama3")


def _t5_fields(config: Mapping, name: str) -> dict[str, Any]:
    num_layers = _require(config, name, "num_layers")
    tied = config.get("tie_word_embeddings", True)
    pad = config.get("pad_token_id", 0)
    eos = config.get("eos_token_id", 1)
    if not isinstance(eos, int):
        raise ValueError(f"{name}: eos_token_id {eos!r}: expected one token id")
    return {
        "vocab_size": _require(config, name, "vocab_size"),
        "d_model": _require(config, name, "d_model"),
        "d_kv": _require(config, name, "d_kv"),
        "d_ff": _require(config, name, "d_ff"),
        "num_layers": num_layers,
        "num_decoder_layers": config.get("num_decoder_layers") or num_layers,
        "num_heads": _require(config, name, "num_heads"),
        "relative_attention_num_buckets": config.get("relative_attention_num_buckets", 32),
        "relative_attention_max_distance": config.get("relative_attention_max_distance", 128),
        "layer_norm_epsilon": config.get("layer_norm_epsilon", 1e-6),
        "feed_forward_proj": config.get("feed_forward_proj", "relu"),
        "tie_word_embeddings": tied,
        "scale_decoder_outputs": config.get("scale_decoder_outputs", tied is not False),
        "dropout_rate": config.get("dropout_rate", 0.1),
        "pad_token_id": pad,
        "eos_token_id": eos,
        "decoder_start_token_id": config.get("decoder_start_token_id", pad),
    }
