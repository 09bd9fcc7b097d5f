"""The official PixelLLM referring training data as a TFDS builder: Flickr30k, mixed COCO and VG
referring expressions (localization), and MDETR's image-safe RefCOCO merge (segmentation).

The official referring stages do not read the refer toolkit: ``pixel_llm_t5_ref.py`` (and the
multi-task ``pixel_llm_t5_trace_ref_densecap_llava.py``) mix ``uni_flickr`` (weight 1),
``uni_mixed_coco`` (5) and ``uni_mixed_vg`` (1), made by its ``build_uninext_ref_tfrecord.py``;
``pixel_llm_t5_refseg.py`` (and ``..._trace_refseg_densecap_llava.py``) train on
``merge_coco_img_safe`` alone, with masks, made by its ``build_mdetr_ref_tfrecord.py``. Each is
a config of this builder, reading the public files those scripts read, ``manual_dir``::

    flickr30k/instances.json          uni_flickr       images flickr30k-images/<image_id>.jpg
    mixed/instances.json              uni_mixed_coco   images train2014/COCO_train2014_<id:012d>.jpg
                                      uni_mixed_vg     images VG_100K/<id>.jpg, VG_100K_2/<id>.jpg
                                                       or gqa/images/<id>.jpg (first found)
    merge_coco_img_safe_train.json    merge_coco_img_safe
                                                       images train2014/<file_name>, or
                                                       val2014/<file_name> for COCO_val2014_*

* **SeqTR layout** (``instances.json``: the annotations SeqTR publishes and UNINEXT's data
  guide links, ``<dataset>/instances.json``): a JSON object ``{split: [record, ...]}``, one
  record per referred object, ``{image_id: int, height: int, width: int, bbox: [x, y, w, h]
  pixels, expressions: [str, ...], mask?: segmentation, category_id?: int, data_source?:
  "coco" | "vg" | "flickr"}``; several records may name one image. Every key is a split (the
  official reads ``train``: 29,778 Flickr images; mixed: 28,158 COCO and 106,635 VG images).
  ``mixed/instances.json`` holds COCO and VG records, told apart by ``data_source``; a mixed
  record without it is counted as a bad field (the official script would put it in both).
  Masks are not stored for these configs (the official localization stages do not read them).
* **MDETR layout** (``merge_coco_img_safe_<split>.json``, MDETR's RefCOCO conversion with
  masks, COCO style): ``images`` holds one entry per *expression* ``{id, file_name, height,
  width, caption, original_id | original_img_id (the COCO image id), raw?, refexp_id?,
  dataset_name, tokens_negative}`` and ``annotations`` its boxes ``{id, image_id (the entry's
  id), bbox [x, y, w, h], segmentation (polygons or RLE), area, iscrowd, category_id,
  tokens_positive, original_id? (the COCO annotation id)}``. As the official conversion does,
  entries are grouped by the COCO image id and annotations by the COCO annotation id
  (``original_id``, else ``id``), so an object referred to by several expressions is one
  object with all of them; an expression's text is the entry's ``caption`` (``sent``;
  ``raw`` if given, else the caption), its id ``refexp_id`` if given, else the annotation's
  ``id``. Crowd annotations are kept, as the official keeps them. *Image-safe*: MDETR merged
  the RefCOCO, RefCOCO+ and RefCOCOg train sets without any COCO image that is in a val or test
  split of any of them (RefCOCOg's umd train split shares images with RefCOCO's val/test), so
  training on it leaves every RefCOCO/+/g evaluation image unseen (24,407 images).

Example layout, the RefCOCO builder's (:mod:`data_pipelines.builders.refcoco`), so the same
ops read both (one example per image and split)::

    image            uint8 [H, W, 3]   stored frame (see data_pipelines.images)
    image/id         text              the image id (COCO, VG or Flickr30k)
    image/filename   text              the image's path under manual_dir
    image/height, image/width   int32
    objects          sequence [N] (SeqTR: in file order; MDETR: by COCO annotation id) of
                       {id: int64 (SeqTR: the record's position among the config's records of
                                   the split; MDETR: the COCO annotation id),
                        ref_id: int64 (the same),
                        box: f32 [4] (x0, y0, x1, y1) normalized, clipped to [0, 1],
                        category: int32 (category_id; 1, "object", where absent),
                        mask: uint8 [H, W, 1], 0 or 255 (merge_coco_img_safe only)}
    expressions      sequence [E] of {object: int32 (index into objects),
                                      text: the expression, stripped (what the pipeline reads),
                                      raw, sent: text, as in the file,
                                      tokens: the expression's words joined by single spaces,
                                      id: int64}

Bad records go through :class:`~data_pipelines.skips.SkipCounter` (``skip_policy``; reasons in
:data:`SKIP_REASONS`): a record or annotation with a missing or mistyped field, a box without
area, a segmentation that cannot be rendered, an empty expression (left out of its object), an
object left without expressions, an MDETR expression without any box annotation, an annotation
of an entry the json does not list, an image listed with two sizes, and an image that is
missing, corrupt or not of the size the json gives are named (file and record) and counted. The
summary is printed at the end of each split and kept in :attr:`ReferringMixture.skip_counts`.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.builders.common import (CORRUPT_IMAGE, SIZE_MISMATCH, SkipPolicyBuilder,
                                            UnusableRecordError, image_fields, is_int,
                                            json_list, load_json, read_image_of_size)
from data_pipelines.builders.refcoco import (BAD_FIELD, BAD_SEGMENTATION, DEGENERATE_BOX,
                                             EMPTY_SENTENCE, mask_png, normalized_box,
                                             render_mask)
from data_pipelines.skips import SkipCounter

# Reasons a record, expression or image is skipped (the SkipCounter categories), with those of
# refcoco (BAD_FIELD, DEGENERATE_BOX, BAD_SEGMENTATION, EMPTY_SENTENCE) and of
# read_image_of_size (CORRUPT_IMAGE, SIZE_MISMATCH).
NO_EXPRESSIONS = "object without expressions"
NO_BOX = "expression without a box annotation"
UNLISTED_ENTRY = "annotation of an entry not in the json"
MISSING_IMAGE = "missing image"
SKIP_REASONS = (BAD_FIELD, DEGENERATE_BOX, BAD_SEGMENTATION, EMPTY_SENTENCE, NO_EXPRESSIONS,
                NO_BOX, UNLISTED_ENTRY, MISSING_IMAGE, CORRUPT_IMAGE, SIZE_MISMATCH)

# The category of records without one, as the official conversion assigns ("object").
DEFAULT_CATEGORY = 1
_SPLIT_NAME = re.compile(r"\w+")


@dataclasses.dataclass(frozen=True)
class Expression:
    """One referring expression of an object, its text fields as the file has them."""

    expression_id: int
    raw: str
    sent: str


@dataclasses.dataclass
class ReferredObject:
    """An object of an image with its box, its segmentation (as in the file) and expressions.

    Attributes:
      object_id: the object's id (module docstring).
      box: float32 ``[4]`` ``(x0, y0, x1, y1)`` normalized.
      category: the category id.
      segmentation: the file's segmentation, rendered only for configs with masks.
      expressions: the object's usable expressions, in file order.
      record: how messages name it.
    """

    object_id: int
    box: np.ndarray
    category: int
    segmentation: Any
    expressions: list[Expression]
    record: str


@dataclasses.dataclass
class ReferredImage:
    """An image of a split with its objects, before its file is read.

    Attributes:
      image_id: the image id of the source (COCO, VG or Flickr30k).
      candidates: paths relative to ``manual_dir`` where the image may be, tried in order.
      size: ``(height, width)`` the json gives.
      objects: the image's objects, in file order.
    """

    image_id: int
    candidates: tuple[str, ...]
    size: tuple[int, int]
    objects: list[ReferredObject]


@dataclasses.dataclass(eq=False)
class ReferringMixtureConfig(tfds.core.BuilderConfig):
    """One source of the official referring mixtures.

    Attributes:
      layout: ``"seqtr"`` (one ``instances.json`` keyed by split) or ``"mdetr"`` (one COCO-style
        json per split).
      annotations: the annotation file under ``manual_dir``; for ``"mdetr"`` a pattern with
        ``{split}``.
      splits: the splits of an ``"mdetr"`` config (a ``"seqtr"`` file names its own).
      data_source: the ``data_source`` value of the config's records in a file mixing sources,
        or ``""`` for a file of one source.
      image_dirs: folders under ``manual_dir`` holding ``<image_id>.jpg`` (tried in order), or
        ``()`` for COCO train2014 file names (``"seqtr"``) or the entries' ``file_name``
        (``"mdetr"``).
      masks: whether objects carry their rendered segmentation.
    """

    layout: str = ""
    annotations: str = ""
    splits: tuple[str, ...] = ()
    data_source: str = ""
    image_dirs: tuple[str, ...] = ()
    masks: bool = False


@dataclasses.dataclass(frozen=True)
class SeqtrRecord:
    """A record of a SeqTR split that belongs to the config.

    Attributes:
      record: the record as the file has it.
      position: its index in the file's split list (for messages).
      object_id: its index among the config's records of the split (the official object id).
      first_expression_id: the id of its first expression; ids number every expression of the
        config's records in file order, so they do not change with what is skipped.
    """

    record: Any
    position: int
    object_id: int
    first_expression_id: int


def read_seqtr(path: str, *, data_source: str) -> dict[str, list[SeqtrRecord]]:
    """A SeqTR ``instances.json``: split -> the records of ``data_source`` (all records if it
    is ``""``).

    Records that cannot be placed (not an object, no ``data_source`` in a file mixing sources)
    are kept, to be reported where they are parsed.

    Raises:
      ValueError: the file is not JSON or not an object of lists (names the file and key).
    """
    content = load_json(path)
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected an object mapping split names to record lists")
    splits = {}
    for split, records in content.items():
        if not (_SPLIT_NAME.fullmatch(split) and isinstance(records, list)):
            raise ValueError(f"{path}: key {split!r} is not a split name with a list of records")
        chosen, num_expressions = [], 0
        for position, record in enumerate(records):
            if (data_source and isinstance(record, Mapping)
                    and record.get("data_source", data_source) != data_source):
                continue
            chosen.append(SeqtrRecord(record=record, position=position, object_id=len(chosen),
                                      first_expression_id=num_expressions))
            expressions = record.get("expressions") if isinstance(record, Mapping) else None
            num_expressions += len(expressions) if isinstance(expressions, list) else 0
        splits[split] = chosen
    return splits


def seqtr_images(records: Sequence[SeqtrRecord], *, split: str, path: str,
                 config: ReferringMixtureConfig, skips: SkipCounter) -> list[ReferredImage]:
    """The images of a SeqTR split's records, each with its objects (record order); bad records
    are reported to ``skips``."""
    images: dict[int, ReferredImage] = {}
    for entry in records:
        record = entry.record
        name = f"{split}[{entry.position}]"
        try:
            if not isinstance(record, Mapping):
                raise UnusableRecordError(BAD_FIELD, "not an object")
            if config.data_source and "data_source" not in record:
                raise UnusableRecordError(BAD_FIELD, f"no 'data_source' in a file mixing "
                                          f"sources (this config reads {config.data_source!r})")
            image_id = _int_field(record, "image_id")
            name = f"{split}[{entry.position}] (image {image_id})"
            size = _size(record)
            box = normalized_box(record.get("bbox"), height=size[0], width=size[1])
            category = _category(record)
            expressions = record.get("expressions")
            if not isinstance(expressions, list):
                raise UnusableRecordError(BAD_FIELD, "field 'expressions' is not a list")
        except UnusableRecordError as error:
            skips.bad(error.reason, file=path, record=name, detail=str(error))
            continue
        kept = []
        for index, text in enumerate(expressions):
            where = f"{name} expression {index}"
            if not isinstance(text, str):
                skips.bad(BAD_FIELD, file=path, record=where,
                          detail=f"expression {text!r} is not a string")
            elif not text.strip():
                skips.bad(EMPTY_SENTENCE, file=path, record=where,
                          detail=f"expression {text!r} is empty")
            else:
                kept.append(Expression(expression_id=entry.first_expression_id + index,
                                       raw=text, sent=text))
        if not kept:
            skips.bad(NO_EXPRESSIONS, file=path, record=name,
                      detail=f"none of its {len(expressions)} expression(s) is usable")
            continue
        image = images.get(image_id)
        if image is None:
            image = images[image_id] = ReferredImage(
                image_id=image_id, candidates=_image_candidates(image_id, config), size=size,
                objects=[])
        elif image.size != size:
            skips.bad(BAD_FIELD, file=path, record=name,
                      detail=f"image {image_id} is {size[1]}x{size[0]} here, "
                      f"{image.size[1]}x{image.size[0]} in an earlier record")
            continue
        image.objects.append(ReferredObject(
            object_id=entry.object_id, box=box, category=category,
            segmentation=record.get("mask"),
            expressions=kept, record=name))
    return list(images.values())


def mdetr_images(path: str, *, skips: SkipCounter) -> list[ReferredImage]:
    """The images of an MDETR-layout json, expression entries grouped by COCO image and
    annotations by COCO annotation (module docstring); bad records are reported to ``skips``.

    Raises:
      ValueError: the file is not JSON or lacks the ``images`` / ``annotations`` lists.
    """
    content = load_json(path)
    entries = json_list(content, path, key="images")
    annotations_by_entry: dict[int, list[Mapping]] = collections.defaultdict(list)
    listed = {entry.get("id") for entry in entries if isinstance(entry, Mapping)}
    for position, annotation in enumerate(json_list(content, path, key="annotations")):
        entry_id = annotation.get("image_id") if isinstance(annotation, Mapping) else None
        if not (is_int(entry_id) and is_int(annotation.get("id"))):
            skips.bad(BAD_FIELD, file=path, record=f"annotations[{position}]",
                      detail="expected integer 'id' and 'image_id'")
        elif entry_id not in listed:
            skips.bad(UNLISTED_ENTRY, file=path, record=f"annotation {annotation['id']}",
                      detail=f"its image_id {entry_id} is not in 'images'")
        else:
            annotations_by_entry[entry_id].append(annotation)
    images: dict[int, ReferredImage] = {}
    objects: dict[tuple[int, int], ReferredObject] = {}
    for position, entry in enumerate(entries):
        name = f"images[{position}]"
        try:
            if not isinstance(entry, Mapping):
                raise UnusableRecordError(BAD_FIELD, "not an object")
            entry_id = _int_field(entry, "id")
            name = f"expression entry {entry_id}"
            original = entry.get("original_img_id", entry.get("original_id"))
            image_id = int(original) if is_int(original) or (
                isinstance(original, str) and original.isdigit()) else None
            if image_id is None:
                raise UnusableRecordError(BAD_FIELD, f"'original_id' / 'original_img_id' "
                                          f"{original!r} is not an image id")
            size = _size(entry)
            filename, caption = entry.get("file_name"), entry.get("caption")
            raw = entry.get("raw", caption)
            if not (isinstance(filename, str) and filename and isinstance(caption, str)
                    and isinstance(raw, str)):
                raise UnusableRecordError(BAD_FIELD, "expected strings 'file_name' and "
                                          "'caption' (and 'raw' where given)")
            if not caption.strip():
                raise UnusableRecordError(EMPTY_SENTENCE, f"caption {caption!r} is empty")
            if not annotations_by_entry.get(entry_id):
                raise UnusableRecordError(NO_BOX, "no annotation has this image_id")
            image = images.get(image_id)
            if image is not None and image.size != size:
                raise UnusableRecordError(BAD_FIELD, f"COCO image {image_id} is "
                                          f"{size[1]}x{size[0]} here, {image.size[1]}x"
                                          f"{image.size[0]} in an earlier entry")
        except UnusableRecordError as error:
            skips.bad(error.reason, file=path, record=name, detail=str(error))
            continue
        if image is None:
            folder = "val2014" if "COCO_val2014" in filename else "train2014"
            image = images[image_id] = ReferredImage(
                image_id=image_id, candidates=(os.path.join(folder, filename),), size=size,
                objects=[])
        for annotation in annotations_by_entry[entry_id]:
            original_ann = annotation.get("original_id", annotation["id"])
            where = f"{name} annotation {annotation['id']}"
            try:
                if not is_int(original_ann):
                    raise UnusableRecordError(BAD_FIELD, f"'original_id' {original_ann!r} is "
                                              "not an integer")
                expression_id = entry.get("refexp_id", annotation["id"])
                if not is_int(expression_id):
                    raise UnusableRecordError(BAD_FIELD, f"'refexp_id' {expression_id!r} is "
                                              "not an integer")
                known = objects.get((image_id, original_ann))
                if known is None:
                    known = objects[(image_id, original_ann)] = ReferredObject(
                        object_id=original_ann,
                        box=normalized_box(annotation.get("bbox"), height=size[0],
                                           width=size[1]),
                        category=_category(annotation),
                        segmentation=annotation.get("segmentation"), expressions=[],
                        record=where)
                    image.objects.append(known)
            except UnusableRecordError as error:
                skips.bad(error.reason, file=path, record=where, detail=str(error))
                continue
            known.expressions.append(Expression(expression_id=expression_id, raw=raw,
                                                sent=caption))
    for image in images.values():
        image.objects.sort(key=lambda obj: obj.object_id)
    return list(images.values())


def _config(name: str, description: str, **fields) -> ReferringMixtureConfig:
    return ReferringMixtureConfig(name=name, description=description, **fields)


class ReferringMixture(SkipPolicyBuilder):
    """The official referring training sources, one example per image and split (module
    docstring).

    Takes :class:`~data_pipelines.builders.common.SkipPolicyBuilder`'s ``skip_policy`` and
    ``splits`` and keeps its ``skip_counts`` per split.
    """

    name = "referring_mixture"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        _config("uni_flickr", "Flickr30k referring phrases (SeqTR's flickr30k/instances.json).",
                layout="seqtr", annotations="flickr30k/instances.json",
                image_dirs=("flickr30k-images",)),
        _config("uni_mixed_coco", "RefCOCO/+/g referring expressions of SeqTR's mixed set "
                "(mixed/instances.json, data_source 'coco').", layout="seqtr",
                annotations="mixed/instances.json", data_source="coco"),
        _config("uni_mixed_vg", "Visual Genome referring expressions of SeqTR's mixed set "
                "(mixed/instances.json, data_source 'vg').", layout="seqtr",
                annotations="mixed/instances.json", data_source="vg",
                image_dirs=("VG_100K", "VG_100K_2", "gqa/images")),
        _config("merge_coco_img_safe", "MDETR's merge of RefCOCO/+/g train without their "
                "val/test images, with masks (merge_coco_img_safe_train.json).",
                layout="mdetr", annotations="merge_coco_img_safe_{split}.json",
                splits=("train",), masks=True),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    SeqTR's annotations (github.com/sean-zhuh/SeqTR, linked from UNINEXT's assets/DATA.md) and
    the MDETR-layout RefCOCO merge with masks, with the images they name:

      manual_dir/
        flickr30k/instances.json             (uni_flickr)
        mixed/instances.json                 (uni_mixed_coco, uni_mixed_vg)
        merge_coco_img_safe_train.json       (merge_coco_img_safe)
        flickr30k-images/1000092795.jpg ...  (Flickr30k)
        train2014/COCO_train2014_000000000009.jpg ...  val2014/ (COCO 2014)
        VG_100K/1.jpg ...  VG_100K_2/ ...    (Visual Genome; or gqa/images/, MDETR's GQA folder)

    Symbolic links to existing folders work.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        objects = {
            "id": tfds.features.Scalar(np.int64),
            "ref_id": tfds.features.Scalar(np.int64),
            "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
            "category": tfds.features.Scalar(np.int32),
        }
        if self.builder_config.masks:
            objects["mask"] = tfds.features.Image(shape=(None, None, 1))
        return self._dataset_info(
            features={
                "objects": tfds.features.Sequence(objects),
                "expressions": tfds.features.Sequence({
                    "object": tfds.features.Scalar(np.int32),
                    "text": tfds.features.Text(),
                    "raw": tfds.features.Text(),
                    "sent": tfds.features.Text(),
                    "tokens": tfds.features.Text(),
                    "id": tfds.features.Scalar(np.int64),
                }),
            },
            homepage="https://github.com/google-research/scenic/tree/main/scenic/projects/"
                     "pixel_llm",
            citation=_CITATION,
        )

    def _example_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        config = self.builder_config
        if config.layout == "seqtr":
            path = os.path.join(manual_dir, config.annotations)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{self._full_name}: {path} is missing\n"
                                        f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
            return {split: self._generate_examples(
                        split=split, manual_dir=manual_dir, path=path,
                        read=lambda skips, split=split, records=records: seqtr_images(
                            records, split=split, path=path, config=config, skips=skips))
                    for split, records in read_seqtr(
                        path, data_source=config.data_source).items()}
        paths = {split: os.path.join(manual_dir, config.annotations.format(split=split))
                 for split in config.splits}
        present = [split for split, path in paths.items() if os.path.exists(path)]
        chosen = self._choose_splits(present, {split: path for split, path in paths.items()
                                               if split not in present})
        return {split: self._generate_examples(
                    split=split, manual_dir=manual_dir, path=paths[split],
                    read=lambda skips, path=paths[split]: mdetr_images(path, skips=skips))
                for split in chosen}

    def _generate_examples(self, *, split: str, manual_dir: str, path: str,
                           read: Callable[[SkipCounter], list[ReferredImage]]
                           ) -> Iterator[tuple[str, dict]]:
        """Examples of the images ``read(skips)`` gives, reporting to the split's counter (the
        records are parsed here, so that their bad ones count in their split)."""
        skips = self._skip_counter()
        referred = read(skips)
        num_examples = 0
        for image in sorted(referred, key=lambda image: image.image_id):
            example = self._example(image, manual_dir=manual_dir, path=path, skips=skips)
            if example is not None:
                num_examples += 1
                yield str(image.image_id), example
        self._keep_skip_counts(split, skips)
        self._refuse_empty_split(
            split, num_examples=num_examples, skips=skips,
            detail=(f"all {len(referred)} image(s) were skipped (images in {manual_dir}?)"
                    if referred else f"{path} has no usable record for it"))

    def _example(self, image: ReferredImage, *, manual_dir: str, path: str,
                 skips: SkipCounter) -> dict | None:
        height, width = image.size
        masks = []
        objects = []
        for obj in image.objects:
            if self.builder_config.masks:
                try:
                    masks.append(render_mask(obj.segmentation, height=height, width=width))
                except (ValueError, TypeError) as error:
                    skips.bad(BAD_SEGMENTATION, file=path, record=obj.record, detail=str(error))
                    continue
            objects.append(obj)
        if not objects:
            return None
        record = f"image {image.image_id} ({len(objects)} object(s))"
        relative = next((c for c in image.candidates
                         if os.path.exists(os.path.join(manual_dir, c))), None)
        if relative is None:
            skips.bad(MISSING_IMAGE, file=" or ".join(os.path.join(manual_dir, c)
                                                      for c in image.candidates),
                      record=record, detail="image file not found")
            return None
        encoded = read_image_of_size(os.path.join(manual_dir, relative), size=image.size,
                                     size_file=path, record=record, skips=skips)
        if encoded is None:
            return None
        object_rows = []
        for index, obj in enumerate(objects):
            row = {"id": obj.object_id, "ref_id": obj.object_id, "box": obj.box,
                   "category": obj.category}
            if self.builder_config.masks:
                row["mask"] = mask_png(masks[index])
            object_rows.append(row)
        return {
            **image_fields(encoded=encoded, image_id=str(image.image_id), filename=relative,
                           height=height, width=width),
            "objects": object_rows,
            "expressions": [{"object": index, "text": expression.sent.strip(),
                             "raw": expression.raw, "sent": expression.sent,
                             "tokens": " ".join(expression.sent.split()),
                             "id": expression.expression_id}
                            for index, obj in enumerate(objects)
                            for expression in obj.expressions],
        }


def _image_candidates(image_id: int, config: ReferringMixtureConfig) -> tuple[str, ...]:
    if not config.image_dirs:
        return (os.path.join("train2014", f"COCO_train2014_{image_id:012d}.jpg"),)
    return tuple(os.path.join(folder, f"{image_id}.jpg") for folder in config.image_dirs)


def _int_field(record: Mapping[str, Any], key: str) -> int:
    value = record.get(key)
    if not is_int(value):
        raise UnusableRecordError(BAD_FIELD, f"field {key!r} is {value!r}, not an integer")
    return value


def _size(record: Mapping[str, Any]) -> tuple[int, int]:
    height, width = record.get("height"), record.get("width")
    if not (is_int(height) and is_int(width) and height > 0 and width > 0):
        raise UnusableRecordError(BAD_FIELD, f"height {height!r}, width {width!r} are not "
                                  "positive integers")
    return height, width


def _category(record: Mapping[str, Any]) -> int:
    category = record.get("category_id", DEFAULT_CATEGORY)
    if not is_int(category):
        raise UnusableRecordError(BAD_FIELD, f"category_id {category!r} is not an integer")
    return category


_CITATION = """\
@inproceedings{kamath2021mdetr,
  title     = {MDETR - Modulated Detection for End-to-End Multi-Modal Understanding},
  author    = {Aishwarya Kamath and Mannat Singh and Yann LeCun and Gabriel Synnaeve and
               Ishan Misra and Nicolas Carion},
  booktitle = {ICCV},
  year      = {2021}
}
@inproceedings{zhu2022seqtr,
  title     = {SeqTR: A Simple yet Universal Network for Visual Grounding},
  author    = {Chaoyang Zhu and Yiyi Zhou and Yunhang Shen and Gen Luo and Xingjia Pan and
               Mingbao Lin and Chao Chen and Liujuan Cao and Xiaoshuai Sun and Rongrong Ji},
  booktitle = {ECCV},
  year      = {2022}
}
@inproceedings{plummer2015flickr30k,
  title     = {Flickr30k Entities: Collecting Region-to-Phrase Correspondences for Richer
               Image-to-Sentence Models},
  author    = {Bryan A. Plummer and Liwei Wang and Chris M. Cervantes and Juan C. Caicedo and
               Julia Hockenmaier and Svetlana Lazebnik},
  booktitle = {ICCV},
  year      = {2015}
}
"""
