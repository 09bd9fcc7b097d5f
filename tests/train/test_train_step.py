"""The jitted train step: sharded equals single-device, accumulation equals one big batch, frozen
parameters untouched, non-finite steps skipped, no recompilation across steps.

Every compiled step is built once per module (fixtures) and shared by the tests; states are
rebuilt for each use because the step donates its input state. Each compilation costs a minute
or more on a 2-core CPU, so the meshes are chosen to cover the most per compilation: (2, 4, 1)
(batch over 8 devices, parameters over fsdp 4), (2, 2, 2) (every axis) and, in the accumulation
test, (4, 1, 1) (pure data parallelism, replicated parameters). The module compiles with
``jax_disable_most_optimizations`` (no LLVM optimization of the CPU code): it cuts each
compilation's CPU time by about 40% and every comparison here is between programs compiled the
same way.
"""

import jax
import numpy as np
import optax
import pytest
from configs import pixelllm as pixelllm_config
from flax import nnx

from pixelllm import sharding
from pixelllm.models.pixel_llm.pixel_llm import PixelLLM
from pixelllm.nn.lora import FrozenParam
from pixelllm.train import train_step as train_lib
from tests.models.pixel_llm.conftest import synthetic_batch

# Module fixtures compile the tiny model: all of this module runs on one xdist worker
# (launch/test.sh uses --dist loadgroup), so they are built once.
pytestmark = [pytest.mark.xdist_group("test_train_step")]

BATCH = 8
TASKS = ("trace", "refseg", "densecap", "refer")
# The step's noise: T5 dropout is on in the tiny config (SAM/EVA02 drop path are 0 there).
CONFIG = pixelllm_config.get_config("tiny")
RULES = sharding.rules_from_config(CONFIG.sharding.rules)


def _batch(seed: int = 3, tasks=TASKS) -> dict[str, np.ndarray]:
    return synthetic_batch(seed, batch=BATCH, tasks=tasks)


class Trainer:
    """A model split for one mesh, its compiled step, and fresh train states on demand."""

    def __init__(self, mesh_shape, *, config=CONFIG, accumulation_steps: int = 1,
                 clip_norm: float | None = 1.0):
        devices = jax.devices()[:int(np.prod(mesh_shape))]
        self.mesh = sharding.make_mesh(mesh_shape, devices)
        # eps well above float32 rounding: gradients that are zero in exact arithmetic (rounding
        # noise, different on every mesh) must not become lr-sized Adam steps of random sign.
        self.tx = optax.adamw(1e-3, eps=1e-3)
        model = PixelLLM.from_config(config.model, rngs=nnx.Rngs(0), mesh=self.mesh, rules=RULES)
        self.graphdef, trained, self.frozen = train_lib.split_model(model)
        self.initial = {path: np.array(v.get_value()) for path, v in nnx.to_flat_state(trained)}
        self._trained = jax.tree.map(np.asarray, trained)
        state = train_lib.init_train_state(trained, self.tx)
        self.step = train_lib.make_train_step(
            self.graphdef, state, self.frozen, tx=self.tx, mesh=self.mesh, rules=RULES,
            loss_weights=config.loss, batch_size=BATCH,
            accumulation_steps=accumulation_steps, clip_norm=clip_norm, seed=7)
        self.frozen = train_lib.place(self.frozen, self.mesh, RULES)

    def fresh_state(self) -> train_lib.TrainState:
        state = train_lib.init_train_state(jax.tree.map(jax.numpy.asarray, self._trained),
                                           self.tx)
        return train_lib.place(state, self.mesh, RULES)

    def run(self, batch, steps: int = 1):
        state, metrics = self.fresh_state(), []
        for _ in range(steps):
            state, step_metrics = self.step(state, self.frozen, batch)
            metrics.append({name: float(value) for name, value in step_metrics.items()})
        return state, metrics


@pytest.fixture(scope="module")
def single():
    return Trainer((1, 1, 1))


@pytest.fixture(scope="module")
def reference(single):
    """One step of the single-device trainer on the shared batch."""
    return single.run(_batch())


def _flat_params(state) -> dict:
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state.params)}


def _assert_same_step(actual, expected, *, rtol=1e-4):
    (state, [metrics]), (ref_state, [ref_metrics]) = actual, expected
    assert metrics.keys() == ref_metrics.keys()
    for name, value in ref_metrics.items():
        np.testing.assert_allclose(metrics[name], value, rtol=rtol, atol=1e-6, err_msg=name)
    params, ref_params = _flat_params(state), _flat_params(ref_state)
    assert params.keys() == ref_params.keys()
    for path, value in ref_params.items():
        np.testing.assert_allclose(params[path], value, rtol=0, atol=1e-5,
                                   err_msg="/".join(map(str, path)))


@pytest.mark.parametrize("mesh_shape", [(2, 4, 1), (2, 2, 2)])
def test_sharded_step_equals_single_device(mesh_shape, reference):
    metrics = reference[1][0]
    assert metrics["skipped"] == 0.0 and np.isfinite(metrics["loss/total"])
    assert metrics["loss/mask_dice"] > 0 and metrics["loss/text"] > 0
    _assert_same_step(Trainer(mesh_shape).run(_batch()), reference)


def test_no_recompilation_across_steps(single):
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    # Placed right after the sharded tests, so the only signature compiled so far is that of a
    # fresh state: a step's output state with another cache key would compile here.
    state = single.fresh_state()
    state, _ = single.step(state, single.frozen, _batch())
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for seed in (1, 2):
            state, metrics = single.step(state, single.frozen, _batch(seed))
        jax.block_until_ready(metrics)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    assert int(state.step) == 3


def test_accumulation_on_a_data_parallel_mesh_equals_one_big_batch_on_one_device():
    """2 micro-batches of 4 on a (4, 1, 1) mesh (one example per device, parameters
    replicated) against the whole batch of 8 on one device: accumulation and pure data
    parallelism in one compilation."""
    # Dropout and CenterNet2's RoI sampling draw per micro-batch shape: both runs go without
    # them (the light proposal head still rebuilds dense-captioning slots from proposals).
    config = pixelllm_config.get_config("tiny")
    config.model.language_model.model.dropout_rate = 0.0
    config.model.proposal_head.kind = "light"
    batch = _batch(5)
    whole = Trainer((1, 1, 1), config=config).run(batch)
    accumulated = Trainer((4, 1, 1), config=config, accumulation_steps=2).run(batch)
    _assert_same_step(accumulated, whole)


def test_frozen_params_untouched_and_without_optimizer_state(single):
    frozen_before = {p: np.array(v.get_value()) for p, v in nnx.to_flat_state(single.frozen)}
    state, metrics = single.run(_batch(), steps=2)
    assert [m["skipped"] for m in metrics] == [0.0, 0.0]
    model = nnx.merge(single.graphdef, state.params, single.frozen)
    _, trained, frozen = train_lib.split_model(model)
    frozen_after = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(frozen)}
    assert frozen_after.keys() == frozen_before.keys()
    assert any(path[0] == "sam" for path in frozen_after)
    for path, value in frozen_before.items():
        np.testing.assert_array_equal(frozen_after[path], value, err_msg="/".join(map(str, path)))
    # Trained parameters did move.
    moved = [not np.array_equal(np.asarray(v.get_value()), single.initial[path])
             for path, v in nnx.to_flat_state(trained)]
    assert sum(moved) > 0.9 * len(moved)

    # Optimizer state: only trained parameters' variables, no SAM, no FrozenParam.
    trained_paths = {path for path, _ in nnx.to_flat_state(state.params)}
    for node in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, nnx.State)):
        if isinstance(node, nnx.State):
            flat = nnx.to_flat_state(node)
            assert {path for path, _ in flat} == trained_paths
            assert not any(isinstance(v, FrozenParam) for _, v in flat)
    assert all(path[0] != "sam" for path in trained_paths)
    opt_leaves = sum(x.size for x in jax.tree.leaves(state.opt_state))
    trained_size = sharding.param_count(state.params)
    assert opt_leaves <= 2 * trained_size + 8  # adam: two moments and a count


def test_nonfinite_batch_is_skipped_and_counted(single):
    bad = _batch()
    # A trace target of a used slot, on a token that has trace targets.
    slot = np.argwhere(bad["token_points_mask"] & (bad["task_points"][..., None] > 0))[0]
    bad["token_points"][tuple(slot)] = np.nan
    state = single.fresh_state()
    before = _flat_params(state)
    opt_before = [np.array(x) for x in jax.tree.leaves(state.opt_state)]
    state, metrics = single.step(state, single.frozen, bad)
    assert float(metrics["skipped"]) == 1.0 and not np.isfinite(float(metrics["loss/point"]))
    assert (int(state.step), int(state.nonfinite_in_a_row), int(state.skipped)) == (1, 1, 1)
    for path, value in _flat_params(state).items():
        np.testing.assert_array_equal(value, before[path])
    for new, old in zip(jax.tree.leaves(state.opt_state), opt_before):
        np.testing.assert_array_equal(np.asarray(new), old)
    train_lib.check_nonfinite(state, max_in_a_row=2)

    state, _ = single.step(state, single.frozen, bad)
    with pytest.raises(train_lib.NonFiniteError, match=r"step 1: .* in 2 consecutive steps"):
        train_lib.check_nonfinite(state, max_in_a_row=2)

    # A finite step resets the streak and keeps the total.
    state, metrics = single.step(state, single.frozen, _batch())
    assert float(metrics["skipped"]) == 0.0
    assert (int(state.nonfinite_in_a_row), int(state.skipped)) == (0, 2)
