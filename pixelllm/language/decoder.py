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

The model implements :class:`~pixelllm.language.interface.LanguageModel` (``forward``,
``prefill``, ``decode_step``, ``add_token_rows``, ``load_hf_weights``).

Visual tokens enter as a prefix of *embeddings*: ``embed(tokens)`` already includes Gemma's
``√D`` scale, and ``__call__(embeddings=...)`` takes the residual-stream input as is (no scale), so
``jnp.concatenate([visual_tokens, model.embed(tokens)], axis=1)`` leaves the visual tokens
unscaled. This matches transformers 5.x, where the scale lives in the embedding layer and
``inputs_embeds`` are used unchanged.

**Dropout**: the base model has none (Llama and Gemma train without). The only dropout is the
LoRA adapters' input dropout (``config.lora.dropout``, PEFT's ``lora_dropout``; see
:mod:`pixelllm.nn.lora`), active when ``rngs`` is passed to ``__call__``/``forward``
(training); without it the model is deterministic. Every layer draws its own masks: the layer
loop passes the same ``rngs`` on (each projection draws a fresh key), and under ``scan_layers``
one key per layer is split off before the scan.

KV cache (``init_cache``), a dict whose leaves all have the batch on axis 0 (so beam search can
reorder it with ``jnp.take(leaf, index, axis=0)``); ``S`` (max length) is static::

    {"end_index": int32 [B]          slots written so far per sequence (the next write goes there),
     "positions": int32 [B, S]       position of the token in each slot, -1 for an empty slot,
     "layer_0":   {"k": [B, S, K, Dh], "v": [B, S, K, Dh]},     K = num_kv_heads, Dh = head_dim
     ...,
     "layer_{n-1}": {...}}

With ``scan_layers`` the layers are one stacked leaf per tensor, the layer on axis 1 (the batch
stays on axis 0)::

    {"end_index": ..., "positions": ...,
     "layers": {"k": [B, n, S, K, Dh], "v": [B, n, S, K, Dh]}}

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
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelllm.checkpoints import key_map
from pixelllm.checkpoints.key_map import TRANSPOSE, Rule, prefixed
from pixelllm.language import decoding
from pixelllm.language.added_tokens import AddedTokenRows, AddedTokens
from pixelllm.language.interface import DecodeStart, TextOutput
from pixelllm.nn import activations, lora, output_projection
from pixelllm.nn import remat as remat_lib
from pixelllm.nn.lora import LoRASettings
from pixelllm.nn.norms import RMSNorm
from pixelllm.nn import stacked as stacked_lib

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
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
class DecoderConfig:
    """Architecture of a decoder-only LM; see the module docstring for each family's switches.

    ``layer_types``: one of ``"full_attention"``/``"sliding_attention"`` per layer (``None``: all
    full). ``rope_theta``/``rope_scaling`` apply to full layers, and to sliding layers too unless
    ``local_rope_theta`` is set (Gemma 3: sliding layers use unscaled RoPE with that base).
    ``query_pre_attn_scalar``: attention logits are scaled by its ``-1/2`` power (``None``:
    ``head_dim``). ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype.
    ``max_position_embeddings`` is the pretrained context length (informative; nothing enforces it).
    ``lora`` picks adapters among :data:`LORA_TARGETS`; ``remat`` is a policy name of
    :mod:`pixelllm.nn.remat` applied to every block. ``scan_layers`` stores the blocks stacked
    (parameters ``layers/...`` with a leading layer axis) and runs them with ``nnx.scan``, the
    attention type of each layer given to the one scanned block as data: one compiled block
    instead of ``num_layers``, same values.
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
    tie_word_embeddings: bool = False
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
    remat: str = "none"
    scan_layers: bool = False

    def __post_init__(self):
        self.lora.check_targets(LORA_TARGETS)
        remat_lib.check_remat(self.remat)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")
        activations.activation(self.activation)
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
        values["lora"] = LoRASettings.from_mapping(values.pop("lora", None))
        scaling = values.get("rope_scaling")
        values["rope_scaling"] = RopeScaling(**scaling) if scaling else None
        if values.get("layer_types") is not None:
            values["layer_types"] = tuple(values["layer_types"])
        return cls(**values)


def as_config(config: DecoderConfig | Mapping[str, Any]) -> DecoderConfig:
    return config if isinstance(config, DecoderConfig) else DecoderConfig.from_mapping(config)


class DecoderLMOutput(NamedTuple):
    """``logits``: float32 [B, L, V] (after the final soft-cap, if any; None when not asked
    for); ``hidden``: [B, L, D] after the final norm, in the compute dtype; ``cache``: the updated
    cache, or ``None``; ``attention``: ``{layer: float32 [B, H, L, S]}`` post-softmax
    probabilities of the requested layers over the ``S`` keys, or None; ``hidden_states``:
    ``{index: [B, L, D]}`` the requested residual-stream states in the compute dtype, indexed as
    transformers' ``output_hidden_states`` (:func:`hidden_state_indices`), or None."""
    logits: jax.Array | None
    hidden: jax.Array
    cache: dict | None
    attention: dict[int, jax.Array] | None = None
    hidden_states: dict[int, jax.Array] | None = None


def hidden_state_indices(num_layers: int) -> range:
    """The valid ``hidden_layers`` indices, those of transformers' ``output_hidden_states``
    tuple: 0 is the input of block 0 (the embeddings, Gemma's ``√D`` scale included), ``i`` in
    ``1 .. num_layers - 1`` the residual stream after block ``i - 1`` (0-based, as
    ``attention_layers``), and ``num_layers`` the final norm's output (``hidden``), as
    transformers replaces the last block's raw output by it."""
    return range(num_layers + 1)


def valid_positions(mask: jax.Array) -> jax.Array:
    """Positions that count valid inputs only: ``cumsum(mask) - 1`` (0 before the first).
    ``mask: [B, L]`` -> int32 ``[B, L]``."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


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


def _norm(config: DecoderConfig, features: int, axis: str = "embed") -> RMSNorm:
    return RMSNorm(features, eps=config.norm_eps, plus_one=config.norm_plus_one, axis=axis,
                   frozen=config.frozen, param_dtype=jnp.dtype(config.param_dtype))


def _projection(config: DecoderConfig, name: str, in_features: int, out_features: int,
                axes: tuple[str, str], rngs: nnx.Rngs) -> lora.LoRALinear:
    return lora.LoRALinear(in_features, out_features, axes=axes, rngs=rngs,
                           rank=config.lora.rank_of(name), scale=config.lora.scale,
                           dropout=config.lora.dropout,
                           frozen=config.frozen, dtype=jnp.dtype(config.dtype),
                           param_dtype=jnp.dtype(config.param_dtype))


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE, optional per-head q/k norms and logit soft-cap.
    ``x: [B, L, D] -> [B, L, D]``."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        width, kv_width = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.q = _projection(c, "q", c.hidden_size, width, ("embed", "heads"), rngs)
        self.k = _projection(c, "k", c.hidden_size, kv_width, ("embed", "heads"), rngs)
        self.v = _projection(c, "v", c.hidden_size, kv_width, ("embed", "heads"), rngs)
        self.o = _projection(c, "o", width, c.hidden_size, ("heads", "embed"), rngs)
        self.q_norm = _norm(c, c.head_dim, "kv") if c.qk_norm else None
        self.k_norm = _norm(c, c.head_dim, "kv") if c.qk_norm else None

    def __call__(self, x: jax.Array, *, positions: jax.Array, inv_freq: jax.Array,
                 mask: jax.Array, slots: jax.Array | None, layer_cache: dict | None,
                 rngs: nnx.Rngs | None = None) -> tuple[jax.Array, dict | None, jax.Array]:
        """``positions: [B, L]``; ``inv_freq: [Dh / 2]`` this layer's RoPE frequencies;
        ``mask: [B, L, S]`` over the keys (the cache's ``S`` slots, or the ``L`` inputs without
        a cache); ``slots: [B, L]`` cache slots to write; ``rngs`` enables LoRA dropout. Returns
        the output, the updated layer cache and the float32 probabilities ``[B, H, L, S]``."""
        c = self.config
        batch, length, _ = x.shape
        q = self.q(x, rngs=rngs).reshape(batch, length, c.num_heads, c.head_dim)
        k = self.k(x, rngs=rngs).reshape(batch, length, c.num_kv_heads, c.head_dim)
        v = self.v(x, rngs=rngs).reshape(batch, length, c.num_kv_heads, c.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
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
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bkgls,bskd->blkgd", probs.astype(v.dtype), v).reshape(batch, length, -1)
        return self.o(out, rngs=rngs), new_cache, probs.reshape(batch, c.num_heads, length, -1)


class MLP(nnx.Module):
    """Gated feed-forward ``down(act(gate(x)) * up(x))``. ``x: [B, L, D] -> [B, L, D]``."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        c = config
        self.activation = activations.activation(c.activation)
        self.gate = _projection(c, "gate", c.hidden_size, c.intermediate_size, ("embed", "mlp"), rngs)
        self.up = _projection(c, "up", c.hidden_size, c.intermediate_size, ("embed", "mlp"), rngs)
        self.down = _projection(c, "down", c.intermediate_size, c.hidden_size, ("mlp", "embed"), rngs)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """``rngs`` enables LoRA dropout."""
        h = self.activation(self.gate(x, rngs=rngs)) * self.up(x, rngs=rngs)
        return self.down(h, rngs=rngs)


class DecoderBlock(nnx.Module):
    """Pre-norm block; with ``post_norms`` (Gemma 2/3) the attention and MLP outputs are normed
    again before their residual adds. ``x: [B, L, D] -> [B, L, D]``."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        c = config
        self.input_norm = _norm(c, c.hidden_size)
        self.attn = Attention(c, rngs=rngs)
        self.post_attn_norm = _norm(c, c.hidden_size) if c.post_norms else None
        self.pre_ffw_norm = _norm(c, c.hidden_size)
        self.mlp = MLP(c, rngs=rngs)
        self.post_ffw_norm = _norm(c, c.hidden_size) if c.post_norms else None

    def __call__(self, x: jax.Array, *, positions: jax.Array, inv_freq: jax.Array,
                 mask: jax.Array, slots: jax.Array | None, layer_cache: dict | None,
                 rngs: nnx.Rngs | None = None) -> tuple[jax.Array, dict | None, jax.Array]:
        """Arguments as :class:`Attention`'s. Returns the output, the updated layer cache and the
        attention probabilities."""
        h, new_cache, probs = self.attn(self.input_norm(x), positions=positions, inv_freq=inv_freq,
                                        mask=mask, slots=slots, layer_cache=layer_cache, rngs=rngs)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.pre_ffw_norm(x), rngs=rngs)
        if self.post_ffw_norm is not None:
            h = self.post_ffw_norm(h)
        return x + h, new_cache, probs


class DecoderLM(AddedTokenRows, nnx.Module):
    """A decoder-only LM with a frozen base and optional LoRA adapters (``config.lora``).

    ``config``: a :class:`DecoderConfig` or a mapping for :meth:`DecoderConfig.from_mapping`.
    """

    def __init__(self, config: DecoderConfig | Mapping[str, Any], *, rngs: nnx.Rngs):
        c = self.config = as_config(config)
        param_dtype = jnp.dtype(c.param_dtype)
        self.embedding = lora.weight(
            nnx.initializers.normal(0.02)(rngs.params(), (c.vocab_size, c.hidden_size), param_dtype),
            ("vocab", "embed"), frozen=c.frozen)
        blocks = [DecoderBlock(c, rngs=rngs) for _ in range(c.num_layers)]
        # Built one by one either way, so both layouts start from the same weights.
        self.layers = stacked_lib.stack_modules(blocks) if c.scan_layers else nnx.List(blocks)
        self.final_norm = _norm(c, c.hidden_size)
        self.lm_head = None if c.tie_word_embeddings else lora.weight(
            nnx.initializers.lecun_normal()(rngs.params(), (c.hidden_size, c.vocab_size), param_dtype),
            ("embed", "vocab"), frozen=c.frozen)
        # Data (not static) although None until add_token_rows fills it.
        self.added_tokens: AddedTokens | None = nnx.data(None)

    @classmethod
    def from_config(cls, model_config: Mapping[str, Any], *, rngs: nnx.Rngs) -> DecoderLM:
        """From the ``model`` field of ``configs/decoder_lm.py``."""
        return cls(model_config, rngs=rngs)

    @property
    def width(self) -> int:
        return self.config.hidden_size

    def embed(self, tokens: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Token embeddings ``[B, L] -> [B, L, D]`` in the compute dtype, with Gemma's ``√D`` scale
        (the constant rounded to float32, then to the compute dtype, as transformers).
        ``rngs`` is accepted for the interface: this model has no input dropout."""
        del rngs
        dtype = jnp.dtype(self.config.dtype)
        table = self.embedding.get_value()
        if self.added_tokens is None:
            x = jnp.take(table, tokens, axis=0)
        else:
            x = self.added_tokens.embed(table, tokens)
        x = x.astype(dtype)
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
        if c.scan_layers:
            stacked = (batch_size, c.num_layers, *kv_shape[1:])
            # Separate buffers per leaf, so a jitted step may donate the cache.
            cache["layers"] = {"k": jnp.zeros(stacked, dtype), "v": jnp.zeros(stacked, dtype)}
            return cache
        for i in range(c.num_layers):
            cache[f"layer_{i}"] = {"k": jnp.zeros(kv_shape, dtype), "v": jnp.zeros(kv_shape, dtype)}
        return cache

    @staticmethod
    def cache_logical_axes(cache: dict) -> dict:
        """The logical axis names of every cache leaf (same tree), to shard the cache with
        :func:`pixelllm.sharding.array_shardings` like the keys/values that fill it."""
        kv = ("batch", "length", "heads", "kv")
        # Stacked (scanned) layers carry the layer on axis 1, never sharded.
        layer_axes = lambda leaf: kv if leaf.ndim == len(kv) else ("batch", None, *kv[1:])
        return {name: (("batch",) if name == "end_index" else ("batch", "length")
                       if name == "positions" else jax.tree.map(layer_axes, value))
                for name, value in cache.items()}

    def __call__(self, *, tokens: jax.Array | None = None, embeddings: jax.Array | None = None,
                 positions: jax.Array, input_mask: jax.Array, cache: dict | None = None,
                 attention_layers: Sequence[int] = (), hidden_layers: Sequence[int] = (),
                 with_logits: bool = True, rngs: nnx.Rngs | None = None) -> DecoderLMOutput:
        """Runs the model over ``L`` new inputs.

        Args:
          tokens: int [B, L] token ids, or
          embeddings: [B, L, D] residual-stream inputs (e.g. visual tokens then ``embed(tokens)``).
          positions: int [B, L] RoPE positions (>= 0), e.g. ``arange(L)`` for a prompt and
            ``cache["end_index"][:, None]`` for the next token.
          input_mask: bool [B, L], False on padding (valid tokens first when a cache is given).
          cache: from :meth:`init_cache` or a previous call; None attends within the inputs only.
          attention_layers: layers whose attention probabilities are returned.
          hidden_layers: indices of :func:`hidden_state_indices` whose residual-stream states are
            returned. Per layer, states not asked for cost nothing; under ``scan_layers`` see
            :meth:`_scan_blocks`.
          with_logits: False leaves ``logits`` None (a caller that needs them for some
            positions only projects those, :meth:`logits`).
          rngs: enables LoRA dropout (training); None is deterministic.
        """
        if (tokens is None) == (embeddings is None):
            raise ValueError("pass exactly one of tokens and embeddings")
        c = self.config
        _check_indices("attention_layers", attention_layers, range(c.num_layers), c.num_layers)
        _check_indices("hidden_layers", hidden_layers, hidden_state_indices(c.num_layers),
                       c.num_layers)
        wanted = {int(i) for i in hidden_layers}
        # Hidden state i + 1 is block i's output, but the last one is taken after the final norm.
        hidden_blocks = sorted(i - 1 for i in wanted if 0 < i < c.num_layers)
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
        inv_freqs = {t: jnp.asarray(self._rope_inv_freq(t)) for t in set(c.types)}

        new_cache = None if cache is None else {
            "end_index": cache["end_index"] + input_mask.sum(axis=-1, dtype=jnp.int32),
            "positions": key_positions}
        hidden_states = {0: x} if 0 in wanted else {}
        block = remat_lib.remat(
            lambda layer, x, mask, inv_freq, layer_cache, rngs: layer(
                x, positions=positions, inv_freq=inv_freq, mask=mask, slots=slots,
                layer_cache=layer_cache, rngs=rngs),
            c.remat)
        if c.scan_layers:
            x, layers_cache, attention, block_outputs = self._scan_blocks(
                block, x, masks, inv_freqs, None if cache is None else cache["layers"],
                attention_layers, hidden_blocks, rngs)
            if new_cache is not None:
                new_cache["layers"] = layers_cache
            hidden_states.update({i + 1: state for i, state in block_outputs.items()})
        else:
            attention = {}
            for i, (layer, layer_type) in enumerate(zip(self.layers, c.types)):
                layer_cache = None if cache is None else cache[f"layer_{i}"]
                x, layer_cache, probs = block(layer, x, masks[layer_type], inv_freqs[layer_type],
                                              layer_cache, rngs)
                if new_cache is not None:
                    new_cache[f"layer_{i}"] = layer_cache
                if i in attention_layers:
                    attention[i] = probs
                if i in hidden_blocks:
                    hidden_states[i + 1] = x
        hidden = self.final_norm(x)
        if c.num_layers in wanted:
            hidden_states[c.num_layers] = hidden
        return DecoderLMOutput(logits=self.logits(hidden) if with_logits else None,
                               hidden=hidden, cache=new_cache, attention=attention or None,
                               hidden_states=dict(sorted(hidden_states.items())) or None)

    def _rope_inv_freq(self, layer_type: str) -> np.ndarray:
        """RoPE inverse frequencies ``[Dh / 2]`` of a layer type: Gemma 3's sliding layers use
        unscaled RoPE with ``local_rope_theta``."""
        c = self.config
        if layer_type == SLIDING_ATTENTION and c.local_rope_theta is not None:
            return rope_inv_freq(c.head_dim, c.local_rope_theta, None)
        return rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)

    def _scan_blocks(self, block, x: jax.Array, masks: dict[str, jax.Array],
                     inv_freqs: dict[str, jax.Array], layers_cache: dict | None,
                     attention_layers: Sequence[int], hidden_blocks: Sequence[int],
                     rngs: nnx.Rngs | None
                     ) -> tuple[jax.Array, dict | None, dict[int, jax.Array],
                                dict[int, jax.Array]]:
        """The stacked blocks under ``nnx.scan``. Each layer's attention type enters as a bool
        (sliding or not) picking its mask and RoPE frequencies. The stacked cache ``{"k", "v":
        [B, n, S, K, Dh]}`` is carried whole and each layer reads and writes its own slice, so
        the cache is updated in place instead of being moved to a layer-major copy and back.

        The outputs of the ``k`` blocks in ``hidden_blocks`` (returned as ``{block: [B, L, D]}``)
        are kept in a carried buffer ``[k + 1, B, L, D]``, one row per chosen block, instead of
        the scan's stacked outputs, which would hold all ``n`` layers. Each chosen block writes
        its output in place into its row and every other block into the spare last row: a
        branch-free write (XLA:GPU runs a ``lax.cond`` by reading its predicate on the host,
        which would stall every layer) that costs one ``[B, L, D]`` copy per unchosen block.
        Without ``hidden_blocks`` there is no buffer and no write.

        With ``rngs``, one dropout key per layer (``[n]`` keys split from one draw) enters the
        scan as data and each layer builds its own ``nnx.Rngs`` from it, so the layers draw
        different LoRA dropout masks (as the T5 stacks do)."""
        n = self.config.num_layers
        sliding = jnp.asarray([t == SLIDING_ATTENTION for t in self.config.types])
        keep_probs = bool(attention_layers)
        rows = np.full(n, len(hidden_blocks), np.int32)
        rows[list(hidden_blocks)] = np.arange(len(hidden_blocks))
        states = jnp.zeros((len(hidden_blocks) + 1, *x.shape), x.dtype) if hidden_blocks else None

        def of_type(values: dict[str, jax.Array], is_sliding: jax.Array) -> jax.Array:
            if len(values) == 1:
                return next(iter(values.values()))
            return jnp.where(is_sliding, values[SLIDING_ATTENTION], values[FULL_ATTENTION])

        @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0, 0, 0), out_axes=(nnx.Carry, 0))
        def run_stack(carry, layer, is_sliding, index, row, key):
            x, kv, states = carry
            x, layer_kv, probs = block(layer, x, of_type(masks, is_sliding),
                                       of_type(inv_freqs, is_sliding),
                                       stacked_lib.layer_cache(kv, index),
                                       None if key is None else nnx.Rngs(dropout=key))
            kv = stacked_lib.write_layer_cache(kv, layer_kv, index)
            if states is not None:
                states = jax.lax.dynamic_update_index_in_dim(states, x, row, 0)
            return (x, kv, states), (probs if keep_probs else None)

        keys = None if rngs is None else jax.random.split(rngs.dropout(), n)
        (x, layers_cache, states), probs = run_stack(
            (x, layers_cache, states), self.layers, sliding, jnp.arange(n, dtype=jnp.int32),
            jnp.asarray(rows), keys)
        return (x, layers_cache, {i: probs[i] for i in attention_layers},
                {block_index: states[row] for row, block_index in enumerate(hidden_blocks)})

    def logits(self, hidden: jax.Array) -> jax.Array:
        """``hidden [..., D]`` (after the final norm) -> float32 ``[..., V]`` after the final
        soft-cap, added tokens last."""
        kernel = self.embedding.get_value().T if self.lm_head is None else self.lm_head.get_value()
        logits = output_projection.project(hidden, kernel.astype(hidden.dtype))
        if self.added_tokens is not None:
            logits = jnp.concatenate([logits, self.added_tokens.logits(hidden)], axis=-1)
        return _softcap(logits, self.config.final_logit_softcap)

    # ------------------------------------------------------------------ LanguageModel

    def forward(self, *, prefix: jax.Array, prefix_mask: jax.Array, tokens: jax.Array,
                token_mask: jax.Array, rngs: nnx.Rngs | None = None,
                attention_layers: Sequence[int] = (), hidden_layers: Sequence[int] = ()
                ) -> TextOutput:
        """Teacher forcing over ``[prefix | text]`` (see
        :class:`~pixelllm.language.interface.LanguageModel`); positions count valid inputs only.
        ``hidden_layers`` (indices of :func:`hidden_state_indices`) adds those residual-stream
        states at the text positions, ``{index: [N, L, D]}``. ``rngs`` (training) enables the
        LoRA adapters' dropout, the only dropout of this model."""
        text = self.embed(tokens)
        sequence = jnp.concatenate([prefix.astype(text.dtype), text], axis=1)
        mask = jnp.concatenate([prefix_mask.astype(bool), token_mask.astype(bool)], axis=1)
        out = self(embeddings=sequence, positions=valid_positions(mask), input_mask=mask,
                   attention_layers=attention_layers, hidden_layers=hidden_layers,
                   with_logits=False, rngs=rngs)
        start = prefix.shape[1]
        attention = None if out.attention is None else {
            layer: probs[:, :, start:] for layer, probs in out.attention.items()}
        hidden_states = None if out.hidden_states is None else {
            index: state[:, start:] for index, state in out.hidden_states.items()}
        # Logits of the text positions only: the vocabulary projection of the prefix would be
        # discarded (and XLA does not move the slice before the matmul).
        hidden = out.hidden[:, start:]
        return TextOutput(self.logits(hidden), hidden, attention, hidden_states)

    def prefill(self, *, prefix: jax.Array, prefix_mask: jax.Array, bos_id: int,
                max_new_tokens: int) -> DecodeStart:
        """Prefills a cache of ``P + 1 + max_new_tokens`` slots with ``prefix [N, P, D]`` and BOS.
        The prefix is compacted first (valid inputs moved to the front, order kept) because the
        cache takes right-padded inputs."""
        n = prefix.shape[0]
        prefix_mask = prefix_mask.astype(bool)
        order = jnp.argsort(~prefix_mask, axis=1, stable=True)
        compact = jnp.take_along_axis(prefix, order[..., None], axis=1)
        compact_mask = jnp.take_along_axis(prefix_mask, order, axis=1)
        lengths = compact_mask.sum(axis=1, dtype=jnp.int32)
        cache = self.init_cache(n, prefix.shape[1] + 1 + max_new_tokens)
        out = self(embeddings=compact, positions=valid_positions(compact_mask),
                   input_mask=compact_mask, cache=cache)
        out = self(tokens=jnp.full((n, 1), bos_id, jnp.int32), positions=lengths[:, None],
                   input_mask=jnp.ones((n, 1), bool), cache=out.cache)
        return DecodeStart(out.cache, out.logits[:, 0], lengths + 1, out.hidden[:, 0])

    def decode_step(self, tokens: jax.Array, positions: jax.Array,
                    cache: dict) -> tuple[jax.Array, jax.Array, dict]:
        return decoding.cached_step(self)(tokens, positions, cache)

    def load_hf_weights(self, state_dict: Mapping[str, np.ndarray], *, source: str) -> DecoderLM:
        return load(self, state_dict, source=source)


def _check_indices(field: str, indices: Sequence[int], valid: range, num_layers: int) -> None:
    bad = sorted(set(indices) - set(valid))
    if bad:
        raise ValueError(f"{field} {bad} out of range: valid indices are {valid.start}.."
                         f"{valid.stop - 1} for {num_layers} layers")


# ----------------------------------------------------------------------------------------------
# Hugging Face checkpoints.


@dataclasses.dataclass(frozen=True)
class _TextLayout:
    """Where the text model sits in a state dict: the prefix of its keys, the key of its output
    projection, and what else the file holds that is not loaded."""
    prefix: str
    head: str
    drop: tuple[str, ...] = ()


# CausalLM files; Gemma 3 multimodal files as named by transformers 5.x and as saved by 4.5x
# (their vision tower and projector are not part of the language model); bare base-model files.
_TEXT_LAYOUTS = (
    _TextLayout("model.", "lm_head.weight"),
    _TextLayout("model.language_model.", "lm_head.weight",
                ("model.vision_tower.*", "model.multi_modal_projector.*")),
    _TextLayout("language_model.model.", "language_model.lm_head.weight",
                ("vision_tower.*", "multi_modal_projector.*")),
    _TextLayout("", "lm_head.weight"),
)
# HF module -> ours, within a layer.
_PROJECTIONS = (("self_attn.q_proj", "attn/q"), ("self_attn.k_proj", "attn/k"),
                ("self_attn.v_proj", "attn/v"), ("self_attn.o_proj", "attn/o"),
                ("mlp.gate_proj", "mlp/gate"), ("mlp.up_proj", "mlp/up"),
                ("mlp.down_proj", "mlp/down"))
_NORMS = (("input_layernorm", "input_norm"), ("self_attn.q_norm", "attn/q_norm"),
          ("self_attn.k_norm", "attn/k_norm"))
# Gemma 2/3 norm both sides of each sub-layer; Llama and Gemma 1 have one norm before the MLP,
# which they call "post_attention_layernorm".
_POST_NORMS = (("post_attention_layernorm", "post_attn_norm"),
               ("pre_feedforward_layernorm", "pre_ffw_norm"),
               ("post_feedforward_layernorm", "post_ffw_norm"))
_PRE_MLP_NORM = (("post_attention_layernorm", "pre_ffw_norm"),)


def _text_layout(state_dict: Mapping[str, np.ndarray]) -> _TextLayout:
    """The layout whose embedding key the file holds (CausalLM's when none does)."""
    return next((layout for layout in _TEXT_LAYOUTS
                 if f"{layout.prefix}embed_tokens.weight" in state_dict), _TEXT_LAYOUTS[0])


def key_rules(config: DecoderConfig, state_dict: Mapping[str, np.ndarray]
              ) -> tuple[list[Rule], list[str]]:
    """The key map from a Hugging Face Llama/Gemma/Gemma 2/Gemma 3 file to a :class:`DecoderLM`'s
    base weights: ``(rules, drop patterns)`` for :mod:`pixelllm.checkpoints.key_map`.

    The text model's prefix is read from the file (see ``_TEXT_LAYOUTS``). A tied model takes
    the output projection's key, when present, as a copy of the embedding that must equal it
    (torch's ``state_dict()`` lists the shared tensor under both names).
    """
    layout = _text_layout(state_dict)
    norms = _NORMS + (_POST_NORMS if config.post_norms else _PRE_MLP_NORM)
    layer = [Rule(f"{hf}.weight", f"{ours}/kernel", TRANSPOSE) for hf, ours in _PROJECTIONS]
    layer += [Rule(f"{hf}.weight", f"{ours}/scale") for hf, ours in norms]
    rules = [Rule("embed_tokens.weight", "embedding"), Rule("norm.weight", "final_norm/scale")]
    rules = prefixed(rules + prefixed(layer, source="layers.{i}.", target="layers/{i}/"),
                     source=layout.prefix)
    rules.append(Rule(layout.head, "embedding") if config.tie_word_embeddings
                 else Rule(layout.head, "lm_head", TRANSPOSE))
    return rules, list(layout.drop)


def _tie_hint(config: DecoderConfig, state_dict: Mapping[str, np.ndarray]) -> str | None:
    head = _text_layout(state_dict).head
    if config.tie_word_embeddings or head in state_dict:
        return None
    return f"the file has no {head}: this looks like a tied model (tie_word_embeddings=True)"


def load(module: DecoderLM, state_dict: Mapping[str, np.ndarray], *, source: str) -> DecoderLM:
    """Fills ``module``'s frozen base weights (in place, strictly) from a Hugging Face
    Llama/Gemma/Gemma 2/Gemma 3 state dict; returns it.

    Accepts ``model.*`` (CausalLM), ``model.language_model.*`` / ``language_model.model.*``
    (Gemma 3 multimodal; the vision tower and projector are skipped) and prefix-less base-model
    keys. torch Linear ``(out, in)`` weights become kernels ``(in, out)``; values are cast to
    each parameter's dtype. LoRA factors and added token rows are not in these files and keep
    their values. With ``scan_layers`` the file's layers are converted one by one and stacked.
    A mismatch raises :class:`~pixelllm.checkpoints.assign.CheckpointMismatchError`
    naming ``source`` and the file's keys, and leaves the model as it was.
    """
    rules, drop = key_rules(module.config, state_dict)
    return key_map.load(module, state_dict, rules, source=source, drop=drop,
                        hint=_tie_hint(module.config, state_dict), wrt=lora.BASE_WEIGHTS,
                        stacked=("layers",) if module.config.scan_layers else ())
