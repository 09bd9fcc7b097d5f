"""RMS normalization as the language models use it: T5/Llama style (``x̂ · w``) and Gemma style
(``x̂ · (1 + w)``, zero-initialised)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pixelllm.nn import lora


class RMSNorm(nnx.Module):
    """RMS norm over the last axis, without mean subtraction or bias, computed in float32.

    ``plus_one=False`` (T5, Llama): ``x̂`` is cast to the output dtype first, then scaled by ``w``
    (ones at init). ``plus_one=True`` (Gemma): ``x̂ · (1 + w)`` in float32, then cast (``w`` zeros at
    init). The output dtype is ``dtype``, or the input's when None. ``x: [..., features]``.
    """

    def __init__(self, features: int, *, eps: float, plus_one: bool = False, axis: str = "embed",
                 frozen: bool, dtype: jnp.dtype | None = None,
                 param_dtype: jnp.dtype = jnp.float32):
        self.eps, self.plus_one, self.dtype = eps, plus_one, dtype
        init = jnp.zeros if plus_one else jnp.ones
        self.scale = lora.weight(init((features,), param_dtype), (axis,), frozen=frozen)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale.get_value()
        if self.plus_one:
            return (normed * (1.0 + scale.astype(jnp.float32))).astype(dtype)
        return normed.astype(dtype) * scale.astype(dtype)
