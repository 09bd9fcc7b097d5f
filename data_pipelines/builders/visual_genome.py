"""Visual Genome region descriptions as a TFDS builder, for dense captioning and region captioning.

Visual Genome annotates each image with many regions, each a box and a short phrase ("a man
riding a horse"). Two published selections are read (configs):

* ``densecap``: DenseCap's (Johnson et al., CVPR 2016) split of the raw Visual Genome files,
  ``manual_dir``::

      region_descriptions.json   [{id: image id, regions: [{region_id, image_id, phrase,
                                                            x, y, width, height}]}]
      image_data.json            [{image_id, url, width, height, coco_id, flickr_id}]
      densecap_splits.json       {"train": [image ids], "val": [...], "test": [...]}
      VG_100K/<id>.jpg  VG_100K_2/<id>.jpg

  Images in no split are left out, as DenseCap's ``preprocess.py`` does. (The top-level image
  id is also accepted as ``image_id``, and ``image_data.json``'s as ``id``, as older releases
  spell them.)
* ``grit``: GRiT's preprocessed COCO-style files (the ones the official PixelLLM reads; splits
  ``train`` and ``test``), ``manual_dir``::

      annotations/train.json, annotations/test.json
          {images: [{id, file_name: "<id>.jpg", height, width}],
           annotations: [{id, image_id, bbox: [x, y, w, h], caption}],
           categories: [{id: 1, name: "object"}]}
      images/<id>.jpg  (or VG_100K/, VG_100K_2/)

Images are looked up in ``images/``, ``VG_100K/`` and ``VG_100K_2/``, in that order.

**Splits.** ``grit`` builds the splits whose ``annotations/<split>.json`` is there (announcing the
missing ones); ``VgDensecap(..., splits=["test"])`` builds only the splits named (for both
configs), and one named whose file is missing is an error. A split left without examples is
left out (``"skip"``) or stops the build (``"fail"``), see
:class:`~data_pipelines.builders.common.SkipPolicyBuilder`.

Example layout (one example per image)::

    image            uint8 [H, W, 3]   RGB in the stored frame (see data_pipelines.images)
    image/id         text              Visual Genome image id ("2407890")
    image/filename   text              file name in its image folder
    image/height, image/width   int32
    objects          sequence [N], in file order, of
                       {id: int64 (region / annotation id; one outside int64 is skipped),
                        box: f32 [4] (x0, y0, x1, y1) normalized, clipped to [0, 1],
                        phrase: text, stripped}

**Coordinates.** ``x, y, width, height`` (``bbox``) are pixels of the image at the size the
json gives, box ``(x, y, x + width, y + height)`` in the project's convention, as GRiT and the
official PixelLLM read them. (DenseCap's ``preprocess.py`` calls ``x, y`` 1-indexed and shifts
them by one pixel; nothing else does.) Boxes are divided by the image's true size after
checking that it is the json's, in the stored pixel frame (no EXIF rotation: the boxes were
drawn on the stored pixels, as TF and TFDS decode them): an image file of another size (a resized
copy such as DenseCap's 720-pixel one) cannot be matched to the boxes with certainty, so it is
reported, naming the json that gives the size, and skipped, not rescaled.

Bad records go through :class:`~data_pipelines.skips.SkipCounter` (``skip_policy``; reasons in
:data:`SKIP_REASONS`): a region with an empty phrase, a malformed field (an id outside int64
too), or a box with no area (``width`` or ``height`` <= 0, or none left after clipping to the
image) is left out; an image that is missing, corrupt, of another size than the json says, not
in ``image_data.json``, or left without regions is left out. The summary is printed at the end of each split and kept in
:attr:`VgDensecap.skip_counts`.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.builders.common import (CORRUPT_IMAGE, SIZE_MISMATCH, UNASSIGNED,
                                            SkipPolicyBuilder, UnusableRecordError, image_fields,
                                            is_finite_number, is_int, json_list,
                                            load_json, read_image_of_size)
from data_pipelines.skips import SkipCounter

# Reasons a region or image is skipped (the SkipCounter categories), with those of
# read_image_of_size: CORRUPT_IMAGE, SIZE_MISMATCH.
BAD_FIELD = "missing or invalid field"
EMPTY_PHRASE = "empty phrase"
DEGENERATE_BOX = "degenerate box"
MISSING_IMAGE_RECORD = "image without size record"
MISSING_IMAGE = "missing image"
NO_REGIONS = "image without usable regions"
SKIP_REASONS = (BAD_FIELD, EMPTY_PHRASE, DEGENERATE_BOX, MISSING_IMAGE_RECORD, MISSING_IMAGE,
                CORRUPT_IMAGE, SIZE_MISMATCH, NO_REGIONS)

IMAGE_DIRS = ("images", "VG_100K", "VG_100K_2")
# What TFDS stores a region id as.
_INT64 = np.iinfo(np.int64)
DENSECAP_SPLITS = ("train", "val", "test")
GRIT_SPLITS = ("train", "test")


class BadRegionError(UnusableRecordError):
    """A region that cannot be used; ``reason`` is one of :data:`SKIP_REASONS`."""


@dataclasses.dataclass(frozen=True)
class ImageEntry:
    """One image of a split, before its file is read.

    Attributes:
      image_id: the Visual Genome image id.
      filename: its file name.
      size: ``(height, width)`` the json gives, or ``None`` if it gives none.
      regions: the raw region records.
      file: the json file holding the regions (for messages).
      size_file: the json file that gives (or lacks) the size.
    """

    image_id: int
    filename: str
    size: tuple[int, int] | None
    regions: Sequence[Any]
    file: str
    size_file: str


@dataclasses.dataclass(frozen=True)
class RegionFields:
    """Where a format keeps a region's id, phrase and box."""

    id_key: str
    phrase_key: str
    # Either one key holding [x, y, w, h] or four keys.
    box_keys: tuple[str, ...]


DENSECAP_FIELDS = RegionFields(id_key="region_id", phrase_key="phrase",
                               box_keys=("x", "y", "width", "height"))
GRIT_FIELDS = RegionFields(id_key="id", phrase_key="caption", box_keys=("bbox",))


def parse_region(region: Any, *, fields: RegionFields, height: int, width: int,
                 image_id: int) -> tuple[int, np.ndarray, str]:
    """A region record -> ``(id, box, phrase)``: box float32 ``(x0, y0, x1, y1)`` normalized by
    ``(width, height)`` and clipped to [0, 1]; phrase stripped.

    Raises:
      BadRegionError: a missing or invalid field (:data:`BAD_FIELD`), an empty phrase
        (:data:`EMPTY_PHRASE`), a box with no area (:data:`DEGENERATE_BOX`).
    """
    if not isinstance(region, Mapping):
        raise BadRegionError(BAD_FIELD, f"expected an object, got {type(region).__name__}")
    region_id = region.get(fields.id_key)
    if not is_int(region_id):
        raise BadRegionError(BAD_FIELD, f"field {fields.id_key!r} is {region_id!r}, not an "
                             "integer")
    if not _INT64.min <= region_id <= _INT64.max:
        raise BadRegionError(BAD_FIELD, f"field {fields.id_key!r} is {region_id}, outside "
                             "int64")
    if region.get("image_id", image_id) != image_id:
        raise BadRegionError(BAD_FIELD, f"region {region_id} names image "
                             f"{region.get('image_id')!r}, but is listed under {image_id}")
    phrase = region.get(fields.phrase_key)
    if not isinstance(phrase, str):
        raise BadRegionError(BAD_FIELD, f"region {region_id}: field {fields.phrase_key!r} is "
                             f"{phrase!r}, not a string")
    if not phrase.strip():
        raise BadRegionError(EMPTY_PHRASE, f"region {region_id}: phrase {phrase!r} is empty")
    if len(fields.box_keys) == 1:
        xywh = region.get(fields.box_keys[0])
    else:
        xywh = [region.get(key) for key in fields.box_keys]
    if not (isinstance(xywh, list | tuple) and len(xywh) == 4
            and all(is_finite_number(v) for v in xywh)):
        raise BadRegionError(BAD_FIELD, f"region {region_id}: box {xywh!r} is not 4 finite "
                             "numbers")
    x, y, w, h = (float(v) for v in xywh)
    if w <= 0 or h <= 0:
        raise BadRegionError(DEGENERATE_BOX, f"region {region_id}: box {xywh!r} has width or "
                             "height <= 0")
    box = np.clip(np.array([x / width, y / height, (x + w) / width, (y + h) / height]), 0.0, 1.0)
    if box[2] <= box[0] or box[3] <= box[1]:
        raise BadRegionError(DEGENERATE_BOX, f"region {region_id}: box {xywh!r} lies outside "
                             f"the {width}x{height} image")
    return region_id, box.astype(np.float32), phrase.strip()


def find_image(manual_dir: str, filename: str) -> str | None:
    """The path of ``filename`` in the first of :data:`IMAGE_DIRS` that has it, else ``None``."""
    for folder in IMAGE_DIRS:
        path = os.path.join(manual_dir, folder, filename)
        if os.path.exists(path):
            return path
    return None


@dataclasses.dataclass(eq=False)
class VgDensecapConfig(tfds.core.BuilderConfig):
    """Which published selection of Visual Genome regions to read."""


class VgDensecap(SkipPolicyBuilder):
    """Visual Genome regions, one example per image (see the module docstring).

    Takes :class:`~data_pipelines.builders.common.SkipPolicyBuilder`'s ``skip_policy`` and
    keeps its ``skip_counts`` per split; records that no split can take (no usable image id)
    are counted under :data:`~data_pipelines.builders.common.UNASSIGNED`.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        VgDensecapConfig(name="densecap", description="DenseCap's train/val/test split of the "
                         "Visual Genome region descriptions."),
        VgDensecapConfig(name="grit", description="GRiT's preprocessed train/test region "
                         "captions (as read by the official PixelLLM)."),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Images: VG_100K/ and VG_100K_2/ from https://homes.cs.washington.edu/~ranjay/visualgenome/
    (or all of them in images/). Then, for `densecap`, region_descriptions.json and
    image_data.json from the same site and densecap_splits.json from
    https://github.com/jcjohnson/densecap (info/densecap_splits.json):

      manual_dir/
        region_descriptions.json  image_data.json  densecap_splits.json
        VG_100K/1.jpg ...  VG_100K_2/1.jpg ...

    and for `grit`, train.json and test.json of GRiT (github.com/JialianW/GRiT,
    datasets/DATASETS.md):

      manual_dir/
        annotations/train.json  annotations/test.json
        images/1.jpg ...  (or VG_100K/, VG_100K_2/)

    Symbolic links to existing folders work.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self._dataset_info(
            features={
                "objects": tfds.features.Sequence({
                    "id": tfds.features.Scalar(np.int64),
                    "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                    "phrase": tfds.features.Text(),
                }),
            },
            homepage="https://homes.cs.washington.edu/~ranjay/visualgenome/",
            citation=_CITATION,
        )

    def _example_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        unassigned = self._skip_counter()
        if self.builder_config.name == "densecap":
            entries, fields = _read_densecap(manual_dir, unassigned), DENSECAP_FIELDS
        else:
            annotations = {split: os.path.join(manual_dir, "annotations", f"{split}.json")
                           for split in GRIT_SPLITS}
            present = [split for split, path in annotations.items() if os.path.exists(path)]
            chosen = self._choose_splits(present, {split: path for split, path in
                                                   annotations.items() if split not in present})
            entries = _read_grit({split: annotations[split] for split in chosen}, unassigned)
            fields = GRIT_FIELDS
        if unassigned.total:
            self._keep_skip_counts(UNASSIGNED, unassigned)
        return {split: self._generate_examples(split=split, entries=split_entries,
                                               fields=fields, manual_dir=manual_dir)
                for split, split_entries in entries.items()}

    def _generate_examples(self, *, split: str, entries: Sequence[ImageEntry],
                           fields: RegionFields, manual_dir: str
                           ) -> Iterator[tuple[str, dict]]:
        skips = self._skip_counter()
        num_examples = 0
        for entry in entries:
            example = _example(entry, fields=fields, manual_dir=manual_dir, skips=skips)
            if example is not None:
                num_examples += 1
                yield str(entry.image_id), example
        self._keep_skip_counts(split, skips)
        self._refuse_empty_split(
            split, num_examples=num_examples, skips=skips,
            detail=(f"all {len(entries)} image(s) were skipped (images in "
                    f"{manual_dir}/{{{','.join(IMAGE_DIRS)}}}?)" if entries
                    else "the annotations list no image for it"))


def _example(entry: ImageEntry, *, fields: RegionFields, manual_dir: str,
             skips: SkipCounter) -> dict | None:
    record = f"image {entry.image_id}"
    if entry.size is None:
        skips.bad(MISSING_IMAGE_RECORD, file=entry.size_file, record=record,
                  detail="no positive integer width and height for it")
        return None
    height, width = entry.size
    objects = []
    for index, region in enumerate(entry.regions):
        try:
            region_id, box, phrase = parse_region(region, fields=fields, height=height,
                                                  width=width, image_id=entry.image_id)
        except BadRegionError as error:
            skips.bad(error.reason, file=entry.file, record=f"{record} region {index}",
                      detail=str(error))
            continue
        objects.append({"id": region_id, "box": box, "phrase": phrase})
    if not objects:
        skips.bad(NO_REGIONS, file=entry.file, record=record,
                  detail=f"none of its {len(entry.regions)} region(s) is usable")
        return None
    path = find_image(manual_dir, entry.filename)
    if path is None:
        skips.bad(MISSING_IMAGE, file=os.path.join(manual_dir, "{" + ",".join(IMAGE_DIRS) + "}",
                                                   entry.filename),
                  record=record, detail="image file not found")
        return None
    encoded = read_image_of_size(path, size=(height, width), size_file=entry.size_file,
                                 record=record, skips=skips)
    if encoded is None:
        return None
    return {
        **image_fields(encoded=encoded, image_id=str(entry.image_id), filename=entry.filename,
                       height=height, width=width),
        "objects": objects,
    }


def _read_densecap(manual_dir: str, unassigned: SkipCounter) -> dict[str, list[ImageEntry]]:
    regions_file = os.path.join(manual_dir, "region_descriptions.json")
    sizes_file = os.path.join(manual_dir, "image_data.json")
    splits_file = os.path.join(manual_dir, "densecap_splits.json")
    splits = load_json(splits_file)
    if not isinstance(splits, dict):
        raise ValueError(f"{splits_file}: expected an object of split name -> image ids")
    split_of: dict[int, str] = {}
    for split in DENSECAP_SPLITS:
        ids = splits.get(split)
        if not isinstance(ids, list) or not all(is_int(i) for i in ids):
            raise ValueError(f"{splits_file}: {split!r} is not a list of integer image ids")
        for image_id in ids:
            if image_id in split_of:
                raise ValueError(f"{splits_file}: image {image_id} is in both "
                                 f"{split_of[image_id]!r} and {split!r}")
            split_of[image_id] = split

    sizes = {}
    for record in json_list(load_json(sizes_file), sizes_file):
        image_id = _first_int(record, ("image_id", "id"))
        height = record.get("height") if isinstance(record, Mapping) else None
        width = record.get("width") if isinstance(record, Mapping) else None
        if image_id is None or not (is_int(height) and is_int(width) and height > 0
                                    and width > 0):
            # An image with no trustworthy size cannot take boxes; it is reported when (and
            # if) a split asks for it.
            continue
        sizes[image_id] = (height, width)

    regions_by_image: dict[int, list] = {}
    for index, record in enumerate(json_list(load_json(regions_file), regions_file)):
        image_id = _first_int(record, ("id", "image_id"))
        regions = record.get("regions") if isinstance(record, Mapping) else None
        if image_id is None or not isinstance(regions, list):
            unassigned.bad(BAD_FIELD, file=regions_file, record=f"item {index}",
                           detail="expected {id: image id, regions: [...]}")
            continue
        regions_by_image.setdefault(image_id, []).extend(regions)

    entries: dict[str, list[ImageEntry]] = {split: [] for split in DENSECAP_SPLITS}
    for split in DENSECAP_SPLITS:
        for image_id in splits[split]:
            entries[split].append(ImageEntry(
                image_id=image_id, filename=f"{image_id}.jpg", size=sizes.get(image_id),
                regions=regions_by_image.get(image_id, []), file=regions_file,
                size_file=sizes_file))
    return entries


def _read_grit(annotations: Mapping[str, str], unassigned: SkipCounter
               ) -> dict[str, list[ImageEntry]]:
    """Split -> its images, from the annotation file of each split in ``annotations``."""
    entries = {}
    for split, path in annotations.items():
        content = load_json(path)
        images = json_list(content, path, key="images")
        annotations = json_list(content, path, key="annotations")
        regions_by_image: dict[int, list] = collections.defaultdict(list)
        for index, annotation in enumerate(annotations):
            image_id = annotation.get("image_id") if isinstance(annotation, Mapping) else None
            if not is_int(image_id):
                unassigned.bad(BAD_FIELD, file=path, record=f"annotations[{index}]",
                               detail=f"field 'image_id' is {image_id!r}, not an integer")
                continue
            regions_by_image[image_id].append(annotation)
        split_entries = []
        for index, image in enumerate(images):
            image_id = image.get("id") if isinstance(image, Mapping) else None
            filename = image.get("file_name") if isinstance(image, Mapping) else None
            if not is_int(image_id) or not isinstance(filename, str) or not filename:
                unassigned.bad(BAD_FIELD, file=path, record=f"images[{index}]",
                               detail="expected an integer 'id' and a 'file_name'")
                continue
            height, width = image.get("height"), image.get("width")
            size = ((height, width) if is_int(height) and is_int(width) and height > 0
                    and width > 0 else None)
            split_entries.append(ImageEntry(image_id=image_id, filename=filename, size=size,
                                            regions=regions_by_image.pop(image_id, []),
                                            file=path, size_file=path))
        for image_id, regions in sorted(regions_by_image.items()):
            unassigned.bad(MISSING_IMAGE_RECORD, file=path, record=f"image {image_id}",
                           detail=f"{len(regions)} annotation(s) of an image not in 'images'")
        entries[split] = split_entries
    return entries


def _first_int(record: Any, keys: Sequence[str]) -> int | None:
    if not isinstance(record, Mapping):
        return None
    for key in keys:
        if is_int(record.get(key)):
            return record[key]
    return None


_CITATION = """\
@article{krishna2017visual,
  title   = {Visual Genome: Connecting Language and Vision Using Crowdsourced Dense Image
             Annotations},
  author  = {Ranjay Krishna and Yuke Zhu and Oliver Groth and Justin Johnson and Kenji Hata and
             Joshua Kravitz and Stephanie Chen and Yannis Kalantidis and Li-Jia Li and
             David A. Shamma and Michael S. Bernstein and Li Fei-Fei},
  journal = {IJCV},
  volume  = {123},
  number  = {1},
  pages   = {32--73},
  year    = {2017}
}
@inproceedings{johnson2016densecap,
  title     = {DenseCap: Fully Convolutional Localization Networks for Dense Captioning},
  author    = {Justin Johnson and Andrej Karpathy and Li Fei-Fei},
  booktitle = {CVPR},
  year      = {2016}
}
"""
