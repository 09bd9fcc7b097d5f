"""EVA02 vision transformer (PixelLLM's trainable image encoder) and its checkpoint converter.

The architecture is timm's ``eva02_*_patch14_*`` with ``qkv_fused=False, swiglu_mlp=True,
scale_mlp=True`` (BAAI EVA-02 "asuka" fine-tunes): patch-embedding convolution, a cls token, an
absolute position embedding over the model's own grid, and pre-norm blocks of

* attention with separate ``q`` (bias), ``k`` (no bias) and ``v`` (bias) projections and 2-D
  rotary position embedding on the patch tokens of ``q`` and ``k``;
* a SwiGLU MLP with a LayerNorm between the gate product and the output projection (sub-LN);
* stochastic depth, linear in depth, active only in train mode (``model.train()``).

LayerNorm eps is 1e-6 everywhere and there is no layer scale. ``final_norm`` is the LayerNorm
timm calls ``fc_norm`` (PixelLLM's ``use_ln_post``), applied here to every patch token; the cls
token is dropped from the output.

RoPE position convention (timm ``RotaryEmbeddingCat``, 'cat' mode, identical to BAAI's
``VisionRotaryEmbeddingFast``): for a grid of S tokens per axis the positions are
``t = arange(S) / S * rope_ref_grid``, so a 448 input (S=32) with the pretraining reference grid
16 advances in half steps. Per head of dimension D there are D/4 frequencies
``10000 ** (-k / (D/4))``; sin and cos are ``[row freqs | col freqs]`` ('ij' indexing), each
repeated twice in place, and the rotation pairs interleaved channels ``(x0, x1) -> (-x1, x0)``
(not the Llama half split). The official PixelLLM Flax port instead builds the table with
``pt_seq_len = image_size // 14`` (27 at 384), i.e. integer positions ``arange(S)``; the two agree
only when S equals the reference grid (224 inputs); weights fine-tuned with that port at other
sizes saw other RoPE positions than this module uses.

Checkpoints: :func:`convert_state_dict` reads timm names and BAAI names, resamples the absolute
position embedding to the model's grid as timm does on load (bicubic with antialias, cls slot
kept), and drops (and logs) the classifier head, MIM-only tensors and the fixed RoPE buffers.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pixelllm import sharding
from pixelllm.checkpoints.assign import assign, check_keys
from pixelllm.nn.layers import conv, layer_norm, linear, param
from pixelllm.nn.resize import resize_2d

_log = logging.getLogger(__name__)

# timm initializes every Linear with trunc_normal(std=.02) and cuts at +-2 (absolute), which for
# std .02 is a plain normal.
_INIT_STD = 0.02


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    h, w = value
    return (int(h), int(w))


@functools.lru_cache(maxsize=32)
def rope_table(grid: tuple[int, int], head_dim: int,
               ref_grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(sin, cos)``, each ``[grid_h * grid_w, head_dim]`` float32, in timm's 'cat' layout."""
    num_bands = head_dim // 4
    bands = 1.0 / 10000.0 ** (np.arange(num_bands, dtype=np.float32) / num_bands)
    t = [np.arange(s, dtype=np.float32) / np.float32(s) * np.float32(r)
         for s, r in zip(grid, ref_grid)]
    rows, cols = np.meshgrid(t[0], t[1], indexing="ij")
    # [H, W, 2 axes, bands] -> [N, row bands | col bands] -> each value twice, in place.
    angles = np.stack([rows, cols], axis=-1)[..., None] * bands
    angles = np.repeat(angles.reshape(grid[0] * grid[1], 2 * num_bands), 2, axis=-1)
    return np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotates interleaved channel pairs. ``x: [B, N, heads, D]``, ``sin, cos: [N, D]``."""
    x32 = x.astype(jnp.float32)
    pairs = x32.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return (x32 * cos[:, None] + rotated * sin[:, None]).astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention with RoPE on every token after the first (the cls token)."""

    def __init__(self, *, embed_dim: int, num_heads: int, proj_init_std: float,
                 dtype: jnp.dtype | None, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.num_heads = num_heads
        init = nnx.initializers.normal(_INIT_STD)
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q = linear(embed_dim, embed_dim, axes=("embed", "heads"), kernel_init=init, **common)
        self.k = linear(embed_dim, embed_dim, axes=("embed", "heads"), kernel_init=init,
                        use_bias=False, **common)
        self.v = linear(embed_dim, embed_dim, axes=("embed", "heads"), kernel_init=init, **common)
        self.proj = linear(embed_dim, embed_dim, axes=("heads", "embed"),
                           kernel_init=nnx.initializers.normal(proj_init_std), **common)

    def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
        """``x: [B, 1+N, C]``, ``sin, cos: [N, head_dim]`` -> ``[B, 1+N, C]``."""
        b, n, c = x.shape
        split = lambda y: y.reshape(b, n, self.num_heads, c // self.num_heads)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        q = jnp.concatenate([q[:, :1], apply_rope(q[:, 1:], sin, cos)], axis=1)
        k = jnp.concatenate([k[:, :1], apply_rope(k[:, 1:], sin, cos)], axis=1)
        out = jax.nn.dot_product_attention(q, k, v)
        return self.proj(out.reshape(b, n, c))


class SwiGLU(nnx.Module):
    """``fc2(norm(silu(fc1_g x) * fc1_x x))``."""

    def __init__(self, *, embed_dim: int, hidden_dim: int, eps: float, fc2_init_std: float,
                 dtype: jnp.dtype | None, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(_INIT_STD)
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1_g = linear(embed_dim, hidden_dim, axes=("embed", "mlp"), kernel_init=init, **common)
        self.fc1_x = linear(embed_dim, hidden_dim, axes=("embed", "mlp"), kernel_init=init, **common)
        self.norm = layer_norm(hidden_dim, eps=eps, axis="mlp", **common)
        self.fc2 = linear(hidden_dim, embed_dim, axes=("mlp", "embed"),
                          kernel_init=nnx.initializers.normal(fc2_init_std), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.norm(jax.nn.silu(self.fc1_g(x)) * self.fc1_x(x)))


def _drop_path(rate: float, rngs: nnx.Rngs) -> nnx.Dropout | None:
    # One mask value per example (broadcast over tokens and channels), rescaled by 1/keep as
    # timm's DropPath; built deterministic so a fresh model is in eval mode until .train().
    if rate <= 0.0:
        return None
    return nnx.Dropout(rate, broadcast_dims=(1, 2), deterministic=True, rngs=rngs)


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + attn(norm1 x)``, then ``x + mlp(norm2 x)``."""

    def __init__(self, *, embed_dim: int, num_heads: int, hidden_dim: int, eps: float,
                 drop_path: float, out_init_std: float, dtype: jnp.dtype | None,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = layer_norm(embed_dim, eps=eps, **common)
        self.attn = Attention(embed_dim=embed_dim, num_heads=num_heads,
                              proj_init_std=out_init_std, **common)
        self.norm2 = layer_norm(embed_dim, eps=eps, **common)
        self.mlp = SwiGLU(embed_dim=embed_dim, hidden_dim=hidden_dim, eps=eps,
                          fc2_init_std=out_init_std, **common)
        self.drop_path1 = _drop_path(drop_path, rngs)
        self.drop_path2 = _drop_path(drop_path, rngs)

    def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array,
                 constrain: Callable[[jax.Array], jax.Array]) -> jax.Array:
        """``x: [B, 1+N, C]``; ``constrain`` pins the residual stream's sharding."""
        y = self.attn(self.norm1(x), sin, cos)
        x = constrain(x + (y if self.drop_path1 is None else self.drop_path1(y)))
        y = self.mlp(self.norm2(x))
        return constrain(x + (y if self.drop_path2 is None else self.drop_path2(y)))


class Eva02(nnx.Module):
    """EVA02 ViT. ``images: [B, H, W, 3]`` (``H, W == img_size``) -> ``[B, H//p, W//p, C]``.

    An ``img_size`` that is not a multiple of the patch size leaves the last ``img_size % p``
    pixel rows and columns unseen (a VALID patch convolution), as the official PixelLLM runs
    EVA02-L/14 on its 384 canvas: a 27x27 grid covering 378 pixels.

    ``rope_ref_grid`` is the token grid the RoPE positions are scaled to (16 for the released
    EVA02 weights, pretrained at 224/14). ``drop_path_rate`` is the last block's stochastic-depth
    rate (linear from 0 in the first block); it draws from the ``dropout`` stream of ``rngs``.

    With a ``mesh``, the residual stream is constrained to ``('batch', 'length', 'embed')`` under
    ``rules`` after the embedding and after every residual addition. Besides fixing the
    activation layout, this avoids wrong results from XLA's partitioner (seen with jax 0.10.2 on
    CPU) when the batch is sharded over ``('data', 'fsdp')`` and weights over
    ``('tensor', 'fsdp')`` with nothing pinning the activations in between.
    """

    def __init__(self, *, img_size: int | tuple[int, int], patch_size: int, embed_dim: int,
                 depth: int, num_heads: int, mlp_ratio: float,
                 rope_ref_grid: int | tuple[int, int], layer_norm_eps: float = 1e-6,
                 final_norm: bool = True, drop_path_rate: float = 0.0,
                 dtype: jnp.dtype | None = None, param_dtype: jnp.dtype = jnp.float32,
                 mesh: Mesh | None = None, rules: sharding.Rules = sharding.DEFAULT_RULES,
                 rngs: nnx.Rngs):
        self.img_size = _pair(img_size)
        if any(s < patch_size for s in self.img_size):
            raise ValueError(f"img_size {self.img_size} is smaller than patch_size {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        head_dim = embed_dim // num_heads
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
        self.patch_size = patch_size
        self.grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.head_dim = head_dim
        self.rope_ref_grid = _pair(rope_ref_grid)
        self.mesh = mesh
        self.rules = sharding.rules_from_config(rules)
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.patch_embed = conv(3, embed_dim, (patch_size, patch_size),
                                strides=(patch_size, patch_size), padding="VALID",
                                **common)
        init = nnx.initializers.normal(_INIT_STD)
        num_tokens = 1 + self.grid[0] * self.grid[1]
        self.cls_token = param(init(rngs.params(), (1, 1, embed_dim), param_dtype),
                               (None, None, "embed"))
        self.pos_embed = param(init(rngs.params(), (1, num_tokens, embed_dim), param_dtype),
                               (None, None, "embed"))
        rates = np.linspace(0.0, drop_path_rate, depth)
        hidden_dim = int(embed_dim * mlp_ratio)
        self.blocks = nnx.List([
            # timm's fix_init_weight: residual-branch outputs shrink with depth.
            Block(embed_dim=embed_dim, num_heads=num_heads, hidden_dim=hidden_dim,
                  eps=layer_norm_eps, drop_path=float(rates[i]),
                  out_init_std=_INIT_STD / math.sqrt(2.0 * (i + 1)), **common)
            for i in range(depth)])
        self.final_norm = layer_norm(embed_dim, eps=layer_norm_eps, **common) if final_norm else None

    @classmethod
    def from_config(cls, model_config, *, rngs: nnx.Rngs, **overrides) -> Eva02:
        """From ``configs/eva02.py``'s ``model``; ``overrides`` adds e.g. ``mesh=`` or ``dtype=``."""
        return cls(**model_config.to_dict(), **overrides, rngs=rngs)

    def _check_images(self, images: jax.Array) -> None:
        expected = (*self.img_size, 3)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"EVA02 expects images [B, {expected[0]}, {expected[1]}, 3] "
                             f"(NHWC, the model's img_size), received shape {tuple(images.shape)}")

    def forward_tokens(self, images: jax.Array) -> jax.Array:
        """``images: [B, H, W, 3]`` -> ``[B, 1+N, C]`` (cls first), before ``final_norm``.

        Equals timm's ``forward_features``.
        """
        self._check_images(images)
        x = self.patch_embed(images)
        b, _, _, c = x.shape
        x = x.reshape(b, -1, c)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, c))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(x.dtype)
        x = self._constrain(x)
        sin, cos = (jnp.asarray(t) for t in rope_table(self.grid, self.head_dim, self.rope_ref_grid))
        for block in self.blocks:
            x = block(x, sin, cos, self._constrain)
        return x

    def _constrain(self, x: jax.Array) -> jax.Array:
        return sharding.constrain(x, ("batch", "length", "embed"), self.mesh, self.rules)

    def __call__(self, images: jax.Array) -> jax.Array:
        """``images: [B, H, W, 3]`` -> patch features ``[B, H//p, W//p, C]`` (cls dropped)."""
        x = self.forward_tokens(images)[:, 1:]
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x.reshape(x.shape[0], *self.grid, x.shape[-1])


# ----------------------------------------------------------------------------- converter

# BAAI EVA-02 names -> timm names, as timm's checkpoint_filter_fn.
_BAAI_RENAMES = (
    (re.compile(r"\.mlp\.w1\."), ".mlp.fc1_g."),
    (re.compile(r"\.mlp\.w2\."), ".mlp.fc1_x."),
    (re.compile(r"\.mlp\.ffn_ln\."), ".mlp.norm."),
    (re.compile(r"\.mlp\.w3\."), ".mlp.fc2."),
)
# Only with separate q/k/v weights (a fused-qkv checkpoint keeps its names and is reported).
_BAAI_BIAS_RENAMES = (
    (re.compile(r"\.attn\.q_bias$"), ".attn.q_proj.bias"),
    (re.compile(r"\.attn\.v_bias$"), ".attn.v_proj.bias"),
)

# timm block-relative name -> (nnx path relative to the block, torch Linear weight?)
_BLOCK_KEYS = {
    "norm1.weight": ("norm1/scale", False), "norm1.bias": ("norm1/bias", False),
    "attn.q_proj.weight": ("attn/q/kernel", True), "attn.q_proj.bias": ("attn/q/bias", False),
    "attn.k_proj.weight": ("attn/k/kernel", True),
    "attn.v_proj.weight": ("attn/v/kernel", True), "attn.v_proj.bias": ("attn/v/bias", False),
    "attn.proj.weight": ("attn/proj/kernel", True), "attn.proj.bias": ("attn/proj/bias", False),
    "norm2.weight": ("norm2/scale", False), "norm2.bias": ("norm2/bias", False),
    "mlp.fc1_g.weight": ("mlp/fc1_g/kernel", True), "mlp.fc1_g.bias": ("mlp/fc1_g/bias", False),
    "mlp.fc1_x.weight": ("mlp/fc1_x/kernel", True), "mlp.fc1_x.bias": ("mlp/fc1_x/bias", False),
    "mlp.norm.weight": ("mlp/norm/scale", False), "mlp.norm.bias": ("mlp/norm/bias", False),
    "mlp.fc2.weight": ("mlp/fc2/kernel", True), "mlp.fc2.bias": ("mlp/fc2/bias", False),
}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _is_ignored(key: str, *, mim: bool, final_norm: bool) -> bool:
    """Tensors that never become parameters of :class:`Eva02`."""
    if key.startswith("head.") or key.startswith("rope."):
        return True  # classifier head; fixed RoPE tables BAAI stores as buffers
    if mim and (key == "mask_token" or key.startswith("lm_head.")):
        return True
    if not final_norm and (key.startswith("fc_norm.") or key.startswith("norm.")):
        return True
    return False


def resample_pos_embed(pos_embed: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``[1, 1+n*n, C]`` -> ``[1, 1+grid_h*grid_w, C]`` as timm's ``resample_abs_pos_embed``
    (torch bicubic, antialias on, align_corners=False; the cls slot is kept as is)."""
    num_patches = pos_embed.shape[1] - 1
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"pos_embed with {num_patches} patch positions is not a square grid")
    if (side, side) == tuple(grid):
        return pos_embed
    table = jnp.asarray(pos_embed[0, 1:], jnp.float32).reshape(side, side, -1)
    table = resize_2d(table, grid, mode="cubic", antialias=True)
    table = np.asarray(table).reshape(1, grid[0] * grid[1], -1).astype(pos_embed.dtype)
    return np.concatenate([pos_embed[:, :1], table], axis=1)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], *,
                       img_size: int | tuple[int, int] | None = None, final_norm: bool = True,
                       source: str = "EVA02 state dict") -> dict[str, np.ndarray]:
    """timm or BAAI EVA02 state dict (torch layouts) -> ``{"nnx/path": array}`` for :class:`Eva02`.

    ``img_size``: the model's input size; the position embedding is resampled to its grid when
    the checkpoint's differs (None keeps the checkpoint's grid). ``final_norm``: whether the
    model has the final LayerNorm (timm ``fc_norm``; ``norm`` in MIM checkpoints, as timm moves
    it); without it those tensors are dropped. Dropped tensors (``head.*``, RoPE buffers,
    ``mask_token``/``lm_head.*`` of MIM checkpoints) are logged. Any other unknown or missing
    source key raises :class:`~pixelllm.checkpoints.assign.CheckpointMismatchError` naming it.
    """
    mim = "mask_token" in state_dict
    ignored = sorted(k for k in state_dict if _is_ignored(k, mim=mim, final_norm=final_norm))
    skip = set(ignored)
    if ignored:
        _log.info("%s: ignored %d tensors not used by Eva02: %s", source, len(ignored),
                  ", ".join(ignored))
    separate_qkv = any(k.endswith(".attn.q_proj.weight") for k in state_dict)
    renames = _BAAI_RENAMES + (_BAAI_BIAS_RENAMES if separate_qkv else ())
    canonical: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        if key in skip:
            continue
        for pattern, replacement in renames:
            key = pattern.sub(replacement, key)
        if key.startswith("norm.") and "fc_norm.weight" not in state_dict:
            key = "fc_norm." + key[len("norm."):]
        if key in canonical:
            raise ValueError(f"{source}: two tensors map to {key!r} (timm and BAAI names mixed?)")
        canonical[key] = np.asarray(value)

    depth = 1 + max((int(m.group(1)) for k in canonical if (m := _BLOCK_RE.match(k))), default=-1)
    expected_names = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    expected_names += [f"blocks.{i}.{name}" for i in range(depth) for name in _BLOCK_KEYS]
    if final_norm:
        expected_names += ["fc_norm.weight", "fc_norm.bias"]
    # Names only here; shapes are checked against the model by `assign`.
    check_keys(source=source, expected={k: np.shape(canonical.get(k)) for k in expected_names},
               found={k: np.shape(v) for k, v in canonical.items()}, what="source tensors")

    patch_weight = canonical["patch_embed.proj.weight"]
    pos_embed = canonical["pos_embed"]
    if img_size is not None:
        size = _pair(img_size)
        patch = patch_weight.shape[-2:]
        if size[0] % patch[0] or size[1] % patch[1]:
            raise ValueError(f"img_size {size} is not a multiple of the checkpoint's patch {patch}")
        pos_embed = resample_pos_embed(pos_embed, (size[0] // patch[0], size[1] // patch[1]))
    out = {
        "cls_token": canonical["cls_token"],
        "pos_embed": pos_embed,
        "patch_embed/kernel": patch_weight.transpose(2, 3, 1, 0),
        "patch_embed/bias": canonical["patch_embed.proj.bias"],
    }
    for i in range(depth):
        for name, (path, is_linear) in _BLOCK_KEYS.items():
            value = canonical[f"blocks.{i}.{name}"]
            out[f"blocks/{i}/{path}"] = value.T if is_linear else value
    if final_norm:
        out["final_norm/scale"] = canonical["fc_norm.weight"]
        out["final_norm/bias"] = canonical["fc_norm.bias"]
    return out


def load(state_dict: Mapping[str, np.ndarray], model: Eva02, *,
         source: str = "EVA02 state dict") -> Eva02:
    """Converts ``state_dict`` for ``model`` (its img_size and final norm) and assigns it strictly."""
    params = convert_state_dict(state_dict, img_size=model.img_size,
                                final_norm=model.final_norm is not None, source=source)
    return assign(model, params, source=source)
