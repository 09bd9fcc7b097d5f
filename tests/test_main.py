"""The training entry point: config flags with overrides reach the trainer; jax.distributed is
initialized only for a multi-process launch."""

import pytest

from pixelllm import main as main_lib
from tests import flag_parsing


@pytest.fixture
def parsed_flags(monkeypatch):
    yield from flag_parsing.parsed_flags(main_lib.FLAGS, monkeypatch, "main")


def test_overrides_reach_the_trainer(parsed_flags, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(main_lib.trainer, "train",
                        lambda config, workdir: calls.append((config, workdir)))
    initialized = []
    monkeypatch.setattr(main_lib.jax.distributed, "initialize",
                        lambda **kwargs: initialized.append(kwargs))
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
    parsed_flags("--config=configs/stages.py:trace_tiny", f"--workdir={tmp_path}",
                 "--config.train.steps=7", "--config.optimizer.learning_rate=0.001",
                 "--config.data.data_dir=/data/tfds")
    main_lib.main(["main"])
    [(config, workdir)] = calls
    assert workdir == str(tmp_path)
    assert config.stage == "trace_tiny"
    assert config.train.steps == 7 and config.optimizer.learning_rate == 0.001
    assert config.data.data_dir == "/data/tfds"
    assert initialized == []  # one process: nothing to initialize


def test_a_misspelt_override_is_an_error(parsed_flags, tmp_path):
    with pytest.raises(AttributeError, match="stepz"):
        parsed_flags("--config=configs/stages.py:trace_tiny", f"--workdir={tmp_path}",
                     "--config.train.stepz=7")


@pytest.mark.parametrize(("flag_values", "environ", "expected"), [
    ({}, {}, None),
    ({}, {"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({}, {"SLURM_NTASKS": "4"}, {}),
    ({}, {"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, {}),
    ({"coordinator_address": "10.0.0.2:1234", "num_processes": 2, "process_id": 1},
     {"SLURM_NTASKS": "8"},
     {"coordinator_address": "10.0.0.2:1234", "num_processes": 2, "process_id": 1}),
])
def test_distributed_init_only_for_several_processes(flag_values, environ, expected):
    arguments = {"coordinator_address": None, "num_processes": None, "process_id": None,
                 **flag_values}
    assert main_lib.distributed_init_args(**arguments, environ=environ) == expected


@pytest.mark.parametrize("flag_values", [
    {"coordinator_address": "10.0.0.2:1234"},
    {"num_processes": 2, "process_id": 0},
])
def test_incomplete_distributed_flags_are_refused(flag_values):
    arguments = {"coordinator_address": None, "num_processes": None, "process_id": None,
                 **flag_values}
    with pytest.raises(ValueError, match="--"):
        main_lib.distributed_init_args(**arguments, environ={})
