"""F-LMM's mask head: a small U-Net from a phrase's attention maps to a coarse mask's logits.

Input: per phrase the post-softmax attention of its tokens over the image tokens, every layer
and head stacked as channels (``[N, h, w, C]``, ``C = layers x heads``, 1024 for a 7B LLaVA on
its 24 x 24 grid). F-LMM's ``UNetHead`` (mmseg's ``UNet`` with its config) does, in order:

1. divides each channel by its spatial sum (clamped at 1e-12): each map becomes a distribution;
2. upsamples bilinearly by ``max(1, upsample_input / max(h, w))`` (torch ``scale_factor``
   semantics: output ``floor(h * s)``, source coordinates ``(i + 0.5) / s - 0.5``), so the
   longest side is at least 64;
3. pads with zeros at the bottom and right to a multiple of ``2^(num_stages - 1)``;
4. the U-Net: ``num_stages`` encoder stages of ``convs_per_stage`` 3x3 convs (no bias,
   GroupNorm with one group, eps 1e-5, ReLU) at ``base * 2^s`` channels, 2x2 max-pooling before
   every stage but the first; decoder stages from the deepest up, each a bilinear 2x upsampling
   (half-pixel, computed in float32) and a 1x1 conv + GroupNorm + ReLU to the skip's channels,
   concatenation ``[skip, upsampled]``, then ``convs_per_stage`` 3x3 conv blocks;
5. crops the padding off and applies a 1x1 conv (with bias) to one channel.

:func:`crop_to_image` then cuts the logits to the image's area inside the LMM's padded canvas,
rounding as F-LMM does. :func:`load` reads F-LMM's ``mask_head.*`` tensors (prefix stripped) with
:func:`key_rules`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelllm.checkpoints import key_map
from pixelllm.checkpoints.key_map import CONV, Rule
from pixelllm.nn import layers
from pixelllm.nn.resize import resize_2d

GROUP_NORM_EPS = 1e-5  # mmcv build_norm_layer's default
SUM_FLOOR = 1e-12  # x / x.sum().clamp(min=1e-12)


def _linear_scale_matrix(in_size: int, scale: float) -> np.ndarray:
    """``(floor(in_size * scale), in_size)`` float64: torch's bilinear (``align_corners=False``)
    along one axis when given ``scale_factor``, which maps output ``i`` to ``(i + 0.5) / scale
    - 0.5`` (not the ratio of the sizes)."""
    out_size = int(math.floor(in_size * scale))
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        source = max((i + 0.5) / scale - 0.5, 0.0)
        low = int(source)
        fraction = source - low
        weights[i, low] += 1.0 - fraction
        weights[i, min(low + 1, in_size - 1)] += fraction
    return weights


def upsample_to_at_least(x: jax.Array, min_side: int) -> jax.Array:
    """``x [N, h, w, C]`` upsampled by ``max(1, min_side / max(h, w))`` as F-LMM's
    ``F.interpolate(scale_factor=...)`` does; unchanged at factor 1."""
    height, width = x.shape[1:3]
    scale = max(1.0, min_side / max(height, width))
    if scale == 1.0:
        return x
    rows = jnp.asarray(_linear_scale_matrix(height, scale), jnp.float32)
    cols = jnp.asarray(_linear_scale_matrix(width, scale), jnp.float32)
    out = jnp.einsum("oh,nhwc,pw->nopc", rows, x.astype(jnp.float32), cols,
                     precision=jax.lax.Precision.HIGHEST)
    return out.astype(x.dtype)


def crop_to_image(logits: jax.Array, *, padded_size: tuple[int, int],
                  image_size: tuple[int, int], pad_before: tuple[int, int]) -> jax.Array:
    """The part of ``logits [N, H, W]`` (over the LMM's padded canvas) that covers the image.

    Args:
      padded_size: ``(height, width)`` of the padded canvas the LMM saw, in pixels.
      image_size: ``(height, width)`` of the resized image inside it.
      pad_before: ``(top, left)`` padding before the image.

    Returns:
      ``[N, int(h * H / ph + 0.5), int(w * W / pw + 0.5)]`` from ``int(top * H / ph)``,
      ``int(left * W / pw)`` (F-LMM's rounding).
    """
    mask_h, mask_w = logits.shape[1:3]
    top = int(pad_before[0] * mask_h / padded_size[0])
    left = int(pad_before[1] * mask_w / padded_size[1])
    height = int(image_size[0] * mask_h / padded_size[0] + 0.5)
    width = int(image_size[1] * mask_w / padded_size[1] + 0.5)
    return logits[:, top:top + height, left:left + width]


class ConvNormReLU(nnx.Module):
    """mmcv's ``ConvModule``: conv without bias, GroupNorm with one group, ReLU."""

    def __init__(self, *, in_channels: int, out_channels: int, kernel_size: int,
                 rngs: nnx.Rngs, dtype: jnp.dtype | None = None,
                 param_dtype: jnp.dtype = jnp.float32):
        self.conv = layers.conv(in_channels, out_channels, kernel_size,
                                padding=kernel_size // 2, use_bias=False, dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)
        self.norm = nnx.GroupNorm(out_channels, num_groups=1, epsilon=GROUP_NORM_EPS,
                                  use_fast_variance=False, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs,
                                  scale_metadata={"logical_axes": ("conv_out",)},
                                  bias_metadata={"logical_axes": ("conv_out",)})

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[N, H, W, in] -> [N, H, W, out]``."""
        return jax.nn.relu(self.norm(self.conv(x)))


class DecoderStage(nnx.Module):
    """mmseg's ``UpConvBlock`` with ``InterpConv``: upsample 2x, 1x1 conv block to the skip's
    channels, concatenate after the skip, ``num_convs`` 3x3 conv blocks."""

    def __init__(self, *, in_channels: int, skip_channels: int, num_convs: int,
                 rngs: nnx.Rngs, dtype: jnp.dtype | None = None,
                 param_dtype: jnp.dtype = jnp.float32):
        common = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.up_conv = ConvNormReLU(in_channels=in_channels, out_channels=skip_channels,
                                    kernel_size=1, **common)
        self.convs = nnx.List([
            ConvNormReLU(in_channels=2 * skip_channels if i == 0 else skip_channels,
                         out_channels=skip_channels, kernel_size=3, **common)
            for i in range(num_convs)])

    def __call__(self, skip: jax.Array, x: jax.Array) -> jax.Array:
        """``skip [N, 2h, 2w, c]``, ``x [N, h, w, C]`` -> ``[N, 2h, 2w, c]``."""
        height, width = x.shape[1:3]
        # F-LMM patches mmseg's Upsample to interpolate in float32.
        upsampled = resize_2d(x.astype(jnp.float32), (2 * height, 2 * width), mode="linear")
        x = self.up_conv(upsampled.astype(x.dtype))
        x = jnp.concatenate([skip, x], axis=-1)
        for conv in self.convs:
            x = conv(x)
        return x


class UNetMaskHead(nnx.Module):
    """F-LMM's ``UNetHead`` (module docstring): attention maps -> one mask logit map each.

    Args:
      in_channels: attention channels (LMM layers x heads).
      base_channels: channels of the first stage (doubled at every stage).
      num_stages: encoder stages (``num_stages - 1`` poolings and decoder stages).
      convs_per_stage: 3x3 conv blocks per encoder and decoder stage.
      upsample_input: the input is upsampled until its longest side is at least this.
    """

    def __init__(self, *, in_channels: int, base_channels: int = 64, num_stages: int = 4,
                 convs_per_stage: int = 2, upsample_input: int = 64, rngs: nnx.Rngs,
                 dtype: jnp.dtype | None = None, param_dtype: jnp.dtype = jnp.float32):
        common = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.num_stages = num_stages
        self.upsample_input = upsample_input
        widths = [base_channels * 2**stage for stage in range(num_stages)]
        self.encoder = nnx.List([
            nnx.List([ConvNormReLU(in_channels=([in_channels] + widths)[stage] if i == 0
                                   else widths[stage], out_channels=widths[stage],
                                   kernel_size=3, **common)
                      for i in range(convs_per_stage)])
            for stage in range(num_stages)])
        # decoder[s] joins stage s + 1 into the skip of stage s (mmseg's order).
        self.decoder = nnx.List([
            DecoderStage(in_channels=widths[stage + 1], skip_channels=widths[stage],
                         num_convs=convs_per_stage, **common)
            for stage in range(num_stages - 1)])
        self.conv_seg = layers.conv(base_channels, 1, 1, **common)

    def __call__(self, attention: jax.Array) -> jax.Array:
        """``attention [N, h, w, C]`` (probabilities) -> logits ``[N, h', w']`` float32,
        ``(h', w')`` the upsampled size."""
        x = attention / jnp.maximum(attention.sum(axis=(1, 2), keepdims=True), SUM_FLOOR)
        x = upsample_to_at_least(x, self.upsample_input)
        height, width = x.shape[1:3]
        multiple = 2 ** (self.num_stages - 1)
        x = jnp.pad(x, ((0, 0), (0, -height % multiple), (0, -width % multiple), (0, 0)))
        skips = []
        for stage, convs in enumerate(self.encoder):
            if stage:
                x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))
            for conv in convs:
                x = conv(x)
            skips.append(x)
        for stage in reversed(range(self.num_stages - 1)):
            x = self.decoder[stage](skips[stage], x)
        return self.conv_seg(x[:, :height, :width])[..., 0].astype(jnp.float32)


# ----------------------------------------------------------------------------- checkpoints

def _conv_block_rules(source: str, target: str) -> list[Rule]:
    return [Rule(f"{source}.conv.weight", f"{target}/conv/kernel", CONV),
            Rule(f"{source}.gn.weight", f"{target}/norm/scale"),
            Rule(f"{source}.gn.bias", f"{target}/norm/bias")]


def key_rules() -> list[Rule]:
    """The key map of a :class:`UNetMaskHead` from F-LMM's ``mask_head.`` tensors (prefix
    stripped): ``encoder.{s}.{0|1}.convs.{i}`` (stages after the first hold a max-pool at index
    0), ``decoder.{s}.upsample.interp_upsample.1``, ``decoder.{s}.conv_block.convs.{i}``,
    ``conv_seg``; each conv block's ``conv`` and ``gn``."""
    return (_conv_block_rules("encoder.0.0.convs.{i}", "encoder/0/{i}")
            + _conv_block_rules("encoder.{s}.1.convs.{i}", "encoder/{s}/{i}")
            + _conv_block_rules("decoder.{s}.upsample.interp_upsample.1", "decoder/{s}/up_conv")
            + _conv_block_rules("decoder.{s}.conv_block.convs.{i}", "decoder/{s}/convs/{i}")
            + [Rule("conv_seg.weight", "conv_seg/kernel", CONV),
               Rule("conv_seg.bias", "conv_seg/bias")])


def load(module: UNetMaskHead, state_dict: Mapping[str, np.ndarray], *,
         source: str) -> UNetMaskHead:
    """Assigns F-LMM's mask-head tensors (``mask_head.`` stripped) to ``module`` strictly;
    ``source`` names the checkpoint in errors."""
    return key_map.load(module, state_dict, key_rules(), source=source)
