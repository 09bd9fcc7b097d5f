"""The demo: synthetic scenes -> the real builders -> ``pixelllm.main`` on every task -> the
paper's evaluators -> overlays. What ``bash launch/demo.sh`` runs.

  python -m pixelllm.tools.demo [--out=demo_out] [--quick] [--steps=N]

Steps, each announced with its time:

1. ``OUT/data``: ``--num_images`` synthetic scenes in the public formats and their tokenizer
   (:mod:`data_pipelines.synthetic_scenes`); ``OUT/images``: the held-out (test) images as PNG.
2. ``OUT/tfds``: Localized Narratives (``coco``), RefCOCO (``refcoco_unc``) and Visual Genome
   (``densecap``) built from those files by their TFDS builders.
3. ``OUT/run``: ``python -m pixelllm.main --config=configs/demo.py`` trains PixelLLM on every
   task at once (progress bar, ``tensorboard/``, ``metrics.jsonl``, checkpoints) and, at its last
   step, scores the held-out splits with the paper's evaluators (``OUT/run/eval/<step>/*.json``;
   ``--config.train.eval_only=True`` reruns that evaluation on the latest checkpoint).
4. ``OUT/metrics.json`` (:data:`METRICS`, and ``train_seconds``, the training command's wall
   time less its evaluation) and the table of metrics against the demo's targets.
5. ``OUT/overlays``: held-out images drawn by :class:`pixelllm.predictor.Predictor` from the
   trained work dir, one PNG per task: ``caption`` (each word's trace), ``locate`` and
   ``segment`` (an expression's box and mask, the ground truth in the file name's JSON),
   ``describe`` (a shape's region caption) and ``dense`` (detected regions with captions).

``--quick`` makes few scenes and trains a few steps (``configs/demo.py:quick``): every file and
key is written, the numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import tqdm
from absl import logging
from PIL import Image

from configs import demo as demo_config
from data_pipelines.synthetic import dataset, formats, tokenizer
from data_pipelines.synthetic.dataset import SyntheticImage
from data_pipelines.synthetic.language import region_phrase
from pixelllm.train import metrics_writer

# Scenes: 128 px, 2 or 3 shapes (the demo model sees them on a 64-pixel canvas).
SCENE = dict(height=demo_config.SCENE_SIDE, width=demo_config.SCENE_SIDE, min_objects=2,
             max_objects=3, val_fraction=0.1, test_fraction=0.1)
NUM_IMAGES = {"demo": 1200, "quick": 40}
# metrics.json key -> (evaluation source of configs/demo.py, metric key of its JSON).
METRICS = {
    "ref_p50": ("refcoco_refer_test", "box_P@0.5"),
    "ref_ciou": ("refcoco_refseg_test", "seg_cIoU"),
    "trace_point_l1": ("ln_trace_validation", "point_l1"),
    "loca_meteor": ("vg_loca_test", "METEOR"),
    "loca_cider": ("vg_loca_test", "CIDEr"),
    "densecap_map": ("vg_densecap_test", "mAP"),
    "caption_meteor": ("ln_caption_validation", "METEOR"),
}
# The targets on held-out scenes: (comparison, value).
TARGETS = {"ref_p50": (">=", 0.80), "ref_ciou": (">=", 0.60), "trace_point_l1": ("<=", 0.10),
           "densecap_map": (">=", 0.20)}
BUILDS = ((formats.LN_DIR, "data_pipelines.builders.localized_narratives",
           "LocalizedNarratives", "coco"),
          (formats.REFER_DIR, "data_pipelines.builders.refcoco", "ReferCoco", "refcoco_unc"),
          (formats.VG_DIR, "data_pipelines.builders.visual_genome", "VgDensecap", "densecap"))
# What the demo writes in OUT (a rerun removes them first).
OUTPUTS = ("data", "images", "tfds", "run", "overlays", "metrics.json", "train.log")
# Overlays are drawn on the image enlarged this many times (labels readable).
OVERLAY_SCALE = 4


class DemoError(RuntimeError):
    """A step of the demo failed; says which and where its output is."""


def _step(title: str):
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def generate(out: Path, *, num_images: int, seed: int) -> list[SyntheticImage]:
    """Step 1: the scenes' files, their tokenizer and the held-out images as PNG."""
    images = dataset.generate(num_images=num_images, seed=seed, **SCENE)
    formats.write_all(images, str(out / "data"))
    (out / "data" / tokenizer.TOKENIZER_FILE).write_bytes(
        tokenizer.train(tokenizer.texts([i for i in images if i.split == "train"])))
    (out / "images").mkdir(parents=True, exist_ok=True)
    for image in images:
        if image.split == "test":
            Image.fromarray(image.scene.image).save(out / "images" / f"{image.image_id}.png")
    counts = {split: sum(i.split == split for i in images) for split in dataset.SPLITS}
    print(f"{num_images} scenes ({counts}), written under {out / 'data'}")
    return images


def build(out: Path) -> None:
    """Step 2: every source's TFDS data set (ArrayRecord) from the generated files."""
    import importlib

    import tensorflow_datasets as tfds
    for folder, module, name, config in BUILDS:
        builder = getattr(importlib.import_module(module), name)(
            config=config, data_dir=str(out / "tfds"))
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(manual_dir=str(out / "data" / folder)))
        print(f"built {builder.info.full_name}: " + ", ".join(
            f"{split} {info.num_examples}" for split, info in builder.info.splits.items()))


def run_main(out: Path, *, config: str, overrides: Sequence[str], log: str) -> float:
    """``python -m pixelllm.main`` on the demo's work dir; its wall time in seconds. Output
    goes to the console and to ``OUT/<log>``."""
    command = [sys.executable, "-m", "pixelllm.main", f"--config={config}",
               f"--workdir={out / 'run'}", f"--config.data.data_dir={out / 'tfds'}",
               f"--config.data.tokenizer={out / 'data' / tokenizer.TOKENIZER_FILE}",
               # The libraries' (Orbax, TFDS) INFO lines drown the run's own reports.
               "--verbosity=-1", *overrides]
    start = time.perf_counter()
    with open(out / log, "w") as log_file:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, bufsize=1)
        for line in process.stdout:
            sys.stdout.write(line)
            log_file.write(line)
    if process.wait():
        raise DemoError(f"{' '.join(command)} failed (exit {process.returncode}); its output is "
                        f"in {out / log}")
    return time.perf_counter() - start


def read_metrics(run: Path) -> dict[str, float]:
    """:data:`METRICS` from the last evaluation of ``run`` (``eval/<step>/<source>.json``)."""
    steps = sorted((int(p.name) for p in (run / "eval").iterdir() if p.name.isdigit()))
    if not steps:
        raise DemoError(f"no evaluation in {run / 'eval'}")
    folder = run / "eval" / str(steps[-1])
    metrics = {}
    for key, (source, name) in METRICS.items():
        path = folder / f"{source}.json"
        if not path.exists():
            raise DemoError(f"{path} is missing: the evaluation of {source} did not run")
        metrics[key] = float(json.loads(path.read_text())["metrics"][name])
    return metrics


def evaluation_seconds(run: Path) -> float:
    """The time the run's evaluations took (``eval/<evaluator>/seconds`` in ``metrics.jsonl``)."""
    return sum(value for scalars in metrics_writer.read_metrics(run).values()
               for name, value in scalars.items()
               if name.startswith("eval/") and name.endswith("/seconds") and value is not None)


def met(key: str, value: float) -> bool | None:
    """Whether ``value`` meets the target of ``key`` (``None``: no target)."""
    if key not in TARGETS:
        return None
    comparison, target = TARGETS[key]
    return value >= target if comparison == ">=" else value <= target


def table(metrics: Mapping[str, float]) -> str:
    rows = [("metric", "value", "target", "")]
    for key, value in metrics.items():
        target = " ".join(str(v) for v in TARGETS[key]) if key in TARGETS else "-"
        verdict = {True: "met", False: "NOT met", None: ""}[met(key, value)]
        rows.append((key, f"{value:.3f}" if key != "train_seconds" else f"{value:.0f}",
                     target, verdict))
    widths = [max(len(row[c]) for row in rows) for c in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in rows)


def draw(out: Path, images: Sequence[SyntheticImage], *, count: int) -> list[Path]:
    """Step 5: the held-out images drawn by the trained model, every task (module
    docstring); a JSON beside each PNG holds the result and, for the referring tasks, the
    ground truth."""
    from pixelllm import overlay
    from pixelllm.predictor import Predictor

    predictor = Predictor.from_workdir(out / "run")
    folder = out / "overlays"
    folder.mkdir(parents=True, exist_ok=True)
    held_out = [i for i in images if i.split == "test"][:count]
    written = []
    for image in tqdm.tqdm(held_out, desc="overlays", unit="image"):
        # Enlarged for readable labels; the predictor reports in the enlarged image's pixels.
        pixels = np.repeat(np.repeat(image.scene.image, OVERLAY_SCALE, 0), OVERLAY_SCALE, 1)
        target, expression = _first_expression(image)
        box = np.asarray(image.scene.objects[target].box, np.float32) * OVERLAY_SCALE
        results = {
            "caption": predictor.caption([pixels])[0],
            "locate": predictor.locate([pixels], [expression])[0],
            "segment": predictor.segment([pixels], [expression])[0],
            "describe": predictor.describe_region([pixels], boxes=[box.tolist()])[0],
            "dense": predictor.dense_caption([pixels])[0],
        }
        truth = {"expression": expression, "box": box.tolist(),
                 "phrase": region_phrase(image.scene.objects[target])}
        for task, result in results.items():
            path = folder / f"{image.image_id}_{task}.png"
            Image.fromarray(overlay.draw(pixels, result.drawing())).save(path)
            path.with_suffix(".json").write_text(json.dumps(
                {"image": str(out / "images" / f"{image.image_id}.png"), "scale": OVERLAY_SCALE,
                 "task": task, "result": result.to_json(), "ground_truth": truth}, indent=1))
            written.append(path)
    return written


def _first_expression(image: SyntheticImage) -> tuple[int, str]:
    """``(shape index, expression)`` of the image's first referring expression."""
    for index, expressions in enumerate(image.expressions):
        if expressions:
            return index, expressions[0]
    raise DemoError(f"held-out image {image.image_id} has no referring expression")


def run(out: Path, *, quick: bool, num_images: int | None, seed: int,
        num_overlay_images: int, steps: int | None = None) -> dict[str, float]:
    """Every step (module docstring); returns ``metrics.json``'s values."""
    # The schedule and the evaluation at the last step follow the steps.
    steps_overrides = () if steps is None else (
        f"--config.train.steps={steps}", f"--config.optimizer.total_steps={steps}",
        f"--config.train.eval_every={steps}")
    run_name = "quick" if quick else "demo"
    config = "configs/demo.py" + (":quick" if quick else "")
    out.mkdir(parents=True, exist_ok=True)
    # A rerun starts over; nothing else in OUT is touched.
    for name in OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    start = _step("1/5 scenes")
    images = generate(out, num_images=num_images or NUM_IMAGES[run_name], seed=seed)
    print(f"({time.perf_counter() - start:.0f} s)")
    start = _step("2/5 TFDS builds")
    build(out)
    print(f"({time.perf_counter() - start:.0f} s)")
    _step(f"3/5 training ({config}) and evaluation")
    run_seconds = run_main(out, config=config, overrides=steps_overrides, log="train.log")
    metrics = {**read_metrics(out / "run"),
               "train_seconds": run_seconds - evaluation_seconds(out / "run")}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _step("4/5 metrics on held-out scenes")
    print(table(metrics))
    start = _step("5/5 overlays")
    drawn = draw(out, images, count=num_overlay_images)
    print(f"{len(drawn)} overlays ({time.perf_counter() - start:.0f} s)")
    print(f"\nmetrics: {out / 'metrics.json'}\npictures: {out / 'overlays'}\n"
          f"TensorBoard: tensorboard --logdir={out / 'run' / 'tensorboard'}\n"
          f"try: .venv/bin/pixelllm caption {out / 'images' / os.listdir(out / 'images')[0]} "
          f"--workdir={out / 'run'} --out={out / 'mine'}")
    return metrics


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    # argparse, not absl flags: the demo's names (--out, --seed) would clash in absl's global
    # registry with other tools imported in the same process.
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_out",
                        help="output folder (the demo's files in it are replaced)")
    parser.add_argument("--quick", action="store_true",
                        help="a few scenes and steps: checks the plumbing")
    parser.add_argument("--num_images", type=int, default=None,
                        help="scenes to generate (default: 1200, quick 40)")
    parser.add_argument("--seed", type=int, default=0, help="scene seed")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: configs/demo.py's; the schedule follows)")
    parser.add_argument("--num_overlay_images", type=int, default=4,
                        help="held-out images drawn per task")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    # The libraries' (Orbax, TFDS) INFO lines drown the demo's own output.
    logging.set_verbosity(logging.WARNING)
    run(Path(args.out), quick=args.quick, num_images=args.num_images, seed=args.seed,
        num_overlay_images=args.num_overlay_images, steps=args.steps)


if __name__ == "__main__":
    main()
