"""Remat policies by name: the table, its errors, and that rematerialization never changes values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixelllm.nn import layers
from pixelllm.nn.remat import REMAT_POLICIES, check_remat, remat, remat_policy


class Block(nnx.Module):
    """Matmuls (batched and not) around elementwise work, so every policy has a choice to make."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.up = layers.linear(8, 16, axes=("embed", "mlp"), rngs=rngs)
        self.down = layers.linear(16, 8, axes=("mlp", "embed"), rngs=rngs)
        self.norm = layers.layer_norm(8, eps=1e-6, rngs=rngs)

    def __call__(self, x: jax.Array, scale: float) -> jax.Array:
        attention = jax.nn.softmax(jnp.einsum("bid,bjd->bij", x, x), axis=-1)
        y = jnp.einsum("bij,bjd->bid", attention, x)
        return self.norm(x + scale * self.down(layers.gelu(self.up(y))))


def test_policy_table():
    assert REMAT_POLICIES == ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
    assert remat_policy("full") is None  # jax.checkpoint's default: save only the inputs
    assert remat_policy("dots_saveable") is jax.checkpoint_policies.dots_saveable
    with pytest.raises(ValueError, match="no checkpoint policy"):
        remat_policy("none")


def test_unknown_names_are_errors_naming_the_field():
    with pytest.raises(ValueError, match=r"model\.remat='dots'.*'full'"):
        check_remat("dots", field="model.remat")
    with pytest.raises(ValueError, match="remat='checkpoint'"):
        remat(lambda block, x: block(x, 1.0), "checkpoint")


def test_none_is_the_function_itself():
    def fn(block, x):
        return block(x, 1.0)
    assert remat(fn, "none") is fn


@pytest.mark.parametrize("name", REMAT_POLICIES[1:])
def test_outputs_and_gradients_equal_without_remat(name):
    x = jnp.asarray(np.random.RandomState(0).randn(2, 5, 8).astype(np.float32))

    def loss(model):
        y = model(x)
        return jnp.sum(y * y), y

    class Stack(nnx.Module):
        def __init__(self, policy):
            rngs = nnx.Rngs(0)
            self.blocks = nnx.List([Block(rngs=rngs) for _ in range(3)])
            self.policy = policy

        def __call__(self, x):
            # A Python float argument is traced under remat: the wrapper must accept it.
            run = remat(lambda block, x, scale: block(x, scale), self.policy)
            for i, block in enumerate(self.blocks):
                x = run(block, x, 0.5 + i)
            return x

    grad = nnx.value_and_grad(loss, has_aux=True)
    (value, out), grads = grad(Stack("none"))
    (value_remat, out_remat), grads_remat = grad(Stack(name))
    np.testing.assert_allclose(out_remat, out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(value_remat, value, rtol=1e-6)
    flat = dict(nnx.to_flat_state(grads))
    flat_remat = dict(nnx.to_flat_state(grads_remat))
    assert flat.keys() == flat_remat.keys()
    for key in flat:
        np.testing.assert_allclose(flat_remat[key].get_value(), flat[key].get_value(),
                                   rtol=1e-5, atol=1e-6, err_msg=str(key))


class Frozen(nnx.Module):
    """Two rematerialized blocks (not trained) under a trained head, each block drawing noise
    from the caller's ``Rngs`` as drop path does."""

    def __init__(self, policy: str):
        rngs = nnx.Rngs(0)
        self.blocks = nnx.List([Block(rngs=rngs) for _ in range(2)])
        self.head = layers.linear(8, 1, axes=("embed", None), rngs=rngs)
        self.policy = policy

    def __call__(self, x: jax.Array, rngs: nnx.Rngs) -> jax.Array:
        def run_block(block, x, rngs):
            return block(x + jax.random.normal(rngs.dropout(), x.shape), 1.0)
        run = remat(run_block, self.policy)
        for block in self.blocks:
            x = run(block, x, rngs)
        return self.head(jax.lax.stop_gradient(x))


@pytest.mark.parametrize("name", REMAT_POLICIES)
def test_frozen_blocks_remat_in_a_jitted_split_state_step(name):
    """As the train step runs the model: parameters split into trained and frozen states, merged
    inside ``jax.grad`` inside ``jax.jit``, so the frozen blocks' values are traced by the jit
    only (nnx.remat used to refuse them). Every policy gives the same loss, gradients and noise
    per block."""
    x = jnp.asarray(np.random.RandomState(1).randn(2, 5, 8).astype(np.float32))

    def value_and_grads(model):
        graphdef, trained, frozen = nnx.split(
            model, nnx.All(nnx.Param, nnx.PathContains("head")), ...)

        @jax.jit
        def step(trained, frozen):
            def loss(trained):
                rngs = nnx.Rngs(dropout=jax.random.key(3))
                out = nnx.merge(graphdef, trained, frozen)(x, rngs)
                return jnp.sum(out * out), rngs.dropout.count[...]
            return jax.value_and_grad(loss, has_aux=True)(trained)
        return step(trained, frozen)

    (value, draws), grads = value_and_grads(Frozen(name))
    assert int(draws) == 2  # each block drew its own noise
    (value_ref, _), grads_ref = value_and_grads(Frozen("none"))
    np.testing.assert_allclose(value, value_ref, rtol=1e-6)
    flat_ref = dict(nnx.to_flat_state(grads_ref))
    for key, leaf in dict(nnx.to_flat_state(grads)).items():
        np.testing.assert_allclose(leaf.get_value(), flat_ref[key].get_value(),
                                   rtol=1e-5, atol=1e-6, err_msg=str(key))
