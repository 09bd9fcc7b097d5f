"""T5 encoder-decoder (Flan-T5 / T5 v1.1, original T5) with LoRA, and its checkpoint converter.

Numerically Hugging Face's ``T5ForConditionalGeneration``: pre-norm blocks with an RMS norm that
has no mean subtraction and no bias, attention without the ``1/sqrt(d)`` scaling, a learned
relative-position bias (one ``[num_buckets, heads]`` table per stack, held by block 0 in HF and
shared by every layer; bidirectional buckets in the encoder, causal in the decoder, none in the
cross-attention), a gated-GELU (``gelu_new``, tanh form) or ReLU feed-forward, no scaling of the
token embedding, and either an untied ``lm_head`` (Flan-T5, T5 v1.1) or the embedding reused as
the output projection after a ``d_model ** -0.5`` rescale (original T5).

PixelLLM feeds its visual tokens to the **encoder** as input embeddings followed by the context
tokens' embeddings (:meth:`T5.embed`), keeps every pretrained weight frozen (``FrozenParam``) and
trains rank-``r`` adapters (:mod:`pixelllm.nn.lora`) on the projections named in ``lora_targets``
of the encoder self-, decoder self- and cross-attention (``q``, ``k``, ``v``, ``o``) or of the
feed-forward (``wi_0``, ``wi_1``, ``wo``; ``wi`` when not gated). The point head reads
:attr:`DecoderOutput.hidden`, the decoder output after its final norm.

**Decoding cache.** The encoder runs once; :meth:`T5.init_cache` also projects its output to the
cross-attention keys and values of every decoder layer. The cache is a dict pytree whose every
leaf has the batch on axis 0 (beam search reorders it with ``jnp.take(leaf, idx, axis=0)``)::

    {"encoder_mask": [B, Le] bool,
     "layers": [{"k": [B, T, H, Dkv], "v": [B, T, H, Dkv],              # self-attention, T static
                 "cross_k": [B, Le, H, Dkv], "cross_v": [B, Le, H, Dkv]},  # computed once
                ...]}                                                        # one per decoder layer

A token at position ``p`` writes its self-attention key/value into slot ``p`` (per sequence;
positions ``>= T`` are dropped) and attends to slots ``<= p``, so a right-padded prefill of
several tokens and a one-token extension go through the same :meth:`T5.decode`; a padding token's
slot is overwritten when that sequence reaches the position. Without a cache, :meth:`T5.decode`
attends causally among its own tokens by their ``positions``.

**Dropout** (``dropout_rate``, at HF's places) is applied only when ``rngs`` is passed to
:meth:`T5.encode` / :meth:`T5.decode`; without it the model is deterministic.
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

_ATTENTION_TARGETS = ("q", "k", "v", "o")
_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF ACT2FN["gelu"]: exact erf
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # tanh form
    "silu": jax.nn.silu,
}

Cache = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyper-parameters; field names follow HF's ``T5Config``.

    ``feed_forward_proj`` is ``"relu"`` / ``"gelu"`` / ``"silu"`` or ``"gated-<act>"``, where
    ``gated-gelu`` means the tanh GELU as in HF. ``lora_alpha / lora_rank`` scales the adapters.
    """

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    tie_word_embeddings: bool = False
    dropout_rate: float = 0.0
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    frozen: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    lora_rank: int = 0
    lora_alpha: float = 1.0
    lora_targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self):
        act = self.feed_forward_proj.removeprefix("gated-")
        if act not in _ACTIVATIONS or act == "gelu_new":
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r}: expected relu, gelu, "
                             "silu or gated-<one of them>")
        allowed = _ATTENTION_TARGETS + (("wi_0", "wi_1", "wo") if self.is_gated else ("wi", "wo"))
        unknown = sorted(set(self.lora_targets) - set(allowed))
        if unknown:
            raise ValueError(f"unknown LoRA targets {unknown}; choose from {allowed}")
        if self.relative_attention_max_distance < self.relative_attention_num_buckets // 2:
            raise ValueError("relative_attention_max_distance must be >= num_buckets // 2 "
                             "(the exact-distance buckets)")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """HF's ``dense_act_fn``: ``gated-gelu`` uses ``gelu_new``."""
        act = self.feed_forward_proj.removeprefix("gated-")
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    @classmethod
    def from_config(cls, config: T5Config | Mapping[str, Any]) -> T5Config:
        """From ``configs/t5.py``'s ``config.model`` (a ConfigDict with a ``lora`` sub-dict)."""
        if isinstance(config, cls):
            return config
        fields = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        lora_cfg = dict(fields.pop("lora", {}))
        for key in ("rank", "alpha", "targets"):
            if key in lora_cfg:
                fields[f"lora_{key}"] = lora_cfg.pop(key)
        if lora_cfg:
            raise ValueError(f"unknown lora settings {sorted(lora_cfg)}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise ValueError(f"unknown T5 config fields {unknown}")
        if "lora_targets" in fields:
            fields["lora_targets"] = tuple(fields["lora_targets"])
        return cls(**fields)


class DecoderOutput(NamedTuple):
    """``logits: [B, L, V]`` float32, ``hidden: [B, L, D]`` (after the final norm), the cache."""

    logits: jax.Array
    hidden: jax.Array
    cache: Cache | None


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> jax.Array:
    """Mesh-TensorFlow/HF bucket of ``key_position - query_position`` (int array, any shape).

    Half of the buckets (per direction when bidirectional) hold exact distances, the rest grow
    logarithmically up to ``max_distance``. The logarithmic part is tabulated on the host in
    float32 exactly as HF computes it, so truncation at the bucket edges agrees with HF.
    """
    if bidirectional:
        num_buckets //= 2
        offset = jnp.where(relative_position > 0, num_buckets, 0)
        distance = jnp.abs(relative_position)
    else:
        offset = 0
        distance = jnp.maximum(-relative_position, 0)
    max_exact = num_buckets // 2
    d = np.arange(max_distance + 1)
    with np.errstate(divide="ignore"):
        large = (np.log(d.astype(np.float32) / max_exact)
                 / np.float32(math.log(max_distance / max_exact)) * (num_buckets - max_exact))
    large = max_exact + np.where(d < max_exact, 0, large).astype(np.int32)
    table = np.where(d < max_exact, d, np.minimum(large, num_buckets - 1)).astype(np.int32)
    return offset + jnp.asarray(table)[jnp.minimum(distance, max_distance)]


def _dropout(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
    if rngs is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _normal(std: float) -> nnx.Initializer:
    return nnx.initializers.normal(stddev=std)


class RMSNorm(nnx.Module):
    """T5's layer norm: ``x * rsqrt(mean(x**2) + eps) * scale`` in float32, no mean, no bias."""

    def __init__(self, features: int, *, eps: float, frozen: bool, dtype: jnp.dtype,
                 param_dtype: jnp.dtype):
        self.eps, self.dtype = eps, dtype
        self.scale = lora.weight(jnp.ones((features,), param_dtype), ("embed",), frozen=frozen)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x: [..., D] -> [..., D]`` in the compute dtype."""
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return x.astype(self.dtype) * self.scale.get_value().astype(self.dtype)


class Attention(nnx.Module):
    """Multi-head attention with T5's unscaled scores and an optional additive position bias."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
        self.num_heads, self.d_kv, self.dropout_rate = cfg.num_heads, cfg.d_kv, cfg.dropout_rate
        self.dtype = jnp.dtype(cfg.dtype)
        # HF's initialisation, so a randomly initialised model behaves like T5 at init.
        stds = {"q": (d * cfg.d_kv) ** -0.5, "k": d ** -0.5, "v": d ** -0.5, "o": inner ** -0.5}
        for name, std in stds.items():
            shape, axes = ((inner, d), ("heads", "embed")) if name == "o" else ((d, inner),
                                                                             ("embed", "heads"))
            setattr(self, name, lora.LoRALinear(
                *shape, axes=axes, rngs=rngs, frozen=cfg.frozen, dtype=self.dtype,
                param_dtype=jnp.dtype(cfg.param_dtype), kernel_init=_normal(std),
                rank=cfg.lora_rank if name in cfg.lora_targets else 0, scale=cfg.lora_scale))

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.num_heads, self.d_kv)

    def key_value(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``x: [B, T, D]`` -> keys and values ``[B, T, H, Dkv]``."""
        return self._heads(self.k(x)), self._heads(self.v(x))

    def __call__(self, x: jax.Array, key: jax.Array, value: jax.Array, *, mask: jax.Array,
                 bias: jax.Array | None, rngs: nnx.Rngs | None) -> jax.Array:
        """``x: [B, L, D]``, ``key``/``value: [B, T, H, Dkv]`` -> ``[B, L, D]``.

        ``mask``: bool, broadcastable to ``[B, L, T]`` (True = attend); ``bias``: float32,
        broadcastable to ``[B, H, L, T]``.
        """
        query = self._heads(self.q(x))
        scores = jnp.einsum("blhd,bthd->bhlt", query, key.astype(self.dtype),
                            preferred_element_type=jnp.float32)
        if bias is not None:
            scores = scores + bias
        scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        probs = _dropout(probs, self.dropout_rate, rngs)
        out = jnp.einsum("bhlt,bthd->blhd", probs, value.astype(self.dtype))
        return self.o(out.reshape(*out.shape[:2], -1))


class FeedForward(nnx.Module):
    """``wo(act(wi_0 x) * wi_1 x)`` when gated, else ``wo(act(wi x))``."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.activation, self.dropout_rate = _ACTIVATIONS[cfg.activation], cfg.dropout_rate
        inputs = ("wi_0", "wi_1") if cfg.is_gated else ("wi",)
        common = dict(rngs=rngs, frozen=cfg.frozen, dtype=jnp.dtype(cfg.dtype),
                      param_dtype=jnp.dtype(cfg.param_dtype))

        def rank(name):
            return cfg.lora_rank if name in cfg.lora_targets else 0

        for name in inputs:
            setattr(self, name, lora.LoRALinear(
                cfg.d_model, cfg.d_ff, axes=("embed", "mlp"),
                kernel_init=_normal(cfg.d_model ** -0.5), rank=rank(name), scale=cfg.lora_scale,
                **common))
        self.wo = lora.LoRALinear(cfg.d_ff, cfg.d_model, axes=("mlp", "embed"),
                                  kernel_init=_normal(cfg.d_ff ** -0.5), rank=rank("wo"),
                                  scale=cfg.lora_scale, **common)
        self.gated = cfg.is_gated

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        """``x: [..., D] -> [..., D]``."""
        if self.gated:
            h = self.activation(self.wi_0(x)) * self.wi_1(x)
        else:
            h = self.activation(self.wi(x))
        return self.wo(_dropout(h, self.dropout_rate, rngs))


def _norm(cfg: T5Config) -> RMSNorm:
    return RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, frozen=cfg.frozen,
                   dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def _bias_table(cfg: T5Config, rngs: nnx.Rngs) -> nnx.Variable:
    value = _normal(cfg.d_model ** -0.5)(
        rngs.params(), (cfg.relative_attention_num_buckets, cfg.num_heads),
        jnp.dtype(cfg.param_dtype))
    # A few KB: replicated rather than split over heads.
    return lora.weight(value, (None, None), frozen=cfg.frozen)


def _position_bias(table: nnx.Variable, relative_position: jax.Array, cfg: T5Config, *,
                   bidirectional: bool) -> jax.Array:
    """``relative_position: [..., L, T]`` -> float32 bias ``[..., H, L, T]``."""
    buckets = relative_position_bucket(
        relative_position, bidirectional=bidirectional,
        num_buckets=cfg.relative_attention_num_buckets,
        max_distance=cfg.relative_attention_max_distance)
    return jnp.moveaxis(table.get_value().astype(jnp.float32)[buckets], -1, -3)


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.dropout_rate = cfg.dropout_rate
        self.self_attention_norm = _norm(cfg)
        self.self_attention = Attention(cfg, rngs=rngs)
        self.mlp_norm = _norm(cfg)
        self.mlp = FeedForward(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, *, mask: jax.Array, bias: jax.Array,
                 rngs: nnx.Rngs | None) -> jax.Array:
        """``x: [B, Le, D]``, ``mask: [B, 1, Le]``, ``bias: [1, H, Le, Le]`` -> ``[B, Le, D]``."""
        h = self.self_attention_norm(x)
        key, value = self.self_attention.key_value(h)
        h = self.self_attention(h, key, value, mask=mask, bias=bias, rngs=rngs)
        x = x + _dropout(h, self.dropout_rate, rngs)
        return x + _dropout(self.mlp(self.mlp_norm(x), rngs), self.dropout_rate, rngs)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.dropout_rate = cfg.dropout_rate
        self.self_attention_norm = _norm(cfg)
        self.self_attention = Attention(cfg, rngs=rngs)
        self.cross_attention_norm = _norm(cfg)
        self.cross_attention = Attention(cfg, rngs=rngs)
        self.mlp_norm = _norm(cfg)
        self.mlp = FeedForward(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, *, positions: jax.Array, self_mask: jax.Array,
                 bias: jax.Array, encoded: jax.Array | None, cross_mask: jax.Array,
                 cache: dict[str, jax.Array] | None,
                 rngs: nnx.Rngs | None) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        """``x: [B, L, D]``, ``positions: [B, L]``, ``self_mask: [B, L, T]``,
        ``bias: [B, H, L, T]``, ``encoded: [B, Le, D]`` (unused with a cache),
        ``cross_mask: [B, 1, Le]`` -> ``([B, L, D], updated layer cache)``."""
        h = self.self_attention_norm(x)
        key, value = self.self_attention.key_value(h)
        if cache is not None:
            rows = jnp.arange(x.shape[0])[:, None]
            cache = dict(cache)
            for name, new in (("k", key), ("v", value)):
                cache[name] = cache[name].at[rows, positions].set(
                    new.astype(cache[name].dtype), mode="drop")
            key, value = cache["k"], cache["v"]
        h = self.self_attention(h, key, value, mask=self_mask, bias=bias, rngs=rngs)
        x = x + _dropout(h, self.dropout_rate, rngs)

        h = self.cross_attention_norm(x)
        if cache is not None:
            key, value = cache["cross_k"], cache["cross_v"]
        else:
            key, value = self.cross_attention.key_value(encoded)
        h = self.cross_attention(h, key, value, mask=cross_mask, bias=None, rngs=rngs)
        x = x + _dropout(h, self.dropout_rate, rngs)
        return x + _dropout(self.mlp(self.mlp_norm(x), rngs), self.dropout_rate, rngs), cache


class Encoder(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.config = cfg
        self.relative_attention_bias = _bias_table(cfg, rngs)
        self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = _norm(cfg)

    def __call__(self, x: jax.Array, mask: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        """``x: [B, Le, D]``, ``mask: [B, Le]`` bool -> ``[B, Le, D]``."""
        position = jnp.arange(x.shape[1])
        bias = _position_bias(self.relative_attention_bias,
                              position[None, :] - position[:, None], self.config,
                              bidirectional=True)[None]
        x = _dropout(x, self.config.dropout_rate, rngs)
        for layer in self.layers:
            x = layer(x, mask=mask[:, None, :], bias=bias, rngs=rngs)
        return _dropout(self.final_norm(x), self.config.dropout_rate, rngs)


class Decoder(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.config = cfg
        self.relative_attention_bias = _bias_table(cfg, rngs)
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs)
                                for _ in range(cfg.num_decoder_layers)])
        self.final_norm = _norm(cfg)

    def __call__(self, x: jax.Array, *, positions: jax.Array, encoded: jax.Array | None,
                 encoder_mask: jax.Array, cache: Cache | None,
                 rngs: nnx.Rngs | None) -> tuple[jax.Array, Cache | None]:
        """``x: [B, L, D]``, ``positions: [B, L]``, ``encoded: [B, Le, D]``,
        ``encoder_mask: [B, Le]`` -> ``([B, L, D] after the final norm, updated cache)``."""
        if cache is None:
            key_positions = positions
        else:
            key_positions = jnp.arange(cache["layers"][0]["k"].shape[1])[None]
        relative = key_positions[:, None, :] - positions[:, :, None]  # [B, L, T]
        bias = _position_bias(self.relative_attention_bias, relative, self.config,
                              bidirectional=False)
        x = _dropout(x, self.config.dropout_rate, rngs)
        layer_caches = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(
                x, positions=positions, self_mask=relative <= 0, bias=bias, encoded=encoded,
                cross_mask=encoder_mask[:, None, :], rngs=rngs,
                cache=None if cache is None else cache["layers"][i])
            layer_caches.append(layer_cache)
        x = _dropout(self.final_norm(x), self.config.dropout_rate, rngs)
        if cache is not None:
            cache = {"encoder_mask": cache["encoder_mask"], "layers": layer_caches}
        return x, cache


class T5(nnx.Module):
    """T5 encoder-decoder; see the module docstring for the cache layout.

    ``config``: a :class:`T5Config` or ``configs/t5.py``'s ``config.model``.
    """

    def __init__(self, config: T5Config | Mapping[str, Any], *, rngs: nnx.Rngs):
        cfg = self.config = T5Config.from_config(config)
        self.dtype = jnp.dtype(cfg.dtype)
        param_dtype = jnp.dtype(cfg.param_dtype)
        self.embedding = lora.weight(
            _normal(1.0)(rngs.params(), (cfg.vocab_size, cfg.d_model), param_dtype),
            ("vocab", "embed"), frozen=cfg.frozen)
        self.encoder = Encoder(cfg, rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)
        self.lm_head = None if cfg.tie_word_embeddings else lora.weight(
            _normal(1.0)(rngs.params(), (cfg.d_model, cfg.vocab_size), param_dtype),
            ("embed", "vocab"), frozen=cfg.frozen)

    @classmethod
    def from_config(cls, model_config: Mapping[str, Any], *, rngs: nnx.Rngs) -> T5:
        """From the ``model`` field of ``configs/t5.py``."""
        return cls(model_config, rngs=rngs)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """``tokens: [B, L]`` int -> ``[B, L, D]`` in the compute dtype (T5 does not rescale)."""
        return self.embedding.get_value()[tokens].astype(self.dtype)

    def encode(self, *, tokens: jax.Array | None = None, embeddings: jax.Array | None = None,
               input_mask: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Either ``tokens: [B, Le]`` or ``embeddings: [B, Le, D]`` (visual tokens, then the
        context tokens' :meth:`embed`); ``input_mask: [B, Le]`` (nonzero = real token).

        Returns the encoder output after its final norm, ``[B, Le, D]``.
        """
        if (tokens is None) == (embeddings is None):
            raise ValueError("pass exactly one of tokens and embeddings")
        x = self.embed(tokens) if embeddings is None else embeddings.astype(self.dtype)
        return self.encoder(x, jnp.asarray(input_mask).astype(bool), rngs)

    def decode(self, *, tokens: jax.Array, positions: jax.Array,
               encoded: jax.Array | None = None, encoder_mask: jax.Array | None = None,
               cache: Cache | None = None, rngs: nnx.Rngs | None = None) -> DecoderOutput:
        """``tokens: [B, L]`` int at ``positions: [B, L]`` (0 = the decoder start token).

        Without ``cache``: teacher forcing over ``encoded: [B, Le, D]`` and ``encoder_mask:
        [B, Le]``. With ``cache`` (from :meth:`init_cache`): the encoder side comes from the
        cache (``encoded``/``encoder_mask`` may be omitted and are ignored) and the returned
        cache holds these tokens' keys and values.
        """
        if cache is None:
            if encoded is None or encoder_mask is None:
                raise ValueError("decode without a cache needs encoded and encoder_mask")
            encoder_mask = jnp.asarray(encoder_mask).astype(bool)
        else:
            encoded, encoder_mask = None, cache["encoder_mask"]
        hidden, cache = self.decoder(self.embed(tokens), positions=jnp.asarray(positions),
                                     encoded=encoded, encoder_mask=encoder_mask, cache=cache,
                                     rngs=rngs)
        return DecoderOutput(logits=self.logits(hidden), hidden=hidden, cache=cache)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """``hidden: [..., D]`` (decoder output) -> float32 ``[..., V]``."""
        if self.lm_head is None:
            # Tied (original T5): rescale so the embedding's scale suits the output projection.
            hidden = hidden * jnp.asarray(self.config.d_model ** -0.5, hidden.dtype)
            kernel = self.embedding.get_value().T
        else:
            kernel = self.lm_head.get_value()
        return jnp.einsum("...d,dv->...v", hidden, kernel.astype(hidden.dtype),
                          preferred_element_type=jnp.float32)

    def init_cache(self, encoded: jax.Array, encoder_mask: jax.Array, max_length: int,
                   dtype: jnp.dtype | None = None) -> Cache:
        """Empty self-attention buffers of ``max_length`` slots plus the cross-attention keys and
        values of ``encoded: [B, Le, D]`` (``encoder_mask: [B, Le]``); layout in the module
        docstring. ``dtype`` defaults to the compute dtype."""
        dtype = jnp.dtype(dtype or self.dtype)
        shape = (encoded.shape[0], max_length, self.config.num_heads, self.config.d_kv)
        layers = []
        for layer in self.decoder.layers:
            key, value = layer.cross_attention.key_value(encoded.astype(self.dtype))
            # Separate buffers per leaf, so a jitted step may donate the cache.
            layers.append({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
                           "cross_k": key.astype(dtype), "cross_v": value.astype(dtype)})
        return {"encoder_mask": jnp.asarray(encoder_mask).astype(bool), "layers": layers}

    @staticmethod
    def cache_logical_axes(cache: Cache) -> Cache:
        """The logical axis names of every cache leaf (same tree), to shard the cache with
        :func:`pixelllm.sharding.array_shardings` like the keys/values that fill it."""
        kv = ("batch", "length", "heads", "kv")
        return {"encoder_mask": ("batch", "length"),
                "layers": [{name: kv for name in layer} for layer in cache["layers"]]}


def _key_map(cfg: T5Config) -> dict[str, tuple[str, tuple[int, ...], bool]]:
    """``{hf key: (nnx path, hf shape, transpose)}`` for every base weight of ``cfg``."""
    d, inner, heads = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.num_heads
    mlp_in = ("wi_0", "wi_1") if cfg.is_gated else ("wi",)
    keys = {"shared.weight": ("embedding", (cfg.vocab_size, d), False)}
    if not cfg.tie_word_embeddings:
        keys["lm_head.weight"] = ("lm_head", (cfg.vocab_size, d), True)

    def attention(hf, ours):
        for name in _ATTENTION_TARGETS:
            shape = (d, inner) if name == "o" else (inner, d)
            keys[f"{hf}.{name}.weight"] = (f"{ours}/{name}/kernel", shape, True)

    def mlp(hf, ours):
        for name in mlp_in:
            keys[f"{hf}.DenseReluDense.{name}.weight"] = (f"{ours}/mlp/{name}/kernel",
                                                           (cfg.d_ff, d), True)
        keys[f"{hf}.DenseReluDense.wo.weight"] = (f"{ours}/mlp/wo/kernel", (d, cfg.d_ff), True)
        keys[f"{hf}.layer_norm.weight"] = (f"{ours}/mlp_norm/scale", (d,), False)

    for stack, layers in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
        keys[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
            f"{stack}/relative_attention_bias", (cfg.relative_attention_num_buckets, heads), False)
        keys[f"{stack}.final_layer_norm.weight"] = (f"{stack}/final_norm/scale", (d,), False)
        for i in range(layers):
            hf, ours = f"{stack}.block.{i}.layer", f"{stack}/layers/{i}"
            attention(f"{hf}.0.SelfAttention", f"{ours}/self_attention")
            keys[f"{hf}.0.layer_norm.weight"] = (f"{ours}/self_attention_norm/scale", (d,), False)
            if stack == "decoder":
                attention(f"{hf}.1.EncDecAttention", f"{ours}/cross_attention")
                keys[f"{hf}.1.layer_norm.weight"] = (f"{ours}/cross_attention_norm/scale", (d,),
                                                     False)
            mlp(f"{hf}.{2 if stack == 'decoder' else 1}", ours)
    return keys


# Copies of `shared.weight` that HF files may carry; accepted when equal to it.
_EMBEDDING_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# Never used by HF's forward (cross-attention has no position bias); HF ignores it on load.
_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def convert_state_dict(hf_state_dict: Mapping[str, np.ndarray],
                       config: T5Config | Mapping[str, Any], *, dtype: Any = np.float32,
                       source: str = "T5 state dict") -> dict[str, np.ndarray]:
    """HF ``T5ForConditionalGeneration`` weights -> ``{nnx path: array}`` of the base model.

    torch Linear ``(out, in)`` become Flax kernels ``(in, out)``; arrays are cast to ``dtype``
    (``np.float32`` or ``jnp.bfloat16``). ``encoder/decoder.embed_tokens.weight`` (and, when tied,
    ``lm_head.weight``) may appear as copies of ``shared.weight`` and must equal it. Raises
    :class:`~pixelllm.checkpoints.assign.CheckpointMismatchError` naming every missing,
    unexpected or mis-shaped key. LoRA parameters are not part of HF files and are not returned.
    """
    cfg = T5Config.from_config(config)
    key_map = _key_map(cfg)
    copies = _EMBEDDING_COPIES + (("lm_head.weight",) if cfg.tie_word_embeddings else ())
    found = {k: tuple(np.shape(v)) for k, v in hf_state_dict.items() if k not in _IGNORED}
    embedding_shape = (cfg.vocab_size, cfg.d_model)
    expected = {k: shape for k, (_, shape, _) in key_map.items()}
    expected.update({k: embedding_shape for k in copies if k in found})
    if "shared.weight" not in found:
        # Files that dropped the tied source keep one of its copies instead (HF ties either way).
        present = [k for k in copies if k in found]
        if present:
            expected.pop(present[0])
            found["shared.weight"] = found.pop(present[0])
            hf_state_dict = {**hf_state_dict, "shared.weight": hf_state_dict[present[0]]}
    assign_lib.check_keys(source=source, expected=expected, found=found, what="T5 weights")
    shared = np.asarray(hf_state_dict["shared.weight"])
    differing = [k for k in copies if k in hf_state_dict
                 and not np.array_equal(np.asarray(hf_state_dict[k]), shared)]
    if differing:
        raise assign_lib.CheckpointMismatchError(
            f"{source}: {', '.join(differing)} differ from shared.weight, but this T5 "
            f"(tie_word_embeddings={cfg.tie_word_embeddings}) has one embedding matrix")
    params = {}
    for key, (path, _, transpose) in key_map.items():
        value = np.asarray(hf_state_dict[key])
        params[path] = np.asarray(value.T if transpose else value, dtype=dtype)
    return params


def load_hf_weights(model: T5, state_dict: Mapping[str, np.ndarray], *, source: str) -> T5:
    """Loads HF weights into ``model`` (in place) strictly; LoRA factors keep their values."""
    params = convert_state_dict(state_dict, model.config, dtype=jnp.dtype(model.config.param_dtype),
                                source=source)
    return assign_lib.assign(model, params, source=source, wrt=lora.BASE_WEIGHTS)
