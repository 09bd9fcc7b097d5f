"""Flax NNX layers constructed with logical axis metadata (see :mod:`pixelllm.sharding`).

Thin factories over ``nnx.Linear``/``nnx.Conv``/``nnx.LayerNorm`` so every parameter in the
project is annotated the same way. Kernels use Flax layouts: Linear ``(in, out)``, Conv
``(kh, kw, in, out)``; images are NHWC.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axis = str | None

_DEFAULT_KERNEL_INIT = nnx.initializers.lecun_normal()


def linear(in_features: int, out_features: int, *, axes: tuple[Axis, Axis], rngs: nnx.Rngs,
           use_bias: bool = True, dtype: jnp.dtype | None = None,
           param_dtype: jnp.dtype = jnp.float32,
           kernel_init: nnx.Initializer = _DEFAULT_KERNEL_INIT) -> nnx.Linear:
    """Dense layer; ``axes`` are the logical names of the kernel's (in, out) dimensions."""
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=kernel_init, rngs=rngs,
        kernel_metadata={"logical_axes": tuple(axes)},
        bias_metadata={"logical_axes": (axes[1],)})


def conv(in_features: int, out_features: int, kernel_size: int | Sequence[int], *,
         rngs: nnx.Rngs, strides: int | Sequence[int] = 1, padding: str | int = "VALID",
         use_bias: bool = True, dtype: jnp.dtype | None = None,
         param_dtype: jnp.dtype = jnp.float32) -> nnx.Conv:
    """2-D convolution over NHWC inputs; kernel axes ``(None, None, conv_in, conv_out)``."""
    # nnx.Conv infers the number of spatial dims from kernel_size: an int would make it 1-D.
    if isinstance(kernel_size, int):
        kernel_size = (kernel_size, kernel_size)
    if isinstance(strides, int):
        strides = (strides, strides)
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nnx.Conv(
        in_features, out_features, kernel_size, strides=strides, padding=padding,
        use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        kernel_metadata={"logical_axes": (None, None, "conv_in", "conv_out")},
        bias_metadata={"logical_axes": ("conv_out",)})


def layer_norm(features: int, *, eps: float, rngs: nnx.Rngs, axis: Axis = "embed",
               use_bias: bool = True, dtype: jnp.dtype | None = None,
               param_dtype: jnp.dtype = jnp.float32) -> nnx.LayerNorm:
    """LayerNorm over the last axis. On NHWC maps this is SAM's ``LayerNorm2d``.

    ``eps`` has no default on purpose: torch uses 1e-5, Flax 1e-6, and the checkpoints we load
    disagree among themselves.
    """
    return nnx.LayerNorm(
        features, epsilon=eps, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        # Two-pass variance, as torch: the one-pass form loses ~1e-3 on few-channel maps.
        use_fast_variance=False,
        rngs=rngs, scale_metadata={"logical_axes": (axis,)},
        bias_metadata={"logical_axes": (axis,)})


def param(value: jax.Array, axes: Sequence[Axis]) -> nnx.Param:
    """A free-standing parameter (position tables, learned tokens) with logical axes."""
    if len(axes) != value.ndim:
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {value.shape}")
    return nnx.Param(value, logical_axes=tuple(axes))


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as torch ``nn.GELU()``; ``jax.nn.gelu`` defaults to the tanh form."""
    return jax.nn.gelu(x, approximate=False)
