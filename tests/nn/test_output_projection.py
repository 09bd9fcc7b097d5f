"""The vocabulary projection's hand-written backward pass equals autodiff's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelllm.nn import output_projection


def _autodiff(hidden, kernel):
    return jnp.einsum("...d,dv->...v", hidden, kernel, preferred_element_type=jnp.float32)


@pytest.mark.parametrize("leading", [(6,), (2, 3, 5)])
def test_values_and_gradients_equal_autodiffs(leading):
    hidden = jax.random.normal(jax.random.key(0), (*leading, 8))
    kernel = jax.random.normal(jax.random.key(1), (8, 50))
    cotangent = jax.random.normal(jax.random.key(2), (*leading, 50))

    def loss(project):
        return lambda h, k: jnp.sum(project(h, k) * cotangent + jnp.sin(project(h, k)))

    ours = jax.value_and_grad(loss(output_projection.project), argnums=(0, 1))(hidden, kernel)
    theirs = jax.value_and_grad(loss(_autodiff), argnums=(0, 1))(hidden, kernel)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-6)
    for a, b in zip(ours[1], theirs[1]):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_give_float32_logits_and_gradients_in_their_own_dtypes():
    hidden = jax.random.normal(jax.random.key(0), (4, 16), jnp.bfloat16)
    kernel = jax.random.normal(jax.random.key(1), (16, 32), jnp.bfloat16)
    logits = output_projection.project(hidden, kernel)
    assert logits.dtype == jnp.float32
    d_hidden, d_kernel = jax.grad(lambda h, k: output_projection.project(h, k).sum(),
                                  argnums=(0, 1))(hidden, kernel)
    assert (d_hidden.dtype, d_kernel.dtype) == (jnp.bfloat16, jnp.bfloat16)
    # d/dh of sum(h @ k) is each row of k summed; d/dk is each column of h summed.
    np.testing.assert_allclose(np.asarray(d_hidden, np.float32)[0],
                               np.asarray(kernel, np.float32).sum(1), rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(d_kernel, np.float32)[:, 0],
                               np.asarray(hidden, np.float32).sum(0), rtol=2e-2, atol=2e-2)
