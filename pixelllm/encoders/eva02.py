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

Checkpoints: :func:`load` reads timm names and BAAI names, resamples the absolute
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
from pixelllm.checkpoints.assign import assign, param_shapes
from pixelllm.checkpoints.key_map import (
    CONV, KEEP, TRANSPOSE, Rule, Transform, apply_key_map)
from pixelllm.nn import remat as remat_lib
from pixelllm.nn.dropout import inverted_dropout
from pixelllm.nn.stacked import stack_modules
from pixelllm.nn.layers import conv, layer_norm, linear, param
from pixelllm.nn.resize import resize_2d

_log = logging.getLogger(__name__)

# timm initializes every Linear with trunc_normal(std=.02) and cuts at +-2 (absolute), which for
# std .02 is a plain normal.
_INIT_STD = 0.02
# The released EVA02 trunks, to say which one a file of another size looks like.
_RELEASED = {(1024, 24): "L", (768, 12): "B", (384, 12): "S"}


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


class DropPath(nnx.Module):
    """Stochastic depth as timm's ``DropPath``: one keep/drop draw per example (broadcast over
    tokens and channels), kept values rescaled by ``1 / (1 - rate)``.

    The rate is a call argument, not a field, so that blocks of different depth (different
    rates) share one structure and can be stacked for ``nnx.scan``. Built deterministic, so a
    fresh model is in eval mode until ``.train()``; draws from the ``dropout`` stream.
    """

    def __init__(self, *, rngs: nnx.Rngs):
        self.deterministic = True
        self.rngs = rngs["dropout"].fork()

    def __call__(self, x: jax.Array, rate: float | jax.Array) -> jax.Array:
        """``x: [B, ...]``; ``rate`` a scalar in ``[0, 1)``."""
        if self.deterministic:
            return x
        return inverted_dropout(x, jnp.asarray(rate, jnp.float32), self.rngs(),
                                mask_shape=(x.shape[0],) + (1,) * (x.ndim - 1))


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + attn(norm1 x)``, then ``x + mlp(norm2 x)``.

    ``drop_path``: whether the residual branches have stochastic depth (their rate is given per
    call, see :class:`DropPath`).
    """

    def __init__(self, *, embed_dim: int, num_heads: int, hidden_dim: int, eps: float,
                 drop_path: bool, out_init_std: float, dtype: jnp.dtype,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = layer_norm(embed_dim, eps=eps, **common)
        self.attn = Attention(embed_dim=embed_dim, num_heads=num_heads,
                              proj_init_std=out_init_std, **common)
        self.norm2 = layer_norm(embed_dim, eps=eps, **common)
        self.mlp = SwiGLU(embed_dim=embed_dim, hidden_dim=hidden_dim, eps=eps,
                          fc2_init_std=out_init_std, **common)
        self.drop_path1 = DropPath(rngs=rngs) if drop_path else None
        self.drop_path2 = DropPath(rngs=rngs) if drop_path else None

    def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array,
                 constrain: Callable[[jax.Array], jax.Array],
                 drop_rate: float | jax.Array) -> jax.Array:
        """``x: [B, 1+N, C]``; ``constrain`` pins the residual stream's sharding; ``drop_rate``
        is this block's stochastic-depth rate (unused without ``drop_path``)."""
        y = self.attn(self.norm1(x), sin, cos)
        x = constrain(x + (y if self.drop_path1 is None else self.drop_path1(y, drop_rate)))
        y = self.mlp(self.norm2(x))
        return constrain(x + (y if self.drop_path2 is None else self.drop_path2(y, drop_rate)))


_STACKED_BLOCK_RE = re.compile(r"^blocks/(\d+)/(.+)$")


def stack_block_params(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-layer ``{"blocks/{i}/path": array}`` -> stacked ``{"blocks/path": [depth, ...]}``,
    the parameter layout of an ``Eva02(scan_layers=True)``; other keys pass unchanged."""
    per_layer: dict[str, dict[int, np.ndarray]] = {}
    out = {}
    for key, value in params.items():
        match = _STACKED_BLOCK_RE.match(key)
        if match is None:
            out[key] = value
        else:
            per_layer.setdefault(match.group(2), {})[int(match.group(1))] = value
    for path, layers in per_layer.items():
        if sorted(layers) != list(range(len(layers))):
            raise ValueError(f"blocks/*/{path}: layers {sorted(layers)} are not 0..n-1")
        out[f"blocks/{path}"] = np.stack([np.asarray(layers[i]) for i in range(len(layers))])
    return out


def unstack_block_params(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of :func:`stack_block_params`."""
    out = {}
    for key, value in params.items():
        if key.startswith("blocks/"):
            for i, layer in enumerate(np.asarray(value)):
                out[f"blocks/{i}/{key[len('blocks/'):]}"] = layer
        else:
            out[key] = value
    return out


class Eva02(nnx.Module):
    """EVA02 ViT. ``images: [B, H, W, 3]`` (``H, W == img_size``) -> ``[B, H//p, W//p, C]``.

    An ``img_size`` that is not a multiple of the patch size leaves the last ``img_size % p``
    pixel rows and columns unseen (a VALID patch convolution), as the official PixelLLM runs
    EVA02-L/14 on its 384 canvas: a 27x27 grid covering 378 pixels.

    ``rope_ref_grid`` is the token grid the RoPE positions are scaled to (16 for the released
    EVA02 weights, pretrained at 224/14). ``drop_path_rate`` is the last block's stochastic-depth
    rate (linear from 0 in the first block); it draws from the ``dropout`` stream of ``rngs``.

    ``dtype`` is the compute dtype (bfloat16 on accelerators), ``param_dtype`` the storage dtype
    (float32); LayerNorm statistics, RoPE and the attention softmax run in float32 whatever the
    compute dtype. ``remat`` names the blocks' rematerialization policy
    (:mod:`pixelllm.nn.remat`). ``scan_layers`` stores the blocks stacked (parameters
    ``blocks/...`` with a leading depth axis, see :func:`stack_block_params`) and runs them with
    ``nnx.scan``: one compiled block instead of ``depth`` copies, same values.

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
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
                 remat: str = "none", scan_layers: bool = False,
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
        self.dtype = dtype
        self.remat = remat_lib.check_remat(remat)
        self.scan_layers = scan_layers
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
        self.drop_path_rates = tuple(float(r) for r in np.linspace(0.0, drop_path_rate, depth))
        hidden_dim = int(embed_dim * mlp_ratio)
        blocks = [
            # timm's fix_init_weight: residual-branch outputs shrink with depth.
            Block(embed_dim=embed_dim, num_heads=num_heads, hidden_dim=hidden_dim,
                  eps=layer_norm_eps, drop_path=drop_path_rate > 0.0,
                  out_init_std=_INIT_STD / math.sqrt(2.0 * (i + 1)), **common)
            for i in range(depth)]
        # Built one by one either way, so both layouts start from the same weights.
        self.blocks = stack_modules(blocks) if scan_layers else nnx.List(blocks)
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
        x = self.patch_embed(jnp.asarray(images, self.dtype))
        b, _, _, c = x.shape
        x = x.reshape(b, -1, c)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, c))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(x.dtype)
        constrain = functools.partial(sharding.constrain, logical_axes=("batch", "length", "embed"),
                                      mesh=self.mesh, rules=self.rules)
        x = constrain(x)
        sin, cos = (jnp.asarray(t) for t in rope_table(self.grid, self.head_dim, self.rope_ref_grid))
        run_block = remat_lib.remat(
            lambda block, x, rate: block(x, sin, cos, constrain, rate), self.remat)
        if not self.scan_layers:
            for block, rate in zip(self.blocks, self.drop_path_rates):
                x = run_block(block, x, rate)
            return x

        @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry)
        def run_stack(x, block, rate):
            return run_block(block, x, rate)

        return run_stack(x, self.blocks, jnp.asarray(self.drop_path_rates, jnp.float32))

    def __call__(self, images: jax.Array) -> jax.Array:
        """``images: [B, H, W, 3]`` -> patch features ``[B, H//p, W//p, C]`` (cls dropped)."""
        x = self.forward_tokens(images)[:, 1:]
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x.reshape(x.shape[0], *self.grid, x.shape[-1])


# ----------------------------------------------------------------------------- converter

# timm block-relative name -> (nnx path relative to the block, transform), then BAAI EVA-02's own
# names for the same tensors (timm's checkpoint_filter_fn renames them the same way).
_BLOCK_RULES = (
    ("norm1.weight", "norm1/scale", KEEP), ("norm1.bias", "norm1/bias", KEEP),
    ("attn.q_proj.weight", "attn/q/kernel", TRANSPOSE), ("attn.q_proj.bias", "attn/q/bias", KEEP),
    ("attn.k_proj.weight", "attn/k/kernel", TRANSPOSE),
    ("attn.v_proj.weight", "attn/v/kernel", TRANSPOSE), ("attn.v_proj.bias", "attn/v/bias", KEEP),
    ("attn.proj.weight", "attn/proj/kernel", TRANSPOSE), ("attn.proj.bias", "attn/proj/bias", KEEP),
    ("norm2.weight", "norm2/scale", KEEP), ("norm2.bias", "norm2/bias", KEEP),
    ("mlp.fc1_g.weight", "mlp/fc1_g/kernel", TRANSPOSE), ("mlp.fc1_g.bias", "mlp/fc1_g/bias", KEEP),
    ("mlp.fc1_x.weight", "mlp/fc1_x/kernel", TRANSPOSE), ("mlp.fc1_x.bias", "mlp/fc1_x/bias", KEEP),
    ("mlp.norm.weight", "mlp/norm/scale", KEEP), ("mlp.norm.bias", "mlp/norm/bias", KEEP),
    ("mlp.fc2.weight", "mlp/fc2/kernel", TRANSPOSE), ("mlp.fc2.bias", "mlp/fc2/bias", KEEP),
)
_BAAI_BLOCK_RULES = (
    ("mlp.w1.weight", "mlp/fc1_g/kernel", TRANSPOSE), ("mlp.w1.bias", "mlp/fc1_g/bias", KEEP),
    ("mlp.w2.weight", "mlp/fc1_x/kernel", TRANSPOSE), ("mlp.w2.bias", "mlp/fc1_x/bias", KEEP),
    ("mlp.ffn_ln.weight", "mlp/norm/scale", KEEP), ("mlp.ffn_ln.bias", "mlp/norm/bias", KEEP),
    ("mlp.w3.weight", "mlp/fc2/kernel", TRANSPOSE), ("mlp.w3.bias", "mlp/fc2/bias", KEEP),
)
# BAAI's q/v biases, only beside separate q/k/v weights: a fused-qkv file keeps them reported.
_BAAI_BIAS_RULES = (("attn.q_bias", "attn/q/bias", KEEP), ("attn.v_bias", "attn/v/bias", KEEP))
# Tensors of public EVA02 files that are not Eva02 parameters: the classifier head and BAAI's fixed
# RoPE buffers; with a mask token (MIM pretraining) also the MIM head.
_DROPPED = ("head.*", "rope.*")
_MIM_DROPPED = ("mask_token", "lm_head.*")
_FINAL_NORM_NAMES = ("fc_norm", "norm")  # `norm`: MIM files, as timm moves it


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


def key_rules(model: Eva02, state_dict: Mapping[str, np.ndarray]
              ) -> tuple[list[Rule], list[str]]:
    """The key map from a timm or BAAI EVA02 file to ``model``: ``(rules, drop patterns)``.

    The position embedding is resampled to the model's grid when the file's differs, as timm
    does on load. Without ``model.final_norm`` the file's ``fc_norm``/``norm`` are dropped.
    """
    resample = Transform(f"resample to grid {model.grid}",
                         functools.partial(resample_pos_embed, grid=model.grid))
    drop = list(_DROPPED) + (list(_MIM_DROPPED) if "mask_token" in state_dict else [])
    rules = [
        Rule("cls_token", "cls_token"), Rule("pos_embed", "pos_embed", resample),
        Rule("patch_embed.proj.weight", "patch_embed/kernel", CONV),
        Rule("patch_embed.proj.bias", "patch_embed/bias"),
    ]
    block_rules = _BLOCK_RULES + _BAAI_BLOCK_RULES
    if any(k.endswith(".attn.q_proj.weight") for k in state_dict):
        block_rules += _BAAI_BIAS_RULES
    rules += [Rule(f"blocks.{{i}}.{name}", f"blocks/{{i}}/{path}", transform)
              for name, path, transform in block_rules]
    for name in _FINAL_NORM_NAMES:
        if model.final_norm is None:
            drop.append(f"{name}.*")
        else:
            rules += [Rule(f"{name}.weight", "final_norm/scale"),
                      Rule(f"{name}.bias", "final_norm/bias")]
    return rules, drop


def load(module: Eva02, state_dict: Mapping[str, np.ndarray], *, source: str) -> Eva02:
    """Fills ``module`` (in place, strictly) from a timm or BAAI EVA02 state dict; returns it.

    Dropped tensors (classifier head, RoPE buffers, MIM head) are logged. A mismatch names
    ``source``, the file's keys and, when width or depth differ, what the file looks like.
    """
    expected = param_shapes(module)
    if module.scan_layers:  # stacked [depth, ...] blocks: convert per layer, then stack
        expected = {path: shape for key, stacked in expected.items()
                    for path, shape in ([(key, stacked)] if not key.startswith("blocks/") else
                                        [(f"blocks/{i}/{key[len('blocks/'):]}", stacked[1:])
                                         for i in range(stacked[0])])}
    rules, drop = key_rules(module, state_dict)
    params, dropped = apply_key_map(state_dict, rules, source=source, expected=expected,
                                    drop=drop, hint=_variant_hint(module, state_dict))
    if dropped:
        _log.info("%s: ignored %d tensors not used by Eva02: %s", source, len(dropped),
                  ", ".join(sorted(dropped)))
    if module.scan_layers:
        params = stack_block_params(params)
    return assign(module, params, source=source)


def _size(embed_dim: int, depth: int) -> str:
    size = f"embed_dim {embed_dim}, depth {depth}"
    name = _RELEASED.get((embed_dim, depth))
    return f"EVA02-{name} ({size})" if name else f"an EVA02 of {size}"


def _variant_hint(module: Eva02, state_dict: Mapping[str, np.ndarray]) -> str | None:
    """What the file looks like (e.g. EVA02-B) when its width or depth differs from the model's."""
    if np.ndim(state_dict.get("cls_token", 0)) == 0:  # absent or scalar: the key listing tells
        return None
    block = re.compile(r"blocks\.(\d+)\.")
    depth = 1 + max((int(m.group(1)) for k in state_dict if (m := block.match(k))), default=-1)
    file_size = _size(np.shape(state_dict["cls_token"])[-1], depth)
    model_size = _size(module.cls_token.get_value().shape[-1], len(module.drop_path_rates))
    if file_size == model_size:
        return None
    return f"this looks like {file_size}; the model is {model_size}"
