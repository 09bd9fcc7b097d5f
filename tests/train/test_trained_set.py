"""A stage's trained set: the model's trainable filter less the stage's frozen patterns; the
optimizer holds state for the trained parameters only; the counts logged at start."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pixelllm.nn.lora import FrozenParam
from pixelllm.train import optimizer, trained_set


class _LoRALinear(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.kernel = FrozenParam(jnp.ones((6, 6)))  # a frozen base weight, never an nnx.Param
        self.lora_a = nnx.LoRAParam(jax.random.normal(rngs.params(), (6, 2)))
        self.lora_b = nnx.LoRAParam(jax.random.normal(rngs.params(), (2, 6)))


class _Model(nnx.Module):
    """PixelLLM's layout in miniature, with its ``trainable()`` interface: the model itself
    freezes ``sam``; the language model's base is ``FrozenParam``."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.frozen = ("sam",)
        self.sam = nnx.Linear(4, 5, rngs=rngs)                                  # 25 weights
        self.eva02 = nnx.Dict(patch_embed=nnx.Linear(3, 4, rngs=rngs),          # 16
                              blocks=nnx.List([nnx.Linear(4, 4, rngs=rngs)]))  # 20
        self.lm = nnx.Dict(q=_LoRALinear(rngs=rngs))                           # 36 + 24 LoRA
        self.mask_adapter = nnx.Linear(6, 2, rngs=rngs)                         # 14
        self.dropout_rngs = nnx.Rngs(dropout=0)  # RNG state: not a weight

    def trainable(self) -> nnx.filterlib.Filter:
        return nnx.All(nnx.Param, nnx.Not(nnx.Any(*(nnx.PathContains(name)
                                                      for name in self.frozen))))


def paths(state) -> set[str]:
    return {trained_set.path_string(path) for path, _ in nnx.to_flat_state(state)}


def test_frozen_patterns_narrow_the_models_trainable_set():
    model = _Model(rngs=nnx.Rngs(0))
    assert paths(nnx.state(model, trained_set.trained_filter(model, []))) == {
        "eva02/patch_embed/kernel", "eva02/patch_embed/bias", "eva02/blocks/0/kernel",
        "eva02/blocks/0/bias", "lm/q/lora_a", "lm/q/lora_b", "mask_adapter/kernel",
        "mask_adapter/bias"}
    # The referring-segmentation stage: only the mask adapter trains.
    refseg = trained_set.trained_filter(model, ["eva02/", ".*lora"])
    assert paths(nnx.state(model, refseg)) == {"mask_adapter/kernel", "mask_adapter/bias"}
    # Matched at the path's start: "blocks" alone is no prefix of any path.
    with pytest.raises(ValueError, match="frozen pattern 'blocks' matches no parameter"):
        trained_set.trained_filter(model, ["blocks"])
    with pytest.raises(ValueError, match="bad regex"):
        trained_set.trained_filter(model, ["eva02/("])


def test_optimizer_state_and_updates_cover_the_trained_parameters_only():
    model = _Model(rngs=nnx.Rngs(0))
    trained = trained_set.trained_filter(model, ["eva02/"])
    graphdef, params, rest = nnx.split(model, trained, ...)
    settings = optimizer.OptimizerSettings(learning_rate=0.1, warmup_steps=0, total_steps=10,
                                           weight_decay=0.05,
                                           lr_multipliers=(("mask_adapter/", 10.0),))
    tx = optimizer.build(settings, params)
    opt_state = tx.init(params)
    # Adam's moments exist for the trained parameters and nothing else.
    adam = opt_state[0][0]
    assert paths(adam.mu) == paths(adam.nu) == paths(params) == {
        "lm/q/lora_a", "lm/q/lora_b", "mask_adapter/kernel", "mask_adapter/bias"}
    moment_sizes = sum(leaf.size for leaf in jax.tree.leaves((adam.mu, adam.nu)))
    assert moment_sizes == 2 * (24 + 14)

    def frozen_weights(state):
        return {k: np.asarray(v.get_value())
                for k, v in nnx.to_flat_state(nnx.filter_state(state, nnx.Not(nnx.RngState)))}

    frozen_before = frozen_weights(rest)
    trained_before = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(params)}
    assert paths(nnx.filter_state(rest, nnx.Not(nnx.RngState))) == {
        "sam/kernel", "sam/bias", "eva02/patch_embed/kernel", "eva02/patch_embed/bias",
        "eva02/blocks/0/kernel", "eva02/blocks/0/bias", "lm/q/kernel"}

    def loss(params):
        merged = nnx.merge(graphdef, params, rest)
        x = jnp.ones((1, 6))
        lora = x @ merged.lm.q.lora_a @ merged.lm.q.lora_b
        return jnp.sum(merged.mask_adapter(x + lora) ** 2) + jnp.sum(merged.eva02.patch_embed(
            jnp.ones((1, 3))))

    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    nnx.update(model, new_params)
    _, _, rest_after = nnx.split(model, trained, ...)
    frozen_after = frozen_weights(rest_after)
    assert frozen_after.keys() == frozen_before.keys()
    for key, value in frozen_after.items():
        np.testing.assert_array_equal(value, frozen_before[key], err_msg=str(key))
    # AdamW's first step moves every trained weight by about the learning rate (x10 for the
    # mask adapter): sign(grad) * rate, plus decay on the kernels.
    moved = {trained_set.path_string(k): np.abs(np.asarray(v.get_value()) - trained_before[k]).max()
             for k, v in nnx.to_flat_state(new_params)}
    assert 0.9 < moved["mask_adapter/bias"] < 1.01 and 0.09 < moved["lm/q/lora_a"] < 0.11


def test_parameter_counts_per_module():
    model = _Model(rngs=nnx.Rngs(0))
    rows = trained_set.parameter_counts(model, trained_set.trained_filter(model, ["eva02/"]))
    assert rows[:-1] == [("eva02", 0, 36), ("lm", 24, 36), ("mask_adapter", 14, 0),
                                 ("sam", 0, 25)]
    assert rows[-1] == ("total", 38, 97)
    table = trained_set.format_counts(rows)
    assert "mask_adapter" in table and "97" in table
