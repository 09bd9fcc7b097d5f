"""Training entry point: ``python -m pixelllm.main --config=configs/stages.py:trace_tiny --workdir=DIR``.

The config is an ml_collections config file with overrides
(``--config.train.steps=100 --config.data.data_dir=/data/tfds``); the run goes to
:func:`pixelllm.train.trainer.train`, which resumes whatever run ``--workdir`` already holds.

Multi-host: with ``--coordinator_address`` (and ``--num_processes``, ``--process_id``), or in an
environment JAX's cluster detection reads (a multi-host TPU VM slice, a SLURM job of several
tasks), ``jax.distributed.initialize`` runs before anything touches the devices; a single
process initializes nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
from absl import app, flags
from ml_collections import config_flags

from pixelllm.train import trainer

# Own flag registry: other command-line tools (pixelllm.tools.param_table) also define
# --config, and a process (a test run) may import both.
FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (path:variant).",
                                          lock_config=True, flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's folder (config, checkpoints, metrics).",
                               flag_values=FLAGS)


class DistributedFlags(NamedTuple):
    """The multi-host flags of a command-line tool (:func:`define_distributed_flags`)."""
    coordinator_address: flags.FlagHolder
    num_processes: flags.FlagHolder
    process_id: flags.FlagHolder
    initialization_timeout: flags.FlagHolder


def define_distributed_flags(flag_values: flags.FlagValues) -> DistributedFlags:
    """Defines ``--coordinator_address``, ``--num_processes``, ``--process_id`` and
    ``--initialization_timeout`` in ``flag_values``, for :func:`initialize_distributed`."""
    return DistributedFlags(
        coordinator_address=flags.DEFINE_string(
            "coordinator_address", None,
            "host:port of process 0 for jax.distributed (multi-host).", flag_values=flag_values),
        num_processes=flags.DEFINE_integer("num_processes", None,
                                           "Processes in a multi-host run.",
                                           flag_values=flag_values),
        process_id=flags.DEFINE_integer("process_id", None,
                                        "This process's index in a multi-host run.",
                                        flag_values=flag_values),
        initialization_timeout=flags.DEFINE_integer(
            "initialization_timeout", None,
            "Seconds jax.distributed waits for every process to join (default: JAX's).",
            flag_values=flag_values))


_DISTRIBUTED = define_distributed_flags(FLAGS)
flags.mark_flags_as_required(["config", "workdir"], flag_values=FLAGS)


def distributed_init_args(*, coordinator_address: str | None, num_processes: int | None,
                          process_id: int | None, environ: Mapping[str, str]
                          ) -> dict[str, Any] | None:
    """The keyword arguments of ``jax.distributed.initialize`` for this launch, or None for a
    single process (nothing to initialize).

    Explicit flags win; otherwise a multi-host environment JAX detects by itself gives ``{}``:
    a SLURM job step of more than one task (``SLURM_NTASKS``), or a TPU slice of several hosts
    (``TPU_WORKER_HOSTNAMES`` lists more than one).
    """
    if coordinator_address is not None:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id")
        return {"coordinator_address": coordinator_address, "num_processes": num_processes,
                "process_id": process_id}
    if num_processes is not None or process_id is not None:
        raise ValueError("--num_processes and --process_id need --coordinator_address")
    if int(environ.get("SLURM_NTASKS", "1")) > 1:
        return {}
    if len([host for host in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if host]) > 1:
        return {}
    return None


def initialize_distributed(distributed: DistributedFlags, environ: Mapping[str, str]) -> None:
    """Runs ``jax.distributed.initialize`` for a multi-process launch
    (:func:`distributed_init_args`); a single process initializes nothing."""
    init_args = distributed_init_args(coordinator_address=distributed.coordinator_address.value,
                                      num_processes=distributed.num_processes.value,
                                      process_id=distributed.process_id.value, environ=environ)
    if init_args is not None:
        if distributed.initialization_timeout.value is not None:
            init_args["initialization_timeout"] = distributed.initialization_timeout.value
        jax.distributed.initialize(**init_args)


def flags_parser(flag_values: flags.FlagValues) -> Callable[[list[str]], list[str]]:
    """``app.run``'s ``flags_parser`` for a tool with its own registry: parses ``flag_values``,
    then absl's own flags (``--v``, ``--logtostderr``, ...) from what is left (``app.run``
    requires the global registry parsed, and it rejects unknown flags)."""
    return lambda argv: flags.FLAGS(flag_values(argv, known_only=True))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # The run's own reports (parameter counts, initialization sources, evaluations) at INFO;
    # the libraries' (Orbax, TFDS) at absl's --verbosity (default: warnings).
    logging.getLogger("pixelllm").setLevel(logging.INFO)
    initialize_distributed(_DISTRIBUTED, os.environ)
    trainer.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser(FLAGS))
