"""Inverted dropout: kept values scaled by 1 / (1 - rate), the rest zero, a mask shape shared
along its axes of size 1."""

import jax
import jax.numpy as jnp
import numpy as np

from pixelllm.nn.dropout import inverted_dropout


def test_kept_values_are_rescaled_and_the_rest_zero():
    x = jnp.arange(1, 20001, dtype=jnp.float32).reshape(100, 200)
    out = np.asarray(inverted_dropout(x, 0.25, jax.random.key(0)))
    kept = out != 0
    np.testing.assert_allclose(out[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
    assert abs(kept.mean() - 0.75) < 0.01


def test_a_mask_shape_shares_one_draw_along_its_unit_axes():
    x = jnp.ones((64, 3, 5), jnp.bfloat16)
    dropped = inverted_dropout(x, jnp.float32(0.5), jax.random.key(1), mask_shape=(64, 1, 1))
    assert dropped.dtype == x.dtype
    out = np.asarray(dropped, np.float32)
    per_example = out.reshape(64, -1)
    assert (per_example == per_example[:, :1]).all()  # one draw per example
    assert set(np.unique(per_example)) == {0.0, 2.0}
