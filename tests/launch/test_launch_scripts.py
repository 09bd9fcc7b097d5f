"""The multi-host launch scripts: --dry-run prints what would run (config, work dir, processes,
environment), and bad arguments are refused before anything starts."""

import pathlib
import shlex
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(script, *args):
    return subprocess.run(["bash", str(ROOT / "launch" / script), *args], capture_output=True,
                          text=True, timeout=30)


def _main_args(words):
    """The flags given to ``python -m pixelllm.main`` in a command's words."""
    start = words.index("pixelllm.main") + 1
    end = words.index("&&", start) if "&&" in words[start:] else len(words)
    return words[start:end]


def _locked_jax():
    return next(line.split("==")[1] for line in (ROOT / "requirements.lock").read_text().split()
                if line.startswith("jax=="))


def test_tpu_pod_dry_run_prints_one_ssh_to_every_worker():
    result = _run("train_tpu_pod.sh", "--tpu=pod-64", "--zone=us-east5-a", "--project=proj",
                  "--config=configs/stages.py:trace", "--workdir=gs://bucket/pixelllm/trace",
                  "--env=XLA_FLAGS=--xla_a=1 --xla_b=2", "--dry-run", "--",
                  "--config.train.steps=100")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    words = shlex.split(lines[0])
    assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-64"]
    assert "--zone=us-east5-a" in words and "--project=proj" in words
    assert "--worker=all" in words
    remote = shlex.split(next(w for w in words if w.startswith("--command="))
                         .removeprefix("--command="))
    assert remote[:3] == ["cd", "pixelllm", "&&"]
    assert "launch/setup_env.sh" in remote
    assert f"jax[tpu]=={_locked_jax()}" in remote
    main = remote.index("pixelllm.main") - 2  # .venv/bin/python -m pixelllm.main
    assert remote[main - 2:main] == ["env", "XLA_FLAGS=--xla_a=1 --xla_b=2"]
    assert _main_args(remote) == ["--config=configs/stages.py:trace",
                                  "--workdir=gs://bucket/pixelllm/trace",
                                  "--config.train.steps=100"]


def test_tpu_pod_chosen_workers():
    result = _run("train_tpu_pod.sh", "--tpu=t", "--zone=z", "--worker=0,1",
                  "--config=configs/stages.py:ref", "--workdir=gs://b/ref", "--dry-run")
    assert result.returncode == 0, result.stderr
    words = shlex.split(result.stdout)
    assert "--worker=0,1" in words and not any(w.startswith("--project") for w in words)
    assert " env " not in result.stdout


@pytest.mark.parametrize("args,error", [
    (["--zone=z", "--config=configs/stages.py:trace", "--workdir=gs://b/w"], "--tpu"),
    (["--tpu=t", "--zone=z", "--config=configs/stages.py:trace", "--workdir=/local/w"],
     "must be a gs:// path"),
    (["--tpu=t", "--zone=z", "--config=configs/nope.py:x", "--workdir=gs://b/w"],
     "no file configs/nope.py"),
    (["--tpu=t", "--zone=z", "--config=configs/stages.py:trace", "--workdir=gs://b/w",
      "--env=NOVALUE"], "expected KEY=VALUE"),
    (["--tpu=t", "--zone=z", "--config=configs/stages.py:trace", "--workdir=gs://b/w",
      "--workers=all"], "unknown argument --workers=all"),
])
def test_tpu_pod_refuses_bad_arguments(args, error):
    result = _run("train_tpu_pod.sh", *args, "--dry-run")
    assert result.returncode == 2
    assert error in result.stderr
    assert result.stdout == ""


def test_slurm_dry_run_one_process_per_gpu():
    result = _run("train_slurm_gpu.sh", "--config=configs/stages.py:densecap",
                  "--workdir=/shared/pixelllm/densecap", "--nodes=4", "--gpus_per_node=8",
                  "--partition=a100", "--time=2-00:00:00", "--env=NCCL_DEBUG=WARN", "--dry-run",
                  "--", "--config.train.accumulation_steps=2")
    assert result.returncode == 0, result.stderr
    setup, cuda, run = [shlex.split(line) for line in result.stdout.strip().splitlines()]
    assert setup == ["bash", "launch/setup_env.sh"]
    assert cuda[-1] == f"jax[cuda12]=={_locked_jax()}"
    assert run[:2] == ["env", "NCCL_DEBUG=WARN"]
    srun = run[2:run.index("pixelllm.main") - 2]
    assert srun == ["srun", "--job-name=pixelllm", "--nodes=4", "--ntasks-per-node=8",
                    "--gpus-per-node=8", "--kill-on-bad-exit=1", "--export=ALL",
                    "--partition=a100", "--time=2-00:00:00"]
    assert _main_args(run) == ["--config=configs/stages.py:densecap",
                               "--workdir=/shared/pixelllm/densecap",
                               "--config.train.accumulation_steps=2"]


def test_slurm_dry_run_one_process_per_node_sees_every_gpu():
    result = _run("train_slurm_gpu.sh", "--config=configs/stages.py:trace",
                  "--workdir=/shared/w", "--nodes=2", "--gpus_per_node=4",
                  "--processes=per_node", "--dry-run")
    assert result.returncode == 0, result.stderr
    run = shlex.split(result.stdout.strip().splitlines()[-1])
    assert run[:2] == ["env", "JAX_LOCAL_DEVICE_IDS=0,1,2,3"]
    assert "--ntasks-per-node=1" in run and "--gpus-per-node=4" in run and "--nodes=2" in run
    assert _main_args(run) == ["--config=configs/stages.py:trace", "--workdir=/shared/w"]


@pytest.mark.parametrize("args,error", [
    (["--workdir=/shared/w"], "--config"),
    (["--config=configs/stages.py:trace", "--workdir=relative/w"], "must be absolute"),
    (["--config=configs/stages.py:trace", "--workdir=/w", "--nodes=0"], "--nodes=0"),
    (["--config=configs/stages.py:trace", "--workdir=/w", "--processes=per_core"],
     "per_gpu or per_node"),
])
def test_slurm_refuses_bad_arguments(args, error):
    result = _run("train_slurm_gpu.sh", *args, "--dry-run")
    assert result.returncode == 2
    assert error in result.stderr
    assert result.stdout == ""
