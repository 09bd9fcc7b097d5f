"""The stage optimizer: scenic's schedule, AdamW's update with the official decay mask, EVA02's
layer-wise decay in both block layouts, per-prefix multipliers."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from pixelllm.encoders.eva02 import Eva02, stack_block_params, unstack_block_params
from pixelllm.train import optimizer

TINY_EVA02 = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                  rope_ref_grid=4)


def settings(**overrides):
    fields = dict(learning_rate=1e-3, warmup_steps=2, total_steps=10, weight_decay=0.05,
                  layer_decay=0.8, eva02_num_layers=2, lr_multipliers=(("mask_adapter/", 10.0),))
    return optimizer.OptimizerSettings(**(fields | overrides))


def flat(tree):
    return {optimizer.param_path(keypath): np.asarray(value)
            for keypath, value in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ---------------------------------------------------------------------------------- schedule

def test_schedule_matches_hand_computed_values():
    # The densecap stage: 1e-4, warm-up 1000, 40k steps; the cosine spans the 39k after warm-up.
    schedule = optimizer.learning_rate_schedule(optimizer.OptimizerSettings(
        learning_rate=1e-4, warmup_steps=1000, total_steps=40000, weight_decay=0.05))
    expected = {0: 0.0, 500: 5e-5, 1000: 1e-4, 1000 + 39000 // 2: 5e-5,
                1000 + 39000 // 4: 1e-4 * 0.5 * (1 + math.cos(math.pi / 4))}
    for step, value in expected.items():
        np.testing.assert_allclose(schedule(step), value, rtol=1e-6, atol=1e-12, err_msg=step)
    # The last update of a short run: 0.5 (1 + cos(pi 89/90)) of the base.
    short = optimizer.learning_rate_schedule(optimizer.OptimizerSettings(
        learning_rate=1.0, warmup_steps=10, total_steps=100, weight_decay=0.0))
    np.testing.assert_allclose(short(99), 0.5 * (1 + math.cos(math.pi * 89 / 90)), rtol=1e-3)
    np.testing.assert_allclose(short(3), 0.3, rtol=1e-6)


def test_schedule_without_warmup_starts_at_the_base_rate():
    schedule = optimizer.learning_rate_schedule(settings(warmup_steps=0, learning_rate=2.0))
    np.testing.assert_allclose(schedule(0), 2.0)
    np.testing.assert_allclose(schedule(5), 2.0 * 0.5 * (1 + math.cos(math.pi * 0.5)), rtol=1e-6)


# ---------------------------------------------------------------------------------- settings

def test_settings_from_a_locked_config_dict():
    config = ml_collections.ConfigDict(dict(
        learning_rate=1e-4, warmup_steps=1000, total_steps=40000, weight_decay=0.05,
        layer_decay=0.8, eva02_num_layers=24, lr_multipliers=((".*lora", 2.0), ("lm/", 3.0))))
    config.lock()
    got = optimizer.OptimizerSettings.from_config(config)
    assert got.lr_multipliers == ((".*lora", 2.0), ("lm/", 3.0))
    assert (got.b1, got.b2, got.eps) == (0.9, 0.999, 1e-8)
    # A mapping works too (plain dicts keep their order).
    mapped = optimizer.OptimizerSettings.from_config(
        dict(config.to_dict(), lr_multipliers={"mask_adapter/": 10.0}))
    assert mapped.lr_multipliers == (("mask_adapter/", 10.0),)


@pytest.mark.parametrize("fields, message", [
    (dict(learning_rate=1e-4, warmup_steps=1, total_steps=9, weight_decay=0, lerning_rate=1),
     "optimizer.lerning_rate is not an optimizer setting"),
    (dict(learning_rate=1e-4, warmup_steps=1, total_steps=9), "optimizer.weight_decay is required"),
    (dict(learning_rate=1e-4, warmup_steps=1, total_steps=9, weight_decay=0, layer_decay=0.8),
     "optimizer.eva02_num_layers"),
    (dict(learning_rate=1e-4, warmup_steps=9, total_steps=9, weight_decay=0),
     "optimizer.warmup_steps=9"),
    (dict(learning_rate=1e-4, warmup_steps=1, total_steps=9, weight_decay=0,
          lr_multipliers=(("mask_adapter(", 10.0),)), "bad regex 'mask_adapter\\('"),
])
def test_bad_settings_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        optimizer.OptimizerSettings.from_config(fields)


# ---------------------------------------------------------------------------------- multipliers

def test_learning_rates_follow_the_official_layer_decay():
    # The multi-task stage: base 1e-4, warm-up 2k of 240k, EVA02-L (24 blocks), decay 0.8.
    official = settings(learning_rate=1e-4, warmup_steps=2000, total_steps=240000,
                        eva02_num_layers=24)
    step = 70000
    base = float(optimizer.learning_rate_schedule(official)(step))
    np.testing.assert_allclose(
        base, 1e-4 * 0.5 * (1 + math.cos(math.pi * (step - 2000) / 238000)), rtol=1e-6)
    expected = {
        "eva02/patch_embed/kernel": 0.8 ** 25, "eva02/patch_embed/bias": 0.8 ** 25,
        "eva02/pos_embed": 0.8 ** 25,
        "eva02/blocks/0/attn/q/kernel": 0.8 ** 24, "eva02/blocks/7/norm1/scale": 0.8 ** 17,
        "eva02/blocks/23/mlp/fc2/kernel": 0.8 ** 1,
        # Neither stem nor block in the official: x1.
        "eva02/cls_token": 1.0, "eva02/final_norm/scale": 1.0,
        "mask_adapter/text_proj/kernel": 10.0, "lm/decoder/layers/0/q/lora_a": 1.0,
        "point_head/points_out/kernel": 1.0,
    }
    for path, multiplier in expected.items():
        np.testing.assert_allclose(optimizer.learning_rate_of(official, path, step),
                                   base * multiplier, rtol=1e-6, err_msg=path)
    # Stacked blocks: one rate per layer, the same as the per-block parameters'.
    np.testing.assert_allclose(optimizer.learning_rate_of(official, "eva02/blocks/attn/q/kernel",
                                                          step),
                               [base * 0.8 ** (24 - i) for i in range(24)], rtol=1e-6)


def test_first_matching_multiplier_wins_and_layer_decay_is_optional():
    plain = settings(layer_decay=None, eva02_num_layers=None,
                     lr_multipliers=(("mask_adapter/text", 3.0), ("mask_adapter/", 10.0)))
    assert optimizer.multiplier_of(plain, "mask_adapter/text_proj/kernel") == 3.0
    assert optimizer.multiplier_of(plain, "mask_adapter/visual_proj/kernel") == 10.0
    assert optimizer.multiplier_of(plain, "eva02/blocks/0/attn/q/kernel") == 1.0
    # Matched at the path's start: a module name deeper in the path does not match.
    assert optimizer.multiplier_of(plain, "other/mask_adapter/kernel") == 1.0


def test_weight_decay_mask_is_the_official_ndim_rule_per_layer_slice():
    params = {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4), "pos_embed": jnp.zeros((1, 5, 4)),
              "gate": jnp.zeros(()),  # scenic's mask is ndim != 1: scalars are decayed
              "blocks": {"norm": {"scale": jnp.zeros((2, 4))},
                         "q": {"kernel": jnp.zeros((2, 4, 4))}},
              "layers": {"0": {"bias": jnp.zeros(4)}}}
    assert flat(optimizer.weight_decay_mask(params)) == {
        "kernel": True, "bias": False, "pos_embed": True, "gate": True,
        "blocks/norm/scale": False, "blocks/q/kernel": True, "layers/0/bias": False}


# ---------------------------------------------------------------------------------- updates

def _adamw_reference(param, grads, rates, *, decayed, b1=0.9, b2=0.999, eps=1e-8, wd=0.05):
    """AdamW by hand in float64: ``rates[t]`` is the learning rate of update t (multiplier
    included)."""
    param = param.astype(np.float64)
    mu = nu = np.zeros_like(param)
    for t, (grad, rate) in enumerate(zip(grads, rates), start=1):
        mu = b1 * mu + (1 - b1) * grad
        nu = b2 * nu + (1 - b2) * grad ** 2
        direction = (mu / (1 - b1 ** t)) / (np.sqrt(nu / (1 - b2 ** t)) + eps)
        param = param - rate * (direction + (wd * param if decayed else 0.0))
    return param


def test_two_updates_match_adamw_by_hand():
    shapes = {
        "eva02/patch_embed/kernel": (4, 4, 3, 8), "eva02/patch_embed/bias": (8,),
        "eva02/pos_embed": (1, 5, 8), "eva02/cls_token": (1, 1, 8),
        "eva02/blocks/0/attn/q/kernel": (8, 8), "eva02/blocks/0/attn/q/bias": (8,),
        "eva02/blocks/1/attn/q/kernel": (8, 8), "eva02/blocks/1/norm1/scale": (8,),
        "eva02/final_norm/scale": (8,),
        "mask_adapter/proj/kernel": (8, 6), "mask_adapter/proj/bias": (6,),
        "lm/decoder/layers/0/q/lora_a": (8, 2),
    }
    multipliers = {"eva02/patch_embed": 0.8 ** 3, "eva02/pos_embed": 0.8 ** 3,
                   "eva02/blocks/0": 0.8 ** 2, "eva02/blocks/1": 0.8, "mask_adapter": 10.0}
    rng = np.random.RandomState(0)
    values = {path: rng.randn(*shape).astype(np.float32) for path, shape in shapes.items()}
    grads = [{path: rng.randn(*shape).astype(np.float32) for path, shape in shapes.items()}
             for _ in range(2)]
    nest = lambda flat_values: nnx.from_flat_state(  # noqa: E731
        {tuple(path.split("/")): jnp.asarray(v) for path, v in flat_values.items()})
    params = nest(values)
    tx = optimizer.build(settings(), params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), updates, state

    state = tx.init(params)
    after_first, first_updates, state = step(params, state, nest(grads[0]))
    # Update 0 is at the start of the warm-up: learning rate 0, weight decay included.
    assert all(not np.any(u) for u in flat(first_updates).values())
    after_second, _, _ = step(after_first, state, nest(grads[1]))
    base_rates = [0.0, 1e-3 * 0.5]  # update 1: warm-up 1/2, cosine 1
    got = flat(after_second)
    for path, value in values.items():
        multiplier = next((m for prefix, m in multipliers.items() if path.startswith(prefix)), 1.0)
        expected = _adamw_reference(value, [g[path] for g in grads],
                                    [r * multiplier for r in base_rates],
                                    decayed=value.ndim != 1)
        np.testing.assert_allclose(got[path], expected, rtol=1e-5, atol=1e-7, err_msg=path)


class _Holder(nnx.Module):
    """EVA02 at the path PixelLLM gives it."""

    def __init__(self, *, scan_layers: bool):
        self.eva02 = Eva02(**TINY_EVA02, scan_layers=scan_layers, rngs=nnx.Rngs(0))


def _eva02_flat(tree):
    """``eva02/...`` flat values without the prefix, as the EVA02 stacking helpers take them."""
    return {path[len("eva02/"):]: value for path, value in flat(tree).items()}


def test_stacked_and_per_block_layouts_train_the_same():
    per_block = nnx.state(_Holder(scan_layers=False), nnx.Param)
    stacked = nnx.state(_Holder(scan_layers=True), nnx.Param)
    values = _eva02_flat(per_block)
    for key, value in stack_block_params(values).items():
        np.testing.assert_array_equal(_eva02_flat(stacked)[key], value, err_msg=key)
    rng = np.random.RandomState(1)
    grads = [{key: rng.randn(*v.shape).astype(np.float32) for key, v in values.items()}
             for _ in range(3)]

    def train(params, grads_per_step):
        tx = optimizer.build(settings(warmup_steps=1), params)

        @jax.jit
        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        state = tx.init(params)
        for grad in grads_per_step:
            grad_tree = jax.tree_util.tree_map_with_path(
                lambda keypath, _, g=grad: jnp.asarray(g[optimizer.param_path(keypath)
                                                         [len("eva02/"):]]), params)
            params, state = step(params, state, grad_tree)
        return _eva02_flat(params)

    got_per_block = train(per_block, grads)
    got_stacked = unstack_block_params(train(stacked, [stack_block_params(g) for g in grads]))
    assert got_stacked.keys() == got_per_block.keys()
    for key in got_per_block:
        np.testing.assert_allclose(got_stacked[key], got_per_block[key], rtol=1e-6, atol=1e-8,
                                   err_msg=key)
        # Every parameter moved (none is accidentally left at rate 0).
        assert not np.array_equal(got_per_block[key], values[key]), key
    # The stacked mask decays kernels, not the per-layer 1-D norms and biases.
    mask = flat(optimizer.weight_decay_mask(stacked))
    assert mask["eva02/blocks/attn/q/kernel"] and not mask["eva02/blocks/attn/q/bias"]
    assert not mask["eva02/blocks/norm1/scale"]


def test_a_wrong_eva02_depth_is_refused_in_both_layouts():
    for scan_layers, message in ((False, r"has blocks \[0, 1\]"), (True, "stacked over 2 layers")):
        params = nnx.state(_Holder(scan_layers=scan_layers), nnx.Param)
        with pytest.raises(ValueError, match=message):
            optimizer.build(settings(eva02_num_layers=24), params)
