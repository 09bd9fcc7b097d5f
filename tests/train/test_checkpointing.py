"""Training checkpoints: round trip of state and data position, keep policy, half-written steps,
sharded restore, mismatch errors, SIGTERM guard."""

import os
import shutil
import signal
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pixelllm.checkpoints.assign import CheckpointMismatchError
from pixelllm.train.checkpointing import Checkpointer, PreemptionGuard

_ON_ONE_DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _trained_state():
    """nnx parameters of a small model and AdamW state after one real update."""
    params = nnx.state(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Param)
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return {"params": optax.apply_updates(params, updates), "opt_state": opt_state}


def _abstract(tree, sharding=_ON_ONE_DEVICE):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _dataset_iterator():
    return iter(grain.MapDataset.range(40).shuffle(seed=3).batch(2).to_iter_dataset())


def _data_loader_iterator():
    loader = grain.DataLoader(
        data_source=grain.sources.RangeDataSource(0, 40, 1),
        sampler=grain.samplers.IndexSampler(num_records=40, shuffle=True, seed=3, num_epochs=1,
                                            shard_options=grain.sharding.NoSharding()),
        operations=[grain.transforms.Batch(2)], worker_count=0)
    return iter(loader)


@pytest.mark.parametrize("make_iterator", [_dataset_iterator, _data_loader_iterator])
def test_round_trip_restores_state_step_metadata_and_data_position(tmp_path, make_iterator):
    state = _trained_state()
    iterator = make_iterator()
    for _ in range(3):
        next(iterator)
    with Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.restore_latest(_abstract(state)) is None
        assert checkpointer.save(7, state, data_iterator=iterator, metadata={"examples": 14})
    expected_batches = [next(iterator) for _ in range(3)]

    resumed_iterator = make_iterator()
    with Checkpointer(tmp_path) as checkpointer:
        restored = checkpointer.restore_latest(_abstract(state), data_iterator=resumed_iterator)
    assert restored.step == 7
    assert restored.metadata == {"examples": 14}
    assert str(restored.directory) == str(tmp_path / "7")
    assert (jax.tree_util.tree_structure(restored.state["opt_state"])
            == jax.tree_util.tree_structure(state["opt_state"]))
    assert int(restored.state["opt_state"][0].count) == 1
    jax.tree.map(np.testing.assert_array_equal, restored.state, state)
    for expected in expected_batches:
        np.testing.assert_array_equal(next(resumed_iterator), expected)


def test_keeps_the_last_n_and_every_kth_step(tmp_path):
    state = {"params": {"w": jnp.zeros(2)}}
    with Checkpointer(tmp_path, max_to_keep=2, keep_period=4) as checkpointer:
        for step in range(1, 11):
            assert checkpointer.save(step, state)
        checkpointer.wait_until_finished()
        assert checkpointer.all_steps() == [4, 8, 9, 10]
    assert sorted(int(p.name) for p in tmp_path.iterdir()) == [4, 8, 9, 10]


def test_saves_on_the_interval_or_when_forced(tmp_path):
    state = {"params": {"w": jnp.zeros(2)}}
    with Checkpointer(tmp_path, save_interval_steps=3) as checkpointer:
        started = [step for step in range(1, 8) if checkpointer.save(step, state)]
        assert started == [3, 6]
        assert checkpointer.save(7, state, force=True)
        assert not checkpointer.save(7, state, force=True)  # already saved: nothing to do
        checkpointer.wait_until_finished()
        assert checkpointer.all_steps() == [3, 6, 7]


def test_a_blocking_save_is_committed_when_it_returns(tmp_path):
    with Checkpointer(tmp_path, async_save=False) as checkpointer:
        checkpointer.save(1, {"params": {"w": jnp.zeros(2)}})
        assert (tmp_path / "1" / "commit_success.txt").exists()


def test_a_half_written_step_is_never_restored(tmp_path):
    state = {"params": {"w": jnp.arange(3.0)}}
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(2, {"params": {"w": jnp.arange(3.0) + 2}})
        checkpointer.wait_until_finished()
        # What a process killed while writing step 5 leaves: Orbax's temporary folder, partly
        # written and without the commit marker.
        partial = tmp_path / "5.orbax-checkpoint-tmp-1700000000000000"
        shutil.copytree(tmp_path / "2", partial)
        (partial / "commit_success.txt").unlink()
        shutil.rmtree(partial / "metadata")
        restored = checkpointer.restore_latest(_abstract(state))
        assert restored.step == 2
        np.testing.assert_array_equal(restored.state["params"]["w"], [2.0, 3.0, 4.0])
    with Checkpointer(tmp_path) as checkpointer:  # a restarted run also skips, and removes it
        assert checkpointer.restore_latest(_abstract(state)).step == 2
    assert not partial.exists()


def test_restores_onto_the_targets_mesh_sharding(tmp_path):
    params = {"kernel": jnp.arange(12.0).reshape(4, 3), "bias": jnp.arange(3.0)}
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(1, {"params": params})
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    target = {"kernel": jax.ShapeDtypeStruct((4, 3), jnp.float32,
                                             sharding=NamedSharding(mesh, P("data", None))),
              "bias": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=NamedSharding(mesh, P()))}
    with Checkpointer(tmp_path) as checkpointer:
        restored = checkpointer.restore_latest({"params": target}).state["params"]
    assert restored["kernel"].sharding == target["kernel"].sharding
    assert [shard.data.shape for shard in restored["kernel"].addressable_shards] == [(2, 3)] * 2
    assert restored["bias"].sharding == target["bias"].sharding
    jax.tree.map(np.testing.assert_array_equal, restored, params)


def test_a_mismatched_tree_names_the_checkpoint_and_the_keys(tmp_path):
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(3, {"params": {"dense": {"kernel": jnp.zeros((4, 3)),
                                                   "bias": jnp.zeros(3)}}})
    target = {"dense": {"kernel": jax.ShapeDtypeStruct((4, 5), jnp.float32),
                        "scale": jax.ShapeDtypeStruct((3,), jnp.float32)}}
    with Checkpointer(tmp_path) as checkpointer:
        with pytest.raises(CheckpointMismatchError) as error:
            checkpointer.restore_latest({"params": _abstract(target)})
        message = str(error.value)
        assert str(tmp_path / "3" / "params") in message
        assert "missing arrays: dense/scale" in message
        assert "unexpected arrays: dense/bias" in message
        assert "dense/kernel (checkpoint (4, 3), model (4, 5))" in message

        with pytest.raises(CheckpointMismatchError, match=r"lacks the items \['frozen'\]"):
            checkpointer.restore_latest({"frozen": _abstract(target)})
        with pytest.raises(ValueError, match="no sharding for 2 arrays: dense/kernel"):
            checkpointer.restore_latest({"params": target})


def test_reserved_names_are_refused(tmp_path):
    with Checkpointer(tmp_path) as checkpointer:
        with pytest.raises(ValueError, match=r"\['metadata'\] are reserved"):
            checkpointer.save(1, {"metadata": {"w": jnp.zeros(2)}})


def test_sigterm_sets_the_stop_flag_and_the_old_handler_returns(tmp_path):
    received = []
    original = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with Checkpointer(tmp_path) as checkpointer:
            with PreemptionGuard(reached_preemption=checkpointer.reached_preemption) as guard:
                assert not guard.should_stop(1)
                os.kill(os.getpid(), signal.SIGTERM)
                deadline = time.monotonic() + 5
                while not guard.should_stop(2) and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert guard.should_stop(2)
        assert received == []  # the guard, not the previous handler, took the signal
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, original)


def test_preemption_sync_point_stops_every_process_without_a_handler():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard(reached_preemption=lambda step: step >= 5, process_count=2) as guard:
        assert signal.getsignal(signal.SIGTERM) is before  # left to JAX's preemption service
        assert [guard.should_stop(step) for step in (3, 4, 5)] == [False, False, True]
    assert signal.getsignal(signal.SIGTERM) is before
