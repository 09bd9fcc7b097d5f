"""The mask adapter: language and visual context added to SAM's box tokens for referring
segmentation.

As the official ``SamMaskAdaptor``: the slot's visual tokens and its text tokens' hidden states
are each layer-normed and projected to SAM's prompt width; together they are the keys (no
positional encoding) of a small two-way transformer whose queries are ``num_queries`` learned
tokens. The query outputs, scaled by ``tanh(alpha)`` with ``alpha`` initialised to zero, are added
to the two box-corner tokens of SAM's prompt encoder, so an untrained adapter leaves SAM's own
box-prompted mask unchanged. Unlike the official, padded text tokens are masked out of attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pixelllm.encoders.sam.two_way_transformer import TwoWayTransformer
from pixelllm.nn import layers


class MaskAdapter(nnx.Module):
    """Args:
      visual_features: width of the visual tokens (the LM width).
      text_features: width of the LM hidden states.
      prompt_features: SAM's prompt width C (256).
      num_queries: learned queries = box tokens they are added to (2).
      depth, num_heads, mlp_dim: the two-way transformer (2, 8, 2048).
      dtype: compute dtype (LayerNorm statistics, softmax and the tanh gate stay float32);
        ``param_dtype``: storage dtype.
      remat: the two-way transformer's rematerialization policy (:mod:`pixelllm.nn.remat`).
    """

    def __init__(self, *, visual_features: int, text_features: int, prompt_features: int,
                 num_queries: int = 2, depth: int = 2, num_heads: int = 8, mlp_dim: int = 2048,
                 layer_norm_eps: float = 1e-5, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32, remat: str = "none", rngs: nnx.Rngs):
        self.dtype = dtype
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.visual_norm = layers.layer_norm(visual_features, eps=layer_norm_eps, **common)
        self.visual_proj = layers.linear(visual_features, prompt_features, axes=("embed", "mlp"),
                                         **common)
        self.text_norm = layers.layer_norm(text_features, eps=layer_norm_eps, **common)
        self.text_proj = layers.linear(text_features, prompt_features, axes=("embed", "mlp"),
                                       **common)
        self.queries = layers.param(
            nnx.initializers.normal(0.02)(rngs.params(), (num_queries, prompt_features),
                                          param_dtype),
            (None, "embed"))
        self.transformer = TwoWayTransformer(depth=depth, embedding_dim=prompt_features,
                                             num_heads=num_heads, mlp_dim=mlp_dim,
                                             layer_norm_eps=layer_norm_eps, remat=remat, **common)
        self.alpha = layers.param(jnp.zeros((num_queries, prompt_features), param_dtype),
                                  (None, "embed"))

    def __call__(self, box_tokens: jax.Array, visual_tokens: jax.Array, text_hidden: jax.Array,
                 text_mask: jax.Array) -> jax.Array:
        """``box_tokens [N, Q, C]``, ``visual_tokens [N, V, Dv]``, ``text_hidden [N, L, Dt]``,
        ``text_mask [N, L]`` -> adapted box tokens ``[N, Q, C]`` in ``box_tokens``' dtype."""
        keys = jnp.concatenate([self.visual_proj(self.visual_norm(visual_tokens)),
                                self.text_proj(self.text_norm(text_hidden))], axis=1)
        key_mask = jnp.concatenate([jnp.ones(visual_tokens.shape[:2], bool),
                                    text_mask.astype(bool)], axis=1)
        queries = jnp.broadcast_to(self.queries[...].astype(self.dtype), box_tokens.shape)
        out, _ = self.transformer(keys, jnp.zeros(keys.shape[1:], self.dtype), queries,
                                  key_mask=key_mask)
        gate = jnp.tanh(self.alpha[...].astype(jnp.float32))
        return (box_tokens + gate * out).astype(box_tokens.dtype)
