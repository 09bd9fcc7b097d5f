"""Two processes on 127.0.0.1 (``jax.distributed``, CPU collectives over gloo, one device each)
train through ``python -m pixelllm.main`` and log the same losses as one process with the same
global batch on two devices; both runs write checkpoints, and the two processes resume from one
to the same losses.

This module is also the config file of its runs (``--config=tests/train/test_multiprocess.py``):
``configs/stages.py:trace_tiny`` on the Localized Narratives set built here (the smoke mixture's
other sources are not built). Everything else comes as command-line overrides. The three
processes run at the same time, each compiling the tiny step (the one-process program differs
from the two-process one: the device ids are part of its compilation), with
``JAX_DISABLE_MOST_OPTIMIZATIONS`` (no LLVM optimization of the CPU code: about 40% less compile
time, for a run of 3 steps; the runs compared are compiled the same way).
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from configs import stages
from tests.xla_flags import xla_flags

REPO = Path(__file__).resolve().parents[2]
STEPS = 3
# Wall-clock limit of the three runs together (each compiles the tiny step: a minute or more on a
# loaded 2-core machine); a process hung in a collective is killed at this point.
DEADLINE_SECONDS = 900
# Terms compared across the runs: each loss term, the gradient norm, the learning rate.
COMPARED = ("loss/", "grad_norm", "learning_rate")


def get_config():
    """``trace_tiny`` reading only its trace source (the data set this test builds)."""
    config = stages.get_config("trace_tiny")
    config.data.train = [source for source in config.data.train if source["task"] == "trace"]
    config.data.eval = [source for source in config.data.eval if source["task"] == "trace"]
    config.data.num_threads = 1
    return config


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _Run:
    """One ``pixelllm.main`` process, its output in ``<log>``."""

    def __init__(self, name: str, args: list[str], *, devices: int, log: Path,
                 env: dict[str, str]):
        self.name, self.log = name, log
        env = {**os.environ, **env, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": xla_flags(devices=devices)}
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pixelllm.main", *args], cwd=REPO, env=env,
                stdout=out, stderr=subprocess.STDOUT)

    def tail(self) -> str:
        return f"--- {self.name} (exit {self.process.poll()}), last lines:\n" + "\n".join(
            self.log.read_text(errors="replace").splitlines()[-25:])


def _run_all(runs: list[_Run]) -> None:
    """Waits for every run to exit 0; on a failure, a hang or the deadline kills the rest and
    fails with every run's output tail."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    try:
        while any(run.process.poll() is None for run in runs):
            failed = [run for run in runs if run.process.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                reason = (f"{failed[0].name} exited with {failed[0].process.returncode}"
                          if failed else f"not done after {DEADLINE_SECONDS} s")
                pytest.fail(f"{reason}\n" + "\n".join(run.tail() for run in runs))
            time.sleep(0.5)
        failed = [run for run in runs if run.process.returncode != 0]
        assert not failed, "\n".join(run.tail() for run in runs)
    finally:
        for run in runs:
            if run.process.poll() is None:
                run.process.kill()
                run.process.wait()


def _compared(metrics: dict[int, dict[str, float]]) -> dict[int, dict[str, float]]:
    return {step: {name: value for name, value in scalars.items() if name.startswith(COMPARED)}
            for step, scalars in metrics.items()}


def _checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(path.name) for path in (workdir / "checkpoints").iterdir()
                  if path.name.isdigit())


def test_two_processes_reach_the_losses_of_one_with_the_same_global_batch(tmp_path):
    from pixelllm.train.metrics_writer import read_metrics
    from tests.train.test_trainer import build_data

    (tmp_path / "data").mkdir()
    data_dir, tokenizer = build_data(tmp_path / "data")
    common = [f"--config={Path(__file__).relative_to(REPO)}",
              f"--config.data.data_dir={data_dir}", f"--config.data.tokenizer={tokenizer}",
              f"--config.train.steps={STEPS}", "--config.mesh_shape=(-1,1,1)",
              # A large rate: the updates of steps 1-2 show in the losses of steps 2-3.
              "--config.optimizer.learning_rate=0.01"]
    one, two = tmp_path / "one_process", tmp_path / "two_processes"
    # One persistent compilation cache: the resumed processes below reuse the programs.
    cache_env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
                 "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                 "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    address = f"127.0.0.1:{_free_port()}"
    runs = [_Run("one process, 2 devices", [*common, f"--workdir={one}"], devices=2,
                 log=tmp_path / "one.log", env=cache_env)]
    runs += [_Run(f"process {index} of 2", [
        *common, f"--workdir={two}", f"--coordinator_address={address}", "--num_processes=2",
        f"--process_id={index}", "--initialization_timeout=120"], devices=1,
        log=tmp_path / f"two_{index}.log", env=cache_env) for index in range(2)]
    _run_all(runs)

    expected, actual = _compared(read_metrics(one)), _compared(read_metrics(two))
    assert sorted(actual) == sorted(expected) == list(range(1, STEPS + 1))
    for step, scalars in expected.items():
        assert actual[step].keys() == scalars.keys()
        for name, value in scalars.items():
            np.testing.assert_allclose(actual[step][name], value, rtol=1e-5, atol=1e-6,
                                       err_msg=f"step {step}: {name}")
    # Step 1 runs at learning rate 0 (warm-up); step 2's update shows in step 3's losses.
    np.testing.assert_allclose(expected[2]["learning_rate"], 0.01, rtol=1e-6)

    # A checkpoint every 2 steps and at the end, with one data iterator position per process.
    assert _checkpoint_steps(one) == _checkpoint_steps(two) == [2, STEPS]
    for workdir, processes in ((one, 1), (two, 2)):
        positions = sorted(path.name for path in
                           (workdir / "checkpoints" / str(STEPS) / "data_iterator").glob("*.json"))
        assert positions == [f"process_{index}-of-{processes}.json"
                             for index in range(processes)]

    # Resume on two processes: as if both were killed after step 3 before its checkpoint, they
    # restart from step 2's (each its parameter shards and its own data iterator position)
    # and train step 3 again, to the same losses.
    shutil.rmtree(two / "checkpoints" / str(STEPS))
    address = f"127.0.0.1:{_free_port()}"
    _run_all([_Run(f"resumed process {index} of 2", [
        *common, f"--workdir={two}", f"--coordinator_address={address}", "--num_processes=2",
        f"--process_id={index}", "--initialization_timeout=120"], devices=1,
        log=tmp_path / f"resumed_{index}.log", env=cache_env) for index in range(2)])
    resumed = _compared(read_metrics(two))
    assert "resumed at step 2" in (tmp_path / "resumed_0.log").read_text()
    for name, value in actual[STEPS].items():
        np.testing.assert_allclose(resumed[STEPS][name], value, rtol=1e-6, atol=1e-7,
                                   err_msg=f"resumed step {STEPS}: {name}")
    assert _checkpoint_steps(two) == [2, STEPS]
