import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pixelllm.checkpoints.assign import CheckpointMismatchError
from pixelllm.nn import lora


class _Tiny(nnx.Module):
    """Two frozen projections, one with an adapter, and a trainable head."""

    def __init__(self, rngs):
        self.q = lora.LoRALinear(6, 8, axes=("embed", "heads"), rank=2, scale=2.0, rngs=rngs)
        self.v = lora.LoRALinear(8, 6, axes=("heads", "embed"), rank=0, use_bias=True, rngs=rngs)
        self.head = nnx.Linear(6, 1, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.v(self.q(x))))


def test_zero_b_means_the_adapter_starts_as_the_base_model():
    layer = lora.LoRALinear(6, 8, axes=("embed", "heads"), rank=4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 6))
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(x @ layer.kernel.get_value()), atol=1e-6)


def test_training_updates_only_adapters_and_trainable_params():
    model = _Tiny(nnx.Rngs(0))
    frozen_before = {"/".join(map(str, p)): np.asarray(v.get_value())
                     for p, v in nnx.to_flat_state(nnx.state(model, lora.FrozenParam))}
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    # Adam keeps two moments per trainable element and nothing for frozen weights.
    trainable_size = sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    moment_size = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(optimizer.opt_state))
                      if getattr(leaf, "ndim", 0) > 0)
    assert moment_size == 2 * trainable_size
    x = jax.random.normal(jax.random.key(1), (16, 6))
    y = jnp.sin(x.sum(-1, keepdims=True))

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2),
                                         argnums=nnx.DiffState(0, nnx.Param))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(30)]
    assert losses[-1] < losses[0]
    for path, value in nnx.to_flat_state(nnx.state(model, lora.FrozenParam)):
        np.testing.assert_array_equal(np.asarray(value.get_value()), frozen_before["/".join(map(str, path))])
    assert np.abs(np.asarray(model.q.lora_b.get_value())).max() > 0
    trainable = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert trainable == {"q/lora_a", "q/lora_b", "head/kernel", "head/bias"}


def test_merge_keeps_the_function_and_lora_weights_round_trip(tmp_path):
    model = _Tiny(nnx.Rngs(0))
    model.q.lora_b.set_value(jax.random.normal(jax.random.key(2), (2, 8)))
    x = jax.random.normal(jax.random.key(3), (5, 6))
    expected = model(x)
    saved = lora.lora_arrays(model)
    assert set(saved) == {"q/lora_a", "q/lora_b"}

    fresh = _Tiny(nnx.Rngs(0))
    lora.load_lora_arrays(fresh, saved, source="adapter.safetensors")
    np.testing.assert_allclose(np.asarray(fresh(x)), np.asarray(expected), atol=1e-6)

    lora.save_lora(model, tmp_path / "adapter.safetensors")
    from_file = _Tiny(nnx.Rngs(0))
    lora.load_lora(from_file, tmp_path / "adapter.safetensors")
    np.testing.assert_allclose(np.asarray(from_file(x)), np.asarray(expected), atol=1e-6)

    lora.merge_lora(model)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(expected), atol=1e-5)
    assert not np.asarray(model.q.lora_b.get_value()).any()

    with pytest.raises(CheckpointMismatchError, match="(?s)adapter.safetensors.*missing parameters: q/lora_b"):
        lora.load_lora_arrays(fresh, {"q/lora_a": saved["q/lora_a"]}, source="adapter.safetensors")
