"""Synthetic images written as the public data sets' files, each in the layout its builder reads.

:func:`write_all` makes three folders under the output folder, each a builder's ``manual_dir``:

* ``localized_narratives/`` (builder ``localized_narratives``, config ``coco``):
  ``coco_train_localized_narratives-00000-of-00001.jsonl``,
  ``coco_val_localized_narratives.jsonl``, one record per image with the public fields
  (``dataset_id``, ``image_id``, ``annotator_id``, ``caption``, ``timed_caption``, ``traces``,
  ``voice_recording``), and the images as ``train2017/<12-digit id>.jpg``, ``val2017/...``.
  Localized Narratives has no COCO test split, so ``test`` images have no narrative.
* ``refer/`` (builder ``refer_coco``, config ``refcoco_unc``): ``refcoco/refs(unc).p``, a
  pickle (protocol 2, plain data only) of the refer toolkit's list of refs ``{ref_id, ann_id,
  image_id, split, sentences: [{tokens, raw, sent_id, sent}], sent_ids, category_id,
  file_name}``, with ``split`` ``train``, ``val`` or ``test``; ``refcoco/instances.json`` in
  COCO format (``images``, ``annotations`` of every shape, ``categories``: one per shape kind);
  the images as ``train2014/COCO_train2014_<12-digit id>.jpg`` (RefCOCO's images all come from
  COCO train2014).
* ``visual_genome/`` (builder ``vg_densecap``, config ``densecap``):
  ``region_descriptions.json`` (a region per shape: ``region_id``, ``image_id``, ``phrase``,
  ``x``, ``y``, ``width``, ``height``), ``image_data.json`` (``image_id``, ``url``, ``width``,
  ``height``, ``coco_id``, ``flickr_id``), ``densecap_splits.json`` (``train``, ``val``,
  ``test`` id lists), the images as ``VG_100K/<id>.jpg``.

**Masks.** A COCO segmentation is a list of polygons, merged by union, without holes, while a
shape's visible part may have any form (a shape in front may cut it in two or leave a hole in
it). Each annotation's ``segmentation`` is therefore the visible mask itself, exactly, as
rectangles with integer corners (runs of pixels in a row, merged with identical runs in the
rows below): pycocotools marks exactly the pixels whose centres lie inside such a polygon, so
the rendered mask is the set of pixels that show the shape, ``area`` is its pixel count and
``bbox`` (like a region's box) is tight to it.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image

from data_pipelines.synthetic.dataset import SPLITS, SyntheticImage
from data_pipelines.synthetic.language import region_phrase
from data_pipelines.synthetic.scenes import SHAPES

LN_DIR, REFER_DIR, VG_DIR = "localized_narratives", "refer", "visual_genome"
LN_FILES = {"train": "coco_train_localized_narratives-00000-of-00001.jsonl",
            "val": "coco_val_localized_narratives.jsonl"}
LN_IMAGE_DIRS = {"train": "train2017", "val": "val2017"}
JPEG_QUALITY = 95


def mask_polygons(mask: np.ndarray) -> list[list[float]]:
    """``[H, W]`` bool -> COCO polygons (flat ``[x0, y0, x1, y0, x1, y1, x0, y1]`` rectangles)
    whose union rasterizes to exactly ``mask`` (module docstring), top to bottom."""
    height = mask.shape[0]
    # Runs start where a row steps from 0 to 1 and stop where it steps back (np.nonzero reads
    # row by row, so the i-th start and the i-th stop belong to one run).
    steps = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    start_rows, start_cols = np.nonzero(steps == 1)
    _, stop_cols = np.nonzero(steps == -1)
    runs_by_row: list[set[tuple[int, int]]] = [set() for _ in range(height + 1)]
    for row, start, stop in zip(start_rows.tolist(), start_cols.tolist(), stop_cols.tolist()):
        runs_by_row[row].add((start, stop))
    rectangles = []  # (top, x0, x1, bottom)
    open_runs: dict[tuple[int, int], int] = {}  # (x0, x1) -> top row
    for row, runs in enumerate(runs_by_row):
        for run in sorted(set(open_runs) - runs):
            rectangles.append((open_runs.pop(run), *run, row))
        for run in sorted(runs - set(open_runs)):
            open_runs[run] = row
    return [[float(v) for v in (x0, top, x1, top, x1, bottom, x0, bottom)]
            for top, x0, x1, bottom in sorted(rectangles)]


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _json(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def write_all(images: Sequence[SyntheticImage], out_dir: str) -> dict[str, dict[str, int]]:
    """Writes the three layouts (module docstring) under ``out_dir``.

    Returns:
      Per layout folder, images per split written to it.
    """
    encoded = {image.image_id: _jpeg(image.scene.image) for image in images}
    return {
        LN_DIR: write_localized_narratives(images, encoded, os.path.join(out_dir, LN_DIR)),
        REFER_DIR: write_refer(images, encoded, os.path.join(out_dir, REFER_DIR)),
        VG_DIR: write_visual_genome(images, encoded, os.path.join(out_dir, VG_DIR)),
    }


def write_localized_narratives(images: Sequence[SyntheticImage], encoded: dict[int, bytes],
                               manual_dir: str) -> dict[str, int]:
    """The Localized Narratives jsonl files and COCO 2017 images of the train and val
    images."""
    lines: dict[str, list[bytes]] = {split: [] for split in LN_FILES}
    for image in images:
        if image.split not in LN_FILES:
            continue
        narration = image.narration
        record = {
            "dataset_id": f"mscoco_{image.split}2017",
            "image_id": str(image.image_id),
            "annotator_id": image.annotator_id,
            "caption": narration.caption,
            "timed_caption": [{"utterance": u.text, "start_time": u.start_time,
                               "end_time": u.end_time} for u in narration.utterances],
            "traces": [[{"x": float(x), "y": float(y), "t": float(t)}
                        for x, y, t in narration.trace]],
            "voice_recording": f"coco_{image.split}/coco_{image.split}_{image.image_id}_"
                               f"{image.annotator_id}.ogg",
        }
        lines[image.split].append(_json(record))
        _write(os.path.join(manual_dir, LN_IMAGE_DIRS[image.split],
                            f"{image.image_id:012d}.jpg"), encoded[image.image_id])
    for split, records in lines.items():
        if records:
            _write(os.path.join(manual_dir, LN_FILES[split]), b"\n".join(records) + b"\n")
    return {split: len(records) for split, records in lines.items()}


def _coco_filename(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def annotation_id(image: SyntheticImage, depth: int) -> int:
    """The COCO annotation id (and Visual Genome region id) of shape ``depth`` of ``image``."""
    return image.image_id * 1000 + depth


def write_refer(images: Sequence[SyntheticImage], encoded: dict[int, bytes],
                manual_dir: str) -> dict[str, int]:
    """The refer toolkit's ``refcoco/refs(unc).p`` and ``refcoco/instances.json`` and the
    train2014 images."""
    categories = {shape: index + 1 for index, shape in enumerate(SHAPES)}
    coco_images, annotations, refs = [], [], []
    per_split = {split: 0 for split in SPLITS}
    num_sentences = 0
    for image in images:
        height, width = image.scene.image.shape[:2]
        coco_images.append({"id": image.image_id, "file_name": _coco_filename(image.image_id),
                            "height": height, "width": width, "license": 1, "coco_url": "",
                            "flickr_url": "", "date_captured": ""})
        _write(os.path.join(manual_dir, "train2014", _coco_filename(image.image_id)),
               encoded[image.image_id])
        for obj, expressions in zip(image.scene.objects, image.expressions):
            ann_id = annotation_id(image, obj.depth)
            x0, y0, x1, y1 = obj.box
            annotations.append({
                "id": ann_id, "image_id": image.image_id, "category_id": categories[obj.shape],
                "segmentation": mask_polygons(obj.mask), "area": float(obj.area),
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "iscrowd": 0})
            if not expressions:
                continue
            sentences = []
            for raw in expressions:
                tokens = re.findall(r"\w+", raw.lower())
                sentences.append({"tokens": tokens, "raw": raw, "sent_id": num_sentences,
                                  "sent": " ".join(tokens)})
                num_sentences += 1
            refs.append({
                "sent_ids": [s["sent_id"] for s in sentences],
                "file_name": f"COCO_train2014_{image.image_id:012d}_{ann_id}.jpg",
                "ann_id": ann_id, "ref_id": len(refs), "image_id": image.image_id,
                "split": image.split, "sentences": sentences,
                "category_id": categories[obj.shape]})
        per_split[image.split] += any(image.expressions)
    instances = {
        "info": {"description": "synthetic grounded scenes (data_pipelines.synthetic)"},
        "images": coco_images, "licenses": [{"id": 1, "name": "generated", "url": ""}],
        "annotations": annotations,
        "categories": [{"supercategory": "shape", "id": index, "name": shape}
                       for shape, index in categories.items()]}
    _write(os.path.join(manual_dir, "refcoco", "instances.json"), _json(instances))
    # Protocol 2, as the refer toolkit's Python 2 pickles: plain data opcodes only.
    _write(os.path.join(manual_dir, "refcoco", "refs(unc).p"), pickle.dumps(refs, protocol=2))
    return per_split


def write_visual_genome(images: Sequence[SyntheticImage], encoded: dict[int, bytes],
                        manual_dir: str) -> dict[str, int]:
    """Visual Genome's ``region_descriptions.json``, ``image_data.json``, DenseCap's
    ``densecap_splits.json`` and the ``VG_100K`` images."""
    descriptions, image_data = [], []
    splits: dict[str, list[int]] = {split: [] for split in SPLITS}
    for image in images:
        height, width = image.scene.image.shape[:2]
        regions = []
        for obj in image.scene.objects:
            x0, y0, x1, y1 = obj.box
            regions.append({"region_id": annotation_id(image, obj.depth), "width": x1 - x0,
                            "height": y1 - y0, "image_id": image.image_id,
                            "phrase": region_phrase(obj), "y": y0, "x": x0})
        descriptions.append({"regions": regions, "id": image.image_id})
        image_data.append({"width": width, "url": "", "height": height,
                           "image_id": image.image_id, "coco_id": None, "flickr_id": None})
        splits[image.split].append(image.image_id)
        _write(os.path.join(manual_dir, "VG_100K", f"{image.image_id}.jpg"),
               encoded[image.image_id])
    _write(os.path.join(manual_dir, "region_descriptions.json"), _json(descriptions))
    _write(os.path.join(manual_dir, "image_data.json"), _json(image_data))
    _write(os.path.join(manual_dir, "densecap_splits.json"), _json(splits))
    return {split: len(ids) for split, ids in splits.items()}
