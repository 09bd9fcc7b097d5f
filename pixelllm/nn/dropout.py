"""Inverted dropout, the one mask-and-rescale that every dropout of the project applies (T5's
dropout, the LoRA adapters' input dropout, SAM's and EVA02's stochastic depth)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def inverted_dropout(x: jax.Array, rate: float | jax.Array, key: jax.Array, *,
                     mask_shape: Sequence[int] | None = None) -> jax.Array:
    """``x`` where a Bernoulli(``1 - rate``) mask keeps it, scaled by ``1 / (1 - rate)``, zero
    elsewhere. ``mask_shape`` (default ``x.shape``) broadcasts against ``x``: a 1 shares one
    draw along that axis (``[B, 1, ...]``: stochastic depth, one draw per example)."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape if mask_shape is None else mask_shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))
