"""Speed of every user-facing task through :class:`pixelllm.predictor.Predictor`, the path of the
``pixelllm`` command and the web app (``pixelllm serve``).

The tasks are the web app's modes, parsed from JSON requests by
:func:`pixelllm.web.modes.parse` (an image of ``--image-size`` noise, PNG in base64) and run as
:meth:`pixelllm.web.modes.Job.run` runs them: caption (with per-word traces), answer (a
question), locate and segment (an expression), describe with a box and with two points, and
dense captioning. For each config and task:

* the first call at batch 1 (compilation plus one run), then the latency of one image: the
  median of ``--calls`` calls after ``--warmup`` untimed ones, as the app calls the Predictor
  (one image, its user-frame preprocessing and result decoding included);
* the same at ``--batch`` images per call (one batch bucket of the Predictor): images/s.

Generating tasks decode exactly ``--max-new-tokens`` tokens per caption (``DecodeSettings.
fixed_length``, passed as the Predictor's ``settings=``; ``--no-fixed-length`` keeps the app's
stop at EOS). Random weights; the text tokens each result shows (up to its first EOS) are
reported too. Configs, all built by :meth:`Predictor.from_pretrained` from the config with no
files (the ``pixelllm --config`` path; every part keeps its seed initialization, float32)::

    tiny   configs/stages.py:multitask_refseg_tiny (the tests' and web tests' model, every
           module built: 32 canvas, tiny T5)
    mid    benchmarks/flop_utilization.py's mid config (real widths, 2 layers per tower, 224
           canvas, a 1024-wide Llama-style text model) with the paper's mask adapter and
           CenterNet2 proposal head (configs/pixelllm.py:t5_xl), which segment and dense
           captioning need
    paper  configs/experiments/pixelllm_t5_xl.py: SAM ViT-H + EVA02-L + Flan-T5-XL, 384
           canvas, about 3.9B parameters (15.6 GB of float32)

The tokenizer is a word-level ``tokenizer.json`` written to a temporary folder with exactly the
model's vocabulary size (T5 conventions: pad 0, EOS 1, no BOS; the decoder models add a BOS),
since no real tokenizer can be downloaded here::

    python -m benchmarks.task_speed                                  # tiny and mid, batch 8
    python -m benchmarks.task_speed --configs paper --batch 1 --calls 3 \
        --out benchmarks/results/task_speed_paper_cpu.json          # the paper's latencies

Paper size on a 24 GB CPU machine: the parameters are built once (eager initialization, each
array allocated once; the Predictor's split state shares them; 15.6 GB) and every config is freed
before the next. Dense captioning decodes a caption for each of the detector's 100 boxes: at
paper size its decoding caches take roughly 3 GB per image (24 decoder layers x (about 40 prefix
+ the new tokens) x 2048 x 2 x 4 bytes x 100 boxes), so run the paper at ``--batch 1`` there
(``--tasks`` picks tasks). Each of the paper's programs may take minutes to compile. The JSON is
rewritten after every task, so the figures measured before a failure are kept. Prints a
table and writes ``benchmarks/results/task_speed_<device>.json``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gc
import inspect
import io
import os
import pathlib
import platform
import resource
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import tokenizers
from PIL import Image
from tokenizers import models as tokenizer_models
from tokenizers import pre_tokenizers

from benchmarks import flop_utilization, results_file
from benchmarks.decode_speed import device_name
from benchmarks.train_step import time_calls
from configs import pixelllm as pixelllm_config
from configs import stages
from configs.experiments import pixelllm_t5_xl
from pixelllm import predictor as predictor_lib
from pixelllm import tasks as task_table
from pixelllm.language.tokenizer import Tokenizer
from pixelllm.models.pixel_llm import inference
from pixelllm.web import modes

CONFIGS = ("tiny", "mid", "paper")
# The web app's requests, one per task (the mode's fields; the image is added). Boxes and points
# are fractions of the image's width and height.
REQUESTS = {
    "caption": dict(mode="caption"),
    "answer": dict(mode="answer", question="what is on the table"),
    "locate": dict(mode="locate", expression="the dog on the left"),
    "segment": dict(mode="segment", expression="the dog on the left"),
    "describe_box": dict(mode="describe", box=(0.25, 0.25, 0.75, 0.75)),
    "describe_points": dict(mode="describe", points=((0.3, 0.5), (0.7, 0.5))),
    "dense_caption": dict(mode="dense"),
}
# Special tokens of the word-level tokenizer, in id order (T5's: pad 0, EOS 1; then unknown).
SPECIAL = ("<pad>", "</s>", "<unk>")
BOS = "<s>"


def build_config(name: str) -> ml_collections.ConfigDict:
    """The experiment config of ``name`` (one of :data:`CONFIGS`; module docstring)."""
    if name == "tiny":
        return stages.get_config("multitask_refseg_tiny")
    if name == "paper":
        return pixelllm_t5_xl.get_config()
    if name != "mid":
        raise ValueError(f"unknown config {name!r}; choose from {CONFIGS}")
    config = flop_utilization.mid_config("none")
    paper_heads = pixelllm_config.get_config("t5_xl").model
    config.unlock()
    # The harness stage builds neither (as the official trace stage); segment and dense
    # captioning need them.
    config.model.mask_adapter = paper_heads.mask_adapter
    config.model.proposal_head = paper_heads.proposal_head
    config.lock()
    return config


def vocabulary_size(config: ml_collections.ConfigDict) -> int:
    """The language model's vocabulary (its embedding rows) in ``config.model``."""
    return int(config.model.language_model.model.vocab_size)


def write_word_tokenizer(folder: pathlib.Path, *, vocab_size: int, bos: bool) -> pathlib.Path:
    """A word-level ``tokenizer.json`` in ``folder`` with ids ``0..vocab_size-1``: the
    :data:`SPECIAL` tokens (and :data:`BOS` with ``bos``), the words of the task prompts and of
    :data:`REQUESTS`, then filler words ``w<id>``; words split at whitespace. Returns its path."""
    names = [*SPECIAL, *([BOS] if bos else [])]
    texts = [task.eval_prompt for task in task_table.TASKS.values()]
    for request in REQUESTS.values():
        if "question" in request:
            texts.append(task_table.question_prompt(request["question"]))
        texts.append(request.get("expression", ""))
    for word in (word for text in texts for word in text.split()):
        if word not in names:
            names.append(word)
    if len(names) > vocab_size:
        raise ValueError(f"a vocabulary of {vocab_size} cannot hold the {len(names)} words of "
                         "the special tokens and the prompts")
    names += [f"w{index}" for index in range(len(names), vocab_size)]
    backend = tokenizers.Tokenizer(tokenizer_models.WordLevel(
        {name: index for index, name in enumerate(names)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([name for name in names[:len(SPECIAL) + bos] if name != "<unk>"])
    path = folder / "tokenizer.json"
    backend.save(str(path))
    return path


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, GB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def build_predictor(config: ml_collections.ConfigDict, *, folder: pathlib.Path,
                    max_new_tokens: int, max_batch: int, seed: int = 0
                    ) -> predictor_lib.Predictor:
    """:meth:`Predictor.from_pretrained` of ``config`` with no files (random weights, built
    once) and a word tokenizer of the model's vocabulary written to ``folder``."""
    tokenizer = write_word_tokenizer(folder, vocab_size=vocabulary_size(config),
                                     bos=config.model.language_model.kind == "decoder")
    return predictor_lib.Predictor.from_pretrained(config, tokenizer=tokenizer, seed=seed,
                                                   max_new_tokens=max_new_tokens,
                                                   max_batch=max_batch)


def noise_png(width: int, height: int, seed: int = 0) -> str:
    """A ``width x height`` RGB noise image as PNG in base64 (what the page uploads)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, format="PNG")
    return base64.b64encode(data.getvalue()).decode("ascii")


def parse_jobs(names: list[str], *, width: int, height: int) -> dict[str, modes.Job]:
    """The web app's :class:`~pixelllm.web.modes.Job` of each task in ``names``, parsed from its
    request on one noise image."""
    image, jobs = noise_png(width, height), {}
    for name in names:
        request = dict(REQUESTS[name], image=image, name=f"noise_{width}x{height}.png")
        if "box" in request:
            request["box"] = [v * size for v, size in zip(request["box"], (width, height) * 2)]
        if "points" in request:
            request["points"] = [[x * width, y * height] for x, y in request["points"]]
        jobs[name] = modes.parse(request, limits=modes.Limits())
    return jobs


def job_call(predictor: predictor_lib.Predictor, job: modes.Job, *, batch: int,
             settings: inference.DecodeSettings) -> Callable[[], list]:
    """A call of ``job``'s Predictor method on ``batch`` copies of its image (batch 1:
    :meth:`Job.run`'s call), with ``settings`` where the method decodes text."""
    method = getattr(predictor, job.method)
    arguments = {name: value * batch for name, value in job.arguments.items()}
    if "settings" in inspect.signature(method).parameters:
        arguments["settings"] = settings
    images = [job.image] * batch
    return lambda: method(images, **arguments)


def shown_tokens(tokenizer: Tokenizer, result: Any) -> list[int]:
    """The text tokens of each text in ``result`` (cut at the first EOS; none for a box)."""
    if isinstance(result, predictor_lib.DenseCaptions):
        texts = [region.text for region in result.regions]
    else:
        texts = [result.text] if hasattr(result, "text") else []
    return [len(tokenizer.encode(text)) for text in texts]


def measure(call: Callable[[], list], *, batch: int, warmup: int, calls: int) -> dict:
    """The first call's seconds (compilation and one run), then :func:`time_calls`' timing;
    the results of the last call are returned under ``results``."""
    start = time.perf_counter()
    results = call()
    first = time.perf_counter() - start
    if len(results) != batch:
        raise RuntimeError(f"{batch} images gave {len(results)} results")
    kept = [results]

    def timed() -> None:
        kept[0] = call()

    timing = time_calls(timed, warmup=warmup, calls=calls)
    return dict(batch=batch, first_call_s=first, **timing,
                images_per_s=batch / timing["median_s"], results=kept[0])


def run_config(name: str, *, task_names: list[str], batch: int, max_new_tokens: int,
               fixed_length: bool, warmup: int, calls: int, image_size: tuple[int, int],
               record: Callable[[dict], None]) -> dict:
    """Builds config ``name``'s Predictor, times every task of ``task_names``, passing each
    row to ``record`` as it is measured; returns the config's facts."""
    config = build_config(name)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        predictor = build_predictor(config, folder=pathlib.Path(folder),
                                    max_new_tokens=max_new_tokens, max_batch=batch)
        build_s = time.perf_counter() - start
        # The split state the Predictor's programs run on: the parameters as held in memory.
        leaves = predictor.parameter_arrays
        facts = dict(config=name, stage=config.get("stage", name), canvas=predictor.canvas,
                     language_model=config.model.language_model.kind,
                     vocab_size=vocabulary_size(config),
                     parameters=int(sum(leaf.size for leaf in leaves)),
                     parameter_bytes=int(sum(leaf.nbytes for leaf in leaves)),
                     build_s=build_s, peak_rss_gb_after_build=peak_rss_gb())
        del leaves
        print(f"\n{name}: {facts['parameters']:,} parameters "
              f"({facts['parameter_bytes'] / 1e9:.2f} GB), built in {build_s:.1f} s, peak RSS "
              f"{facts['peak_rss_gb_after_build']:.2f} GB", flush=True)
        settings = predictor.settings._replace(fixed_length=fixed_length)
        jobs = parse_jobs(task_names, width=image_size[0], height=image_size[1])
        for task, job in jobs.items():
            for size in dict.fromkeys((1, batch)):
                timing = measure(job_call(predictor, job, batch=size, settings=settings),
                                 batch=size, warmup=warmup, calls=calls)
                tokens = [count for result in timing.pop("results")
                          for count in shown_tokens(predictor.tokenizer, result)]
                row = dict(config=name, task=task, mode=job.mode, method=job.method, **timing,
                           shown_tokens_mean=float(np.mean(tokens)) if tokens else None,
                           texts_per_image=len(tokens) / size,
                           peak_rss_gb=peak_rss_gb())
                print(f"{name:>6} {task:>16} batch {size:>2}: first call {row['first_call_s']:7.2f}"
                      f" s, median {row['median_s']:7.3f} s, {row['images_per_s']:7.2f} images/s",
                      flush=True)
                record(row)
        facts["traces"] = dict(predictor.traces)
        facts["peak_rss_gb_after_tasks"] = peak_rss_gb()
    del predictor
    # This config's compiled programs are never called again: their memory goes before the
    # next config is built.
    jax.clear_caches()
    gc.collect()
    return facts


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,mid",
                        help=f"comma-separated, out of {', '.join(CONFIGS)}")
    parser.add_argument("--tasks", default=",".join(REQUESTS),
                        help=f"comma-separated, out of {', '.join(REQUESTS)}")
    parser.add_argument("--batch", type=int, default=8,
                        help="images per call for images/s (a power of two; 1: latency only)")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="tokens decoded per caption (EOS included)")
    parser.add_argument("--fixed-length", action=argparse.BooleanOptionalAction, default=True,
                        help="decode exactly --max-new-tokens tokens (else stop at EOS)")
    parser.add_argument("--calls", type=int, default=5, help="timed calls per task and batch")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed calls after the first (compiling) one")
    parser.add_argument("--image-size", default="640x480", help="WIDTHxHEIGHT of the images")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    config_names = [name for name in args.configs.split(",") if name]
    task_names = [name for name in args.tasks.split(",") if name]
    for given, known, flag in ((config_names, CONFIGS, "--configs"),
                               (task_names, tuple(REQUESTS), "--tasks")):
        unknown = sorted(set(given) - set(known))
        if unknown or not given:
            parser.error(f"{flag}: unknown or none {unknown}; choose from {list(known)}")
    if args.batch < 1 or args.batch & (args.batch - 1):
        parser.error(f"--batch {args.batch}: a power of two (the Predictor's batch buckets)")
    width, height = (int(v) for v in args.image_size.lower().split("x"))

    device = jax.devices()[0]
    result = dict(device=device.device_kind, platform=device.platform, jax=jax.__version__,
                  python=platform.python_version(), load_average=os.getloadavg(),
                  batch=args.batch, max_new_tokens=args.max_new_tokens,
                  fixed_length=args.fixed_length, calls=args.calls, warmup=args.warmup,
                  image_size=[width, height], configs={}, rows=[])

    def record(row: dict) -> None:
        result["rows"].append(row)
        result["load_average_after"] = os.getloadavg()
        with contextlib.redirect_stdout(io.StringIO()):  # one "wrote" line, at the end
            results_file.write(result, f"task_speed_{device_name()}", args.out)

    for name in config_names:
        result["configs"][name] = run_config(
            name, task_names=task_names, batch=args.batch, max_new_tokens=args.max_new_tokens,
            fixed_length=args.fixed_length, warmup=args.warmup, calls=args.calls,
            image_size=(width, height), record=record)

    print(f"\n{width}x{height} noise images, {args.max_new_tokens} new tokens "
          f"({'fixed length' if args.fixed_length else 'stop at EOS'}), median of {args.calls} "
          f"calls after {args.warmup} warm-up; load average {os.getloadavg()[0]:.1f}")
    header = (f"{'config':>6} {'task':>16} {'batch':>5} {'first call s':>12} {'median s':>9} "
              f"{'images/s':>9} {'tokens shown':>12}")
    print(header + "\n" + "-" * len(header))
    for row in result["rows"]:
        tokens = "" if row["shown_tokens_mean"] is None else f"{row['shown_tokens_mean']:.1f}"
        print(f"{row['config']:>6} {row['task']:>16} {row['batch']:>5} "
              f"{row['first_call_s']:>12.2f} {row['median_s']:>9.3f} "
              f"{row['images_per_s']:>9.2f} {tokens:>12}")
    for name, facts in result["configs"].items():
        print(f"{name}: {facts['parameters']:,} parameters, peak RSS "
              f"{facts['peak_rss_gb_after_tasks']:.2f} GB, traces {facts['traces']}")
    result["peak_rss_gb"] = peak_rss_gb()
    results_file.write(result, f"task_speed_{device_name()}", args.out)
    return result


# A smoke setting for ``benchmarks.run --quick``: the tiny model, a generating task and a
# referring one, 2 tokens, batch 2.
QUICK = ["--configs", "tiny", "--tasks", "caption,locate", "--batch", "2",
         "--max-new-tokens", "2", "--calls", "1", "--warmup", "0", "--image-size", "48x40"]


def table_rows(result: dict) -> list[dict]:
    """``benchmarks.run``'s rows, per config and task: the latency of one image (batch 1), its
    first call (compilation), and images/s at the result's batch."""
    rows = []
    for row in result["rows"]:
        name = f"{row['config']} {row['task']}"
        if row["batch"] == 1:
            rows += [dict(measure=f"{name}: latency, batch 1", value=row["median_s"], unit="s"),
                     dict(measure=f"{name}: first call (compile), batch 1",
                          value=row["first_call_s"], unit="s")]
        if row["batch"] == result["batch"]:
            rows.append(dict(measure=f"{name}: batch {row['batch']}", value=row["images_per_s"],
                             unit="images/s"))
    return rows


if __name__ == "__main__":
    main()
