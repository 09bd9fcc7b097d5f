"""ReasonSeg (LISA's reasoning segmentation data) as a TFDS builder: implicit queries and masks.

Every image of ReasonSeg comes with a LabelMe-style annotation json of the same name, in one
folder per split, and the training images' GPT-written explanations in one more file
(``manual_dir``, the folder LISA calls ``reason_seg/``)::

    ReasonSeg/train/<name>.jpg  ReasonSeg/train/<name>.json
    ReasonSeg/val/...           ReasonSeg/test/...
    ReasonSeg/explanatory/train.json

``<name>.json`` holds ``text`` (a list of query strings: one for val and test, up to five
rephrasings for train), ``is_sentence`` (whether the queries are long sentences rather than
short phrases; LISA's "short" and "long" test subsets are the two values) and ``shapes``
(``[{label, points: [[x, y], ...], shape_type, ...}]``, polygons in pixels). The explanatory
file is a list of ``{image: "<name>.jpg", query, outputs}``; ``outputs`` is a textual answer
explaining why the region answers ``query``.

Example layout (one example per image, key and ``image/id`` its file name without ``.jpg``)::

    image            uint8 [H, W, 3]   RGB, upright (EXIF orientation applied, see below)
    image/id         text              "<name>"
    image/filename   text              "<name>.jpg"
    image/height, image/width   int32
    queries          sequence [Q] of text: the json's ``text``, in order (empty ones left out)
    is_sentence      bool
    mask             uint8 [H, W, 1]   1 target, 255 ignored in evaluation, 0 background
    explanations     sequence [X] of {query: text, outputs: text,
                                      query_index: int32 (index into queries of the query it
                                                          explains, -1 if none is equal)}

The mask is LISA's ``get_mask_from_json``: shapes labelled ``flag`` (case-insensitive) are
left out; every other shape is drawn as OpenCV fills a polygon (its points truncated to
integers; :func:`data_pipelines.opencv_polygons.fill_polygon`, pixel-exact with ``cv2``), with
255 if its label contains ``ignore`` (case-insensitive) and 1 otherwise, in order of decreasing
drawn area, so a smaller shape overwrites a larger one where they overlap; shapes of equal area
are drawn last-first, so the earlier one in the file wins (LISA's ``np.argsort(areas)[::-1]``
with a stable sort). Evaluation leaves the 255 pixels out of intersection and union
(:mod:`pixelllm.evaluators.reason_seg`); training targets are ``mask == 1``.

**Image frame.** LISA reads images with ``cv2.imread``, which applies the EXIF orientation, and
LabelMe drew the polygons on the image as displayed, so unlike COCO-based data the annotations
are in the upright frame: an image with an orientation tag is stored upright (as PNG, lossless);
one without keeps its own bytes. A json's ``imageHeight`` / ``imageWidth`` (LabelMe writes them),
where present, must match the upright image.

Explanations come from ``explanatory/<split>.json`` where it exists (only ``train`` has one);
every entry naming an image is kept, in file order (LISA keeps the last one per image).

Splits: ``train``, ``val``, ``test``, as their folders exist. Bad records go through
:class:`~data_pipelines.skips.SkipCounter` (``skip_policy``; reasons in :data:`SKIP_REASONS`),
named by file: a json that is not valid JSON (UTF-8, or CP-1252 as LISA falls back to), lacks
a field or has a malformed shape; an image without a json or a json without an image; a corrupt
image or one of another size than its json says; queries that are empty (left out; an image
left without any is skipped); an explanation entry that is malformed or names no built image.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines.builders.common import (CORRUPT_IMAGE, SIZE_MISMATCH, SkipPolicyBuilder,
                                            UnusableRecordError, image_fields, is_int)
from data_pipelines.images import ImageError, encode_for_storage, read_upright_photo
from data_pipelines.opencv_polygons import fill_polygon
from data_pipelines.skips import SkipCounter

SPLITS = ("train", "val", "test")
ROOT = "ReasonSeg"
EXPLANATORY_DIR = "explanatory"

TARGET = 1
IGNORE = 255

# Reasons a record is skipped (the SkipCounter categories), with CORRUPT_IMAGE, SIZE_MISMATCH.
BAD_JSON = "malformed annotation json"
BAD_FIELD = "missing or invalid field"
MISSING_IMAGE = "annotation without image"
MISSING_ANNOTATION = "image without annotation"
EMPTY_QUERY = "empty query"
NO_QUERIES = "image without queries"
BAD_EXPLANATION = "malformed explanation"
UNMATCHED_EXPLANATION = "explanation of an image not built"
SKIP_REASONS = (BAD_JSON, BAD_FIELD, MISSING_IMAGE, MISSING_ANNOTATION, CORRUPT_IMAGE,
                SIZE_MISMATCH, EMPTY_QUERY, NO_QUERIES, BAD_EXPLANATION, UNMATCHED_EXPLANATION)

_EXIF_ORIENTATION = 0x0112
_INT32_LIMIT = 2**31


class BadReasonSegRecordError(UnusableRecordError):
    """An annotation that cannot be used; ``reason`` is one of :data:`SKIP_REASONS`."""


def read_annotation(path: str) -> Any:
    """The json at ``path``, decoded as UTF-8 or else CP-1252 (as LISA reads it).

    Raises:
      BadReasonSegRecordError: neither decoding gives valid JSON (:data:`BAD_JSON`).
    """
    with open(path, "rb") as f:
        raw = f.read()
    errors = []
    for encoding in ("utf-8", "cp1252"):
        try:
            return json.loads(raw.decode(encoding))
        except ValueError as error:
            errors.append(f"{encoding}: {error}")
    raise BadReasonSegRecordError(BAD_JSON, "not valid JSON (" + "; ".join(errors) + ")")


def _polygon_vertices(shape: Any, index: int) -> tuple[str, list[tuple[int, int]]]:
    """A shape's label and its points truncated toward zero to integers, as LISA's
    ``np.array([points], dtype=np.int32)`` makes them."""
    label = shape.get("label") if isinstance(shape, Mapping) else None
    points = shape.get("points") if isinstance(shape, Mapping) else None
    if not isinstance(label, str):
        raise BadReasonSegRecordError(BAD_FIELD, f"shapes[{index}]: 'label' is {label!r}, not "
                                      "a string")
    if not (isinstance(points, list) and points and all(
            isinstance(p, list) and len(p) == 2 and all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                and abs(v) < _INT32_LIMIT for v in p) for p in points)):
        raise BadReasonSegRecordError(BAD_FIELD, f"shapes[{index}]: 'points' is not a non-empty "
                                      f"list of [x, y] numbers: {str(points)[:80]}")
    return label, [(int(x), int(y)) for x, y in points]


def reason_seg_mask(shapes: Any, *, height: int, width: int) -> np.ndarray:
    """LISA's ground-truth mask of a ReasonSeg annotation's ``shapes`` (module docstring).

    Returns:
      uint8 ``[height, width]``: :data:`TARGET` (1), :data:`IGNORE` (255) or 0.

    Raises:
      BadReasonSegRecordError: ``shapes`` is not a list of ``{label: str, points: [[x, y],
        ...]}`` (:data:`BAD_FIELD`, naming the shape).
    """
    if not isinstance(shapes, list):
        raise BadReasonSegRecordError(BAD_FIELD, f"'shapes' is {str(shapes)[:40]}, not a list")
    polygons = []
    for index, shape in enumerate(shapes):
        label, vertices = _polygon_vertices(shape, index)
        if label.lower() == "flag":  # LISA: "meaningless deprecated annotations"
            continue
        polygons.append((IGNORE if "ignore" in label.lower() else TARGET, vertices))
    areas = []
    for _, vertices in polygons:
        drawn = np.zeros((height, width), np.uint8)
        fill_polygon(drawn, vertices, 1)
        areas.append(int(drawn.sum()))
    mask = np.zeros((height, width), np.uint8)
    for index in np.argsort(np.array(areas, np.int64), kind="stable")[::-1]:
        value, vertices = polygons[index]
        fill_polygon(mask, vertices, value)
    return mask


def parse_queries(text: Any, *, skips: SkipCounter, file: str, record: str) -> list[str]:
    """The non-empty query strings of a json's ``text``; empty ones are reported and left out.

    Raises:
      BadReasonSegRecordError: ``text`` is not a list of strings.
    """
    if not (isinstance(text, list) and all(isinstance(query, str) for query in text)):
        raise BadReasonSegRecordError(BAD_FIELD, f"'text' is {str(text)[:80]}, not a list of "
                                      "strings")
    queries = []
    for index, query in enumerate(text):
        if query.strip():
            queries.append(query)
        else:
            skips.bad(EMPTY_QUERY, file=file, record=f"{record} text[{index}]",
                      detail=f"query {query!r} is empty")
    return queries


def read_upright_image(path: str) -> tuple[bytes, int, int]:
    """``(encoded, height, width)`` of the image at ``path`` in the frame it is displayed in:
    its own bytes when it has no EXIF rotation, else the upright pixels as PNG.

    Raises:
      ImageError: the file is corrupt or its orientation cannot be read.
    """
    encoded, height, width = encode_for_storage(path, name=path)
    try:
        with Image.open(path) as image:
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageError(f"{path}: cannot read the EXIF orientation: {error}") from error
    if orientation == 1:
        return encoded, height, width
    pixels = read_upright_photo(path, name=path)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue(), pixels.shape[0], pixels.shape[1]


def mask_png(mask: np.ndarray) -> bytes:
    """``[H, W]`` uint8 -> single-channel PNG of the same values (TFDS encodes arrays only
    with TF)."""
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


class ReasonSeg(SkipPolicyBuilder):
    """ReasonSeg, one example per image (see the module docstring).

    Takes :class:`~data_pipelines.builders.common.SkipPolicyBuilder`'s ``skip_policy`` and
    ``splits``, and keeps its ``skip_counts`` per split.
    """

    name = "reason_seg"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(
        name="reason_seg", description="ReasonSeg train/val/test with LISA's masks.")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    The ReasonSeg folders (github.com/dvlab-research/LISA, "Dataset"; the train and val
    folders and explanatory/ are public, test where you have it), as LISA lays them out:

      manual_dir/
        ReasonSeg/train/<name>.jpg  ReasonSeg/train/<name>.json ...
        ReasonSeg/val/...  ReasonSeg/test/...
        ReasonSeg/explanatory/train.json
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self._dataset_info(
            features={
                "queries": tfds.features.Sequence(tfds.features.Text()),
                "is_sentence": tfds.features.Scalar(np.bool_),
                "mask": tfds.features.Image(shape=(None, None, 1)),
                "explanations": tfds.features.Sequence({
                    "query": tfds.features.Text(),
                    "outputs": tfds.features.Text(),
                    "query_index": tfds.features.Scalar(np.int32),
                }),
            },
            homepage="https://github.com/dvlab-research/LISA",
            citation=_CITATION,
        )

    def _example_generators(self, dl_manager: tfds.download.DownloadManager):
        root = os.path.join(os.fspath(dl_manager.manual_dir), ROOT)
        folders = {split: os.path.join(root, split) for split in SPLITS}
        present = [split for split, folder in folders.items() if os.path.isdir(folder)]
        missing = {split: folder for split, folder in folders.items() if split not in present}
        chosen = self._choose_splits(present, missing)
        return {split: self._generate_examples(
                    split, folder=folders[split],
                    explanatory=os.path.join(root, EXPLANATORY_DIR, f"{split}.json"))
                for split in chosen}

    def _generate_examples(self, split: str, *, folder: str,
                           explanatory: str) -> Iterator[tuple[str, dict]]:
        skips = self._skip_counter()
        explanations = _read_explanations(explanatory, skips=skips)
        names = sorted({os.path.splitext(f)[0] for f in os.listdir(folder)
                        if f.endswith((".jpg", ".json"))})
        built = set()
        for name in names:
            example = _example(folder, name, explanations=explanations.get(f"{name}.jpg", []),
                               skips=skips)
            if example is not None:
                built.add(f"{name}.jpg")
                yield name, example
        for image, entries in sorted(explanations.items()):
            if image not in built:
                for index, _ in entries:
                    skips.bad(UNMATCHED_EXPLANATION, file=explanatory, record=f"entry {index}",
                              detail=f"image {image!r} is not among the examples of {folder}")
        self._keep_skip_counts(split, skips)
        self._refuse_empty_split(split, num_examples=len(built), skips=skips,
                                 detail=f"none of the {len(names)} image(s) in {folder} was "
                                 "usable")


def _read_explanations(path: str, *, skips: SkipCounter
                       ) -> dict[str, list[tuple[int, dict[str, str]]]]:
    """Image file name -> ``[(entry index, {query, outputs})]`` of an explanatory json (none if
    it does not exist); malformed entries are reported."""
    if not os.path.exists(path):
        return {}
    try:
        entries = read_annotation(path)
    except BadReasonSegRecordError as error:
        raise ValueError(f"{path}: {error}") from error
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of explanations at the top level")
    by_image: dict[str, list] = {}
    for index, entry in enumerate(entries):
        fields = {key: entry.get(key) if isinstance(entry, Mapping) else None
                  for key in ("image", "query", "outputs")}
        if not all(isinstance(value, str) and value.strip() for value in fields.values()):
            skips.bad(BAD_EXPLANATION, file=path, record=f"entry {index}",
                      detail="expected non-empty strings 'image', 'query' and 'outputs'")
            continue
        # LISA matches by the image's file name alone.
        image = os.path.basename(fields["image"])
        by_image.setdefault(image, []).append(
            (index, {"query": fields["query"], "outputs": fields["outputs"]}))
    return by_image


def _example(folder: str, name: str, *, explanations: Sequence[tuple[int, dict[str, str]]],
             skips: SkipCounter) -> dict | None:
    image_path = os.path.join(folder, f"{name}.jpg")
    json_path = os.path.join(folder, f"{name}.json")
    record = f"image {name}"
    if not os.path.exists(json_path):
        skips.bad(MISSING_ANNOTATION, file=image_path, record=record,
                  detail=f"no {name}.json beside it")
        return None
    if not os.path.exists(image_path):
        skips.bad(MISSING_IMAGE, file=json_path, record=record, detail=f"no {name}.jpg beside it")
        return None
    try:
        annotation = read_annotation(json_path)
        if not isinstance(annotation, Mapping):
            raise BadReasonSegRecordError(BAD_JSON, "the top level is not an object")
        is_sentence = annotation.get("is_sentence")
        if not isinstance(is_sentence, bool):
            raise BadReasonSegRecordError(BAD_FIELD, f"'is_sentence' is {is_sentence!r}, not a "
                                          "boolean")
        queries = parse_queries(annotation.get("text"), skips=skips, file=json_path,
                                record=record)
        if "shapes" not in annotation:
            raise BadReasonSegRecordError(BAD_FIELD, "no 'shapes'")
    except BadReasonSegRecordError as error:
        skips.bad(error.reason, file=json_path, record=record, detail=str(error))
        return None
    if not queries:
        skips.bad(NO_QUERIES, file=json_path, record=record, detail="no non-empty query")
        return None
    try:
        encoded, height, width = read_upright_image(image_path)
    except ImageError as error:
        skips.bad(CORRUPT_IMAGE, file=image_path, record=record, detail=str(error))
        return None
    stated = (annotation.get("imageHeight"), annotation.get("imageWidth"))
    if all(is_int(v) for v in stated) and stated != (height, width):
        skips.bad(SIZE_MISMATCH, file=json_path, record=record,
                  detail=f"imageWidth x imageHeight is {stated[1]}x{stated[0]}, the upright "
                  f"image is {width}x{height}")
        return None
    try:
        mask = reason_seg_mask(annotation["shapes"], height=height, width=width)
    except BadReasonSegRecordError as error:
        skips.bad(error.reason, file=json_path, record=record, detail=str(error))
        return None
    stripped = [query.strip() for query in queries]
    return {
        **image_fields(encoded=encoded, image_id=name, filename=f"{name}.jpg", height=height,
                       width=width),
        "queries": queries,
        "is_sentence": is_sentence,
        "mask": mask_png(mask),
        "explanations": [
            {**entry, "query_index": (stripped.index(entry["query"].strip())
                                      if entry["query"].strip() in stripped else -1)}
            for _, entry in explanations],
    }


_CITATION = """\
@inproceedings{lai2024lisa,
  title     = {LISA: Reasoning Segmentation via Large Language Model},
  author    = {Xin Lai and Zhuotao Tian and Yukang Chen and Yanwei Li and Yuhui Yuan and
               Shu Liu and Jiaya Jia},
  booktitle = {CVPR},
  year      = {2024}
}
"""
