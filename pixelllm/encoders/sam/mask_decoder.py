"""SAM's mask decoder: prompt tokens + image embedding -> mask logits and predicted IoU.

Numerically segment_anything's ``MaskDecoder`` and Hugging Face's ``SamMaskDecoder``. Output
tokens ``[iou, mask_0 .. mask_M]`` are prepended to the sparse prompt tokens and run through a
:class:`~pixelllm.encoders.sam.two_way_transformer.TwoWayTransformer` together with the image
embedding (plus the dense prompt). The image side is upsampled 4x by two k2s2 transposed
convolutions (LayerNorm2d + GELU between, GELU after); each mask token goes through its own
3-layer MLP to a ``C/8`` vector whose dot product with the upsampled map gives that mask's
logits. An MLP on the IoU token predicts each mask's IoU. ``multimask_output=False`` returns
mask 0 only; ``True`` returns masks 1..M (SAM's ambiguity-aware outputs).

LayerNorm eps: the two-way blocks use ``layer_norm_eps`` (1e-5 segment_anything, 1e-6
transformers); the transformer's final norm is 1e-5 and the upscaling LayerNorm2d 1e-6 in
both releases.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelllm.checkpoints.key_map import TRANSPOSE, VECTOR, Rule, Transform, prefixed
from pixelllm.encoders.sam.two_way_transformer import LAYOUTS, TwoWayTransformer
from pixelllm.encoders.sam.two_way_transformer import key_rules as two_way_key_rules
from pixelllm.nn.layers import gelu, layer_norm, linear, param


class MLP(nnx.Module):
    """``num_layers`` Linear layers with ReLU between them; ``[..., in] -> [..., out]``."""

    def __init__(self, *, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int,
                 dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        # Hidden widths alternate between the mlp and embed axes so that consecutive kernels
        # agree; the small outputs (mask channels, IoU per mask) stay replicated.
        axes = ["embed" if i % 2 == 0 else "mlp" for i in range(num_layers)] + [None]
        self.layers = nnx.List([
            linear(dims[i], dims[i + 1], axes=(axes[i], axes[i + 1]), dtype=dtype,
                   param_dtype=param_dtype, rngs=rngs)
            for i in range(num_layers)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


def _conv_transpose_2x2(in_features: int, out_features: int, *, dtype: jnp.dtype,
                        param_dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.ConvTranspose:
    return nnx.ConvTranspose(
        in_features, out_features, (2, 2), (2, 2), padding="VALID", dtype=dtype,
        param_dtype=param_dtype, rngs=rngs,
        kernel_metadata={"logical_axes": (None, None, "conv_in", "conv_out")},
        bias_metadata={"logical_axes": ("conv_out",)})


def conv_transpose_kernel_from_torch(weight: np.ndarray) -> np.ndarray:
    """torch ``ConvTranspose2d`` weight ``(in, out, kh, kw)`` -> ``nnx.ConvTranspose`` kernel
    ``(kh, kw, in, out)``.

    Flax (``transpose_kernel=False``) correlates the stride-dilated input with the kernel,
    while torch scatters each input pixel through it, so the kernel is flipped spatially.
    """
    return np.ascontiguousarray(np.transpose(weight, (2, 3, 0, 1))[::-1, ::-1])


class SamMaskDecoder(nnx.Module):
    """SAM's mask decoder (argument names as ``configs/sam.py`` ``model.mask_decoder``).

    Args:
      transformer_dim: channels C of tokens and image embedding (256).
      transformer_depth, transformer_heads, transformer_mlp_dim, attention_downsample_rate:
        the two-way transformer (2, 8, 2048, 2 in SAM).
      num_multimask_outputs: M, masks returned with ``multimask_output=True`` (3).
      iou_head_depth, iou_head_hidden_dim: the IoU MLP (3, 256).
      layer_norm_eps: eps of the two-way blocks' LayerNorms (1e-5 segment_anything, 1e-6 HF).
      final_layer_norm_eps: the transformer's final LayerNorm (1e-5 in both releases).
      upscale_layer_norm_eps: the upscaling LayerNorm2d (1e-6 in both releases).
    """

    def __init__(self, *, transformer_dim: int, transformer_depth: int, transformer_heads: int,
                 transformer_mlp_dim: int, layer_norm_eps: float,
                 attention_downsample_rate: int = 2, num_multimask_outputs: int = 3,
                 iou_head_depth: int = 3, iou_head_hidden_dim: int = 256,
                 final_layer_norm_eps: float = 1e-5, upscale_layer_norm_eps: float = 1e-6,
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        if transformer_dim % 8:
            raise ValueError(f"transformer_dim must be a multiple of 8, got {transformer_dim}")
        self.transformer_dim = transformer_dim
        self.num_mask_tokens = num_multimask_outputs + 1
        self.dtype = dtype
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.iou_token = param(
            jax.random.normal(rngs.params(), (transformer_dim,), param_dtype), ("embed",))
        self.mask_tokens = param(
            jax.random.normal(rngs.params(), (self.num_mask_tokens, transformer_dim),
                              param_dtype), (None, "embed"))
        self.transformer = TwoWayTransformer(
            depth=transformer_depth, embedding_dim=transformer_dim, num_heads=transformer_heads,
            mlp_dim=transformer_mlp_dim, attention_downsample_rate=attention_downsample_rate,
            layer_norm_eps=layer_norm_eps, final_layer_norm_eps=final_layer_norm_eps, **common)
        self.upscale_conv1 = _conv_transpose_2x2(transformer_dim, transformer_dim // 4, **common)
        self.upscale_norm = layer_norm(transformer_dim // 4, eps=upscale_layer_norm_eps,
                                       axis="conv_out", **common)
        self.upscale_conv2 = _conv_transpose_2x2(transformer_dim // 4, transformer_dim // 8,
                                                 **common)
        self.output_hypernetworks_mlps = nnx.List([
            MLP(input_dim=transformer_dim, hidden_dim=transformer_dim,
                output_dim=transformer_dim // 8, num_layers=3, **common)
            for _ in range(self.num_mask_tokens)])
        self.iou_prediction_head = MLP(
            input_dim=transformer_dim, hidden_dim=iou_head_hidden_dim,
            output_dim=self.num_mask_tokens, num_layers=iou_head_depth, **common)

    def __call__(self, image_embeddings: jax.Array, image_pe: jax.Array,
                 sparse_prompt_embeddings: jax.Array, dense_prompt_embeddings: jax.Array,
                 multimask_output: bool, sparse_mask: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        """Predicts masks for B prompts.

        Args:
          image_embeddings: ``[B, h, w, C]``, or ``[1, h, w, C]`` shared by all prompts.
          image_pe: ``[h, w, C]`` (the prompt encoder's ``dense_pe()``).
          sparse_prompt_embeddings: ``[B, N, C]`` (N may be 0).
          dense_prompt_embeddings: ``[B, h, w, C]``.
          multimask_output: static; True -> M masks, False -> 1.
          sparse_mask: optional ``[B, N]`` bool, False on padding prompt tokens (a variable
            number of text tokens per prompt): no token or pixel attends to them.

        Returns:
          ``masks [B, M or 1, 4h, 4w]`` logits and ``iou_pred [B, M or 1]``, float32.
        """
        sparse = jnp.asarray(sparse_prompt_embeddings, self.dtype)
        dense = jnp.asarray(dense_prompt_embeddings, self.dtype)
        image = jnp.asarray(image_embeddings, self.dtype)
        channels = self.transformer_dim
        if sparse.ndim != 3 or sparse.shape[-1] != channels:
            raise ValueError(f"sparse_prompt_embeddings must be [B, N, {channels}], "
                             f"got {sparse.shape}")
        batch = sparse.shape[0]
        if image.ndim != 4 or image.shape[0] not in (1, batch) or image.shape[-1] != channels:
            raise ValueError(f"image_embeddings must be [1 or B={batch}, h, w, {channels}], "
                             f"got {image.shape}")
        if dense.shape != (batch, *image.shape[1:]):
            raise ValueError(f"dense_prompt_embeddings must be {(batch, *image.shape[1:])}, "
                             f"got {dense.shape}")
        height, width = image.shape[1:3]

        output_tokens = jnp.concatenate([self.iou_token[...][None], self.mask_tokens[...]])
        tokens = jnp.concatenate(
            [jnp.broadcast_to(output_tokens.astype(self.dtype), (batch, *output_tokens.shape)),
             sparse], axis=1)
        token_mask = None if sparse_mask is None else jnp.concatenate(
            [jnp.ones((batch, output_tokens.shape[0]), bool), sparse_mask.astype(bool)], axis=1)
        hidden, src = self.transformer(image + dense, image_pe, tokens, token_mask=token_mask)
        iou_token_out = hidden[:, 0]
        mask_tokens_out = hidden[:, 1:1 + self.num_mask_tokens]

        src = src.reshape(batch, height, width, channels)
        upscaled = gelu(self.upscale_norm(self.upscale_conv1(src)))
        upscaled = gelu(self.upscale_conv2(upscaled))  # [B, 4h, 4w, C/8]
        hyper_in = jnp.stack([mlp(mask_tokens_out[:, i])
                              for i, mlp in enumerate(self.output_hypernetworks_mlps)], axis=1)
        # Mask logits and IoUs leave in float32 whatever the compute dtype: losses and
        # thresholds read them.
        masks = jnp.einsum("bmc,bhwc->bmhw", hyper_in.astype(jnp.float32),
                           upscaled.astype(jnp.float32))
        iou_pred = self.iou_prediction_head(iou_token_out).astype(jnp.float32)

        selected = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, selected], iou_pred[:, selected]


# ----------------------------------------------------------------------------- checkpoints

_CONV_TRANSPOSE = Transform("conv_transpose", conv_transpose_kernel_from_torch)


def _mlp_rules(source: str, target: str, num_layers: int, layout: str) -> list[Rule]:
    if layout == "segment_anything":
        names = [f"layers.{i}" for i in range(num_layers)]
    else:
        names = ["proj_in"] + [f"layers.{i}" for i in range(num_layers - 2)] + ["proj_out"]
    return [rule for i, name in enumerate(names)
            for rule in (Rule(f"{source}.{name}.weight", f"{target}/layers/{i}/kernel", TRANSPOSE),
                         Rule(f"{source}.{name}.bias", f"{target}/layers/{i}/bias"))]


def key_rules(layout: str, *, iou_head_depth: int) -> list[Rule]:
    """The key map of a :class:`SamMaskDecoder` (``mask_decoder.`` stripped) for
    :mod:`pixelllm.checkpoints.key_map`.

    ``layout="segment_anything"``: ``transformer.layers.0.norm1.weight``,
    ``output_upscaling.0.weight``, ``output_hypernetworks_mlps.0.layers.0.weight``,
    ``iou_prediction_head.layers.2.bias``, ...; ``layout="transformers"``: HF names
    (``transformer.layers.0.layer_norm1``, ``upscale_conv1``, ``upscale_layer_norm``,
    ``...mlps.0.proj_in``, ``iou_prediction_head.proj_out``, ...). HF numbers the IoU head's
    middle layers from 0 after ``proj_in``, hence ``iou_head_depth``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; choose one of {LAYOUTS}")
    upscale = (("output_upscaling.0", "output_upscaling.1", "output_upscaling.3")
               if layout == "segment_anything"
               else ("upscale_conv1", "upscale_layer_norm", "upscale_conv2"))
    rules = prefixed(two_way_key_rules(layout), source="transformer.", target="transformer/")
    rules += [
        Rule("iou_token.weight", "iou_token", VECTOR),
        Rule("mask_tokens.weight", "mask_tokens"),
        Rule(f"{upscale[0]}.weight", "upscale_conv1/kernel", _CONV_TRANSPOSE),
        Rule(f"{upscale[0]}.bias", "upscale_conv1/bias"),
        Rule(f"{upscale[1]}.weight", "upscale_norm/scale"),
        Rule(f"{upscale[1]}.bias", "upscale_norm/bias"),
        Rule(f"{upscale[2]}.weight", "upscale_conv2/kernel", _CONV_TRANSPOSE),
        Rule(f"{upscale[2]}.bias", "upscale_conv2/bias"),
    ]
    rules += _mlp_rules("output_hypernetworks_mlps.{m}", "output_hypernetworks_mlps/{m}", 3, layout)
    rules += _mlp_rules("iou_prediction_head", "iou_prediction_head", iou_head_depth, layout)
    return rules
