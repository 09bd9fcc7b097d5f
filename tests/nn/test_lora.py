import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
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


# ---------------------------------------------------------------------------------- dropout
# PEFT's lora.Linear.forward: result = base(x) + lora_B(lora_A(lora_dropout(x))) * scaling, with
# lora_dropout = torch.nn.Dropout(p) (inverted: kept elements scaled by 1 / (1 - p)).


def _adapted(dropout: float, *, seed: int = 0) -> lora.LoRALinear:
    """A rank-3 adapter 6 -> 5 with a bias and a nonzero B, so the adapter branch matters."""
    layer = lora.LoRALinear(6, 5, axes=("embed", "heads"), rank=3, scale=2.0, dropout=dropout,
                            use_bias=True, rngs=nnx.Rngs(seed))
    layer.lora_b.set_value(jax.random.normal(jax.random.key(seed + 1), (3, 5)))
    layer.bias.set_value(jax.random.normal(jax.random.key(seed + 2), (5,)))
    return layer


def test_without_rngs_or_at_rate_zero_lora_dropout_changes_nothing():
    x = jax.random.normal(jax.random.key(3), (4, 7, 6))
    expected = _adapted(0.0)(x)
    np.testing.assert_array_equal(np.asarray(_adapted(0.0)(x, rngs=nnx.Rngs(dropout=1))),
                                  np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(_adapted(0.5)(x)), np.asarray(expected))


def test_lora_dropout_matches_peft_formula_in_torch_with_the_same_mask():
    rate, seed = 0.3, 11
    layer = _adapted(rate)
    x = jax.random.normal(jax.random.key(3), (4, 7, 6))
    ours = np.asarray(layer(x, rngs=nnx.Rngs(dropout=seed)))
    # The mask the layer draws: the first key of a fresh Rngs with the same seed.
    keep = np.asarray(jax.random.bernoulli(nnx.Rngs(dropout=seed).dropout(), 1 - rate, x.shape))
    assert 0 < keep.mean() < 1

    tx = torch.tensor(np.asarray(x))
    base = torch.nn.Linear(6, 5)
    lora_a, lora_b = torch.nn.Linear(6, 3, bias=False), torch.nn.Linear(3, 5, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.tensor(np.asarray(layer.kernel.get_value()).T))
        base.bias.copy_(torch.tensor(np.asarray(layer.bias.get_value())))
        lora_a.weight.copy_(torch.tensor(np.asarray(layer.lora_a.get_value()).T))
        lora_b.weight.copy_(torch.tensor(np.asarray(layer.lora_b.get_value()).T))
        # torch.nn.Dropout(p) in training, its mask replaced by ours.
        dropped = tx * torch.tensor(keep) / (1 - rate)
        expected = base(tx) + lora_b(lora_a(dropped)) * layer.scale
    np.testing.assert_allclose(ours, expected.numpy(), atol=1e-5)
    # Dropout reached the adapter: with this mask the output differs from the deterministic one.
    assert np.abs(ours - np.asarray(layer(x))).max() > 1e-3


def test_lora_dropout_is_inverted_elementwise_and_leaves_the_base_branch_alone():
    # kernel K random, A = B = identity, scale 1: output - x K = dropout(x) itself.
    rate, n = 0.25, 6
    layer = lora.LoRALinear(n, n, axes=("embed", "heads"), rank=n, scale=1.0, dropout=rate,
                            rngs=nnx.Rngs(0))
    layer.lora_a.set_value(jnp.eye(n))
    layer.lora_b.set_value(jnp.eye(n))
    x = jax.random.uniform(jax.random.key(1), (2000, n), minval=0.5, maxval=1.5)
    rngs = nnx.Rngs(dropout=5)
    draws = np.stack([np.asarray(layer(x, rngs=rngs) - x @ layer.kernel.get_value())
                      for _ in range(4)])
    x = np.asarray(x)
    dropped = np.abs(draws) < 1e-4
    kept = ~dropped
    # Kept elements are x / (1 - p), the base branch x K unchanged (else the residual would
    # not be exactly 0 or x / (1 - p)).
    np.testing.assert_allclose(draws[kept], np.broadcast_to(x / (1 - rate), draws.shape)[kept],
                               atol=1e-4)
    assert abs(dropped.mean() - rate) < 0.01
    # E[dropout(x)] = x: the mean over draws and rows matches the mean input.
    np.testing.assert_allclose(draws.mean(axis=(0, 1)), x.mean(axis=0), rtol=0.02)
    # A fresh mask per call.
    assert (dropped[0] != dropped[1]).any()


def test_lora_dropout_rate_is_validated():
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="lora.dropout must be in"):
            lora.LoRASettings(rank=2, dropout=bad)
        with pytest.raises(ValueError, match="dropout must be in"):
            lora.LoRALinear(4, 4, axes=("embed", "heads"), rank=2, dropout=bad, rngs=nnx.Rngs(0))
    settings = lora.LoRASettings.from_mapping({"rank": 8, "alpha": 16.0, "dropout": 0.05})
    assert settings.dropout == 0.05 and lora.LoRASettings().dropout == 0.0
    with pytest.raises(ValueError, match="expected rank, alpha, targets, dropout"):
        lora.LoRASettings.from_mapping({"lora_dropout": 0.05})
