"""Decoder-only language models: Llama 3.x, Gemma 1, Gemma 2 and Gemma 3 (text), one implementation.

The families differ only by :class:`DecoderConfig` switches, set as in Hugging Face transformers'
``llama``/``gemma``/``gemma2``/``gemma3`` modeling code:

======================  ==========  ==========  ==============  ================
switch                  Llama 3.x   Gemma 1     Gemma 2         Gemma 3
======================  ==========  ==========  ==============  ================
activation              silu        gelu_tanh   gelu_tanh       gelu_tanh
norm_plus_one           no (x·w)    x·(1+w)     x·(1+w)         x·(1+w)
scale_embeddings (√D)   no          yes         yes             yes
post_norms              no          no          yes             yes
qk_norm                 no          no          no              yes
query_pre_attn_scalar   head_dim    head_dim    256 (config)    256 (config)
logit soft-caps         none        none        attn 50, fin 30 none
layer_types             all full    all full    sliding/full    5 sliding : 1 full
local_rope_theta        -           -           - (shared)      1e4 (global 1e6)
rope_scaling            llama3      none        none            linear (4B+)
======================  ==========  ==========  ==============  ================

Visual tokens enter as a prefix of *embeddings*: ``embed(tokens)`` already includes Gemma's
``√D`` scale, and ``__call__(embeddings=...)`` takes the residual-stream input as is (no scale), so
``jnp.concatenate([visual_tokens, model.embed(tokens)], axis=1)`` leaves the visual tokens
unscaled. This matches transformers 5.x, where the scale lives in the embedding layer and
``inputs_embeds`` are used unchanged.

KV cache (``init_cache``), a dict whose leaves all have the batch on axis 0 (so beam search can
reorder it with ``jnp.take(leaf, index, axis=0)``); ``S`` (max length) is static::

    {"end_index": int32 [B]          slots written so far per sequence (the next write goes there),
     "positions": int32 [B, S]       position of the token in each slot, -1 for an empty slot,
     "layer_0":   {"k": [B, S, K, Dh], "v": [B, S, K, Dh]},     K = num_kv_heads, Dh = head_dim
     ...,
     "layer_{n-1}": {...}}

A call with ``L`` tokens writes them all at slots ``end_index[b] + j`` (slots past ``S`` are
dropped), padding tokens with position -1, then advances ``end_index[b]`` by the number of valid
tokens: within one call the valid tokens of a sequence must come first (right padding), and the
next call overwrites the padding. Prefill (a right-padded prompt batch) and one-token extension go
through the same ``__call__``. With ``positions = arange`` per sequence, ``end_index`` is the
position of the next token. Attention is decided by positions, not slots: a query at position
``p`` sees the slots holding positions ``0 <= q <= p`` (and ``p - q < sliding_window`` on sliding
layers). Sliding layers keep all ``S`` slots.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelllm.checkpoints import assign as assign_lib
from pixelllm.nn import lora

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
_ACTIVATIONS = {
    "silu": jax.nn.silu,
    # transformers' gelu_pytorch_tanh.
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE frequency scaling, as transformers' ``rope_parameters``.

    ``linear``: every inverse frequency divided by ``factor`` (Gemma 3 4B+ global layers).
    ``llama3``: wavelengths above ``original_max_position_embeddings / low_freq_factor`` divided by
    ``factor``, below ``.../high_freq_factor`` kept, smoothly interpolated in between.
    """
    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in _ROPE_TYPES[1:]:
            raise ValueError(f"rope_type {self.rope_type!r} not supported; choose from {_ROPE_TYPES[1:]}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRASettings:
    """Adapters on the projections named in ``targets`` (subset of :data:`LORA_TARGETS`);
    ``rank`` 0 means none; scale ``alpha / rank`` (PEFT convention)."""
    rank: int = 0
    alpha: float = 1.0
    targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self):
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown:
            raise ValueError(f"unknown LoRA targets {unknown}; choose from {LORA_TARGETS}")

    def rank_of(self, name: str) -> int:
        return self.rank if name in self.targets else 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """Architecture of a decoder-only LM; see the module docstring for each family's switches.

    ``layer_types``: one of ``"full_attention"``/``"sliding_attention"`` per layer (``None``: all
    full). ``rope_theta``/``rope_scaling`` apply to full layers, and to sliding layers too unless
    ``local_rope_theta`` is set (Gemma 3: sliding layers use unscaled RoPE with that base).
    ``query_pre_attn_scalar``: attention logits are scaled by its ``-1/2`` power (``None``:
    ``head_dim``). ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype.
    ``max_position_embeddings`` is the pretrained context length (informative; nothing enforces it).
    """
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    activation: str = "silu"
    norm_eps: float = 1e-6
    norm_plus_one: bool = False
    scale_embeddings: bool = False
    tie_embeddings: bool = False
    post_norms: bool = False
    qk_norm: bool = False
    query_pre_attn_scalar: int | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    layer_types: tuple[str, ...] | None = None
    sliding_window: int | None = None
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    local_rope_theta: float | None = None
    max_position_embeddings: int = 8192
    lora: LoRASettings = LoRASettings()
    frozen: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r}; choose from {sorted(_ACTIVATIONS)}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        types = self.types
        if len(types) != self.num_layers:
            raise ValueError(f"{len(types)} layer_types for {self.num_layers} layers")
        unknown = sorted(set(types) - {FULL_ATTENTION, SLIDING_ATTENTION})
        if unknown:
            raise ValueError(f"unknown layer types {unknown}")
        if SLIDING_ATTENTION in types and not self.sliding_window:
            raise ValueError("sliding_attention layers need a sliding_window")

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(self.layer_types) if self.layer_types else (FULL_ATTENTION,) * self.num_layers

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> DecoderConfig:
        """From a config mapping (e.g. ``configs/decoder_lm.py``'s ``config.model``) with nested
        ``lora`` and ``rope_scaling`` mappings; unknown keys raise ``TypeError``."""
        values = dict(mapping.to_dict() if hasattr(mapping, "to_dict") else mapping)
        lora_values = dict(values.pop("lora", None) or {})
        if "targets" in lora_values:
            lora_values["targets"] = tuple(lora_values["targets"])
        values["lora"] = LoRASettings(**lora_values)
        scaling = values.get("rope_scaling")
        values["rope_scaling"] = RopeScaling(**scaling) if scaling else None
        if values.get("layer_types") is not None:
            values["layer_types"] = tuple(values["layer_types"])
        return cls(**values)


def as_config(config: DecoderConfig | Mapping[str, Any]) -> DecoderConfig:
    return config if isinstance(config, DecoderConfig) else DecoderConfig.from_mapping(config)


class DecoderOutput(NamedTuple):
    """``logits``: float32 [B, L, V] (after the final soft-cap, if any); ``hidden``: [B, L, D]
    after the final norm, in the compute dtype; ``cache``: the updated cache, or ``None``."""
    logits: jax.Array
    hidden: jax.Array
    cache: dict | None


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` float32, computed in float32 as transformers does."""
    inv_freq = np.float32(1.0) / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32)
                                                       / np.float32(head_dim)))
    if scaling is None:
        return inv_freq
    factor = np.float32(scaling.factor)
    if scaling.rope_type == "linear":
        return inv_freq / factor
    old_context = np.float32(scaling.original_max_position_embeddings)
    low, high = np.float32(scaling.low_freq_factor), np.float32(scaling.high_freq_factor)
    wavelen = np.float32(2 * math.pi) / inv_freq
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Half-split RoPE (transformers' ``rotate_half``). ``x: [B, L, N, Dh]``, ``positions: [B, L]``."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def attention_mask(query_positions: jax.Array, key_positions: jax.Array,
                   sliding_window: int | None) -> jax.Array:
    """``[B, L, S]`` bool: causal by position, keys at position -1 are empty slots or padding.
    ``query_positions: [B, L]``, ``key_positions: [B, S]``."""
    q, k = query_positions[:, :, None], key_positions[:, None, :]
    mask = (k >= 0) & (k <= q)
    if sliding_window is not None:
        mask &= q - k < sliding_window
    return mask


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else jnp.tanh(x / cap) * cap


class RMSNorm(nnx.Module):
    """RMS norm over the last axis in float32: ``(x̂ · w)`` cast back (Llama casts x̂ first), or
    ``x̂ · (1 + w)`` then cast (Gemma; zero-initialised). ``x: [..., features]``."""

    def __init__(self, features: int, *, eps: float, plus_one: bool, axis: str, frozen: bool,
                 param_dtype: jnp.dtype):
        self.eps, self.plus_one = eps, plus_one
        init = jnp.zeros if plus_one else jnp.ones
        self.scale = lora.weight(init((features,), param_dtype), (axis,), frozen=frozen)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale.get_value()
        if self.plus_one:
            return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
        return normed.astype(x.dtype) * scale.astype(x.dtype)


def _norm(config: DecoderConfig, features: int, axis: str = "embed") -> RMSNorm:
    return RMSNorm(features, eps=config.norm_eps, plus_one=config.norm_plus_one, axis=axis,
                   frozen=config.frozen, param_dtype=jnp.dtype(config.param_dtype))


def _projection(config: DecoderConfig, name: str, in_features: int, out_features: int,
                axes: tuple[str, str], rngs: nnx.Rngs) -> lora.LoRALinear:
    return lora.LoRALinear(in_features, out_features, axes=axes, rngs=rngs,
                           rank=config.lora.rank_of(name), scale=config.lora.scale,
                           frozen=config.frozen, dtype=jnp.dtype(config.dtype),
                           param_dtype=jnp.dtype(config.param_dtype))


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE, optional per-head q/k norms and logit soft-cap.
    ``x: [B, L, D] -> [B, L, D]``."""

    def __init__(self, config: DecoderConfig, *, sliding: bool, rngs: nnx.Rngs):
        c = config
        self.config, self.sliding = c, sliding
        width, kv_width = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.q = _projection(c, "q", c.hidden_size, width, ("embed", "heads"), rngs)
        self.k = _projection(c, "k", c.hidden_size, kv_width, ("embed", "heads"), rngs)
        self.v = _projection(c, "v", c.hidden_size, kv_width, ("embed", "heads"), rngs)
        self.o = _projection(c, "o", width, c.hidden_size, ("heads", "embed"), rngs)
        self.q_norm = _norm(c, c.head_dim, "kv") if c.qk_norm else None
        self.k_norm = _norm(c, c.head_dim, "kv") if c.qk_norm else None

    def __call__(self, x: jax.Array, *, positions: jax.Array, mask: jax.Array,
                 slots: jax.Array | None, layer_cache: dict | None) -> tuple[jax.Array, dict | None]:
        """``positions: [B, L]``; ``mask: [B, L, S]`` over the keys (the cache's ``S`` slots, or
        the ``L`` inputs without a cache); ``slots: [B, L]`` cache slots to write."""
        c = self.config
        batch, length, _ = x.shape
        q = self.q(x).reshape(batch, length, c.num_heads, c.head_dim)
        k = self.k(x).reshape(batch, length, c.num_kv_heads, c.head_dim)
        v = self.v(x).reshape(batch, length, c.num_kv_heads, c.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.sliding and c.local_rope_theta is not None:
            inv_freq = rope_inv_freq(c.head_dim, c.local_rope_theta, None)
        else:
            inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)

        new_cache = None
        if layer_cache is not None:
            rows = jnp.arange(batch)[:, None]
            new_cache = {
                name: layer_cache[name].at[rows, slots].set(value.astype(layer_cache[name].dtype),
                                                            mode="drop")
                for name, value in (("k", k), ("v", v))}
            k, v = new_cache["k"].astype(q.dtype), new_cache["v"].astype(q.dtype)

        groups = c.num_heads // c.num_kv_heads
        # Query head h uses kv head h // groups, as transformers' repeat_kv.
        q = q.reshape(batch, length, c.num_kv_heads, groups, c.head_dim)
        logits = jnp.einsum("blkgd,bskd->bkgls", q, k, preferred_element_type=jnp.float32)
        logits = _softcap(logits * (c.query_pre_attn_scalar or c.head_dim) ** -0.5,
                          c.attn_logit_softcap)
        # A finite fill keeps rows without any visible key (padding) free of NaNs.
        logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgls,bskd->blkgd", probs, v).reshape(batch, length, -1)
        return self.o(out), new_cache


class MLP(nnx.Module):
    """Gated feed-forward ``down(act(gate(x)) * up(x))``. ``x: [B, L, D] -> [B, L, D]``."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        c = config
        self.activation = c.activation
        self.gate = _projection(c, "gate", c.hidden_size, c.intermediate_size, ("embed", "mlp"), rngs)
        self.up = _projection(c, "up", c.hidden_size, c.intermediate_size, ("embed", "mlp"), rngs)
        self.down = _projection(c, "down", c.intermediate_size, c.hidden_size, ("mlp", "embed"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(_ACTIVATIONS[self.activation](self.gate(x)) * self.up(x))


class DecoderBlock(nnx.Module):
    """Pre-norm block; with ``post_norms`` (Gemma 2/3) the attention and MLP outputs are normed
    again before their residual adds. ``x: [B, L, D] -> [B, L, D]``."""

    def __init__(self, config: DecoderConfig, *, sliding: bool, rngs: nnx.Rngs):
        c = config
        self.input_norm = _norm(c, c.hidden_size)
        self.attn = Attention(c, sliding=sliding, rngs=rngs)
        self.post_attn_norm = _norm(c, c.hidden_size) if c.post_norms else None
        self.pre_ffw_norm = _norm(c, c.hidden_size)
        self.mlp = MLP(c, rngs=rngs)
        self.post_ffw_norm = _norm(c, c.hidden_size) if c.post_norms else None

    def __call__(self, x: jax.Array, *, positions: jax.Array, mask: jax.Array,
                 slots: jax.Array | None, layer_cache: dict | None) -> tuple[jax.Array, dict | None]:
        h, new_cache = self.attn(self.input_norm(x), positions=positions, mask=mask, slots=slots,
                                 layer_cache=layer_cache)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.pre_ffw_norm(x))
        if self.post_ffw_norm is not None:
            h = self.post_ffw_norm(h)
        return x + h, new_cache


class DecoderLM(nnx.Module):
    """A decoder-only LM with a frozen base and optional LoRA adapters (``config.lora``).

    ``config``: a :class:`DecoderConfig` or a mapping for :meth:`DecoderConfig.from_mapping`.
    """

    def __init__(self, config: DecoderConfig | Mapping[str, Any], *, rngs: nnx.Rngs):
        c = self.config = as_config(config)
        param_dtype = jnp.dtype(c.param_dtype)
        self.embedding = lora.weight(
            nnx.initializers.normal(0.02)(rngs.params(), (c.vocab_size, c.hidden_size), param_dtype),
            ("vocab", "embed"), frozen=c.frozen)
        self.layers = nnx.List([DecoderBlock(c, sliding=t == SLIDING_ATTENTION, rngs=rngs)
                                for t in c.types])
        self.final_norm = _norm(c, c.hidden_size)
        self.lm_head = None if c.tie_embeddings else lora.weight(
            nnx.initializers.lecun_normal()(rngs.params(), (c.hidden_size, c.vocab_size), param_dtype),
            ("embed", "vocab"), frozen=c.frozen)

    @classmethod
    def from_config(cls, model_config: Mapping[str, Any], *, rngs: nnx.Rngs) -> DecoderLM:
        """From the ``model`` field of ``configs/decoder_lm.py``."""
        return cls(model_config, rngs=rngs)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token embeddings ``[B, L] -> [B, L, D]`` in the compute dtype, with Gemma's ``√D`` scale
        (the constant rounded to float32, then to the compute dtype, as transformers)."""
        dtype = jnp.dtype(self.config.dtype)
        x = jnp.take(self.embedding.get_value(), tokens, axis=0).astype(dtype)
        if self.config.scale_embeddings:
            x = x * jnp.asarray(np.float32(math.sqrt(self.config.hidden_size)), dtype)
        return x

    def init_cache(self, batch_size: int, max_length: int, dtype: jnp.dtype | None = None) -> dict:
        """An empty cache for ``batch_size`` sequences of up to ``max_length`` tokens (see the
        module docstring); ``dtype`` of the keys/values defaults to the compute dtype."""
        c = self.config
        dtype = jnp.dtype(dtype or c.dtype)
        kv_shape = (batch_size, max_length, c.num_kv_heads, c.head_dim)
        cache = {"end_index": jnp.zeros((batch_size,), jnp.int32),
                 "positions": jnp.full((batch_size, max_length), -1, jnp.int32)}
        for i in range(c.num_layers):
            cache[f"layer_{i}"] = {"k": jnp.zeros(kv_shape, dtype), "v": jnp.zeros(kv_shape, dtype)}
        return cache

    @staticmethod
    def cache_logical_axes(cache: dict) -> dict:
        """The logical axis names of every cache leaf (same tree), to shard the cache with
        :func:`pixelllm.sharding.array_shardings` like the keys/values that fill it."""
        kv = ("batch", "length", "heads", "kv")
        return {name: ({"k": kv, "v": kv} if name.startswith("layer_")
                       else ("batch",) if name == "end_index" else ("batch", "length"))
                for name in cache}

    def __call__(self, *, tokens: jax.Array | None = None, embeddings: jax.Array | None = None,
                 positions: jax.Array, input_mask: jax.Array,
                 cache: dict | None = None) -> DecoderOutput:
        """Runs the model over ``L`` new inputs.

        Args:
          tokens: int [B, L] token ids, or
          embeddings: [B, L, D] residual-stream inputs (e.g. visual tokens then ``embed(tokens)``).
          positions: int [B, L] RoPE positions (>= 0), e.g. ``arange(L)`` for a prompt and
            ``cache["end_index"][:, None]`` for the next token.
          input_mask: bool [B, L], False on padding (valid tokens first when a cache is given).
          cache: from :meth:`init_cache` or a previous call; None attends within the inputs only.
        """
        if (tokens is None) == (embeddings is None):
            raise ValueError("pass exactly one of tokens and embeddings")
        c = self.config
        x = self.embed(tokens) if tokens is not None else embeddings.astype(jnp.dtype(c.dtype))
        batch, length = x.shape[:2]
        positions = positions.astype(jnp.int32)
        input_mask = input_mask.astype(bool)
        new_positions = jnp.where(input_mask, positions, -1)
        if cache is None:
            slots, key_positions = None, new_positions
        else:
            slots = cache["end_index"][:, None] + jnp.arange(length, dtype=jnp.int32)[None]
            key_positions = cache["positions"].at[jnp.arange(batch)[:, None], slots].set(
                new_positions, mode="drop")
        masks = {t: attention_mask(positions, key_positions,
                                   c.sliding_window if t == SLIDING_ATTENTION else None)
                 for t in set(c.types)}

        new_cache = None if cache is None else {
            "end_index": cache["end_index"] + input_mask.sum(axis=-1, dtype=jnp.int32),
            "positions": key_positions}
        for i, (layer, layer_type) in enumerate(zip(self.layers, c.types)):
            x, layer_cache = layer(x, positions=positions, mask=masks[layer_type], slots=slots,
                                   layer_cache=None if cache is None else cache[f"layer_{i}"])
            if new_cache is not None:
                new_cache[f"layer_{i}"] = layer_cache
        hidden = self.final_norm(x)

        if self.lm_head is None:
            logits = jnp.einsum("bld,vd->blv", hidden, self.embedding.get_value().astype(hidden.dtype),
                                preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("bld,dv->blv", hidden, self.lm_head.get_value().astype(hidden.dtype),
                                preferred_element_type=jnp.float32)
        return DecoderOutput(logits=_softcap(logits, c.final_logit_softcap), hidden=hidden,
                             cache=new_cache)


# ----------------------------------------------------------------------------------------------
# Hugging Face checkpoints.

# Where the text model sits in a state dict: CausalLM files, Gemma 3 multimodal files as saved by
# transformers 4.5x and as named by 5.x, and bare base-model files.
_TEXT_PREFIXES = ("model.", "model.language_model.", "language_model.model.", "")


def _hf_layout(config: DecoderConfig) -> dict[str, tuple[str, tuple[int, ...], bool]]:
    """``{hf key without prefix: (nnx path, hf shape, transpose)}`` for the base weights."""
    c = config
    d, width, kv_width = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    layout = {"embed_tokens.weight": ("embedding", (c.vocab_size, d), False),
              "norm.weight": ("final_norm/scale", (d,), False)}
    for i in range(c.num_layers):
        hf, ours = f"layers.{i}.", f"layers/{i}/"
        for name, out_features, in_features in (("q", width, d), ("k", kv_width, d),
                                                ("v", kv_width, d), ("o", d, width)):
            layout[f"{hf}self_attn.{name}_proj.weight"] = (
                f"{ours}attn/{name}/kernel", (out_features, in_features), True)
        for name, out_features, in_features in (("gate", c.intermediate_size, d),
                                                ("up", c.intermediate_size, d),
                                                ("down", d, c.intermediate_size)):
            layout[f"{hf}mlp.{name}_proj.weight"] = (
                f"{ours}mlp/{name}/kernel", (out_features, in_features), True)
        norms = {"input_layernorm": "input_norm"}
        if c.post_norms:
            norms.update(post_attention_layernorm="post_attn_norm",
                         pre_feedforward_layernorm="pre_ffw_norm",
                         post_feedforward_layernorm="post_ffw_norm")
        else:
            # Llama/Gemma 1 call their pre-MLP norm "post_attention_layernorm".
            norms.update(post_attention_layernorm="pre_ffw_norm")
        for hf_name, our_name in norms.items():
            layout[f"{hf}{hf_name}.weight"] = (f"{ours}{our_name}/scale", (d,), False)
        if c.qk_norm:
            for name in ("q", "k"):
                layout[f"{hf}self_attn.{name}_norm.weight"] = (
                    f"{ours}attn/{name}_norm/scale", (c.head_dim,), False)
    return layout


def convert_state_dict(state_dict: Mapping[str, np.ndarray], config: DecoderConfig | Mapping[str, Any],
                       *, dtype: Any = np.float32, source: str = "state dict") -> dict[str, np.ndarray]:
    """Hugging Face Llama/Gemma/Gemma 2/Gemma 3 weights -> ``{nnx path: array}`` (base weights).

    Accepts ``model.*`` (CausalLM), ``model.language_model.*`` / ``language_model.model.*``
    (Gemma 3 multimodal; drop the vision keys first) and prefix-less base-model keys. torch Linear
    ``(out, in)`` kernels are transposed to ``(in, out)``; arrays are cast to ``dtype``. A tied
    model accepts an ``lm_head.weight`` only when it equals the embedding (torch ``state_dict()``
    lists the shared tensor twice). Raises :class:`CheckpointMismatchError` naming every missing,
    unexpected or mis-shaped key. LoRA factors are not in these files.
    """
    c = as_config(config)
    prefix = next((p for p in _TEXT_PREFIXES if f"{p}embed_tokens.weight" in state_dict), "model.")
    head_key = "language_model.lm_head.weight" if prefix == "language_model.model." else "lm_head.weight"
    layout = _hf_layout(c)
    expected = {prefix + k: shape for k, (_, shape, _) in layout.items()}
    if not c.tie_embeddings:
        expected[head_key] = (c.vocab_size, c.hidden_size)
    found = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
    embed_key = prefix + "embed_tokens.weight"
    if (c.tie_embeddings and head_key in found and embed_key in found
            and found[head_key] == found[embed_key]
            and np.array_equal(state_dict[head_key], state_dict[embed_key])):
        del found[head_key]
    assign_lib.check_keys(source=source, expected=expected, found=found, what="Hugging Face keys")

    def convert(key, transpose):
        array = np.asarray(state_dict[key])
        return (array.T if transpose else array).astype(dtype, copy=False)

    arrays = {path: convert(prefix + k, transpose) for k, (path, _, transpose) in layout.items()}
    if not c.tie_embeddings:
        arrays["lm_head"] = convert(head_key, True)
    return arrays


def load_hf_weights(model: DecoderLM, state_dict: Mapping[str, np.ndarray], *,
                    source: str) -> DecoderLM:
    """Loads Hugging Face base weights into ``model`` in place, strictly (every base weight once,
    right shapes); LoRA factors keep their values. Returns the model."""
    arrays = convert_state_dict(state_dict, model.config, dtype=jnp.dtype(model.config.param_dtype),
                                source=source)
    return assign_lib.assign(model, arrays, source=source, wrt=lora.BASE_WEIGHTS)
