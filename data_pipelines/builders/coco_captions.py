"""COCO Captions (Chen et al., 2015) as a TFDS builder: every image with all its captions.

Two public annotation layouts are read, each giving its own splits:

* the COCO 2017 caption files, ``manual_dir``::

      annotations/captions_train2017.json   -> split ``train``  (images in train2017/)
      annotations/captions_val2017.json     -> split ``val``    (images in val2017/)

  each ``{images: [{id, file_name, height, width, ...}], annotations: [{id, image_id,
  caption}], ...}``; an image is ``<split folder>/<file_name>`` and must be of the size the
  json gives.
* Karpathy's split (``caption_datasets.zip`` of Karpathy & Fei-Fei, CVPR 2015), the split the
  official PixelLLM trains (``train+restval``) and evaluates (``val``) on::

      dataset_coco.json   {images: [{filepath: "train2014" | "val2014", filename, cocoid,
                                     split: "train" | "restval" | "val" | "test",
                                     sentences: [{raw, tokens, sentid, ...}], ...}]}

  giving ``karpathy_train`` (train + restval), ``karpathy_val`` and ``karpathy_test``. An
  image is ``<filepath>/<filename>`` (``val2014/COCO_val2014_000000391895.jpg``) if that file
  exists, else the same picture under its COCO 2017 name, ``train2017/<cocoid:012d>.jpg`` or
  ``val2017/<cocoid:012d>.jpg`` (the 2017 release re-splits the 2014 images without changing
  them), so the 2017 folders alone serve every split.

The splits whose annotation file is present are built (the others are named on stderr);
``splits=[...]`` chooses.

Example layout (one example per image)::

    image            uint8 [H, W, 3]   RGB in the stored frame (see data_pipelines.images)
    image/id         text              COCO image id ("391895")
    image/filename   text              the image's path under manual_dir
    image/height, image/width   int32
    captions         sequence [C], by caption id, of
                       {text: the caption, whitespace stripped at both ends,
                        id: int64 (annotation id, or Karpathy's sentid)}

Captions are the annotators' typing (``caption``, Karpathy's ``raw``) with the leading and
trailing spaces and newlines that many of them carry removed; inner text is kept as typed.

Bad records go through :class:`~data_pipelines.skips.SkipCounter` (``skip_policy``; reasons in
:data:`SKIP_REASONS`): an empty or non-string caption is left out; a caption of an image the
json does not list is counted; an image without any caption, whose file is missing or
corrupt, or (2017 files) of another size than the json gives is left out. The summary is
printed at the end of each split and kept in :attr:`CocoCaptions.skip_counts`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.builders.common import (CORRUPT_IMAGE, SIZE_MISMATCH, UNASSIGNED,
                                            SkipPolicyBuilder, image_fields, is_int,
                                            json_list, load_json, read_image_of_size)
from data_pipelines.images import ImageError, encode_for_storage
from data_pipelines.skips import SkipCounter

# Reasons a caption or image is skipped (the SkipCounter categories), with those of
# read_image_of_size: CORRUPT_IMAGE, SIZE_MISMATCH.
BAD_FIELD = "missing or invalid field"
EMPTY_CAPTION = "empty caption"
UNLISTED_IMAGE = "caption of an image not in the json"
NO_CAPTIONS = "image without captions"
MISSING_IMAGE = "missing image"
SKIP_REASONS = (BAD_FIELD, EMPTY_CAPTION, UNLISTED_IMAGE, NO_CAPTIONS, MISSING_IMAGE,
                CORRUPT_IMAGE, SIZE_MISMATCH)

COCO2017_FILES = {"train": ("annotations/captions_train2017.json", "train2017"),
                  "val": ("annotations/captions_val2017.json", "val2017")}
KARPATHY_FILE = "dataset_coco.json"
# Karpathy's split value -> this builder's split.
KARPATHY_SPLITS = {"train": "karpathy_train", "restval": "karpathy_train",
                   "val": "karpathy_val", "test": "karpathy_test"}
_COCO2017_IMAGE_DIRS = ("train2017", "val2017")


@dataclasses.dataclass(frozen=True)
class CaptionedImage:
    """One image of a split with its caption records, before its file is read.

    Attributes:
      image_id: the COCO image id.
      candidates: paths where the image may be, tried in order.
      size: ``(height, width)`` the json gives, or ``None`` if it gives none (Karpathy).
      captions: ``(id, caption value as in the file)``, in file order.
      file: the json the image and captions come from (for messages).
    """

    image_id: int
    candidates: tuple[str, ...]
    size: tuple[int, int] | None
    captions: tuple[tuple[int, Any], ...]
    file: str


def read_coco2017(path: str, *, image_dir: str, skips: SkipCounter) -> list[CaptionedImage]:
    """The images of a ``captions_<split>2017.json``, each with its captions.

    Captions of an image the file does not list are reported to ``skips``
    (:data:`UNLISTED_IMAGE`), malformed records as :data:`BAD_FIELD`.

    Raises:
      ValueError: the file is not JSON or lacks the ``images`` / ``annotations`` lists (names
        the file).
    """
    content = load_json(path)
    images = json_list(content, path, key="images")
    annotations = json_list(content, path, key="annotations")
    captions: dict[int, list[tuple[int, Any]]] = collections.defaultdict(list)
    for index, annotation in enumerate(annotations):
        image_id = annotation.get("image_id") if isinstance(annotation, Mapping) else None
        caption_id = annotation.get("id") if isinstance(annotation, Mapping) else None
        if not (is_int(image_id) and is_int(caption_id)):
            skips.bad(BAD_FIELD, file=path, record=f"annotations[{index}]",
                      detail="expected integer 'id' and 'image_id'")
            continue
        captions[image_id].append((caption_id, annotation.get("caption")))
    entries = []
    for index, image in enumerate(images):
        image_id = image.get("id") if isinstance(image, Mapping) else None
        filename = image.get("file_name") if isinstance(image, Mapping) else None
        height = image.get("height") if isinstance(image, Mapping) else None
        width = image.get("width") if isinstance(image, Mapping) else None
        if not (is_int(image_id) and isinstance(filename, str) and filename and is_int(height)
                and is_int(width) and height > 0 and width > 0):
            skips.bad(BAD_FIELD, file=path, record=f"images[{index}]",
                      detail="expected an integer 'id', a 'file_name' and positive integer "
                      "'height' and 'width'")
            continue
        entries.append(CaptionedImage(
            image_id=image_id, candidates=(os.path.join(image_dir, filename),),
            size=(height, width), captions=tuple(captions.pop(image_id, ())), file=path))
    for image_id, orphans in sorted(captions.items()):
        skips.bad(UNLISTED_IMAGE, file=path, record=f"image {image_id}",
                  detail=f"{len(orphans)} caption(s) of an image not in 'images'")
    return entries


def read_karpathy(path: str, *, manual_dir: str, skips: SkipCounter
                  ) -> dict[str, list[CaptionedImage]]:
    """Karpathy's ``dataset_coco.json``: split (:data:`KARPATHY_SPLITS` values) -> images, to
    be found under ``manual_dir`` (module docstring).

    An image record without a known ``split``, an integer ``cocoid``, ``filepath`` and
    ``filename`` or a ``sentences`` list is reported to ``skips`` (:data:`BAD_FIELD`).

    Raises:
      ValueError: the file is not JSON or lacks the ``images`` list (names the file).
    """
    images = json_list(load_json(path), path, key="images")
    entries: dict[str, list[CaptionedImage]] = {split: [] for split in
                                                dict.fromkeys(KARPATHY_SPLITS.values())}
    for index, image in enumerate(images):
        fields = ({key: image.get(key) for key in ("split", "cocoid", "filepath", "filename",
                                                   "sentences")}
                  if isinstance(image, Mapping) else {})
        if not (fields.get("split") in KARPATHY_SPLITS and is_int(fields["cocoid"])
                and isinstance(fields["filepath"], str) and isinstance(fields["filename"], str)
                and fields["filename"] and isinstance(fields["sentences"], list)):
            skips.bad(BAD_FIELD, file=path, record=f"images[{index}]",
                      detail=f"expected 'split' in {sorted(KARPATHY_SPLITS)}, an integer "
                      "'cocoid', 'filepath', 'filename' and a list of 'sentences'")
            continue
        cocoid = fields["cocoid"]
        captions = []
        for position, sentence in enumerate(fields["sentences"]):
            sentence_id = sentence.get("sentid") if isinstance(sentence, Mapping) else None
            if not is_int(sentence_id):
                skips.bad(BAD_FIELD, file=path, record=f"image {cocoid} sentence {position}",
                          detail="expected an integer 'sentid'")
                continue
            captions.append((sentence_id, sentence.get("raw")))
        same_in_2017 = [os.path.join(manual_dir, folder, f"{cocoid:012d}.jpg")
                        for folder in _COCO2017_IMAGE_DIRS]
        entries[KARPATHY_SPLITS[fields["split"]]].append(CaptionedImage(
            image_id=cocoid,
            candidates=(os.path.join(manual_dir, fields["filepath"], fields["filename"]),
                        *same_in_2017),
            size=None, captions=tuple(captions), file=path))
    return entries


def clean_captions(entry: CaptionedImage, skips: SkipCounter) -> list[tuple[int, str]]:
    """``(id, text)`` of the image's usable captions, sorted by id, text stripped; empty or
    non-string captions are reported to ``skips``."""
    kept = []
    for caption_id, caption in entry.captions:
        record = f"image {entry.image_id} caption {caption_id}"
        if not isinstance(caption, str):
            skips.bad(BAD_FIELD, file=entry.file, record=record,
                      detail=f"caption is {caption!r}, not a string")
        elif not caption.strip():
            skips.bad(EMPTY_CAPTION, file=entry.file, record=record,
                      detail=f"caption {caption!r} is empty")
        else:
            kept.append((caption_id, caption.strip()))
    return sorted(kept)


@dataclasses.dataclass(eq=False)
class CocoCaptionsConfig(tfds.core.BuilderConfig):
    """The COCO caption files (2017 and Karpathy's split)."""


class CocoCaptions(SkipPolicyBuilder):
    """COCO Captions, one example per image (see the module docstring).

    Takes :class:`~data_pipelines.builders.common.SkipPolicyBuilder`'s ``skip_policy`` and
    ``splits`` and keeps its ``skip_counts`` per split; Karpathy image records that no split
    can take are counted under :data:`~data_pipelines.builders.common.UNASSIGNED`.
    """

    # Not "coco_captions": TFDS's catalogue has a builder of that name.
    name = "coco_captions_manual"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [CocoCaptionsConfig(
        name="coco", description="COCO 2017 caption files (train, val) and Karpathy's split "
        "(karpathy_train = train + restval, karpathy_val, karpathy_test).")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    From https://cocodataset.org: annotations_trainval2017.zip (its captions_*2017.json) and
    the train2017/ and val2017/ images; optionally Karpathy's dataset_coco.json (from
    caption_datasets.zip, https://cs.stanford.edu/people/karpathy/deepimagesent/):

      manual_dir/
        annotations/captions_train2017.json  annotations/captions_val2017.json
        train2017/000000000009.jpg ...  val2017/000000000139.jpg ...
        dataset_coco.json                     (Karpathy's split, optional)
        train2014/  val2014/                  (optional: the 2017 folders serve Karpathy too)

    Symbolic links to existing COCO folders work. The splits whose json is present are built.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self._dataset_info(
            features={
                "captions": tfds.features.Sequence({
                    "text": tfds.features.Text(),
                    "id": tfds.features.Scalar(np.int64),
                }),
            },
            homepage="https://cocodataset.org",
            citation=_CITATION,
        )

    def _example_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        json_of = {split: os.path.join(manual_dir, name)
                   for split, (name, _) in COCO2017_FILES.items()}
        karpathy = os.path.join(manual_dir, KARPATHY_FILE)
        json_of.update({split: karpathy for split in dict.fromkeys(KARPATHY_SPLITS.values())})
        present = [split for split, path in json_of.items() if os.path.exists(path)]
        chosen = self._choose_splits(present, {split: path for split, path in json_of.items()
                                               if split not in present})
        generators = {}
        for split in chosen:
            if split in COCO2017_FILES:
                image_dir = os.path.join(manual_dir, COCO2017_FILES[split][1])
                generators[split] = self._generate_examples(
                    split=split, manual_dir=manual_dir,
                    read=functools.partial(read_coco2017, json_of[split], image_dir=image_dir))
        karpathy_chosen = [split for split in chosen if split not in COCO2017_FILES]
        if karpathy_chosen:
            unassigned = self._skip_counter()
            entries = read_karpathy(karpathy, manual_dir=manual_dir, skips=unassigned)
            if unassigned.total:
                self._keep_skip_counts(UNASSIGNED, unassigned)
            for split in karpathy_chosen:
                generators[split] = self._generate_examples(
                    split=split, manual_dir=manual_dir,
                    read=lambda skips, images=entries[split]: images)
        return generators

    def _generate_examples(self, *, split: str, manual_dir: str,
                           read: Callable[..., list[CaptionedImage]]
                           ) -> Iterator[tuple[str, dict]]:
        """Examples of the images ``read(skips=...)`` gives, reporting to the split's
        counter (a 2017 json is read here, so that its bad records count in its split)."""
        skips = self._skip_counter()
        entries = read(skips=skips)
        num_examples = 0
        for entry in entries:
            example = _example(entry, manual_dir=manual_dir, skips=skips)
            if example is not None:
                num_examples += 1
                yield str(entry.image_id), example
        self._keep_skip_counts(split, skips)
        self._refuse_empty_split(
            split, num_examples=num_examples, skips=skips,
            detail=(f"all {len(entries)} image(s) were skipped (images in {manual_dir}?)"
                    if entries else "the annotations list no image for it"))


def _example(entry: CaptionedImage, *, manual_dir: str, skips: SkipCounter) -> dict | None:
    record = f"image {entry.image_id}"
    captions = clean_captions(entry, skips)
    if not captions:
        skips.bad(NO_CAPTIONS, file=entry.file, record=record,
                  detail=f"none of its {len(entry.captions)} caption(s) is usable")
        return None
    path = next((c for c in entry.candidates if os.path.exists(c)), None)
    if path is None:
        skips.bad(MISSING_IMAGE, file=" or ".join(entry.candidates), record=record,
                  detail="image file not found")
        return None
    if entry.size is None:
        try:
            encoded, height, width = encode_for_storage(path, name=path)
        except ImageError as error:
            skips.bad(CORRUPT_IMAGE, file=path, record=record, detail=str(error))
            return None
    else:
        height, width = entry.size
        encoded = read_image_of_size(path, size=entry.size, size_file=entry.file,
                                     record=record, skips=skips)
        if encoded is None:
            return None
    return {
        **image_fields(encoded=encoded, image_id=str(entry.image_id),
                       filename=os.path.relpath(path, manual_dir), height=height, width=width),
        "captions": [{"text": text, "id": caption_id} for caption_id, text in captions],
    }


_CITATION = """\
@article{chen2015microsoft,
  title   = {Microsoft COCO Captions: Data Collection and Evaluation Server},
  author  = {Xinlei Chen and Hao Fang and Tsung-Yi Lin and Ramakrishna Vedantam and
             Saurabh Gupta and Piotr Doll{\\'a}r and C. Lawrence Zitnick},
  journal = {arXiv preprint arXiv:1504.00325},
  year    = {2015}
}
@inproceedings{karpathy2015deep,
  title     = {Deep Visual-Semantic Alignments for Generating Image Descriptions},
  author    = {Andrej Karpathy and Li Fei-Fei},
  booktitle = {CVPR},
  year      = {2015}
}
"""
