"""Panoptic Narrative Grounding (PNG) as a TFDS builder: narratives whose phrases have masks.

PNG ties the noun phrases of COCO's Localized Narratives to segments of the COCO panoptic
annotation, things and stuff alike. The files, in the layout F-LMM reads them from
(``manual_dir``, its ``data/coco/``)::

    annotations/png_coco_train2017.json   annotations/png_coco_val2017.json
    annotations/panoptic_train2017.json   annotations/panoptic_val2017.json
    annotations/panoptic_train2017/<file_name>.png   annotations/panoptic_val2017/...
    train2017/<file_name>.jpg             val2017/...

``png_coco_<split>2017.json`` is a list of narratives ``{image_id, caption, segments: [{utterance,
segment_ids, plural, noun}, ...]}``: the narrative cut into consecutive utterances, each with the
panoptic segment ids it names (none for words that ground nothing). ``panoptic_<split>2017.json``
is COCO's panoptic annotation: ``images`` (``id, file_name, height, width``), ``annotations``
(per image its PNG ``file_name`` and ``segments_info: [{id, category_id}]``) and ``categories``
(``id, isthing``). A panoptic PNG stores segment ids as colours: ``id = R + 256 G + 256^2 B``.

Example layout (one example per narrative, key its index in the json)::

    image            uint8 [H, W, 3]   RGB, stored frame (see data_pipelines.images)
    image/id         text              COCO image id ("139")
    image/filename   text              file name in <split>2017/
    image/height, image/width   int32
    narrative_index  int32             index of the narrative in png_coco_<split>2017.json
    caption          text              the json's ``caption`` ("" if it has none)
    narrative        text              the utterances joined by single spaces: the text
                                       the phrase spans index
    segments         sequence [S] of {utterance: text, phrase: int32 (index into phrases,
                                      -1 for an utterance without a mask)}
    phrases          sequence [P] of {segment: int32 (index into segments),
                                      text: text (its utterance),
                                      char_start, char_end: int32, [start, end) in narrative,
                                      plural: bool, is_thing: bool,
                                      num_segments: int32 (panoptic segments in the mask),
                                      mask: uint8 [H, W, 1], 0 or 255 (union of its segments)}

``segments`` keeps every utterance in order so a pipeline can tokenize them one by one as F-LMM
does (each utterance's tokens get its phrase's mask id, -1 otherwise). Masks are stored one
single-channel PNG per phrase at the image's size (exact and small, as the RefCOCO builder's);
static shapes are the pipeline's business (pad ``P`` to a fixed count, resize the masks to the
canvas).

What F-LMM's ``PNGDataset`` does, kept here: a phrase is an utterance with at least one segment
id; its mask is the union of ``panoptic == id`` over its ids; ``is_thing`` is the category's
``isthing`` for a singular phrase and True for every plural one (F-LMM counts plural phrases
as things in its thing/stuff split); a narrative without any phrase is not an example (F-LMM
draws another one instead). ``noun`` is not read (neither does F-LMM).

Bad records go through :class:`~data_pipelines.skips.SkipCounter` (``skip_policy``; reasons in
:data:`SKIP_REASONS`), named by file: a narrative with a malformed field, whose image is not in
the panoptic json, or whose image or panoptic PNG is missing, corrupt or of another size than
the json says, is left out; a phrase whose segment id is not among its image's segments, or a
singular phrase naming several segments (F-LMM asserts one), is left out of its narrative (its
utterance stays, without a mask); a narrative left without phrases is left out.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.builders.common import (CORRUPT_IMAGE, SIZE_MISMATCH, SkipPolicyBuilder,
                                            UnusableRecordError, image_fields, is_int,
                                            json_list, load_json, read_image_of_size)
from data_pipelines.builders.refcoco import mask_png
from data_pipelines.images import ImageError, read_image
from data_pipelines.skips import SkipCounter

SPLITS = ("train", "val")
ANNOTATIONS_DIR = "annotations"

# Reasons a narrative or phrase is skipped (the SkipCounter categories), with CORRUPT_IMAGE and
# SIZE_MISMATCH of read_image_of_size.
BAD_FIELD = "missing or invalid field"
UNKNOWN_IMAGE = "image not in the panoptic json"
MISSING_IMAGE = "missing image"
MISSING_PANOPTIC = "missing panoptic png"
CORRUPT_PANOPTIC = "corrupt panoptic png"
PANOPTIC_SIZE_MISMATCH = "panoptic png size differs from annotations"
UNKNOWN_SEGMENT = "segment id not in the image's panoptic segments"
SINGULAR_WITH_SEVERAL = "singular phrase with several segments"
NO_PHRASES = "narrative without grounded phrases"
SKIP_REASONS = (BAD_FIELD, UNKNOWN_IMAGE, MISSING_IMAGE, CORRUPT_IMAGE, SIZE_MISMATCH,
                MISSING_PANOPTIC, CORRUPT_PANOPTIC, PANOPTIC_SIZE_MISMATCH, UNKNOWN_SEGMENT,
                SINGULAR_WITH_SEVERAL, NO_PHRASES)


class BadNarrativeError(UnusableRecordError):
    """A narrative that cannot be used; ``reason`` is one of :data:`SKIP_REASONS`."""


def split_files(manual_dir: str, split: str) -> dict[str, str]:
    """The narratives json, panoptic json, panoptic PNG folder and image folder of ``split``."""
    annotations = os.path.join(manual_dir, ANNOTATIONS_DIR)
    return {
        "narratives": os.path.join(annotations, f"png_coco_{split}2017.json"),
        "panoptic_json": os.path.join(annotations, f"panoptic_{split}2017.json"),
        "panoptic_dir": os.path.join(annotations, f"panoptic_{split}2017"),
        "image_dir": os.path.join(manual_dir, f"{split}2017"),
    }


def panoptic_ids(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG pixels uint8 ``[H, W, 3]`` -> segment ids int64 ``[H, W]``
    (``R + 256 G + 256^2 B``, panopticapi's ``rgb2id``)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def union_mask(segment_map: np.ndarray, segment_ids: Sequence[int]) -> np.ndarray:
    """uint8 ``[H, W]``, 1 where ``segment_map`` (``[H, W]`` ids) holds any of ``segment_ids``."""
    return np.isin(segment_map, np.asarray(segment_ids, np.int64)).astype(np.uint8)


def _segment_id(value: Any) -> int | None:
    """A segment id as the json has it (an int or a decimal string, as F-LMM's ``int()``)."""
    if is_int(value):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def parse_segments(segments: Any) -> list[tuple[str, list[int], bool]]:
    """A narrative's ``segments`` -> ``[(utterance, segment ids, plural)]``.

    Raises:
      BadNarrativeError: not a list of ``{utterance: str, segment_ids: [int | "int"], plural:
        bool}`` (:data:`BAD_FIELD`, naming the segment and field).
    """
    if not isinstance(segments, list):
        raise BadNarrativeError(BAD_FIELD, f"'segments' is {str(segments)[:40]}, not a list")
    parsed = []
    for index, segment in enumerate(segments):
        entry = segment if isinstance(segment, Mapping) else {}
        utterance, ids, plural = (entry.get(key) for key in ("utterance", "segment_ids",
                                                             "plural"))
        if not isinstance(utterance, str):
            raise BadNarrativeError(BAD_FIELD, f"segments[{index}]: 'utterance' is "
                                    f"{utterance!r}, not a string")
        if not isinstance(plural, bool):
            raise BadNarrativeError(BAD_FIELD, f"segments[{index}]: 'plural' is {plural!r}, "
                                    "not a boolean")
        numbers = [_segment_id(v) for v in ids] if isinstance(ids, list) else [None]
        if None in numbers:
            raise BadNarrativeError(BAD_FIELD, f"segments[{index}]: 'segment_ids' is "
                                    f"{str(ids)[:60]}, not a list of integer ids")
        parsed.append((utterance, numbers, plural))
    return parsed


class PanopticNarrativeGrounding(SkipPolicyBuilder):
    """Panoptic Narrative Grounding, one example per narrative (see the module docstring).

    Takes :class:`~data_pipelines.builders.common.SkipPolicyBuilder`'s ``skip_policy`` and
    ``splits``, and keeps its ``skip_counts`` per split.
    """

    name = "panoptic_narrative_grounding"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(
        name="png_coco", description="PNG train2017/val2017 with one mask per phrase.")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    png_coco_{train,val}2017.json from the PNG project page
    (https://bcv-uniandes.github.io/panoptic-narrative-grounding/#downloads), COCO's panoptic
    annotations (panoptic_annotations_trainval2017.zip: the jsons and the PNG folders) and the
    COCO 2017 images, as F-LMM lays them out under data/coco:

      manual_dir/
        annotations/png_coco_train2017.json  annotations/png_coco_val2017.json
        annotations/panoptic_train2017.json  annotations/panoptic_val2017.json
        annotations/panoptic_train2017/*.png  annotations/panoptic_val2017/*.png
        train2017/*.jpg  val2017/*.jpg
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self._dataset_info(
            features={
                "narrative_index": tfds.features.Scalar(np.int32),
                "caption": tfds.features.Text(),
                "narrative": tfds.features.Text(),
                "segments": tfds.features.Sequence({
                    "utterance": tfds.features.Text(),
                    "phrase": tfds.features.Scalar(np.int32),
                }),
                "phrases": tfds.features.Sequence({
                    "segment": tfds.features.Scalar(np.int32),
                    "text": tfds.features.Text(),
                    "char_start": tfds.features.Scalar(np.int32),
                    "char_end": tfds.features.Scalar(np.int32),
                    "plural": tfds.features.Scalar(np.bool_),
                    "is_thing": tfds.features.Scalar(np.bool_),
                    "num_segments": tfds.features.Scalar(np.int32),
                    "mask": tfds.features.Image(shape=(None, None, 1)),
                }),
            },
            homepage="https://bcv-uniandes.github.io/panoptic-narrative-grounding/",
            citation=_CITATION,
        )

    def _example_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        files = {split: split_files(manual_dir, split) for split in SPLITS}
        missing = {}
        for split, paths in files.items():
            absent = [path for path in paths.values() if not os.path.exists(path)]
            if absent:
                missing[split] = ", ".join(absent)
        present = [split for split in SPLITS if split not in missing]
        chosen = self._choose_splits(present, missing)
        return {split: self._generate_examples(split, files[split]) for split in chosen}

    def _generate_examples(self, split: str, files: Mapping[str, str]
                           ) -> Iterator[tuple[str, dict]]:
        skips = self._skip_counter()
        panoptic = _PanopticIndex(files["panoptic_json"])
        narratives_file = files["narratives"]
        narratives = json_list(load_json(narratives_file), narratives_file)
        built = 0
        for index, narrative in enumerate(narratives):
            example = _example(narrative, index=index, files=files, panoptic=panoptic,
                               skips=skips)
            if example is not None:
                built += 1
                yield str(index), example
        self._keep_skip_counts(split, skips)
        self._refuse_empty_split(split, num_examples=built, skips=skips,
                                 detail=f"none of the {len(narratives)} narrative(s) of "
                                 f"{narratives_file} was usable")


class _PanopticIndex:
    """COCO's panoptic json by image: image records, PNG names, segments and ``isthing``."""

    def __init__(self, path: str):
        content = load_json(path)
        self.path = path
        self.images = {image["id"]: image for image in json_list(content, path, key="images")
                       if isinstance(image, Mapping) and is_int(image.get("id"))}
        self.annotations = {annotation["image_id"]: annotation
                            for annotation in json_list(content, path, key="annotations")
                            if isinstance(annotation, Mapping)
                            and is_int(annotation.get("image_id"))}
        self.isthing = {category["id"]: bool(category.get("isthing"))
                        for category in json_list(content, path, key="categories")
                        if isinstance(category, Mapping) and is_int(category.get("id"))}

    def segment_categories(self, image_id: int) -> dict[int, int]:
        """Segment id -> category id of the image's panoptic segments."""
        info = self.annotations[image_id].get("segments_info")
        if not isinstance(info, list):
            raise BadNarrativeError(BAD_FIELD, f"{self.path}: image {image_id}: "
                                    "'segments_info' is not a list")
        return {segment["id"]: segment.get("category_id") for segment in info
                if isinstance(segment, Mapping) and is_int(segment.get("id"))}


def _image_record(panoptic: _PanopticIndex, image_id: int) -> tuple[str, str, int, int]:
    """``(image file, panoptic png file, height, width)`` of ``image_id``."""
    image = panoptic.images.get(image_id)
    annotation = panoptic.annotations.get(image_id)
    if image is None or annotation is None:
        raise BadNarrativeError(UNKNOWN_IMAGE, f"image {image_id} has no image record and "
                                f"panoptic annotation in {panoptic.path}")
    fields = (image.get("file_name"), annotation.get("file_name"), image.get("height"),
              image.get("width"))
    if not (isinstance(fields[0], str) and isinstance(fields[1], str) and is_int(fields[2])
            and is_int(fields[3]) and fields[2] > 0 and fields[3] > 0):
        raise BadNarrativeError(BAD_FIELD, f"{panoptic.path}: image {image_id}: expected "
                                "'file_name', 'height', 'width' and an annotation 'file_name'")
    return fields


def _example(narrative: Any, *, index: int, files: Mapping[str, str], panoptic: _PanopticIndex,
             skips: SkipCounter) -> dict | None:
    narratives_file = files["narratives"]
    record = f"narrative {index}"
    try:
        entry = narrative if isinstance(narrative, Mapping) else {}
        image_id = _segment_id(entry.get("image_id"))
        if image_id is None:
            raise BadNarrativeError(BAD_FIELD, f"'image_id' is {entry.get('image_id')!r}, not "
                                    "an integer id")
        caption = entry.get("caption", "")
        if not isinstance(caption, str):
            raise BadNarrativeError(BAD_FIELD, f"'caption' is {caption!r}, not a string")
        segments = parse_segments(entry.get("segments"))
        image_file, panoptic_file, height, width = _image_record(panoptic, image_id)
        categories = panoptic.segment_categories(image_id)
    except BadNarrativeError as error:
        skips.bad(error.reason, file=narratives_file, record=record, detail=str(error))
        return None
    record = f"{record} (image {image_id})"

    grounded = []  # (segment index, segment ids, plural, is_thing)
    for position, (_, ids, plural) in enumerate(segments):
        if not ids:
            continue
        unknown = [i for i in ids if i not in categories]
        if unknown:
            skips.bad(UNKNOWN_SEGMENT, file=narratives_file, record=f"{record} segments"
                      f"[{position}]", detail=f"segment ids {unknown} are not in "
                      f"{panoptic.path}'s segments of image {image_id}")
            continue
        if not plural and len(ids) != 1:
            skips.bad(SINGULAR_WITH_SEVERAL, file=narratives_file,
                      record=f"{record} segments[{position}]",
                      detail=f"singular phrase with segment ids {ids}")
            continue
        is_thing = plural or panoptic.isthing.get(categories[ids[0]], False)
        grounded.append((position, ids, plural, is_thing))
    if not grounded:
        skips.bad(NO_PHRASES, file=narratives_file, record=record,
                  detail=f"none of its {len(segments)} segment(s) has a usable segment id")
        return None

    image_path = os.path.join(files["image_dir"], image_file)
    panoptic_path = os.path.join(files["panoptic_dir"], panoptic_file)
    if not os.path.exists(image_path):
        skips.bad(MISSING_IMAGE, file=image_path, record=record, detail="no such file")
        return None
    encoded = read_image_of_size(image_path, size=(height, width),
                                 size_file=panoptic.path, record=record, skips=skips)
    if encoded is None:
        return None
    segment_map = _read_panoptic(panoptic_path, size=(height, width), record=record,
                                 skips=skips, size_file=panoptic.path)
    if segment_map is None:
        return None

    offsets, position_in_text = [], 0
    for utterance, _, _ in segments:
        offsets.append(position_in_text)
        position_in_text += len(utterance) + 1
    phrase_of_segment = {position: p for p, (position, *_) in enumerate(grounded)}
    return {
        **image_fields(encoded=encoded, image_id=str(image_id), filename=image_file,
                       height=height, width=width),
        "narrative_index": index,
        "caption": caption,
        "narrative": " ".join(utterance for utterance, _, _ in segments),
        "segments": [{"utterance": utterance, "phrase": phrase_of_segment.get(position, -1)}
                     for position, (utterance, _, _) in enumerate(segments)],
        "phrases": [{
            "segment": position,
            "text": segments[position][0],
            "char_start": offsets[position],
            "char_end": offsets[position] + len(segments[position][0]),
            "plural": plural,
            "is_thing": is_thing,
            "num_segments": len(ids),
            "mask": mask_png(union_mask(segment_map, ids)),
        } for position, ids, plural, is_thing in grounded],
    }


def _read_panoptic(path: str, *, size: tuple[int, int], record: str, skips: SkipCounter,
                   size_file: str) -> np.ndarray | None:
    """The segment ids ``[H, W]`` of the panoptic PNG at ``path``, or ``None`` (reported)."""
    if not os.path.exists(path):
        skips.bad(MISSING_PANOPTIC, file=path, record=record, detail="no such file")
        return None
    try:
        rgb = read_image(path, name=path)
    except ImageError as error:
        skips.bad(CORRUPT_PANOPTIC, file=path, record=record, detail=str(error))
        return None
    if rgb.shape[:2] != size:
        skips.bad(PANOPTIC_SIZE_MISMATCH, file=path, record=record,
                  detail=f"png is {rgb.shape[1]}x{rgb.shape[0]}, {size_file} says "
                  f"{size[1]}x{size[0]}")
        return None
    return panoptic_ids(rgb)


_CITATION = """\
@inproceedings{gonzalez2021png,
  title     = {Panoptic Narrative Grounding},
  author    = {Cristina Gonz{\\'a}lez and Nicol{\\'a}s Ayobi and Isabela Hern{\\'a}ndez and
               Jos{\\'e} Hern{\\'a}ndez and Jordi Pont-Tuset and Pablo Arbel{\\'a}ez},
  booktitle = {ICCV},
  year      = {2021}
}
"""
