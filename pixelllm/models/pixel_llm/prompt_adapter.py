"""The prompt adapter: fused image features + a location prompt -> the LM's visual tokens.

As the official PixelLLM (``modeling/prompt_adapter.py``): a SAM-style two-way transformer whose
queries are ``num_queries`` learned tokens followed by the prompt's SAM prompt-encoder tokens, and
whose keys are the fused feature map plus SAM's dense prompt embedding, with SAM's random-Fourier
positional encoding of the map's cell centres. The learned queries' outputs become
``visual_features`` wide, then the projection to the language model's width (Dense + LayerNorm,
the official T5 model's ``visual_project_layers='linear'``) gives one set of ``num_queries``
visual tokens per caption slot.

``style`` selects the output side and the prompt projections:

- ``"official"``: one Dense per query (``output_hypernetworks_mlps.{i}``, 512 -> 1024 each),
  queries initialised N(0, 1), one projection shared by the sparse and the dense prompt.
- ``"shared_output"``: one Dense shared by all queries, queries N(0, 0.02), separate sparse and
  dense prompt projections (``(num_queries - 1) * dim * visual_features`` fewer parameters:
  16M at the paper's size).

The official module also holds ``dense_output_mlp`` (512 -> 1024 on the image side), read only
by its ``prompt_fuse_fn='dense'``; PixelLLM's configs use ``'sparse'``, so it is left out here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pixelllm.encoders.sam.two_way_transformer import TwoWayTransformer
from pixelllm.nn import layers

STYLES = ("official", "shared_output")


class PerQueryLinear(nnx.Module):
    """One Dense per query, stacked: ``[..., Q, in] -> [..., Q, out]``; each kernel initialised
    as its own ``nn.Dense`` (LeCun normal over its ``in`` fan-in, zero bias)."""

    def __init__(self, num_queries: int, in_features: int, out_features: int, *,
                 dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        self.kernel = layers.param(
            init(rngs.params(), (num_queries, in_features, out_features), param_dtype),
            (None, "mlp", "embed"))
        self.bias = layers.param(jnp.zeros((num_queries, out_features), param_dtype),
                                 (None, "embed"))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        return (jnp.einsum("...qi,qio->...qo", x.astype(self.dtype), kernel)
                + self.bias[...].astype(self.dtype))


class PromptAdapter(nnx.Module):
    """Visual tokens for each prompt.

    Args:
      image_features: channels of the fused map (EVA02 + SAM, 1280 at full size).
      prompt_features: channels of SAM's prompt tokens and positional encoding (256).
      out_features: the language model's width.
      style: ``"official"`` or ``"shared_output"`` (module docstring).
      dim, depth, num_heads, mlp_dim: the two-way transformer (512, 6, 8, 2048 officially).
      num_queries: learned query tokens = visual tokens per slot (32).
      visual_features: width of the queries' output layers (1024, the official ``output_dim``).
      box_pad_tokens: copies of SAM's ``no_mask_embed`` after a box's two corner tokens (3
        officially: the box replaces the 5 tokens of the 2x2 corner-point prompt with its padding
        point, and the 3 left over are filled with ``no_mask_embed``); read by
        :meth:`PixelLLM.visual_tokens`, box prompts only.
      dtype: compute dtype (LayerNorm statistics and softmax stay float32); ``param_dtype``:
        storage dtype.
      remat: the two-way transformer's rematerialization policy (:mod:`pixelllm.nn.remat`).
    """

    def __init__(self, *, image_features: int, prompt_features: int, out_features: int,
                 style: str = "official", dim: int = 512, depth: int = 6, num_heads: int = 8,
                 mlp_dim: int = 2048, num_queries: int = 32, visual_features: int = 1024,
                 box_pad_tokens: int = 3, layer_norm_eps: float = 1e-5,
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
                 remat: str = "none", rngs: nnx.Rngs):
        if style not in STYLES:
            raise ValueError(f"model.prompt_adapter.style {style!r}; choose from {STYLES}")
        if box_pad_tokens < 0:
            raise ValueError(f"model.prompt_adapter.box_pad_tokens {box_pad_tokens} < 0")
        self.num_queries = num_queries
        self.box_pad_tokens = box_pad_tokens
        self.dtype = dtype
        official = style == "official"
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.queries = layers.param(
            nnx.initializers.normal(1.0 if official else 0.02)(rngs.params(), (num_queries, dim),
                                                               param_dtype),
            (None, "embed"))
        self.image_proj = layers.linear(image_features, dim, axes=("embed", "mlp"), **common)
        self.pe_proj = layers.linear(prompt_features, dim, axes=("embed", "mlp"), **common)
        self.prompt_proj = layers.linear(prompt_features, dim, axes=("embed", "mlp"), **common)
        # The official projects the dense prompt with the sparse prompts' layer.
        self.dense_prompt_proj = None if official else layers.linear(
            prompt_features, dim, axes=("embed", "mlp"), **common)
        self.transformer = TwoWayTransformer(depth=depth, embedding_dim=dim, num_heads=num_heads,
                                             mlp_dim=mlp_dim, layer_norm_eps=layer_norm_eps,
                                             remat=remat, **common)
        self.visual_proj = (PerQueryLinear(num_queries, dim, visual_features, **common)
                            if official else
                            layers.linear(dim, visual_features, axes=("mlp", "embed"), **common))
        # Official visual_project_layers: Dense (init N(0, 0.02)), then LayerNorm eps 1e-5.
        self.lm_proj = layers.linear(visual_features, out_features, axes=("mlp", "embed"),
                                     kernel_init=nnx.initializers.normal(0.02), **common)
        self.lm_norm = layers.layer_norm(out_features, eps=layer_norm_eps, **common)

    def pad_box_tokens(self, box_tokens: jax.Array, no_mask_embed: jax.Array) -> jax.Array:
        """``box_tokens [..., 2, Cp]`` (SAM's corner tokens) -> ``[..., 2 + box_pad_tokens, Cp]``
        followed by ``no_mask_embed [Cp]`` copies, as the official box prompt."""
        pad = jnp.broadcast_to(no_mask_embed.astype(box_tokens.dtype),
                               (*box_tokens.shape[:-2], self.box_pad_tokens,
                                box_tokens.shape[-1]))
        return jnp.concatenate([box_tokens, pad], axis=-2)

    def __call__(self, image: jax.Array, image_pe: jax.Array, prompt_tokens: jax.Array,
                 dense_prompt: jax.Array) -> jax.Array:
        """Args:
          image: fused map ``[B, h, w, Ci]``.
          image_pe: positional encoding of its cells ``[h, w, Cp]``.
          prompt_tokens: SAM prompt-encoder tokens per slot ``[B, S, T, Cp]``.
          dense_prompt: SAM's dense prompt embedding, ``[Cp]`` (``no_mask_embed``).

        Returns:
          visual tokens ``[B, S, num_queries, out_features]`` in the compute dtype.
        """
        batch, slots, num_prompt_tokens = prompt_tokens.shape[:3]
        height, width = image.shape[1:3]
        dense_proj = (self.prompt_proj if self.dense_prompt_proj is None
                      else self.dense_prompt_proj)
        keys = self.image_proj(image) + dense_proj(dense_prompt)
        keys = jnp.repeat(keys.reshape(batch, 1, height * width, -1), slots, axis=1)
        queries = jnp.concatenate([
            jnp.broadcast_to(self.queries[...].astype(self.dtype),
                             (batch, slots, *self.queries.shape)),
            self.prompt_proj(prompt_tokens)], axis=2)
        flat = batch * slots
        out, _ = self.transformer(keys.reshape(flat, height * width, -1),
                                  self.pe_proj(image_pe).reshape(height * width, -1),
                                  queries.reshape(flat, self.num_queries + num_prompt_tokens, -1))
        visual = self.lm_proj(self.visual_proj(out[:, :self.num_queries]))
        return self.lm_norm(visual).reshape(batch, slots, self.num_queries, -1)
