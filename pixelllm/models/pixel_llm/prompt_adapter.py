"""The prompt adapter: fused image features + a location prompt -> the LM's visual tokens.

As the official PixelLLM (``modeling/prompt_adapter.py``): a SAM-style two-way transformer whose
queries are ``num_queries`` learned tokens followed by the prompt's SAM prompt-encoder tokens, and
whose keys are the fused feature map plus SAM's dense prompt embedding, with SAM's random-Fourier
positional encoding of the map's cell centres. The learned queries' outputs are projected to the
language model's width (Dense to ``visual_features``, then Dense + LayerNorm to the LM width), one
set of ``num_queries`` visual tokens per caption slot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pixelllm.encoders.sam.two_way_transformer import TwoWayTransformer
from pixelllm.nn import layers


class PromptAdapter(nnx.Module):
    """Visual tokens for each prompt.

    Args:
      image_features: channels of the fused map (EVA02 + SAM, 1280 at full size).
      prompt_features: channels of SAM's prompt tokens and positional encoding (256).
      out_features: the language model's width.
      dim, depth, num_heads, mlp_dim: the two-way transformer (512, 6, 8, 2048 officially).
      num_queries: learned query tokens = visual tokens per slot (32).
      visual_features: width of the intermediate projection (1024).
    """

    def __init__(self, *, image_features: int, prompt_features: int, out_features: int,
                 dim: int = 512, depth: int = 6, num_heads: int = 8, mlp_dim: int = 2048,
                 num_queries: int = 32, visual_features: int = 1024,
                 layer_norm_eps: float = 1e-5, rngs: nnx.Rngs):
        self.num_queries = num_queries
        self.queries = layers.param(
            nnx.initializers.normal(0.02)(rngs.params(), (num_queries, dim)), (None, "embed"))
        self.image_proj = layers.linear(image_features, dim, axes=("embed", "mlp"), rngs=rngs)
        self.dense_prompt_proj = layers.linear(prompt_features, dim, axes=("embed", "mlp"),
                                               rngs=rngs)
        self.pe_proj = layers.linear(prompt_features, dim, axes=("embed", "mlp"), rngs=rngs)
        self.prompt_proj = layers.linear(prompt_features, dim, axes=("embed", "mlp"), rngs=rngs)
        self.transformer = TwoWayTransformer(depth=depth, embedding_dim=dim, num_heads=num_heads,
                                             mlp_dim=mlp_dim, layer_norm_eps=layer_norm_eps,
                                             rngs=rngs)
        self.visual_proj = layers.linear(dim, visual_features, axes=("mlp", "embed"), rngs=rngs)
        self.lm_proj = layers.linear(visual_features, out_features, axes=("mlp", "embed"),
                                     rngs=rngs)
        self.lm_norm = layers.layer_norm(out_features, eps=layer_norm_eps, rngs=rngs)

    def __call__(self, image: jax.Array, image_pe: jax.Array, prompt_tokens: jax.Array,
                 dense_prompt: jax.Array) -> jax.Array:
        """Args:
          image: fused map ``[B, h, w, Ci]``.
          image_pe: positional encoding of its cells ``[h, w, Cp]``.
          prompt_tokens: SAM prompt-encoder tokens per slot ``[B, S, T, Cp]``.
          dense_prompt: SAM's dense prompt embedding, ``[Cp]`` (``no_mask_embed``).

        Returns:
          visual tokens ``[B, S, num_queries, out_features]``.
        """
        batch, slots, num_prompt_tokens = prompt_tokens.shape[:3]
        height, width = image.shape[1:3]
        keys = self.image_proj(image) + self.dense_prompt_proj(dense_prompt)
        keys = jnp.repeat(keys.reshape(batch, 1, height * width, -1), slots, axis=1)
        queries = jnp.concatenate([
            jnp.broadcast_to(self.queries[...], (batch, slots, *self.queries.shape)),
            self.prompt_proj(prompt_tokens)], axis=2)
        flat = batch * slots
        out, _ = self.transformer(keys.reshape(flat, height * width, -1),
                                  self.pe_proj(image_pe).reshape(height * width, -1),
                                  queries.reshape(flat, self.num_queries + num_prompt_tokens, -1))
        visual = self.lm_proj(self.visual_proj(out[:, :self.num_queries]))
        return self.lm_norm(visual).reshape(batch, slots, self.num_queries, -1)
