"""The demo (pixelllm/tools/demo.py, launch/demo.sh): its report from the evaluation files, and
the quick run end to end (every key, every picture; no thresholds)."""

import json
import os
import pathlib
import subprocess

import numpy as np
import pytest
from PIL import Image

from pixelllm.tools import demo
from tests.xla_flags import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[2]
TASKS = ("caption", "locate", "segment", "describe", "dense")


def _write_eval(run: pathlib.Path, step: int, value: float, skip: str = "") -> None:
    folder = run / "eval" / str(step)
    folder.mkdir(parents=True)
    for source, key in demo.METRICS.values():
        if source == skip:
            continue
        path = folder / f"{source}.json"
        metrics = json.loads(path.read_text())["metrics"] if path.exists() else {}
        metrics[key] = value
        path.write_text(json.dumps({"source": source, "metrics": metrics}))


def test_metrics_come_from_the_last_evaluation(tmp_path):
    _write_eval(tmp_path, 90, 0.1)
    _write_eval(tmp_path, 100, 0.7)  # 100 sorts before 90 as text: steps compare as numbers
    assert demo.read_metrics(tmp_path) == {key: 0.7 for key in demo.METRICS}


def test_a_missing_evaluation_is_named(tmp_path):
    _write_eval(tmp_path, 5, 0.5, skip="vg_densecap_test")
    with pytest.raises(demo.DemoError, match="vg_densecap_test.json"):
        demo.read_metrics(tmp_path)
    (tmp_path / "empty" / "eval").mkdir(parents=True)
    with pytest.raises(demo.DemoError, match="no evaluation"):
        demo.read_metrics(tmp_path / "empty")


def test_the_table_says_which_targets_are_met():
    metrics = {"ref_p50": 0.85, "ref_ciou": 0.5, "trace_point_l1": 0.08, "densecap_map": 0.2,
               "loca_meteor": 0.3, "train_seconds": 600.0}
    rows = {line.split()[0]: line for line in demo.table(metrics).splitlines()[1:]}
    assert rows["ref_p50"].endswith(" met")
    assert rows["ref_ciou"].endswith("NOT met")
    assert rows["trace_point_l1"].endswith(" met")  # lower is better
    assert rows["densecap_map"].endswith(" met")    # the target itself meets it
    assert rows["loca_meteor"].split()[-1] == "-"   # no target
    assert demo.met("trace_point_l1", 0.11) is False


def test_quick_demo_writes_every_key_and_picture(tmp_path):
    out = tmp_path / "demo_out"
    # One device; compiled as every test (tests/conftest.py). The run is mostly compilation
    # (13 programs and the initializers of two model builds); with the suite's classic CPU
    # emitters the trained demo model's box, mask and caption come out as with the default ones.
    env = {**os.environ, "XLA_FLAGS": xla_flags(devices=1)}
    result = subprocess.run(["bash", str(ROOT / "launch" / "demo.sh"), "--quick",
                             f"--out={out}", "--num_overlay_images=1"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {*demo.METRICS, "train_seconds"}
    assert all(np.isfinite(value) for value in metrics.values())
    assert metrics["train_seconds"] > 0
    assert "ref_p50" in result.stdout and str(out / "overlays") in result.stdout
    assert list((out / "run" / "tensorboard").iterdir())
    drawn = sorted((out / "overlays").glob("*.png"))
    assert sorted(path.stem.split("_", 1)[1] for path in drawn) == sorted(TASKS)
    image_id = drawn[0].stem.split("_")[0]
    original = np.asarray(Image.open(out / "images" / f"{image_id}.png"))
    for path in drawn:
        picture = np.asarray(Image.open(path).convert("RGB"))
        enlarged = original.repeat(demo.OVERLAY_SCALE, 0).repeat(demo.OVERLAY_SCALE, 1)
        assert picture.shape == enlarged.shape
        assert (picture != enlarged).any(), path.name  # something is drawn
        result_json = json.loads(path.with_suffix(".json").read_text())
        assert result_json["task"] == path.stem.split("_", 1)[1]
