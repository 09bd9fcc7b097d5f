"""The training loop on ``configs/stages.py:trace_tiny`` over a Localized Narratives data set built
here with the real TFDS builder: an interrupted run (SIGKILL, SIGTERM) resumes to the same
losses as an uninterrupted one, eval_only trains nothing, the workdir holds what it should.

Every run compiles the tiny model's train step (about a minute on a 2-core CPU), so one
uninterrupted run is shared by the tests (module fixture), the interrupted runs are
subprocesses (they must be killed), and all runs share a persistent compilation cache. All of
them compile with ``jax_disable_most_optimizations`` (no LLVM optimization of the CPU code:
about 40% less compile time, for runs of a few steps), in-process and in the subprocesses alike.
Losses from different processes are compared to a relative 1e-5, not bit for bit: a process whose
compilation differs (a cache miss, another XLA thread split of a reduction) moves the gradient
norm in its seventh digit, while a resume fault (wrong data, optimizer state or schedule step)
moves the losses in their first few.
"""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image

from configs import stages
from pixelllm.train import trainer
from pixelllm.train.metrics_writer import read_metrics

# Module fixtures compile the tiny model: all of this module runs on one xdist worker
# (launch/test.sh uses --dist loadgroup), so they are built once.
pytestmark = [pytest.mark.xdist_group("test_trainer")]

STEPS = 4
CAPTIONS = ["a dog on the grass", "the cat on the right", "a red car on the left",
            "where is the dog", "an object of a red car", "the dog on the left"]
REPO = Path(__file__).resolve().parents[2]


def _ln_line(image_id: str, caption: str) -> str:
    """One Localized Narratives record: two utterances, the mouse down the left half, then
    down the right half."""
    words = caption.split()
    timed = [(" ".join(words[:2]), 0.0, 1.0), (" ".join(words[2:]), 1.1, 2.0)]
    trace = [(0.1, 0.2, 0.0), (0.4, 0.8, 1.0), (0.6, 0.2, 1.1), (0.9, 0.8, 2.0)]
    return json.dumps({
        "dataset_id": "mscoco", "image_id": image_id, "annotator_id": 1, "caption": caption,
        "voice_recording": "x.ogg",
        "timed_caption": [{"utterance": u, "start_time": s, "end_time": e} for u, s, e in timed],
        "traces": [[{"x": x, "y": y, "t": t} for x, y, t in trace]]})


def build_data(root: Path) -> tuple[str, str]:
    """``(tfds data_dir, tokenizer file)``: a sentencepiece model and the Localized Narratives
    COCO data set (6 training images, 2 validation images) built by its TFDS builder."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CAPTIONS * 20), model_writer=model,
                                   minloglevel=2, num_threads=1, character_coverage=1.0,
                                   model_type="unigram", vocab_size=40, hard_vocab_limit=False,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    tokenizer = root / "spiece.model"
    tokenizer.write_bytes(model.getvalue())
    manual = root / "manual"
    splits = (("train2017", "coco_train_localized_narratives-00000-of-00004.jsonl", range(6)),
              ("val2017", "coco_val_localized_narratives.jsonl", range(6, 8)))
    for folder, name, ids in splits:
        (manual / folder).mkdir(parents=True)
        lines = []
        for image_id in ids:
            pixels = np.random.default_rng(image_id).integers(0, 255, (16, 32, 3), np.uint8)
            Image.fromarray(pixels).save(manual / folder / f"{image_id:012d}.jpg", quality=95)
            lines.append(_ln_line(str(image_id), CAPTIONS[image_id % len(CAPTIONS)]))
        (manual / name).write_text("\n".join(lines) + "\n")
    import tensorflow_datasets as tfds

    from data_pipelines.builders.localized_narratives import LocalizedNarratives
    LocalizedNarratives(config="coco", data_dir=str(root / "tfds")).download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    return str(root / "tfds"), str(tokenizer)


def make_config(data_dir: str, tokenizer: str, **train):
    """``trace_tiny`` on the built data set: its trace sources only (the smoke mixture's
    referring and dense-captioning sets are not built here), on one device."""
    config = stages.get_config("trace_tiny")
    config.data.data_dir, config.data.tokenizer = data_dir, tokenizer
    config.data.num_threads = 1
    config.data.train = [source for source in config.data.train if source["task"] == "trace"]
    config.data.eval = [source for source in config.data.eval if source["task"] == "trace"]
    config.mesh_shape = (1, 1, 1)
    config.train.steps = STEPS
    config.train.log_every = 1
    for name, value in train.items():
        config.train[name] = value
    return config


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """One persistent compilation cache for this module's runs, in-process and subprocesses."""
    path = str(tmp_path_factory.mktemp("jax_cache"))
    previous = {name: getattr(jax.config, name) for name in (
        "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes")}
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    yield path
    for name, value in previous.items():
        jax.config.update(name, value)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def uninterrupted(data, compilation_cache, tmp_path_factory):
    """The workdir of one uninterrupted 4-step run (checkpoints at 2 and 4)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    assert trainer.train(make_config(*data), workdir) == STEPS
    return workdir


class Pause:
    """An evaluator that, at the step it is called, writes ``marker`` and waits for ``release``
    (or a signal): the test interrupts the run at a known step, after the checkpoint of step 2."""

    def __init__(self, marker: str, release: str):
        self._marker, self._release = Path(marker), Path(release)

    def __call__(self, model, step):
        del model
        self._marker.write_text(str(step))
        deadline = time.monotonic() + 600
        while not self._release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return {}


def run_paused(data_dir: str, tokenizer: str, workdir: str, marker: str, release: str) -> None:
    """Subprocess entry: the 4-step run, paused by :class:`Pause` at step 3."""
    trainer.train(make_config(data_dir, tokenizer, eval_every=3), workdir,
                  evaluators={"pause": Pause(marker, release)})


def _start_paused(data, workdir: Path, cache: str) -> tuple[subprocess.Popen, Path]:
    """A paused run in a subprocess, returned once it waits at step 3 with step 2 saved."""
    marker, release = workdir.parent / f"{workdir.name}.paused", workdir.parent / "release"
    # The environment (tests/conftest.py) brings the compilation settings of this process.
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    code = ("from tests.train.test_trainer import run_paused; "
            f"run_paused(*{[*data, str(workdir), str(marker), str(release)]!r})")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not (marker.exists() and (workdir / "checkpoints" / "2").exists()):
        if process.poll() is not None:
            pytest.fail(f"the paused run exited with {process.returncode}:\n"
                        f"{process.stderr.read().decode()[-3000:]}")
        assert time.monotonic() < deadline, "the paused run never reached step 3"
        time.sleep(0.2)
    assert marker.read_text() == "3"
    return process, release


def _losses(workdir: Path, steps) -> dict[int, dict[str, float]]:
    metrics = read_metrics(workdir)
    return {step: {name: value for name, value in metrics[step].items()
                   if name.startswith("loss/") or name in ("grad_norm", "learning_rate")}
            for step in steps}


def _assert_same_losses(workdir: Path, reference: Path, steps) -> None:
    """The logged losses, gradient norm and learning rate of ``steps`` agree in both workdirs."""
    ours, theirs = _losses(workdir, steps), _losses(reference, steps)
    for step in steps:
        assert sorted(ours[step]) == sorted(theirs[step]), step
        for name, value in ours[step].items():
            np.testing.assert_allclose(value, theirs[step][name], rtol=1e-5, atol=1e-7,
                                       err_msg=f"step {step} {name}")


def _steps(workdir: Path) -> list[int]:
    return sorted(int(path.name) for path in (workdir / "checkpoints").iterdir()
                  if path.name.isdigit())


def test_a_killed_run_resumes_to_the_losses_of_an_uninterrupted_one(
        data, uninterrupted, compilation_cache, tmp_path):
    workdir = tmp_path / "killed"
    process, _ = _start_paused(data, workdir, compilation_cache)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert _steps(workdir) == [2]
    # Before the kill the subprocess reproduced the uninterrupted run's first steps.
    _assert_same_losses(workdir, uninterrupted, [1, 2])

    assert trainer.train(make_config(*data), workdir) == STEPS
    _assert_same_losses(workdir, uninterrupted, [3, 4])
    assert _steps(workdir) == [2, 4]


def test_sigterm_saves_the_step_it_stopped_at_and_exits_0(
        data, uninterrupted, compilation_cache, tmp_path):
    workdir = tmp_path / "terminated"
    process, release = _start_paused(data, workdir, compilation_cache)
    process.send_signal(signal.SIGTERM)
    release.write_text("")
    assert process.wait(timeout=300) == 0, process.stderr.read().decode()[-3000:]
    assert _steps(workdir) == [2, 3]
    _assert_same_losses(workdir, uninterrupted, [1, 2, 3])

    assert trainer.train(make_config(*data), workdir) == STEPS
    _assert_same_losses(workdir, uninterrupted, [4])


def test_the_workdir_holds_the_config_metrics_and_checkpoints(data, uninterrupted):
    saved = json.loads((uninterrupted / trainer.CONFIG_FILE).read_text())
    assert saved["stage"] == "trace_tiny" and saved["train"]["steps"] == STEPS
    assert saved["data"]["data_dir"] == data[0]
    assert _steps(uninterrupted) == [2, 4]
    metrics = read_metrics(uninterrupted)
    assert sorted(metrics) == [1, 2, 3, 4]
    # Warm-up of 1 update then cosine over 3: 0, lr, lr * 0.75, lr * 0.25.
    learning_rates = [metrics[step]["learning_rate"] for step in range(1, 5)]
    np.testing.assert_allclose(learning_rates, np.array([0, 1, 0.75, 0.25]) * 5e-5, rtol=1e-6)
    for step in range(1, 5):
        assert metrics[step]["skipped"] == 0 and metrics[step]["examples_per_second"] > 0
        assert np.isfinite(metrics[step]["loss/total"]) and metrics[step]["loss/text"] > 0
    metadata = json.loads((uninterrupted / "checkpoints" / "4" / "metadata" /
                           "metadata").read_text())
    assert metadata == {"examples": 4 * STEPS}


def test_eval_only_evaluates_the_latest_checkpoint_and_trains_nothing(
        data, uninterrupted, tmp_path):
    """With no evaluator given, the default computes the objective on the validation split."""
    workdir = tmp_path / "eval_only"
    shutil.copytree(uninterrupted, workdir)
    before = {path: path.read_bytes() for path in (workdir / "checkpoints").rglob("*")
              if path.is_file()}

    assert trainer.train(make_config(*data, eval_only=True), workdir) == STEPS
    after = {path: path.read_bytes() for path in (workdir / "checkpoints").rglob("*")
             if path.is_file()}
    assert after == before  # no new step, no file changed
    scalars = read_metrics(workdir)[STEPS]
    text, total = (scalars[f"eval/loss/ln_coco_trace_val/loss/{term}"]
                   for term in ("text", "total"))
    assert 0 < text < total < 1e3


def test_a_run_on_the_sam_feature_cache_logs_the_losses_of_one_running_sam(
        data, uninterrupted, compilation_cache, tmp_path):
    """``pixelllm.tools.sam_cache`` stores each training image's SAM features (float32, exact);
    a run reading them (trace_tiny's SAM has no drop path) trains like the run that ran SAM,
    with a train step that does not run SAM's image encoder."""
    from data_pipelines.sam_feature_store import FeatureStore
    from pixelllm.tools import sam_cache
    from pixelllm.train import sam_feature_cache

    config = make_config(*data)
    store = tmp_path / "sam_features"
    config.data.sam_feature_cache.directory = str(store)
    report = sam_cache.write(config, batch_size=4, dtype="float32")
    # Six training images, one canvas each (Localized Narratives is resized, not cropped).
    assert report.entries == 6 and len(FeatureStore.open(str(store))) == 6
    assert sam_feature_cache.PROBE_KEY in FeatureStore.open(str(store)).metadata
    workdir = tmp_path / "cached"
    assert trainer.train(config, workdir) == STEPS
    _assert_same_losses(workdir, uninterrupted, range(1, STEPS + 1))
