"""Input pipeline throughput on CPU: examples/s of the training mixture at the 384 canvas.

Generates raw files in the public formats (Localized Narratives jsonl + COCO-sized JPEGs, the
refer toolkit's refs pickles and instances.json for RefCOCO/RefCOCO+/RefCOCOg, DenseCap's Visual
Genome json), builds them with the project's TFDS builders (array_record), trains a small
SentencePiece tokenizer on the generated text, and times ``data_pipelines.pipeline`` on the
``configs/data.py:pixelllm`` training mixture (trace + referring + dense captioning, official
sizes: S = 16, Lc = 32, L = 128, G = 100) pinned to ``--cores`` CPU cores::

    python -m benchmarks.input_pipeline                     # 2 cores, 1/2/4 threads
    python -m benchmarks.input_pipeline --threads 2 --batches 10

Reports, per reading-thread count, examples/s over ``--batches`` batches after two warm-up
batches, and per source the single-thread cost of one example (read + every op) with its share
in the ops; prints a table and writes ``benchmarks/results/input_pipeline_cpu.json``. Generated
images are 640x480 and 480x640 (COCO-like) and 800x600 (VG-like) smooth random JPEGs; the data
are synthetic, so only the timings mean anything; each source is read as if it held 10,000
records (cycling through the generated ones) so that shuffling costs what it costs on real data.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import pathlib
import pickle
import platform
import tempfile
import time

import numpy as np
import sentencepiece as spm
import tensorflow_datasets as tfds
from PIL import Image, ImageFilter

from benchmarks import results_file
from configs import data as data_config
from data_pipelines import pipeline
from data_pipelines.builders import localized_narratives, refcoco, visual_genome
from data_pipelines.ops import registry

WORDS = ("a the man woman dog cat tree car street building sky grass table people left right "
         "red blue green small large sitting standing holding walking near behind front "
         "background image picture we can see there is are with on in of and").split()


def _jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A smooth random colour field with some noise: compresses like a photo."""
    coarse = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 12, (height, width, 3))
    pixels = np.clip(np.asarray(image.filter(ImageFilter.GaussianBlur(2)), float) + noise, 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _sentence(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(WORDS, size=words))


def _write_localized_narratives(manual: pathlib.Path, rng: np.random.Generator, count: int):
    for split, folder, first in (("train", "train2017", 1), ("val", "val2017", 100_001)):
        (manual / folder).mkdir(parents=True)
        lines = []
        for image_id in range(first, first + (count if split == "train" else 2)):
            width, height = (640, 480) if image_id % 2 else (480, 640)
            (manual / folder / f"{image_id:012d}.jpg").write_bytes(_jpeg(rng, width, height))
            for annotator in range(1 + image_id % 2):
                utterances = [_sentence(rng, int(rng.integers(1, 6))) for _ in range(12)]
                times = np.cumsum(rng.uniform(0.3, 1.2, len(utterances) + 1))
                trace_t = np.linspace(times[0], times[-1], 300)
                xy = np.clip(0.5 + np.cumsum(rng.normal(0, 0.02, (300, 2)), axis=0), -0.05, 1.05)
                lines.append(json.dumps({
                    "dataset_id": f"mscoco_{folder}", "image_id": str(image_id),
                    "annotator_id": annotator, "caption": " ".join(utterances),
                    "timed_caption": [{"utterance": u, "start_time": float(times[i]),
                                       "end_time": float(times[i + 1])}
                                      for i, u in enumerate(utterances)],
                    "traces": [[{"x": float(x), "y": float(y), "t": float(t)}
                                for (x, y), t in zip(xy, trace_t)]],
                    "voice_recording": "x.ogg"}))
        name = ("coco_train_localized_narratives-00000-of-00004.jsonl" if split == "train" else
                "coco_val_localized_narratives.jsonl")
        (manual / name).write_text("\n".join(lines) + "\n")


def _write_refer(manual: pathlib.Path, rng: np.random.Generator, count: int):
    (manual / "train2014").mkdir(parents=True)
    images, annotations = [], []
    for image_id in range(1, count + 1):
        width, height = (640, 480) if image_id % 2 else (480, 640)
        name = f"COCO_train2014_{image_id:012d}.jpg"
        (manual / "train2014" / name).write_bytes(_jpeg(rng, width, height))
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for k in range(3):
            x, y = rng.uniform(0, width * 0.6), rng.uniform(0, height * 0.6)
            w, h = rng.uniform(40, width * 0.4), rng.uniform(40, height * 0.4)
            annotations.append({
                "id": image_id * 10 + k, "image_id": image_id, "category_id": 1 + k,
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    instances = {"images": images, "annotations": annotations,
                 "categories": [{"id": k, "name": str(k)} for k in (1, 2, 3)]}
    for dataset, split_by in (("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd")):
        (manual / dataset).mkdir()
        (manual / dataset / "instances.json").write_text(json.dumps(instances))
        refs = []
        for ref_id, annotation in enumerate(annotations):
            raws = [_sentence(rng, int(rng.integers(2, 9))) for _ in range(rng.integers(1, 4))]
            sentences = [{"raw": raw, "sent_id": ref_id * 4 + s, "tokens": raw.lower().split(),
                          "sent": raw.lower()} for s, raw in enumerate(raws)]
            refs.append({"ref_id": ref_id, "ann_id": annotation["id"],
                         "image_id": annotation["image_id"],
                         "category_id": annotation["category_id"], "split": "train",
                         "sent_ids": [s["sent_id"] for s in sentences], "sentences": sentences,
                         "file_name": f"COCO_train2014_{annotation['image_id']:012d}_0.jpg"})
        with open(manual / dataset / f"refs({split_by}).p", "wb") as f:
            pickle.dump(refs, f, protocol=2)


def _write_visual_genome(manual: pathlib.Path, rng: np.random.Generator, count: int):
    (manual / "VG_100K").mkdir(parents=True)
    ids = list(range(1, count + 5))
    sizes, regions = [], []
    for image_id in ids:
        width, height = 800, 600
        (manual / "VG_100K" / f"{image_id}.jpg").write_bytes(_jpeg(rng, width, height))
        sizes.append({"image_id": image_id, "width": width, "height": height, "url": "",
                      "coco_id": None, "flickr_id": None})
        boxes = rng.uniform(0, 1, (50, 4)) * [width * 0.7, height * 0.7, 200, 150]
        regions.append({"id": image_id, "regions": [
            {"region_id": image_id * 100 + r, "image_id": image_id,
             "phrase": _sentence(rng, int(rng.integers(2, 7))), "x": float(x), "y": float(y),
             "width": float(w) + 10, "height": float(h) + 10}
            for r, (x, y, w, h) in enumerate(boxes)]})
    (manual / "image_data.json").write_text(json.dumps(sizes))
    (manual / "region_descriptions.json").write_text(json.dumps(regions))
    (manual / "densecap_splits.json").write_text(json.dumps(
        {"train": ids[:count], "val": ids[count:count + 2], "test": ids[count + 2:]}))


def _build(builder_cls, config: str, manual: pathlib.Path, data_dir: pathlib.Path) -> float:
    start = time.perf_counter()
    builder = builder_cls(config=config, data_dir=str(data_dir))
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    return time.perf_counter() - start


def _tokenizer(path: pathlib.Path, rng: np.random.Generator) -> str:
    model = io.BytesIO()
    sentences = [_sentence(rng, 12) for _ in range(2000)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model,
                                   minloglevel=2, num_threads=1, model_type="unigram",
                                   vocab_size=200, hard_vocab_limit=False, pad_id=0, eos_id=1,
                                   unk_id=2, bos_id=-1)
    path.write_bytes(model.getvalue())
    return str(path)


class _Cycled:
    """A source read as if it held ``length`` records (record ``i`` is ``records[i % n]``), so
    shuffling costs what it does on a real data set (grain's index shuffle is slow on a few
    dozen indices, fast on thousands)."""

    def __init__(self, records, length: int):
        self._records, self._length = records, length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int):
        return self._records[index % len(self._records)]


def _per_source_costs(sources: list[pipeline.Source], examples: int) -> list[dict]:
    """Single-thread ms per example of each source, split into reading and each op (after one
    untimed pass over the same examples, so caches are warm)."""
    rows = []
    for source in sources:
        ops = registry.parse(source.ops)
        names = [op["op"] for op in source.ops]
        for index in range(examples):
            registry.compose(ops)(source.records[index % len(source.records)],
                                  np.random.default_rng(index))
        read_s, op_s = 0.0, np.zeros(len(ops))
        for index in range(examples):
            rng = np.random.default_rng(index)
            start = time.perf_counter()
            example = source.records[index % len(source.records)]
            read_s += time.perf_counter() - start
            for k, op in enumerate(ops):
                start = time.perf_counter()
                example = op(example, rng)
                op_s[k] += time.perf_counter() - start
        rows.append({"source": source.name, "ms_per_example": 1e3 * (read_s + op_s.sum())
                     / examples, "read_ms": 1e3 * read_s / examples,
                     "op_ms": {name: 1e3 * s / examples for name, s in zip(names, op_s)}})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cores", type=int, default=2, help="CPU cores to run on")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4],
                        help="reading/preprocessing thread counts to time")
    parser.add_argument("--batch", type=int, default=32, help="examples per batch (one host)")
    parser.add_argument("--batches", type=int, default=8, help="timed batches per setting")
    parser.add_argument("--records", type=int, default=24, help="images per generated source")
    parser.add_argument("--workdir", type=pathlib.Path, default=None,
                        help="where to write the generated data (default: a temporary folder)")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)

    available = sorted(os.sched_getaffinity(0))
    cores = available[:args.cores]
    os.sched_setaffinity(0, cores)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.workdir or pathlib.Path(scratch)
        rng = np.random.default_rng(0)
        manual = {name: root / "manual" / name for name in ("ln", "refer", "vg")}
        _write_localized_narratives(manual["ln"], rng, args.records)
        _write_refer(manual["refer"], rng, args.records)
        _write_visual_genome(manual["vg"], rng, args.records)
        data_dir = root / "tfds"
        build_s = {
            "localized_narratives/coco": _build(localized_narratives.LocalizedNarratives,
                                                "coco", manual["ln"], data_dir),
            **{f"refer_coco/{c}": _build(refcoco.ReferCoco, c, manual["refer"], data_dir)
               for c in ("refcoco_unc", "refcocoplus_unc", "refcocog_umd")},
            "vg_densecap/densecap": _build(visual_genome.VgDensecap, "densecap", manual["vg"],
                                           data_dir),
        }
        config = data_config.get_config("pixelllm")
        config.data_dir = str(data_dir)
        config.tokenizer = _tokenizer(root / "spiece.model", rng)
        sizes = pipeline.Sizes(**config.sizes)
        sources = [dataclasses.replace(source, records=_Cycled(source.records, 10_000))
                   for source in pipeline.sources_from_config(
                       config.train, data_dir=config.data_dir, tokenizer=config.tokenizer)]

        rows = []
        for threads in args.threads:
            p = pipeline.InputPipeline(sources, batch_size=args.batch, sizes=sizes,
                                       seed=config.seed, process_index=0, process_count=1,
                                       num_threads=threads)
            iterator = iter(p)
            for _ in range(2):
                next(iterator)
            start = time.perf_counter()
            for _ in range(args.batches):
                next(iterator)
            seconds = time.perf_counter() - start
            rows.append({"threads": threads, "examples_per_s": args.batch * args.batches
                         / seconds, "batch_s": seconds / args.batches})
        costs = _per_source_costs(sources, examples=16)

    print(f"{len(cores)} of {len(available)} CPU cores (load average {os.getloadavg()[0]:.1f}), "
          f"canvas {sizes.canvas}, S {sizes.slots}, L {sizes.text_length}, G {sizes.objects}, "
          f"batch {args.batch}, {args.batches} timed batches")
    print(f"{'threads':>8} {'examples/s':>11} {'s/batch':>8}")
    for row in rows:
        print(f"{row['threads']:>8} {row['examples_per_s']:>11.1f} {row['batch_s']:>8.2f}")
    print("single-thread cost per example (ms): source, total, read, then per op")
    for row in costs:
        ops = ", ".join(f"{name} {ms:.1f}" for name, ms in row["op_ms"].items())
        print(f"  {row['source']}: {row['ms_per_example']:.1f} (read {row['read_ms']:.1f}; "
              f"{ops})")

    # Other processes on the same cores slow everything: the load says how busy they were.
    result = dict(device="cpu", cores=len(cores), load_average_1min=os.getloadavg()[0],
                  python=platform.python_version(),
                  processor=platform.processor() or platform.machine(),
                  sizes=config.sizes.to_dict(),
                  batch=args.batch, timed_batches=args.batches, records_per_source=args.records,
                  weights={entry["name"]: entry["weight"] for entry in config.train},
                  build_s=build_s, rows=rows, per_source=costs)
    results_file.write(result, "input_pipeline_cpu", args.out)
    return result


# A smoke setting for ``benchmarks.run --quick``.
QUICK = ["--threads", "2", "--batch", "4", "--batches", "2", "--records", "4"]


def table_rows(result: dict) -> list[dict]:
    """``benchmarks.run``'s rows: examples/s per reading-thread count at the 384 canvas."""
    return [dict(measure=f"examples/s, {row['threads']} thread(s), canvas "
                         f"{result['sizes']['canvas']}", value=row["examples_per_s"],
                 unit="examples/s") for row in result["rows"]]


if __name__ == "__main__":
    main()
