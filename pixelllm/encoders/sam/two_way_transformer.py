"""SAM's two-way transformer: sparse tokens and a dense image map attending to each other.

Used by SAM's mask decoder and, at other sizes, by PixelLLM's prompt adapter (depth 6, width
512) and mask adapter, so nothing here is specific to SAM's 256-wide, 2-layer instance.

Each block runs (1) self-attention of the tokens, (2) tokens -> image cross-attention, (3) an
MLP on the tokens, (4) image -> tokens cross-attention, each followed by a residual add and a
LayerNorm. The tokens' positional encoding is the initial token embedding itself; it is added
to queries and keys before every attention, except in the first block's self-attention, which
also has no residual (as SAM). A last tokens -> image attention and LayerNorm end the stack.
Cross-attentions project to ``embedding_dim // attention_downsample_rate`` channels.

LayerNorm eps differs between releases: segment_anything uses torch's default 1e-5 everywhere;
the Hugging Face port uses 1e-6 in the blocks and keeps 1e-5 for the final norm, hence the
separate ``final_layer_norm_eps``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pixelllm.checkpoints.key_map import TRANSPOSE, Rule
from pixelllm.nn import layers
from pixelllm.nn import remat as remat_lib
from pixelllm.nn.layers import linear

Activation = Callable[[jax.Array], jax.Array]

LAYOUTS = ("segment_anything", "transformers")


class Attention(nnx.Module):
    """Multi-head attention with q/k/v projected to ``embedding_dim // downsample_rate``.

    ``q: [B, Nq, C]``, ``k, v: [B, Nk, C]`` -> ``[B, Nq, C]``; ``key_mask: [B, Nk]`` (True =
    attend) leaves keys out, e.g. padded text tokens used as keys by PixelLLM's mask adapter.
    """

    def __init__(self, *, embedding_dim: int, num_heads: int, downsample_rate: int = 1,
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        internal_dim = embedding_dim // downsample_rate
        if embedding_dim % downsample_rate or internal_dim % num_heads:
            raise ValueError(f"embedding_dim {embedding_dim} / downsample_rate {downsample_rate} "
                             f"must be a whole multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = linear(embedding_dim, internal_dim, axes=("embed", "heads"), **common)
        self.k_proj = linear(embedding_dim, internal_dim, axes=("embed", "heads"), **common)
        self.v_proj = linear(embedding_dim, internal_dim, axes=("embed", "heads"), **common)
        self.out_proj = linear(internal_dim, embedding_dim, axes=("heads", "embed"), **common)

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array,
                 key_mask: jax.Array | None = None) -> jax.Array:
        def heads(x):
            return x.reshape(*x.shape[:-1], self.num_heads, x.shape[-1] // self.num_heads)

        mask = None if key_mask is None else key_mask[:, None, None, :].astype(bool)
        out = jax.nn.dot_product_attention(heads(self.q_proj(q)), heads(self.k_proj(k)),
                                           heads(self.v_proj(v)), mask=mask)
        return self.out_proj(out.reshape(*out.shape[:-2], -1))


class MLPBlock(nnx.Module):
    """``lin2(activation(lin1(x)))``; ``x: [..., C]`` -> ``[..., C]``."""

    def __init__(self, *, embedding_dim: int, mlp_dim: int, activation: Activation,
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.lin1 = linear(embedding_dim, mlp_dim, axes=("embed", "mlp"), **common)
        self.lin2 = linear(mlp_dim, embedding_dim, axes=("mlp", "embed"), **common)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.lin2(self.activation(self.lin1(x)))


class TwoWayAttentionBlock(nnx.Module):
    """One block; ``queries, query_pe: [B, N, C]``, ``keys, key_pe: [B, HW, C]``."""

    def __init__(self, *, embedding_dim: int, num_heads: int, mlp_dim: int,
                 attention_downsample_rate: int, layer_norm_eps: float, activation: Activation,
                 skip_first_layer_pe: bool, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = Attention(embedding_dim=embedding_dim, num_heads=num_heads, **common)
        self.norm1 = layers.layer_norm(embedding_dim, eps=layer_norm_eps, **common)
        self.cross_attn_token_to_image = Attention(
            embedding_dim=embedding_dim, num_heads=num_heads,
            downsample_rate=attention_downsample_rate, **common)
        self.norm2 = layers.layer_norm(embedding_dim, eps=layer_norm_eps, **common)
        self.mlp = MLPBlock(embedding_dim=embedding_dim, mlp_dim=mlp_dim, activation=activation,
                            **common)
        self.norm3 = layers.layer_norm(embedding_dim, eps=layer_norm_eps, **common)
        self.norm4 = layers.layer_norm(embedding_dim, eps=layer_norm_eps, **common)
        self.cross_attn_image_to_token = Attention(
            embedding_dim=embedding_dim, num_heads=num_heads,
            downsample_rate=attention_downsample_rate, **common)
        self.skip_first_layer_pe = skip_first_layer_pe

    def __call__(self, queries: jax.Array, keys: jax.Array, query_pe: jax.Array,
                 key_pe: jax.Array, key_mask: jax.Array | None = None,
                 token_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        if self.skip_first_layer_pe:
            # SAM's first block replaces the tokens by their self-attention (no residual): the
            # tokens are their own positional encoding at this point.
            queries = self.self_attn(queries, queries, queries, token_mask)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries, token_mask)
        queries = self.norm1(queries)

        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys,
                                                                      key_mask))
        queries = self.norm3(queries + self.mlp(queries))

        keys = self.norm4(keys + self.cross_attn_image_to_token(k, queries + query_pe, queries,
                                                                token_mask))
        return queries, keys


class TwoWayTransformer(nnx.Module):
    """Tokens and image embedding updated by ``depth`` two-way blocks.

    Args:
      depth: number of two-way blocks.
      embedding_dim: channels C of tokens and image embedding.
      num_heads: attention heads (must divide ``embedding_dim // attention_downsample_rate``).
      mlp_dim: hidden width of the token MLP.
      attention_downsample_rate: cross-attention internal width is ``embedding_dim // rate``.
      layer_norm_eps: eps of the blocks' LayerNorms (1e-5 segment_anything, 1e-6 transformers).
      final_layer_norm_eps: eps of the final LayerNorm; defaults to ``layer_norm_eps``.
      activation: MLP activation (SAM: ReLU).
      dtype: computation dtype (inputs are cast to it; LayerNorm statistics and the attention
        softmax stay float32); ``param_dtype``: storage dtype.
      remat: the blocks' rematerialization policy (:mod:`pixelllm.nn.remat`). The first block
        differs from the others (no positional encoding in its self-attention), so the blocks
        run one by one rather than under ``nnx.scan``.
    """

    def __init__(self, *, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int,
                 layer_norm_eps: float, attention_downsample_rate: int = 2,
                 final_layer_norm_eps: float | None = None,
                 activation: Activation = jax.nn.relu, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32, remat: str = "none", rngs: nnx.Rngs):
        self.embedding_dim = embedding_dim
        self.dtype = dtype
        self.remat = remat_lib.check_remat(remat)
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim, num_heads=num_heads, mlp_dim=mlp_dim,
                attention_downsample_rate=attention_downsample_rate,
                layer_norm_eps=layer_norm_eps, activation=activation,
                skip_first_layer_pe=(i == 0), **common)
            for i in range(depth)])
        self.final_attn_token_to_image = Attention(
            embedding_dim=embedding_dim, num_heads=num_heads,
            downsample_rate=attention_downsample_rate, **common)
        self.norm_final_attn = layers.layer_norm(
            embedding_dim,
            eps=layer_norm_eps if final_layer_norm_eps is None else final_layer_norm_eps,
            **common)

    def __call__(self, image_embedding: jax.Array, image_pe: jax.Array,
                 point_embedding: jax.Array, key_mask: jax.Array | None = None,
                 token_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Runs the stack.

        Args:
          image_embedding: ``[B, HW, C]`` or ``[B, h, w, C]``.
          image_pe: the image's positional encoding, shaped like ``image_embedding`` with or
            without the batch axis (``[HW, C]`` / ``[h, w, C]``; a batch of 1 broadcasts).
          point_embedding: tokens ``[B, N, C]``; also used as their positional encoding.
          key_mask: optional ``[B, HW]`` bool; False keys are never attended to (SAM passes none).
          token_mask: optional ``[B, N]`` bool; False tokens (padding) are never attended to, so
            the other tokens and the image come out as without them.

        Returns:
          ``(queries [B, N, C], keys [B, HW, C])``.
        """
        keys, key_pe = self._flatten_image(jnp.asarray(image_embedding, self.dtype),
                                           jnp.asarray(image_pe, self.dtype))
        point_embedding = jnp.asarray(point_embedding, self.dtype)
        if point_embedding.ndim != 3 or point_embedding.shape[0] != keys.shape[0] \
                or point_embedding.shape[-1] != self.embedding_dim:
            raise ValueError(f"point_embedding must be [B={keys.shape[0]}, N, "
                             f"C={self.embedding_dim}], got {point_embedding.shape}")
        queries = point_embedding
        run_layer = remat_lib.remat(
            lambda layer, queries, keys: layer(queries, keys, point_embedding, key_pe, key_mask,
                                               token_mask),
            self.remat)
        for layer in self.layers:
            queries, keys = run_layer(layer, queries, keys)
        attn_out = self.final_attn_token_to_image(queries + point_embedding, keys + key_pe, keys,
                                                  key_mask)
        return self.norm_final_attn(queries + attn_out), keys

    def _flatten_image(self, image_embedding, image_pe):
        if image_embedding.ndim not in (3, 4) or image_embedding.shape[-1] != self.embedding_dim:
            raise ValueError(f"image_embedding must be [B, HW, C] or [B, h, w, C] with "
                             f"C={self.embedding_dim}, got {image_embedding.shape}")
        batch, channels = image_embedding.shape[0], image_embedding.shape[-1]
        if image_pe.ndim == image_embedding.ndim - 1:
            image_pe = image_pe[None]
        if image_pe.ndim != image_embedding.ndim or image_pe.shape[0] not in (1, batch) \
                or image_pe.shape[1:] != image_embedding.shape[1:]:
            raise ValueError(f"image_pe {image_pe.shape} does not fit image_embedding "
                             f"{image_embedding.shape}")
        keys = image_embedding.reshape(batch, -1, channels)
        key_pe = jnp.broadcast_to(image_pe.reshape(image_pe.shape[0], -1, channels), keys.shape)
        return keys, key_pe


# ----------------------------------------------------------------------------- checkpoints

def _linear_rules(source: str, target: str) -> list[Rule]:
    return [Rule(f"{source}.weight", f"{target}/kernel", TRANSPOSE),
            Rule(f"{source}.bias", f"{target}/bias")]


def _norm_rules(source: str, target: str) -> list[Rule]:
    return [Rule(f"{source}.weight", f"{target}/scale"), Rule(f"{source}.bias", f"{target}/bias")]


def _attention_rules(source: str, target: str) -> list[Rule]:
    return [rule for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
            for rule in _linear_rules(f"{source}.{proj}", f"{target}/{proj}")]


def key_rules(layout: str) -> list[Rule]:
    """The key map of a :class:`TwoWayTransformer` for :mod:`pixelllm.checkpoints.key_map`.

    Source keys are relative to the transformer (``layers.0.self_attn.q_proj.weight`` once
    ``mask_decoder.transformer.`` is stripped); ``layout`` is ``"segment_anything"``
    (``norm1``, ``norm_final_attn``) or ``"transformers"`` (``layer_norm1``,
    ``layer_norm_final_attn``).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; choose one of {LAYOUTS}")
    norm = "norm{}" if layout == "segment_anything" else "layer_norm{}"
    final_norm = "norm_final_attn" if layout == "segment_anything" else "layer_norm_final_attn"
    src, dst = "layers.{i}", "layers/{i}"
    rules = []
    for attn in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
        rules += _attention_rules(f"{src}.{attn}", f"{dst}/{attn}")
    for j in range(1, 5):
        rules += _norm_rules(f"{src}.{norm.format(j)}", f"{dst}/norm{j}")
    rules += _linear_rules(f"{src}.mlp.lin1", f"{dst}/mlp/lin1")
    rules += _linear_rules(f"{src}.mlp.lin2", f"{dst}/mlp/lin2")
    rules += _attention_rules("final_attn_token_to_image", "final_attn_token_to_image")
    rules += _norm_rules(final_norm, "norm_final_attn")
    return rules
