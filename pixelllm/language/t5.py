"""T5 encoder-decoder (Flan-T5 / T5 v1.1, original T5) with LoRA, and its checkpoint converter.

Numerically Hugging Face's ``T5ForConditionalGeneration``: pre-norm blocks with an RMS norm that
has no mean subtraction and no bias, attention without the ``1/sqrt(d)`` scaling, a learned
relative-position bias (one ``[num_buckets, heads]`` table per stack, held by block 0 in HF and
shared by every layer; bidirectional buckets in the encoder, causal in the decoder, none in the
cross-attention), a gated-GELU (``gelu_new``, tanh form) or ReLU feed-forward, no scaling of the
token embedding. Two independent switches shape the output: ``tie_word_embeddings`` reuses the
embedding as the output projection (no ``lm_head``), and ``scale_decoder_outputs`` multiplies the
decoder output by ``d_model ** -0.5`` before it. Original T5 sets both; Flan-T5 and T5 v1.1
neither. transformers 5.x always ties and decides the rescale on its own
(``scale_decoder_outputs``, true unless a file's ``config.json`` says
``tie_word_embeddings: false``), so files saved by it can be tied without the rescale.

The model implements :class:`~pixelllm.language.interface.LanguageModel`.

PixelLLM feeds its visual tokens to the **encoder** as input embeddings followed by the context
tokens' embeddings (:meth:`T5.embed`), keeps every pretrained weight frozen (``FrozenParam``) and
trains rank-``r`` adapters (:mod:`pixelllm.nn.lora`) on the projections named in ``lora.targets``
of the encoder self-, decoder self- and cross-attention (``q``, ``k``, ``v``, ``o``) or of the
feed-forward (``wi_0``, ``wi_1``, ``wo``; ``wi`` when not gated). The point head reads
:attr:`T5DecoderOutput.hidden`, the decoder output after its final norm and before the final
dropout (the logits read it after), as the official PixelLLM's ``decode_feat``.

**Decoding cache.** The encoder runs once; :meth:`T5.init_cache` also projects its output to the
cross-attention keys and values of every decoder layer. The cache is a dict pytree whose every
leaf has the batch on axis 0 (beam search reorders it with ``jnp.take(leaf, idx, axis=0)``)::

    {"encoder_mask": [B, Le] bool,
     "layers": [{"k": [B, T, H, Dkv], "v": [B, T, H, Dkv],              # self-attention, T static
                 "cross_k": [B, Le, H, Dkv], "cross_v": [B, Le, H, Dkv]},  # computed once
                ...]}                                                        # one per decoder layer

With ``scan_layers`` the layers are stacked, the layer on axis 1 (the batch stays on axis 0):
``"layers": {"k": [B, n, T, H, Dkv], "v": ..., "cross_k": [B, n, Le, H, Dkv], "cross_v": ...}``.

A token at position ``p`` writes its self-attention key/value into slot ``p`` (per sequence;
positions ``>= T`` are dropped) and attends to slots ``<= p``, so a right-padded prefill of
several tokens and a one-token extension go through the same :meth:`T5.decode`; a padding token's
slot is overwritten when that sequence reaches the position. Without a cache, :meth:`T5.decode`
attends causally among its own tokens by their ``positions``.

**Dropout** (``dropout_rate``, at HF's places; one mask shared along the position axis, as the
official t5x layers' ``broadcast_dims=(-2,)``, unless ``dropout_shared_over_positions`` is False,
HF's per-element masks) is applied only when ``rngs`` is passed to
:meth:`T5.embed` / :meth:`T5.encode` / :meth:`T5.decode`; without it the model is deterministic.
The encoder's input dropout belongs to :meth:`T5.embed`: embeddings given to :meth:`T5.encode`
enter as they are, so PixelLLM's visual tokens are not dropped out (the official drops out only
the context embeddings).
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
from pixelllm.nn.dropout import inverted_dropout
from pixelllm.nn import remat as remat_lib
from pixelllm.nn.lora import LoRASettings
from pixelllm.nn.norms import RMSNorm
from pixelllm.nn import stacked as stacked_lib

_ATTENTION_TARGETS = ("q", "k", "v", "o")
# Feed-forward activations T5 configs name (``feed_forward_proj``, optionally ``gated-``).
_FEED_FORWARD_ACTIVATIONS = ("relu", "gelu", "silu")

Cache = dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class T5Config:
    """Hyper-parameters; field names follow HF's ``T5Config``.

    ``feed_forward_proj`` is ``"relu"`` / ``"gelu"`` / ``"silu"`` or ``"gated-<act>"``, where
    ``gated-gelu`` means the tanh GELU as in HF. ``tie_word_embeddings`` and
    ``scale_decoder_outputs``: see the module docstring. ``lora`` places the adapters (targets
    among q, k, v, o and the feed-forward's wi_0, wi_1 / wi, wo); ``remat`` is a policy name of
    :mod:`pixelllm.nn.remat` applied to every encoder and decoder layer. ``scan_layers`` stores
    each stack's layers stacked (parameters ``encoder/layers/...``, ``decoder/layers/...`` with a
    leading layer axis) and runs them with ``nnx.scan``: one compiled layer per stack, same values.
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
    scale_decoder_outputs: bool = False
    dropout_rate: float = 0.0
    dropout_shared_over_positions: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    frozen: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    lora: LoRASettings = LoRASettings()
    remat: str = "none"
    scan_layers: bool = False

    def __post_init__(self):
        act = self.feed_forward_proj.removeprefix("gated-")
        if act not in _FEED_FORWARD_ACTIVATIONS:
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r}: expected relu, gelu, "
                             "silu or gated-<one of them>")
        self.lora.check_targets(
            _ATTENTION_TARGETS + (("wi_0", "wi_1", "wo") if self.is_gated else ("wi", "wo")))
        remat_lib.check_remat(self.remat)
        if self.lora.dropout:
            # The official PixelLLM's T5 LoRA folds the adapter into the kernel: no input dropout.
            raise ValueError("lora.dropout is not supported by T5 (only by the decoder LMs)")
        if self.relative_attention_max_distance < self.relative_attention_num_buckets // 2:
            raise ValueError("relative_attention_max_distance must be >= num_buckets // 2 "
                             "(the exact-distance buckets)")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """The :mod:`pixelllm.nn.activations` name of HF's ``dense_act_fn`` (``gated-gelu`` is
        HF's ``gelu_new``, the tanh form)."""
        act = self.feed_forward_proj.removeprefix("gated-")
        return "gelu_tanh" if self.feed_forward_proj == "gated-gelu" else act

    @classmethod
    def from_config(cls, config: T5Config | Mapping[str, Any]) -> T5Config:
        """From ``configs/t5.py``'s ``config.model`` (a ConfigDict with a ``lora`` sub-dict)."""
        if isinstance(config, cls):
            return config
        fields = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        fields["lora"] = LoRASettings.from_mapping(fields.pop("lora", None))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise ValueError(f"unknown T5 config fields {unknown}")
        return cls(**fields)


class T5DecoderOutput(NamedTuple):
    """``logits: [B, L, V]`` float32, ``hidden: [B, L, D]`` (after the final norm, before the
    final dropout), the cache, and
    ``attention``: ``{layer: float32 [B, H, L, Le]}`` cross-attention probabilities of the requested
    decoder layers over the encoder output, or None."""

    logits: jax.Array
    hidden: jax.Array
    cache: Cache | None
    attention: dict[int, jax.Array] | None = None


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


def _dropout(x: jax.Array, cfg: T5Config, rngs: nnx.Rngs | None) -> jax.Array:
    """Inverted dropout of ``x [..., L, D]`` at ``cfg.dropout_rate``; with
    ``cfg.dropout_shared_over_positions`` one mask per example and feature, shared along axis -2
    (the positions; the queries of attention probabilities ``[B, H, Lq, Lk]``), as t5x."""
    rate = cfg.dropout_rate
    if rngs is None or rate == 0.0:
        return x
    shape = list(x.shape)
    if cfg.dropout_shared_over_positions:
        shape[-2] = 1
    return inverted_dropout(x, rate, rngs.dropout(), mask_shape=shape)


def _normal(std: float) -> nnx.Initializer:
    return nnx.initializers.normal(stddev=std)


class Attention(nnx.Module):
    """Multi-head attention with T5's unscaled scores and an optional additive position bias."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
        self.num_heads, self.d_kv, self.config = cfg.num_heads, cfg.d_kv, cfg
        self.dtype = jnp.dtype(cfg.dtype)
        # HF's initialisation, so a randomly initialised model behaves like T5 at init.
        stds = {"q": (d * cfg.d_kv) ** -0.5, "k": d ** -0.5, "v": d ** -0.5, "o": inner ** -0.5}
        for name, std in stds.items():
            shape, axes = ((inner, d), ("heads", "embed")) if name == "o" else ((d, inner),
                                                                             ("embed", "heads"))
            setattr(self, name, lora.LoRALinear(
                *shape, axes=axes, rngs=rngs, frozen=cfg.frozen, dtype=self.dtype,
                param_dtype=jnp.dtype(cfg.param_dtype), kernel_init=_normal(std),
                rank=cfg.lora.rank_of(name), scale=cfg.lora.scale))

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.num_heads, self.d_kv)

    def key_value(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``x: [B, T, D]`` -> keys and values ``[B, T, H, Dkv]``."""
        return self._heads(self.k(x)), self._heads(self.v(x))

    def __call__(self, x: jax.Array, key: jax.Array, value: jax.Array, *, mask: jax.Array,
                 bias: jax.Array | None, rngs: nnx.Rngs | None) -> tuple[jax.Array, jax.Array]:
        """``x: [B, L, D]``, ``key``/``value: [B, T, H, Dkv]`` -> ``[B, L, D]`` and the float32
        probabilities ``[B, H, L, T]`` (before dropout).

        ``mask``: bool, broadcastable to ``[B, L, T]`` (True = attend); ``bias``: float32,
        broadcastable to ``[B, H, L, T]``.
        """
        query = self._heads(self.q(x))
        scores = jnp.einsum("blhd,bthd->bhlt", query, key.astype(self.dtype),
                            preferred_element_type=jnp.float32)
        if bias is not None:
            scores = scores + bias
        scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        dropped = _dropout(probs.astype(self.dtype), self.config, rngs)
        out = jnp.einsum("bhlt,bthd->blhd", dropped, value.astype(self.dtype))
        return self.o(out.reshape(*out.shape[:2], -1)), probs


class FeedForward(nnx.Module):
    """``wo(act(wi_0 x) * wi_1 x)`` when gated, else ``wo(act(wi x))``."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.activation = activations.activation(cfg.activation)
        self.config = cfg
        inputs = ("wi_0", "wi_1") if cfg.is_gated else ("wi",)
        common = dict(rngs=rngs, frozen=cfg.frozen, dtype=jnp.dtype(cfg.dtype),
                      param_dtype=jnp.dtype(cfg.param_dtype))

        for name in inputs:
            setattr(self, name, lora.LoRALinear(
                cfg.d_model, cfg.d_ff, axes=("embed", "mlp"),
                kernel_init=_normal(cfg.d_model ** -0.5), rank=cfg.lora.rank_of(name),
                scale=cfg.lora.scale, **common))
        self.wo = lora.LoRALinear(cfg.d_ff, cfg.d_model, axes=("mlp", "embed"),
                                  kernel_init=_normal(cfg.d_ff ** -0.5),
                                  rank=cfg.lora.rank_of("wo"), scale=cfg.lora.scale, **common)
        self.gated = cfg.is_gated

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        """``x: [..., D] -> [..., D]``."""
        if self.gated:
            h = self.activation(self.wi_0(x)) * self.wi_1(x)
        else:
            h = self.activation(self.wi(x))
        return self.wo(_dropout(h, self.config, rngs))


def _norm(cfg: T5Config) -> RMSNorm:
    return RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, frozen=cfg.frozen,
                   dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def _layers(cfg: T5Config, layers: list[nnx.Module]) -> nnx.Module:
    """The stack's layers, stacked for ``nnx.scan`` with ``scan_layers``. Built one by one either
    way, so both layouts start from the same weights."""
    return stacked_lib.stack_modules(layers) if cfg.scan_layers else nnx.List(layers)


def _scan_rngs(rngs: nnx.Rngs | None, count: int) -> jax.Array | None:
    """One dropout key per scanned layer (``[count]`` keys), or None without dropout."""
    return None if rngs is None else jax.random.split(rngs.dropout(), count)


def _layer_rngs(key: jax.Array | None) -> nnx.Rngs | None:
    return None if key is None else nnx.Rngs(dropout=key)


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
        self.config = cfg
        self.self_attention_norm = _norm(cfg)
        self.self_attention = Attention(cfg, rngs=rngs)
        self.mlp_norm = _norm(cfg)
        self.mlp = FeedForward(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, *, mask: jax.Array, bias: jax.Array,
                 rngs: nnx.Rngs | None) -> jax.Array:
        """``x: [B, Le, D]``, ``mask: [B, 1, Le]``, ``bias: [1, H, Le, Le]`` -> ``[B, Le, D]``."""
        h = self.self_attention_norm(x)
        key, value = self.self_attention.key_value(h)
        h, _ = self.self_attention(h, key, value, mask=mask, bias=bias, rngs=rngs)
        x = x + _dropout(h, self.config, rngs)
        return x + _dropout(self.mlp(self.mlp_norm(x), rngs), self.config, rngs)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.config = cfg
        self.self_attention_norm = _norm(cfg)
        self.self_attention = Attention(cfg, rngs=rngs)
        self.cross_attention_norm = _norm(cfg)
        self.cross_attention = Attention(cfg, rngs=rngs)
        self.mlp_norm = _norm(cfg)
        self.mlp = FeedForward(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, *, positions: jax.Array, self_mask: jax.Array,
                 bias: jax.Array, encoded: jax.Array | None, cross_mask: jax.Array,
                 cache: dict[str, jax.Array] | None, rngs: nnx.Rngs | None
                 ) -> tuple[jax.Array, dict[str, jax.Array] | None, jax.Array]:
        """``x: [B, L, D]``, ``positions: [B, L]``, ``self_mask: [B, L, T]``,
        ``bias: [B, H, L, T]``, ``encoded: [B, Le, D]`` (unused with a cache),
        ``cross_mask: [B, 1, Le]`` -> ``([B, L, D], updated layer cache, cross-attention
        probabilities [B, H, L, Le])``."""
        h = self.self_attention_norm(x)
        key, value = self.self_attention.key_value(h)
        if cache is not None:
            rows = jnp.arange(x.shape[0])[:, None]
            cache = dict(cache)
            for name, new in (("k", key), ("v", value)):
                cache[name] = cache[name].at[rows, positions].set(
                    new.astype(cache[name].dtype), mode="drop")
            key, value = cache["k"], cache["v"]
        h, _ = self.self_attention(h, key, value, mask=self_mask, bias=bias, rngs=rngs)
        x = x + _dropout(h, self.config, rngs)

        h = self.cross_attention_norm(x)
        if cache is not None:
            key, value = cache["cross_k"], cache["cross_v"]
        else:
            key, value = self.cross_attention.key_value(encoded)
        h, cross_probs = self.cross_attention(h, key, value, mask=cross_mask, bias=None, rngs=rngs)
        x = x + _dropout(h, self.config, rngs)
        x = x + _dropout(self.mlp(self.mlp_norm(x), rngs), self.config, rngs)
        return x, cache, cross_probs


class Encoder(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.config = cfg
        self.relative_attention_bias = _bias_table(cfg, rngs)
        self.layers = _layers(cfg, [EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = _norm(cfg)

    def __call__(self, x: jax.Array, mask: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        """``x: [B, Le, D]`` (input dropout already applied, :meth:`T5.embed`), ``mask: [B, Le]``
        bool -> ``[B, Le, D]``."""
        position = jnp.arange(x.shape[1])
        bias = _position_bias(self.relative_attention_bias,
                              position[None, :] - position[:, None], self.config,
                              bidirectional=True)[None]
        block = remat_lib.remat(
            lambda layer, x, rngs: layer(x, mask=mask[:, None, :], bias=bias, rngs=rngs),
            self.config.remat)
        if self.config.scan_layers:
            @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry)
            def run_stack(x, layer, key):
                return block(layer, x, _layer_rngs(key))

            x = run_stack(x, self.layers, _scan_rngs(rngs, self.config.num_layers))
        else:
            for layer in self.layers:
                x = block(layer, x, rngs)
        return _dropout(self.final_norm(x), self.config, rngs)


class Decoder(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.config = cfg
        self.relative_attention_bias = _bias_table(cfg, rngs)
        self.layers = _layers(cfg, [DecoderLayer(cfg, rngs=rngs)
                                    for _ in range(cfg.num_decoder_layers)])
        self.final_norm = _norm(cfg)

    def __call__(self, x: jax.Array, *, positions: jax.Array, encoded: jax.Array | None,
                 encoder_mask: jax.Array, cache: Cache | None, rngs: nnx.Rngs | None,
                 attention_layers: Sequence[int] = ()
                 ) -> tuple[jax.Array, Cache | None, dict[int, jax.Array]]:
        """``x: [B, L, D]``, ``positions: [B, L]``, ``encoded: [B, Le, D]``,
        ``encoder_mask: [B, Le]`` -> ``([B, L, D] after the final norm, before the final
        dropout (:meth:`T5.decode` applies it for the logits), updated cache,
        {layer: cross-attention probabilities [B, H, L, Le]} of ``attention_layers``)``."""
        if cache is None:
            key_positions = positions
        else:
            # Self-attention slots T: keys [B, T, H, Dkv] per layer, or stacked [B, n, T, H, Dkv].
            keys = cache["layers"]["k"] if self.config.scan_layers else cache["layers"][0]["k"]
            key_positions = jnp.arange(keys.shape[-3])[None]
        relative = key_positions[:, None, :] - positions[:, :, None]  # [B, L, T]
        bias = _position_bias(self.relative_attention_bias, relative, self.config,
                              bidirectional=False)
        x = _dropout(x, self.config, rngs)
        block = remat_lib.remat(
            lambda layer, x, layer_cache, rngs: layer(
                x, positions=positions, self_mask=relative <= 0, bias=bias, encoded=encoded,
                cross_mask=encoder_mask[:, None, :], cache=layer_cache, rngs=rngs),
            self.config.remat)
        if self.config.scan_layers:
            x, layer_caches, attention = self._scan_layers(
                block, x, None if cache is None else cache["layers"], rngs, attention_layers)
        else:
            layer_caches, attention = [], {}
            for i, layer in enumerate(self.layers):
                x, layer_cache, probs = block(
                    layer, x, None if cache is None else cache["layers"][i], rngs)
                layer_caches.append(layer_cache)
                if i in attention_layers:
                    attention[i] = probs
        x = self.final_norm(x)
        if cache is not None:
            cache = {"encoder_mask": cache["encoder_mask"], "layers": layer_caches}
        return x, cache, attention

    def _scan_layers(self, block, x: jax.Array, layers_cache: Cache | None,
                     rngs: nnx.Rngs | None, attention_layers: Sequence[int]
                     ) -> tuple[jax.Array, Cache | None, dict[int, jax.Array]]:
        """The stacked layers under ``nnx.scan``. The stacked cache (``[B, n, ...]`` leaves) is
        carried whole and each layer reads and writes its own slice, so it is updated in place
        instead of being moved to a layer-major copy and back."""
        count = self.config.num_decoder_layers
        keep_probs = bool(attention_layers)

        @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0))
        def run_stack(carry, layer, index, key):
            x, stacked = carry
            x, layer_kv, probs = block(layer, x, stacked_lib.layer_cache(stacked, index),
                                       _layer_rngs(key))
            stacked = stacked_lib.write_layer_cache(stacked, layer_kv, index)
            return (x, stacked), (probs if keep_probs else None)

        (x, layers_cache), probs = run_stack((x, layers_cache), self.layers,
                                             jnp.arange(count, dtype=jnp.int32),
                                             _scan_rngs(rngs, count))
        return x, layers_cache, {i: probs[i] for i in attention_layers}


class T5(AddedTokenRows, nnx.Module):
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
        # Data (not static) although None until add_token_rows fills it.
        self.added_tokens: AddedTokens | None = nnx.data(None)

    @classmethod
    def from_config(cls, model_config: Mapping[str, Any], *, rngs: nnx.Rngs) -> T5:
        """From the ``model`` field of ``configs/t5.py``."""
        return cls(model_config, rngs=rngs)

    @property
    def width(self) -> int:
        return self.config.d_model

    def embed(self, tokens: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """``tokens: [B, L]`` int -> ``[B, L, D]`` in the compute dtype (T5 does not rescale);
        ``rngs`` applies the encoder's input dropout."""
        table = self.embedding.get_value()
        if self.added_tokens is None:
            x = table[tokens].astype(self.dtype)
        else:
            x = self.added_tokens.embed(table, tokens).astype(self.dtype)
        return _dropout(x, self.config, rngs)

    def encode(self, *, tokens: jax.Array | None = None, embeddings: jax.Array | None = None,
               input_mask: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Either ``tokens: [B, Le]`` or ``embeddings: [B, Le, D]`` (visual tokens, then the
        context tokens' :meth:`embed`); ``input_mask: [B, Le]`` (nonzero = real token).

        Returns the encoder output after its final norm, ``[B, Le, D]``.
        """
        if (tokens is None) == (embeddings is None):
            raise ValueError("pass exactly one of tokens and embeddings")
        x = (self.embed(tokens, rngs=rngs) if embeddings is None
             else embeddings.astype(self.dtype))
        return self.encoder(x, jnp.asarray(input_mask).astype(bool), rngs)

    def decode(self, *, tokens: jax.Array, positions: jax.Array,
               encoded: jax.Array | None = None, encoder_mask: jax.Array | None = None,
               cache: Cache | None = None, rngs: nnx.Rngs | None = None,
               attention_layers: Sequence[int] = ()) -> T5DecoderOutput:
        """``tokens: [B, L]`` int at ``positions: [B, L]`` (0 = the decoder start token).

        Without ``cache``: teacher forcing over ``encoded: [B, Le, D]`` and ``encoder_mask:
        [B, Le]``. With ``cache`` (from :meth:`init_cache`): the encoder side comes from the
        cache (``encoded``/``encoder_mask`` may be omitted and are ignored) and the returned
        cache holds these tokens' keys and values. ``attention_layers``: decoder layers whose
        cross-attention probabilities are returned.
        """
        bad = sorted(set(attention_layers) - set(range(self.config.num_decoder_layers)))
        if bad:
            raise ValueError(f"attention_layers {bad} out of range for "
                             f"{self.config.num_decoder_layers} decoder layers")
        if cache is None:
            if encoded is None or encoder_mask is None:
                raise ValueError("decode without a cache needs encoded and encoder_mask")
            encoder_mask = jnp.asarray(encoder_mask).astype(bool)
        else:
            encoded, encoder_mask = None, cache["encoder_mask"]
        hidden, cache, attention = self.decoder(
            self.embed(tokens), positions=jnp.asarray(positions), encoded=encoded,
            encoder_mask=encoder_mask, cache=cache, rngs=rngs, attention_layers=attention_layers)
        logits = self.logits(_dropout(hidden, self.config, rngs))
        return T5DecoderOutput(logits=logits, hidden=hidden, cache=cache,
                               attention=attention or None)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """``hidden: [..., D]`` (decoder output) -> float32 ``[..., V]``, added tokens last."""
        if self.config.scale_decoder_outputs:
            # Original T5: rescale so the embedding's scale suits the tied output projection.
            hidden = hidden * jnp.asarray(self.config.d_model ** -0.5, hidden.dtype)
        kernel = self.embedding.get_value().T if self.lm_head is None else self.lm_head.get_value()
        logits = output_projection.project(hidden, kernel.astype(hidden.dtype))
        if self.added_tokens is not None:
            logits = jnp.concatenate([logits, self.added_tokens.logits(hidden)], axis=-1)
        return logits

    def init_cache(self, encoded: jax.Array, encoder_mask: jax.Array, max_length: int,
                   dtype: jnp.dtype | None = None) -> Cache:
        """Empty self-attention buffers of ``max_length`` slots plus the cross-attention keys and
        values of ``encoded: [B, Le, D]`` (``encoder_mask: [B, Le]``); layout in the module
        docstring. ``dtype`` defaults to the compute dtype."""
        dtype = jnp.dtype(dtype or self.dtype)
        shape = (encoded.shape[0], max_length, self.config.num_heads, self.config.d_kv)
        encoder_mask = jnp.asarray(encoder_mask).astype(bool)
        if self.config.scan_layers:
            @nnx.scan(in_axes=(0, None), out_axes=0)
            def cross_key_value(layer, encoded):
                return layer.cross_attention.key_value(encoded)

            # [n, B, Le, H, Dkv] -> [B, n, Le, H, Dkv]: the batch leads every cache leaf.
            key, value = (jnp.moveaxis(t, 0, 1).astype(dtype) for t in
                          cross_key_value(self.decoder.layers, encoded.astype(self.dtype)))
            stacked = (shape[0], self.config.num_decoder_layers, *shape[1:])
            return {"encoder_mask": encoder_mask,
                    "layers": {"k": jnp.zeros(stacked, dtype), "v": jnp.zeros(stacked, dtype),
                               "cross_k": key, "cross_v": value}}
        layers = []
        for layer in self.decoder.layers:
            key, value = layer.cross_attention.key_value(encoded.astype(self.dtype))
            # Separate buffers per leaf, so a jitted step may donate the cache.
            layers.append({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
                           "cross_k": key.astype(dtype), "cross_v": value.astype(dtype)})
        return {"encoder_mask": encoder_mask, "layers": layers}

    @staticmethod
    def cache_logical_axes(cache: Cache) -> Cache:
        """The logical axis names of every cache leaf (same tree), to shard the cache with
        :func:`pixelllm.sharding.array_shardings` like the keys/values that fill it."""
        kv = ("batch", "length", "heads", "kv")
        # Stacked (scanned) layers carry the layer on axis 1, never sharded.
        layer_axes = lambda leaf: kv if leaf.ndim == len(kv) else ("batch", None, *kv[1:])
        return {"encoder_mask": ("batch", "length"),
                "layers": jax.tree.map(layer_axes, cache["layers"])}

    # ------------------------------------------------------------------ LanguageModel

    def forward(self, *, prefix: jax.Array, prefix_mask: jax.Array, tokens: jax.Array,
                token_mask: jax.Array, rngs: nnx.Rngs | None = None,
                attention_layers: Sequence[int] = ()) -> TextOutput:
        """The encoder reads ``prefix [N, P, D]`` (``prefix_mask [N, P]``), the decoder the text
        ``tokens [N, L]`` at positions ``0..L-1`` (causal, so padding after the text changes
        nothing before it; ``token_mask`` is not needed). ``rngs`` enables dropout;
        ``attention`` holds decoder cross-attention over the prefix."""
        del token_mask
        prefix_mask = prefix_mask.astype(bool)
        encoded = self.encode(embeddings=prefix, input_mask=prefix_mask, rngs=rngs)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        out = self.decode(tokens=tokens, positions=positions, encoded=encoded,
                          encoder_mask=prefix_mask, rngs=rngs, attention_layers=attention_layers)
        return TextOutput(out.logits, out.hidden, out.attention)

    def prefill(self, *, prefix: jax.Array, prefix_mask: jax.Array, bos_id: int,
                max_new_tokens: int) -> DecodeStart:
        """Encodes the prefix once into a cache of ``1 + max_new_tokens`` decoder slots, then runs
        BOS (the decoder start token) at position 0."""
        n = prefix.shape[0]
        prefix_mask = prefix_mask.astype(bool)
        encoded = self.encode(embeddings=prefix, input_mask=prefix_mask)
        cache = self.init_cache(encoded, prefix_mask, max_new_tokens + 1)
        out = self.decode(tokens=jnp.full((n, 1), bos_id, jnp.int32),
                          positions=jnp.zeros((n, 1), jnp.int32), cache=cache)
        return DecodeStart(out.cache, out.logits[:, 0], jnp.ones((n,), jnp.int32), out.hidden[:, 0])

    def decode_step(self, tokens: jax.Array, positions: jax.Array,
                    cache: Cache) -> tuple[jax.Array, jax.Array, Cache]:
        return decoding.encoder_decoder_step(self)(tokens, positions, cache)

    def load_hf_weights(self, state_dict: Mapping[str, np.ndarray], *, source: str) -> T5:
        return load(self, state_dict, source=source)


# ----------------------------------------------------------------------------------------------
# Hugging Face checkpoints.

# HF sub-layer module -> (ours, the projections it holds); HF's `layer_norm` of the sub-layer is
# our `<ours>_norm`. Both feed-forward layouts are listed: the model's own parameters decide.
_SUBLAYERS = {"SelfAttention": ("self_attention", _ATTENTION_TARGETS),
              "EncDecAttention": ("cross_attention", _ATTENTION_TARGETS),
              "DenseReluDense": ("mlp", ("wi", "wi_0", "wi_1", "wo"))}
# The sub-layers of a block of each stack, in HF's `block.{i}.layer.{index}` order.
_STACKS = {"encoder": ("SelfAttention", "DenseReluDense"),
           "decoder": ("SelfAttention", "EncDecAttention", "DenseReluDense")}
# `shared.weight` and the copies of it that HF files may carry (files may also drop it and keep
# a copy: HF ties them either way).
_EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# Never used by HF's forward (cross-attention has no position bias); HF ignores it on load.
_DROPPED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def key_rules(config: T5Config) -> list[Rule]:
    """The key map from a Hugging Face ``T5ForConditionalGeneration`` file to a :class:`T5`'s
    base weights (:mod:`pixelllm.checkpoints.key_map`).

    Every embedding key present gives ``embedding`` and must agree with the others; so does
    ``lm_head.weight`` when ``tie_word_embeddings`` (otherwise it is the output projection).
    """
    rules = [Rule(key, "embedding") for key in _EMBEDDING_KEYS]
    rules.append(Rule("lm_head.weight", "embedding") if config.tie_word_embeddings
                 else Rule("lm_head.weight", "lm_head", TRANSPOSE))
    for stack, sublayers in _STACKS.items():
        rules += [Rule(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                       f"{stack}/relative_attention_bias"),
                  Rule(f"{stack}.final_layer_norm.weight", f"{stack}/final_norm/scale")]
        for index, hf_name in enumerate(sublayers):
            ours, projections = _SUBLAYERS[hf_name]
            layer = [Rule("layer_norm.weight", f"{ours}_norm/scale")]
            layer += [Rule(f"{hf_name}.{name}.weight", f"{ours}/{name}/kernel", TRANSPOSE)
                      for name in projections]
            rules += prefixed(layer, source=f"{stack}.block.{{i}}.layer.{index}.",
                              target=f"{stack}/layers/{{i}}/")
    return rules


def _tie_hint(config: T5Config, state_dict: Mapping[str, np.ndarray]) -> str | None:
    if config.tie_word_embeddings or "lm_head.weight" in state_dict:
        return None
    return "the file has no lm_head.weight: this looks like a tied T5 (tie_word_embeddings=True)"


def load(module: T5, state_dict: Mapping[str, np.ndarray], *, source: str) -> T5:
    """Fills ``module``'s frozen base weights (in place, strictly) from a Hugging Face
    ``T5ForConditionalGeneration`` state dict; returns it.

    torch Linear ``(out, in)`` weights become kernels ``(in, out)``; values are cast to each
    parameter's dtype. LoRA factors and added token rows are not in such files and keep their
    values. With ``scan_layers`` each stack's layers are converted one by one and stacked. A
    mismatch raises :class:`~pixelllm.checkpoints.assign.CheckpointMismatchError` naming
    ``source`` and the file's keys (embedding copies that differ included), and leaves the model
    as it was.
    """
    stacked = ("encoder/layers", "decoder/layers") if module.config.scan_layers else ()
    return key_map.load(module, state_dict, key_rules(module.config), source=source, drop=_DROPPED,
                        hint=_tie_hint(module.config, state_dict), wrt=lora.BASE_WEIGHTS,
                        stacked=stacked)
