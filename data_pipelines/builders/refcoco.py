"""RefCOCO, RefCOCO+ and RefCOCOg as a TFDS builder: referring expressions with boxes and masks.

Each *ref* names one COCO train2014 object (an annotation with a box and a segmentation) and
holds one or more sentences that single it out in its image. Two input layouts are read, giving
the same examples:

* ``"refer"``, the files of the refer toolkit (github.com/lichengunc/refer), ``manual_dir``::

      refcoco/refs(unc).p  refcoco/refs(google).p  refcoco/instances.json
      refcoco+/refs(unc).p                         refcoco+/instances.json
      refcocog/refs(google).p  refcocog/refs(umd).p  refcocog/instances.json
      train2014/COCO_train2014_000000581857.jpg ...

  ``refs(<split_by>).p`` is a Python 2 pickle of a list of refs ``{ref_id, ann_id, image_id,
  category_id, split, sent_ids, sentences: [{tokens, raw, sent_id, sent}], file_name}``, read
  with :func:`pixelllm.checkpoints.restricted_pickle.load_data_pickle` (data only, never code);
  a ref's own ``file_name`` carries an annotation suffix, so image files are named by
  ``instances.json`` (``COCO_train2014_<12-digit id>.jpg`` where it has no ``file_name``).
* ``"tfds"``, the ``refcoco.json`` that TFDS's ``ref_coco`` has users make with its
  ``manual_download_process.py``: ``{"ref": [ref + {ann, dataset, dataset_partition}],
  "coco_anns": {"<image id>": {"info": image, "anns": [annotation]}}}`` (all data sets in one
  file), with the images in ``coco_train2014/`` beside it.

``input_format="auto"`` (the default) takes the refer files when the config's refs pickle
exists, else ``refcoco.json``.

Example layout (one example per image and split; splits are the refs' own ``split`` values,
``train``, ``val``, ``testA``, ``testB``, ``test`` as present)::

    image            uint8 [H, W, 3]   upright RGB (see data_pipelines.images)
    image/id         text              COCO image id ("581857")
    image/filename   text              file name in the image folder
    image/height, image/width   int32
    objects          sequence [N], one per ref, by ref_id, of
                       {id: int64 (COCO annotation id), ref_id: int64,
                        box: f32 [4] (x0, y0, x1, y1) normalized, clipped to [0, 1],
                        category: int32 (COCO category id),
                        mask: uint8 [H, W, 1], 0 or 255}
    expressions      sequence [E] of {object: int32 (index into objects),
                                      text: the sentence's ``sent``, stripped: the referring
                                            text the pipeline reads,
                                      raw, sent: text, as in the refs,
                                      tokens: text, the refs' ``tokens`` joined by spaces,
                                      id: int64 (sent_id)}

Expressions are stored flat with an ``object`` index (each object's contiguous, in the ref's
order) because TFDS cannot store a sequence nested in a sequence without TensorFlow (hence
``tokens`` joined; ``tokens.split()`` gives the list back, as no token holds a space).

The referring text is ``sent`` (lower-case, tokenized, punctuation dropped), not the annotator's
``raw`` typing: every referring config of the official PixelLLM reads
``refexp_field='sent'``, from records whose ``sent`` is the refer sentence (its
``build_mdetr_ref_tfrecord.py`` and ``build_uninext_ref_tfrecord.py``); ``raw`` and ``tokens``
are kept for other uses.

Masks are the annotation's segmentation rendered as pycocotools' ``COCO.annToMask`` does
(polygons merged, or an RLE, compressed or not) at the image's size, stored as single-channel
PNG with values 0 and 255 (viewable, and ``mask > 0`` is the object). Boxes come from the
annotation's ``bbox`` (x, y, w, h pixels), divided by the image size.

Bad records go through :class:`~data_pipelines.skips.SkipCounter` (``skip_policy``; reasons in
:data:`SKIP_REASONS`): a ref whose annotation or image is missing, whose box has no area (``w``
or ``h`` <= 0, or none left inside the image), or whose segmentation cannot be rendered is left
out; a sentence without a string ``raw`` and ``sent``, a list of ``tokens`` without spaces and an
integer ``sent_id``, or with an empty ``sent``, is left out of its ref, and a ref left without
sentences is left out; an image that is missing, corrupt or not of the size ``instances.json``
gives (boxes and masks would not fit it) is left out with its refs. The summary is printed at
the end of each split and kept in :attr:`ReferCoco.skip_counts`.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from pycocotools import mask as coco_mask

from data_pipelines.builders.common import (CORRUPT_IMAGE, SIZE_MISMATCH, UNASSIGNED,
                                            SkipPolicyBuilder, UnusableRecordError, image_fields,
                                            is_finite_number, is_int, json_list,
                                            read_image_of_size)
from pixelllm.checkpoints.restricted_pickle import load_data_pickle
from data_pipelines.skips import SkipCounter

INPUT_FORMATS = ("auto", "refer", "tfds")

# Reasons a ref or image is skipped (the SkipCounter categories), with those of
# read_image_of_size: CORRUPT_IMAGE, SIZE_MISMATCH.
BAD_FIELD = "missing or invalid field"
MISSING_ANNOTATION = "ref to a missing annotation"
MISSING_IMAGE = "missing image"
DEGENERATE_BOX = "degenerate box"
BAD_SEGMENTATION = "unreadable segmentation"
EMPTY_SENTENCE = "empty sentence"
NO_SENTENCES = "ref without sentences"
SKIP_REASONS = (BAD_FIELD, MISSING_ANNOTATION, MISSING_IMAGE, CORRUPT_IMAGE, SIZE_MISMATCH,
                DEGENERATE_BOX, BAD_SEGMENTATION, EMPTY_SENTENCE, NO_SENTENCES)

_TFDS_JSON = "refcoco.json"
_REFER_IMAGE_DIR = "train2014"
_TFDS_IMAGE_DIR = "coco_train2014"
_SPLIT_NAME = re.compile(r"\w+")

_LOGGER = logging.getLogger(__name__)


class BadReferRecordError(UnusableRecordError):
    """A ref or annotation that cannot be used; ``reason`` is one of :data:`SKIP_REASONS`."""


@dataclasses.dataclass(frozen=True)
class ReferData:
    """One data set and partition's refs with what they point to, from either input format.

    Attributes:
      refs: refs as the refer toolkit stores them (``ref_id``, ``ann_id``, ``image_id``,
        ``split``, ``sentences``, ...).
      annotations: COCO annotation id -> annotation (``image_id``, ``category_id``, ``bbox``,
        ``segmentation``).
      images: COCO image id -> image record (``file_name``, ``height``, ``width``).
      refs_file: the file the refs come from (for messages).
      annotations_file: the file the annotations and image records come from.
      image_dir: the folder of the image files.
    """

    refs: Sequence[Mapping[str, Any]]
    annotations: Mapping[int, Mapping[str, Any]]
    images: Mapping[int, Mapping[str, Any]]
    refs_file: str
    annotations_file: str
    image_dir: str


@dataclasses.dataclass(frozen=True)
class ReferSentence:
    """One sentence of a ref, its text fields as the refs have them."""

    sent_id: int
    raw: str
    sent: str
    tokens: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ReferObject:
    """A usable ref: its object's box and mask, and its non-empty sentences."""

    ann_id: int
    ref_id: int
    box: np.ndarray  # [4] (x0, y0, x1, y1) normalized
    category: int
    mask: np.ndarray  # [H, W] uint8 0/1
    sentences: tuple[ReferSentence, ...]


def read_refer_toolkit(manual_dir: str, *, dataset: str, split_by: str) -> ReferData:
    """The refer toolkit's ``<dataset>/refs(<split_by>).p`` and ``<dataset>/instances.json``.

    Raises:
      FileNotFoundError: a file is missing.
      ValueError: ``instances.json`` lacks ``images`` or ``annotations`` (names the file), or
        the pickle is unsafe or malformed (see :mod:`pixelllm.checkpoints.restricted_pickle`).
    """
    refs_file = os.path.join(manual_dir, dataset, f"refs({split_by}).p")
    annotations_file = os.path.join(manual_dir, dataset, "instances.json")
    refs = load_data_pickle(refs_file)
    if not isinstance(refs, list):
        raise ValueError(f"{refs_file}: expected a list of refs, got {type(refs).__name__}")
    with open(annotations_file, "rb") as f:
        instances = json.load(f)
    annotations = _index_by_id(json_list(instances, annotations_file, key="annotations"),
                               file=annotations_file, what="annotations")
    images = _index_by_id(json_list(instances, annotations_file, key="images"),
                          file=annotations_file, what="images")
    return ReferData(refs=refs, annotations=annotations, images=images, refs_file=refs_file,
                     annotations_file=annotations_file,
                     image_dir=os.path.join(manual_dir, _REFER_IMAGE_DIR))


def read_tfds_json(manual_dir: str, *, dataset: str, split_by: str) -> ReferData:
    """TFDS ``ref_coco``'s ``refcoco.json``, restricted to ``dataset`` / ``split_by``.

    The refs carry their annotation (``ann``); ``coco_anns`` maps the image id (a string, as
    JSON keys are) to ``{info: image record, anns: [annotations]}``.

    Raises:
      FileNotFoundError: the file is missing.
      ValueError: it lacks ``ref`` or ``coco_anns`` (names the file).
    """
    path = os.path.join(manual_dir, _TFDS_JSON)
    with open(path, "rb") as f:
        content = json.load(f)
    all_refs = json_list(content, path, key="ref")
    coco_anns = content.get("coco_anns") if isinstance(content, dict) else None
    if not isinstance(coco_anns, dict):
        raise ValueError(f"{path}: expected an object field 'coco_anns'")
    refs = [ref for ref in all_refs if isinstance(ref, dict) and ref.get("dataset") == dataset
            and ref.get("dataset_partition") == split_by]
    images, annotations = {}, {}
    for key, entry in coco_anns.items():
        info = entry.get("info") if isinstance(entry, dict) else None
        if not isinstance(info, dict) or not is_int(info.get("id")) or str(info["id"]) != key:
            raise ValueError(f"{path}: coco_anns[{key!r}] has no 'info' record with id {key}")
        images[info["id"]] = info
        for annotation in entry.get("anns") or []:
            if isinstance(annotation, dict) and is_int(annotation.get("id")):
                annotations[annotation["id"]] = annotation
    # The annotation each ref carries is the one the refer toolkit gave it (refToAnn).
    for ref in refs:
        annotation = ref.get("ann")
        if isinstance(annotation, dict) and is_int(annotation.get("id")):
            annotations[annotation["id"]] = annotation
    return ReferData(refs=refs, annotations=annotations, images=images, refs_file=path,
                     annotations_file=path,
                     image_dir=os.path.join(manual_dir, _TFDS_IMAGE_DIR))


def render_mask(segmentation: Any, *, height: int, width: int) -> np.ndarray:
    """A COCO segmentation as ``COCO.annToMask`` renders it: uint8 ``[height, width]``, 0/1.

    Args:
      segmentation: a list of polygons (flat ``[x0, y0, x1, y1, ...]`` pixel coordinates,
        merged), an uncompressed RLE (``{"size": [h, w], "counts": [int, ...]}``) or a
        compressed one (``counts`` a string).

    Raises:
      ValueError: an empty list, a polygon of fewer than 3 points (pycocotools would read a
        4-number polygon as a box), an RLE of another size, or anything else.
    """
    if isinstance(segmentation, list):
        if not segmentation:
            raise ValueError("empty list of polygons")
        for polygon in segmentation:
            if (not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2
                    or not all(is_finite_number(v) for v in polygon)):
                raise ValueError(f"a polygon must be a flat list of >= 3 (x, y) points, got "
                                 f"{str(polygon)[:80]}")
        rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list | str):
        size = segmentation.get("size")
        if list(size or ()) != [height, width]:
            raise ValueError(f"RLE of size {size} on an image of size {[height, width]}")
        if isinstance(segmentation["counts"], list):
            rle = coco_mask.frPyObjects(segmentation, height, width)
        else:
            rle = {"size": size, "counts": segmentation["counts"].encode("ascii")}
    else:
        raise ValueError(f"not a polygon list or RLE: {str(segmentation)[:80]}")
    mask = coco_mask.decode(rle)
    return np.ascontiguousarray(mask.reshape(height, width))


def normalized_box(bbox: Any, *, height: int, width: int) -> np.ndarray:
    """COCO ``bbox`` ``(x, y, w, h)`` pixels -> float32 ``(x0, y0, x1, y1)`` normalized, clipped.

    Raises:
      BadReferRecordError: not 4 finite numbers (:data:`BAD_FIELD`); ``w`` or ``h`` <= 0, or
        no area left inside the image (:data:`DEGENERATE_BOX`).
    """
    if not (isinstance(bbox, list | tuple) and len(bbox) == 4
            and all(is_finite_number(v) for v in bbox)):
        raise BadReferRecordError(BAD_FIELD, f"bbox {bbox!r} is not 4 finite numbers")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise BadReferRecordError(DEGENERATE_BOX, f"bbox {bbox!r} has width or height <= 0")
    box = np.clip(np.array([x / width, y / height, (x + w) / width, (y + h) / height]), 0.0, 1.0)
    if box[2] <= box[0] or box[3] <= box[1]:
        raise BadReferRecordError(DEGENERATE_BOX, f"bbox {bbox!r} lies outside the "
                                  f"{width}x{height} image")
    return box.astype(np.float32)


def parse_ref(ref: Any, data: ReferData, skips: SkipCounter) -> ReferObject | None:
    """A ref -> :class:`ReferObject`, or ``None`` (reported to ``skips``) if it is unusable.

    Empty sentences are reported and left out; a ref left without sentences is unusable.
    """
    ref_name = f"ref {ref.get('ref_id')!r}" if isinstance(ref, Mapping) else "ref"
    try:
        ref_id, ann_id, image_id = (_int_field(ref, key) for key in ("ref_id", "ann_id",
                                                                     "image_id"))
        image = data.images.get(image_id)
        if image is None:
            raise BadReferRecordError(MISSING_IMAGE, f"image {image_id} is not in "
                                      f"{data.annotations_file}")
        height, width = _image_size(image)
        annotation = data.annotations.get(ann_id)
        if annotation is None:
            raise BadReferRecordError(MISSING_ANNOTATION, f"annotation {ann_id} is not in "
                                      f"{data.annotations_file}")
        if annotation.get("image_id") != image_id:
            raise BadReferRecordError(MISSING_ANNOTATION, f"annotation {ann_id} belongs to image "
                                      f"{annotation.get('image_id')!r}, not {image_id}")
        box = normalized_box(annotation.get("bbox"), height=height, width=width)
        category = annotation.get("category_id", ref.get("category_id"))
        if not is_int(category):
            raise BadReferRecordError(BAD_FIELD, f"annotation {ann_id}: category_id "
                                      f"{category!r} is not an integer")
        sentences = ref.get("sentences")
        if not isinstance(sentences, list):
            raise BadReferRecordError(BAD_FIELD, "field 'sentences' is not a list")
    except BadReferRecordError as error:
        skips.bad(error.reason, file=data.refs_file, record=ref_name, detail=str(error))
        return None
    kept = []
    for index, sentence in enumerate(sentences):
        entry = sentence if isinstance(sentence, Mapping) else {}
        raw, sent, tokens, sent_id = (entry.get(key) for key in ("raw", "sent", "tokens",
                                                                  "sent_id"))
        record = f"{ref_name} sentence {sent_id if is_int(sent_id) else index}"
        if not (isinstance(raw, str) and isinstance(sent, str) and is_int(sent_id)
                and isinstance(tokens, list)
                and all(isinstance(t, str) and t and not any(c.isspace() for c in t)
                        for t in tokens)):
            skips.bad(BAD_FIELD, file=data.refs_file, record=record,
                      detail="expected strings 'raw' and 'sent', a list of 'tokens' without "
                      "spaces and an integer 'sent_id'")
        elif not sent.strip():
            skips.bad(EMPTY_SENTENCE, file=data.refs_file, record=record,
                      detail=f"sentence {sent!r} (raw {raw!r}) is empty")
        else:
            kept.append(ReferSentence(sent_id=sent_id, raw=raw, sent=sent, tokens=tuple(tokens)))
    if not kept:
        skips.bad(NO_SENTENCES, file=data.refs_file, record=ref_name,
                  detail=f"none of its {len(sentences)} sentence(s) is usable")
        return None
    try:
        mask = render_mask(annotation.get("segmentation"), height=height, width=width)
    except (ValueError, TypeError) as error:
        skips.bad(BAD_SEGMENTATION, file=data.annotations_file,
                  record=f"{ref_name} annotation {ann_id}", detail=str(error))
        return None
    return ReferObject(ann_id=ann_id, ref_id=ref_id, box=box, category=int(category), mask=mask,
                       sentences=tuple(kept))


def image_filename(image: Mapping[str, Any], image_id: int) -> str:
    """The image's file name: its record's ``file_name``, else COCO train2014's pattern."""
    name = image.get("file_name")
    return name if isinstance(name, str) and name else f"COCO_train2014_{image_id:012d}.jpg"


@dataclasses.dataclass(eq=False)
class ReferCocoConfig(tfds.core.BuilderConfig):
    """A data set (``refcoco``, ``refcoco+``, ``refcocog``) and its split partition."""

    dataset: str = ""
    split_by: str = ""


def _config(dataset: str, split_by: str, description: str) -> ReferCocoConfig:
    return ReferCocoConfig(name=f"{dataset.replace('+', 'plus')}_{split_by}", dataset=dataset,
                           split_by=split_by, description=description)


class ReferCoco(SkipPolicyBuilder):
    """RefCOCO/+/g, one example per image and split (see the module docstring).

    Takes :class:`~data_pipelines.builders.common.SkipPolicyBuilder`'s ``skip_policy`` and
    keeps its ``skip_counts`` per split; refs without a valid ``split`` are counted under
    :data:`~data_pipelines.builders.common.UNASSIGNED`.

    Args:
      input_format: ``"refer"`` (refer toolkit files), ``"tfds"`` (``refcoco.json``) or
        ``"auto"`` (refer files when present, else ``refcoco.json``).
      **kwargs: passed to ``SkipPolicyBuilder`` (``skip_policy``, ``data_dir``, ``config``, ...).
    """

    name = "refer_coco"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "Expressions keep raw, sent and tokens; the referring text is sent, as the "
                 "official PixelLLM configs read it.",
    }
    BUILDER_CONFIGS = [
        _config("refcoco", "unc", "RefCOCO, UNC partition (train, val, testA, testB)."),
        _config("refcoco", "google", "RefCOCO, Google partition (train, val, test)."),
        _config("refcoco+", "unc", "RefCOCO+, UNC partition (train, val, testA, testB)."),
        _config("refcocog", "google", "RefCOCOg, Google partition (train, val)."),
        _config("refcocog", "umd", "RefCOCOg, UMD partition (train, val, test)."),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Either the refer toolkit's files (https://github.com/lichengunc/refer, data/README.md) with
    the COCO train2014 images:

      manual_dir/
        refcoco/refs(unc).p  refcoco/refs(google).p  refcoco/instances.json
        refcoco+/refs(unc).p  refcoco+/instances.json
        refcocog/refs(google).p  refcocog/refs(umd).p  refcocog/instances.json
        train2014/COCO_train2014_000000000009.jpg ...

    or TFDS ref_coco's refcoco.json (made by its manual_download_process.py) with the images:

      manual_dir/
        refcoco.json
        coco_train2014/COCO_train2014_000000000009.jpg ...

    Symbolic links to existing COCO folders work.
    """

    def __init__(self, *, input_format: str = "auto", **kwargs):
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"unknown input_format {input_format!r}; expected one of "
                             f"{INPUT_FORMATS}")
        self.input_format = input_format
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self._dataset_info(
            features={
                "objects": tfds.features.Sequence({
                    "id": tfds.features.Scalar(np.int64),
                    "ref_id": tfds.features.Scalar(np.int64),
                    "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                    "category": tfds.features.Scalar(np.int32),
                    "mask": tfds.features.Image(shape=(None, None, 1)),
                }),
                "expressions": tfds.features.Sequence({
                    "object": tfds.features.Scalar(np.int32),
                    "text": tfds.features.Text(),
                    "raw": tfds.features.Text(),
                    "sent": tfds.features.Text(),
                    "tokens": tfds.features.Text(),
                    "id": tfds.features.Scalar(np.int64),
                }),
            },
            homepage="https://github.com/lichengunc/refer",
            citation=_CITATION,
        )

    def _example_generators(self, dl_manager: tfds.download.DownloadManager):
        data = self._read(os.fspath(dl_manager.manual_dir))
        refs_by_split: dict[str, list] = collections.defaultdict(list)
        unassigned = self._skip_counter()
        for index, ref in enumerate(data.refs):
            split = ref.get("split") if isinstance(ref, Mapping) else None
            if isinstance(split, str) and _SPLIT_NAME.fullmatch(split):
                refs_by_split[split].append(ref)
            else:
                record = (f"ref {ref.get('ref_id')!r}" if isinstance(ref, Mapping)
                          else f"item {index}")
                unassigned.bad(BAD_FIELD, file=data.refs_file, record=record,
                               detail=f"field 'split' is {split!r}, not a split name")
        if unassigned.total:
            self._keep_skip_counts(UNASSIGNED, unassigned)
        if not refs_by_split:
            raise ValueError(f"{data.refs_file}: no ref of {self.builder_config.dataset} "
                             f"({self.builder_config.split_by}) has a split")
        return {split: self._generate_examples(split=split, refs=refs, data=data)
                for split, refs in sorted(refs_by_split.items())}

    def _read(self, manual_dir: str) -> ReferData:
        config = self.builder_config
        refer_refs = os.path.join(manual_dir, config.dataset, f"refs({config.split_by}).p")
        input_format = self.input_format
        if input_format == "auto":
            if os.path.exists(refer_refs):
                input_format = "refer"
            elif os.path.exists(os.path.join(manual_dir, _TFDS_JSON)):
                input_format = "tfds"
            else:
                raise FileNotFoundError(
                    f"{manual_dir}: found neither {refer_refs} nor "
                    f"{os.path.join(manual_dir, _TFDS_JSON)}.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        read = read_refer_toolkit if input_format == "refer" else read_tfds_json
        _LOGGER.info("refer_coco/%s: reading the %s input format", config.name, input_format)
        return read(manual_dir, dataset=config.dataset, split_by=config.split_by)

    def _generate_examples(self, *, split: str, refs: Sequence[Mapping[str, Any]],
                           data: ReferData) -> Iterator[tuple[str, dict]]:
        skips = self._skip_counter()
        refs_by_image: dict[Any, list] = collections.defaultdict(list)
        for ref in refs:
            refs_by_image[ref.get("image_id")].append(ref)
        num_examples = 0
        for image_id in sorted(refs_by_image, key=str):
            example = self._example(image_id, refs_by_image[image_id], data=data, skips=skips)
            if example is not None:
                num_examples += 1
                yield str(image_id), example
        self._keep_skip_counts(split, skips)
        self._refuse_empty_split(
            split, num_examples=num_examples, skips=skips,
            detail=f"all {len(refs_by_image)} image(s) of its {len(refs)} ref(s) were skipped "
            f"(images in {data.image_dir}?)")

    def _example(self, image_id: Any, refs: list, *, data: ReferData,
                 skips: SkipCounter) -> dict | None:
        objects = [obj for obj in (parse_ref(ref, data, skips) for ref in refs)
                   if obj is not None]
        if not objects:
            return None
        objects.sort(key=lambda obj: obj.ref_id)
        image = data.images[image_id]
        filename = image_filename(image, image_id)
        path = os.path.join(data.image_dir, filename)
        record = f"image {image_id} ({len(objects)} ref(s))"
        if not os.path.exists(path):
            skips.bad(MISSING_IMAGE, file=path, record=record, detail="image file not found")
            return None
        height, width = _image_size(image)
        encoded = read_image_of_size(path, size=(height, width), size_file=data.annotations_file,
                                     record=record, skips=skips)
        if encoded is None:
            return None
        return {
            **image_fields(encoded=encoded, image_id=str(image_id), filename=filename,
                           height=height, width=width),
            "objects": [{"id": obj.ann_id, "ref_id": obj.ref_id, "box": obj.box,
                         "category": obj.category, "mask": mask_png(obj.mask)}
                        for obj in objects],
            "expressions": [{"object": index, "text": sentence.sent.strip(),
                             "raw": sentence.raw, "sent": sentence.sent,
                             "tokens": " ".join(sentence.tokens), "id": sentence.sent_id}
                            for index, obj in enumerate(objects)
                            for sentence in obj.sentences],
        }


def mask_png(mask: np.ndarray) -> bytes:
    """``[H, W]`` 0/1 -> single-channel PNG of 0/255 (TFDS encodes arrays only with TF)."""
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _int_field(record: Any, key: str) -> int:
    value = record.get(key) if isinstance(record, Mapping) else None
    if not is_int(value):
        raise BadReferRecordError(BAD_FIELD, f"field {key!r} is {value!r}, not an integer")
    return value


def _image_size(image: Mapping[str, Any]) -> tuple[int, int]:
    height, width = image.get("height"), image.get("width")
    if not (is_int(height) and is_int(width) and height > 0 and width > 0):
        raise BadReferRecordError(BAD_FIELD, f"image {image.get('id')!r}: height {height!r}, "
                                  f"width {width!r} are not positive integers")
    return height, width


def _index_by_id(records: list, *, file: str, what: str) -> dict[int, Mapping[str, Any]]:
    index = {}
    for position, record in enumerate(records):
        if not isinstance(record, dict) or not is_int(record.get("id")):
            raise ValueError(f"{file}: {what}[{position}] has no integer 'id'")
        index[record["id"]] = record
    return index


_CITATION = """\
@inproceedings{kazemzadeh2014referitgame,
  title     = {ReferItGame: Referring to Objects in Photographs of Natural Scenes},
  author    = {Sahar Kazemzadeh and Vicente Ordonez and Mark Matten and Tamara L. Berg},
  booktitle = {EMNLP},
  year      = {2014}
}
@inproceedings{yu2016modeling,
  title     = {Modeling Context in Referring Expressions},
  author    = {Licheng Yu and Patrick Poirson and Shan Yang and Hao Yan and Tamara L. Berg},
  booktitle = {ECCV},
  year      = {2016}
}
@inproceedings{mao2016generation,
  title     = {Generation and Comprehension of Unambiguous Object Descriptions},
  author    = {Junhua Mao and Jonathan Huang and Alexander Toshev and Oana Camburu and
               Alan L. Yuille and Kevin Murphy},
  booktitle = {CVPR},
  year      = {2016}
}
"""
