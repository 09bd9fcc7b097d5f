"""SAM's ViT image encoder (ViTDet-style backbone of Segment Anything) and its checkpoint converter.

Numerically the public ``segment_anything`` ``ImageEncoderViT`` (ViT-B/L/H) and Hugging Face's
``SamVisionEncoder``: a patch-embedding convolution, an absolute position embedding added on the
NHWC token grid, pre-norm transformer blocks that attend inside ``window_size`` windows (the grid is
zero-padded after ``norm1`` to a multiple of the window; padded tokens take part in attention
unmasked and are cropped afterwards) except the blocks in ``global_attn_indexes``, which attend over
the whole grid, decomposed relative position terms (MViTv2) in every block, and a convolutional
neck to ``out_chans`` channels.

**Input size.** PixelLLM runs the frozen ViT-H at 384x384 although it was trained at 1024x1024.
Parameters always keep their *pretrained* shapes, set by ``pretrain_img_size``: the position
embedding is ``[1, G, G, embed_dim]`` with ``G = pretrain_img_size // patch_size``, global blocks
hold ``[2G - 1, head_dim]`` relative-position tables, windowed blocks ``[2 * window_size - 1,
head_dim]``. At run time, for an input grid ``g = img_size // patch_size``, the position embedding
is resized to ``g x g`` with torch's bicubic kernel (``F.interpolate(mode="bicubic",
align_corners=False)``, no antialias) and each relative-position table whose length differs from
``2 * size - 1`` is linearly interpolated as ``segment_anything``'s ``get_rel_pos`` does (127 -> 47
rows in the global blocks at 384 px). So ``sam_vit_h_4b8939.pth`` loads unchanged into a model
built with ``img_size=384, pretrain_img_size=1024`` and produces ``[B, 24, 24, 256]``.

Images are NHWC, already normalized with SAM's pixel mean/std (done by the caller).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelllm.checkpoints.key_map import CONV, TRANSPOSE, Rule
from pixelllm.nn import layers
from pixelllm.nn import remat as remat_lib
from pixelllm.nn.dropout import inverted_dropout
from pixelllm.nn.resize import resize_2d, resize_axis

# segment_anything's LayerNorm2d and HF's SamLayerNorm fix the neck's eps, whatever the blocks use.
_NECK_EPS = 1e-6


def _relative_table(table: jax.Array, size: int) -> jax.Array:
    """``[size, size, head_dim]``: row ``table[i - j + size - 1]`` for query ``i``, key ``j``.

    A table of another length (pretrained at another grid) is linearly interpolated first, as
    torch ``F.interpolate(mode="linear")`` in ``segment_anything``'s ``get_rel_pos``.
    """
    table = resize_axis(table, 0, 2 * size - 1, mode="linear")
    index = np.arange(size)[:, None] - np.arange(size)[None, :] + size - 1
    return table[index]


def _window_partition(x: jax.Array, window: int) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B * nh * nw, window, window, C]`` after zero-padding H, W."""
    b, h, w, c = x.shape
    hp, wp = -(-h // window) * window, -(-w // window) * window
    x = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    x = x.reshape(b, hp // window, window, wp // window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c)


def _window_unpartition(windows: jax.Array, window: int, height: int, width: int) -> jax.Array:
    """Inverse of :func:`_window_partition`, cropping the padding: ``[B, height, width, C]``."""
    hp, wp = -(-height // window) * window, -(-width // window) * window
    c = windows.shape[-1]
    x = windows.reshape(-1, hp // window, wp // window, window, window, c)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, hp, wp, c)
    return x[:, :height, :width]


class RelPosAttention(nnx.Module):
    """Multi-head self-attention with decomposed relative position terms.

    ``rel_pos_size`` is the spatial size the tables were trained for (window or pretrained grid).
    """

    def __init__(self, *, dim: int, num_heads: int, rel_pos_size: int, dtype: jnp.dtype,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs):
        head_dim = dim // num_heads
        self.num_heads = num_heads
        self.dtype = dtype
        self.qkv = layers.linear(dim, 3 * dim, axes=("embed", "heads"), dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)
        self.proj = layers.linear(dim, dim, axes=("heads", "embed"), dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
        table_shape = (2 * rel_pos_size - 1, head_dim)
        self.rel_pos_h = layers.param(jnp.zeros(table_shape, param_dtype), (None, "kv"))
        self.rel_pos_w = layers.param(jnp.zeros(table_shape, param_dtype), (None, "kv"))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x: [B, H, W, dim]`` -> ``[B, H, W, dim]``."""
        b, h, w, dim = x.shape
        # Output channels of qkv are ordered [q | k | v], each head-major.
        qkv = self.qkv(x).reshape(b, h, w, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        scale = (dim // self.num_heads) ** -0.5
        logits = jnp.einsum("bhwnd,bxynd->bnhwxy", q * scale, k)
        # The relative terms use the unscaled query, as in MViTv2 / segment_anything.
        rel_h = jnp.einsum("bhwnd,hxd->bnhwx", q,
                           _relative_table(self.rel_pos_h[...], h).astype(self.dtype))
        rel_w = jnp.einsum("bhwnd,wyd->bnhwy", q,
                           _relative_table(self.rel_pos_w[...], w).astype(self.dtype))
        logits = logits + rel_h[..., :, None] + rel_w[..., None, :]
        logits = logits.reshape(b, self.num_heads, h * w, h * w)
        # Softmax in float32 so a bfloat16 compute dtype does not saturate the normalizer.
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bnqk,bknd->bqnd", probs, v.reshape(b, h * w, self.num_heads, -1))
        return self.proj(out.reshape(b, h, w, dim))


class Mlp(nnx.Module):
    """``lin2(gelu(lin1(x)))`` with exact-erf GELU."""

    def __init__(self, *, dim: int, mlp_dim: int, dtype: jnp.dtype, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        self.lin1 = layers.linear(dim, mlp_dim, axes=("embed", "mlp"), dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
        self.lin2 = layers.linear(mlp_dim, dim, axes=("mlp", "embed"), dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.lin2(layers.gelu(self.lin1(x)))


def drop_path(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
    """Stochastic depth of a residual branch ``x [B, ...]``: one keep/drop draw per example, kept
    values rescaled by ``1 / (1 - rate)``; the identity without ``rngs`` (evaluation)."""
    if rngs is None or rate == 0.0:
        return x
    return inverted_dropout(x, rate, rngs.dropout(),
                            mask_shape=(x.shape[0],) + (1,) * (x.ndim - 1))


class EncoderBlock(nnx.Module):
    """Pre-norm block; ``window_size`` 0 means global attention; ``drop_path`` the stochastic
    depth rate of both residual branches (training only)."""

    def __init__(self, *, dim: int, num_heads: int, mlp_dim: int, window_size: int,
                 rel_pos_size: int, eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype,
                 drop_path: float = 0.0, rngs: nnx.Rngs):
        self.window_size = window_size
        self.drop_path = drop_path
        self.norm1 = layers.layer_norm(dim, eps=eps, dtype=dtype, param_dtype=param_dtype,
                                       rngs=rngs)
        self.attn = RelPosAttention(dim=dim, num_heads=num_heads, rel_pos_size=rel_pos_size,
                                 dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = layers.layer_norm(dim, eps=eps, dtype=dtype, param_dtype=param_dtype,
                                       rngs=rngs)
        self.mlp = Mlp(dim=dim, mlp_dim=mlp_dim, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """``x: [B, H, W, dim]`` -> ``[B, H, W, dim]``; ``rngs`` enables drop path."""
        y = self.norm1(x)
        if self.window_size:
            height, width = y.shape[1:3]
            y = _window_partition(y, self.window_size)
            y = _window_unpartition(self.attn(y), self.window_size, height, width)
        else:
            y = self.attn(y)
        x = x + drop_path(y, self.drop_path, rngs)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, rngs)


class Neck(nnx.Module):
    """1x1 conv -> LayerNorm2d -> 3x3 conv -> LayerNorm2d, convolutions without bias."""

    def __init__(self, *, in_chans: int, out_chans: int, dtype: jnp.dtype,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = layers.conv(in_chans, out_chans, (1, 1), use_bias=False, **common)
        self.norm1 = layers.layer_norm(out_chans, eps=_NECK_EPS, axis="conv_out", **common)
        self.conv2 = layers.conv(out_chans, out_chans, (3, 3), padding=1, use_bias=False,
                                 **common)
        self.norm2 = layers.layer_norm(out_chans, eps=_NECK_EPS, axis="conv_out", **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x: [B, H, W, in_chans]`` -> ``[B, H, W, out_chans]``."""
        return self.norm2(self.conv2(self.norm1(self.conv1(x))))


class SamImageEncoder(nnx.Module):
    """SAM ViT image encoder: ``[B, img_size, img_size, 3]`` -> ``[B, g, g, out_chans]``,
    ``g = img_size // patch_size``.

    Constructor fields are those of ``configs/sam.py`` ``model.image_encoder``. Parameter shapes
    depend on ``pretrain_img_size``, not ``img_size`` (see the module docstring). ``dtype`` is the
    compute dtype (LayerNorm statistics and the attention softmax stay float32), ``param_dtype``
    the storage dtype; ``remat`` the blocks' rematerialization policy (:mod:`pixelllm.nn.remat`).
    ``drop_path_rate``: stochastic depth of the last block, rising linearly from 0 at the first
    (scenic's SAM); active only when ``rngs`` is passed to the call. PixelLLM's official recipe
    runs the frozen SAM with 0.5 in training.

    Parameters (paths as used by :func:`key_rules`):
      ``patch_embed/kernel``: ``[patch, patch, 3, embed_dim]``
      ``pos_embed``: ``[1, G, G, embed_dim]``, ``G = pretrain_img_size // patch_size``
      ``blocks/{i}/{norm1,norm2}``, ``blocks/{i}/attn/{qkv,proj}``,
      ``blocks/{i}/attn/rel_pos_{h,w}``: ``[2 S - 1, head_dim]`` (S = window or G),
      ``blocks/{i}/mlp/{lin1,lin2}``, ``neck/{conv1,norm1,conv2,norm2}``.
    """

    def __init__(self, *, img_size: int, pretrain_img_size: int, patch_size: int, embed_dim: int,
                 depth: int, num_heads: int, mlp_ratio: float, out_chans: int, window_size: int,
                 global_attn_indexes: Sequence[int], layer_norm_eps: float,
                 drop_path_rate: float = 0.0, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32,
                 remat: str = "none", rngs: nnx.Rngs):
        for name, size in (("img_size", img_size), ("pretrain_img_size", pretrain_img_size)):
            if size <= 0 or size % patch_size:
                raise ValueError(f"{name}={size} must be a positive multiple of "
                                 f"patch_size={patch_size}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate={drop_path_rate} must be in [0, 1)")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        bad = sorted(set(global_attn_indexes) - set(range(depth)))
        if bad:
            raise ValueError(f"global_attn_indexes {bad} out of range for depth={depth}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.out_chans = out_chans
        self.dtype = dtype
        self.remat = remat_lib.check_remat(remat)
        pretrain_grid = pretrain_img_size // patch_size
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.patch_embed = layers.conv(3, embed_dim, (patch_size, patch_size),
                                       strides=(patch_size, patch_size), **common)
        self.pos_embed = layers.param(
            jnp.zeros((1, pretrain_grid, pretrain_grid, embed_dim), param_dtype),
            (None, None, None, "embed"))
        blocks = []
        for i in range(depth):
            window = 0 if i in global_attn_indexes else window_size
            blocks.append(EncoderBlock(
                dim=embed_dim, num_heads=num_heads, mlp_dim=int(embed_dim * mlp_ratio),
                window_size=window, rel_pos_size=window or pretrain_grid, eps=layer_norm_eps,
                drop_path=drop_path_rate * i / max(depth - 1, 1), **common))
        self.blocks = nnx.List(blocks)
        self.neck = Neck(in_chans=embed_dim, out_chans=out_chans, **common)

    def __call__(self, images: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """``images: [B, img_size, img_size, 3]`` normalized -> ``[B, g, g, out_chans]``;
        ``rngs`` (training) enables drop path."""
        shape = tuple(np.shape(images))
        expected = f"[B, {self.img_size}, {self.img_size}, 3] (NHWC, normalized)"
        if len(shape) != 4:
            raise ValueError(f"SamImageEncoder expects images {expected}; got rank {len(shape)} "
                             f"shape {shape}")
        if shape[-1] != 3:
            raise ValueError(f"SamImageEncoder expects images {expected} with 3 channels last; "
                             f"got {shape[-1]} channels in shape {shape}")
        if shape[1:3] != (self.img_size, self.img_size):
            raise ValueError(f"SamImageEncoder expects images {expected}; got {shape[1]}x"
                             f"{shape[2]} in shape {shape} (resize/pad to img_size or build the "
                             f"model with img_size={shape[1]})")
        x = self.patch_embed(jnp.asarray(images, self.dtype))
        pos_embed = resize_2d(self.pos_embed[...], x.shape[1:3], mode="cubic")
        x = x + pos_embed.astype(self.dtype)
        # Windowed and global blocks differ in shapes (relative-position tables, attention
        # extent), so they run one by one rather than under nnx.scan.
        run_block = remat_lib.remat(lambda block, x, rngs: block(x, rngs), self.remat)
        for block in self.blocks:
            x = run_block(block, x, rngs)
        return self.neck(x)


# Source-name pieces per layout: block list, patch conv, block norms, neck modules.
_LAYOUTS = {
    "segment_anything": dict(blocks="blocks", patch="patch_embed.proj", norms=("norm1", "norm2"),
                             neck=("neck.0", "neck.1", "neck.2", "neck.3")),
    "transformers": dict(blocks="layers", patch="patch_embed.projection",
                         norms=("layer_norm1", "layer_norm2"),
                         neck=("neck.conv1", "neck.layer_norm1", "neck.conv2", "neck.layer_norm2")),
}


def key_rules(layout: str) -> list[Rule]:
    """The key map of a :class:`SamImageEncoder` (torch names, ``image_encoder.`` or
    ``vision_encoder.`` stripped), for :mod:`pixelllm.checkpoints.key_map`.

    ``layout``: ``"segment_anything"`` (``blocks.0.attn.qkv.weight``, ``neck.0.weight``, ...) or
    ``"transformers"`` (HF ``SamVisionEncoder``: ``layers.0.layer_norm1.weight``,
    ``patch_embed.projection.weight``, ``neck.conv1.weight``, ...).
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"unknown SAM image encoder layout {layout!r}; "
                         f"choose one of {sorted(_LAYOUTS)}")
    names = _LAYOUTS[layout]
    conv1, norm1, conv2, norm2 = names["neck"]
    rules = [
        Rule(f"{names['patch']}.weight", "patch_embed/kernel", CONV),
        Rule(f"{names['patch']}.bias", "patch_embed/bias"),
        Rule("pos_embed", "pos_embed"),
        Rule(f"{conv1}.weight", "neck/conv1/kernel", CONV),
        Rule(f"{norm1}.weight", "neck/norm1/scale"),
        Rule(f"{norm1}.bias", "neck/norm1/bias"),
        Rule(f"{conv2}.weight", "neck/conv2/kernel", CONV),
        Rule(f"{norm2}.weight", "neck/norm2/scale"),
        Rule(f"{norm2}.bias", "neck/norm2/bias"),
    ]
    src, dst = f"{names['blocks']}.{{i}}.", "blocks/{i}/"
    for src_norm, dst_norm in zip(names["norms"], ("norm1", "norm2")):
        rules += [Rule(f"{src}{src_norm}.weight", f"{dst}{dst_norm}/scale"),
                  Rule(f"{src}{src_norm}.bias", f"{dst}{dst_norm}/bias")]
    for module in ("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2"):
        path = dst + module.replace(".", "/")
        rules += [Rule(f"{src}{module}.weight", f"{path}/kernel", TRANSPOSE),
                  Rule(f"{src}{module}.bias", f"{path}/bias")]
    rules += [Rule(f"{src}attn.{table}", f"{dst}attn/{table}")
              for table in ("rel_pos_h", "rel_pos_w")]
    return rules
