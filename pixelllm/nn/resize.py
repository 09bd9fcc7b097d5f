"""Resizing that matches ``torch.nn.functional.interpolate`` (``align_corners=False``).

Checkpoints trained in PyTorch resize position tables with torch's kernels; ``jax.image.resize``
uses other ones (Keys a=-0.5 cubic, antialias on by default), which changes the numbers. Each
resize here is a static weight matrix per axis built in numpy and applied with one einsum, so it
is exact, differentiable and jit-friendly. :func:`window_resize_matrix` builds the bilinear one
from traced sizes instead (a window of each image onto its own size: one program for every image
size).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    return np.where(
        x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
        np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _linear(x: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.abs(x))


@functools.lru_cache(maxsize=256)
def resize_matrix(in_size: int, out_size: int, mode: str, antialias: bool) -> np.ndarray:
    """The ``(out_size, in_size)`` float64 matrix torch applies along one axis.

    ``mode`` is ``"linear"`` or ``"cubic"``. Without antialias: torch's separable kernels with
    border clamping (cubic a=-0.75). With antialias (torch's ``_aa`` kernels, as PIL): the kernel
    is stretched by the downscale factor and renormalized (cubic a=-0.5).
    """
    if mode not in ("linear", "cubic"):
        raise ValueError(f"unknown resize mode {mode!r}")
    scale = in_size / out_size
    weights = np.zeros((out_size, in_size))
    if antialias:
        support = (1.0 if mode == "linear" else 2.0) * max(scale, 1.0)
        inv = 1.0 / max(scale, 1.0)
        for i in range(out_size):
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), in_size)
            taps = np.arange(lo, hi)
            arg = (taps - center + 0.5) * inv
            w = _linear(arg) if mode == "linear" else _cubic(arg, -0.5)
            weights[i, lo:hi] = w / w.sum()
        return weights
    for i in range(out_size):
        src = max((i + 0.5) * scale - 0.5, 0.0) if mode == "linear" else (i + 0.5) * scale - 0.5
        base = int(np.floor(src))
        frac = src - base
        if mode == "linear":
            taps = np.array([base, base + 1])
            w = np.array([1.0 - frac, frac])
        else:
            taps = base + np.arange(-1, 3)
            w = _cubic(frac - np.arange(-1, 3), -0.75)
        for t, wt in zip(np.clip(taps, 0, in_size - 1), w):
            weights[i, t] += wt
    return weights


def resize_axis(x: jax.Array, axis: int, out_size: int, *, mode: str,
                antialias: bool = False) -> jax.Array:
    """Resizes one axis of ``x`` as torch ``F.interpolate`` would; a no-op at equal size."""
    in_size = x.shape[axis]
    if in_size == out_size:
        return x
    matrix = jnp.asarray(resize_matrix(in_size, out_size, mode, antialias), dtype=x.dtype)
    moved = jnp.moveaxis(x, axis, -1)
    out = jnp.einsum("...i,oi->...o", moved, matrix, precision=jax.lax.Precision.HIGHEST)
    return jnp.moveaxis(out, -1, axis)


def resize_2d(x: jax.Array, out_hw: tuple[int, int], *, mode: str = "cubic",
              antialias: bool = False) -> jax.Array:
    """Resizes ``x[..., H, W, C]`` to ``[..., h, w, C]`` (torch bicubic/bilinear, separable)."""
    x = resize_axis(x, x.ndim - 3, out_hw[0], mode=mode, antialias=antialias)
    return resize_axis(x, x.ndim - 2, out_hw[1], mode=mode, antialias=antialias)


def window_resize_matrix(start: jax.Array, in_valid: jax.Array, out_valid: jax.Array, *,
                         in_size: int, out_size: int) -> jax.Array:
    """``[out_size, in_size]`` float32: torch's bilinear resize (``align_corners=False``, no
    antialias) of the window ``[start, start + in_valid)`` of an axis onto the first
    ``out_valid`` outputs; rows past ``out_valid`` are zero. ``start, in_valid, out_valid`` are
    traced int scalars."""
    scale = in_valid.astype(jnp.float32) / out_valid.astype(jnp.float32)
    src = jnp.maximum((jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale - 0.5, 0.0)
    low = jnp.floor(src).astype(jnp.int32)
    frac = src - low
    high = jnp.where(low < in_valid - 1, low + 1, low)
    weights = (jax.nn.one_hot(start + low, in_size) * (1.0 - frac)[:, None]
               + jax.nn.one_hot(start + high, in_size) * frac[:, None])
    return jnp.where((jnp.arange(out_size) < out_valid)[:, None], weights, 0.0)
