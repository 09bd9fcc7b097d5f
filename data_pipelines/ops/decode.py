"""Builder example -> working example: decoded image, pixel coordinates, flat field names.

The builders (:mod:`data_pipelines.builders`) store coordinates normalized to the stored image
and nest per-object and per-utterance fields the TFDS way (a ``Sequence`` comes back from
``as_data_source()`` as a dict of lists). This op makes the form the other ops share
(:mod:`fields`):

* ``image``: a uint8 ``[H, W, 3]`` array as TFDS decodes it, or encoded bytes, read with
  :func:`data_pipelines.images.read_image` (stored frame, no EXIF rotation; mode conversion);
  undecodable bytes raise :class:`~data_pipelines.images.ImageError` naming the image, which the
  pipeline counts as a skipped record;
* texts: bytes -> str;
* Localized Narratives ``narratives`` + flat ``utterances`` -> ``narratives``, one dict per
  narrative with its utterances (trace boxes and points in pixels, ``visible`` all True), its
  raw trace points in pixels, and the narrative as stored for word alignment;
* RefCOCO / Visual Genome ``objects`` -> ``objects/box`` (pixels), ``objects/id``,
  ``objects/texts`` (RefCOCO expressions grouped per object, or the VG phrase) and, for
  RefCOCO, ``objects/mask`` (bool, image size);
* COCO Captions ``captions`` -> ``narratives``, one per caption, without utterances or trace
  (a caption task reads only their ``caption``);
* LLaVA-style ``turns`` -> one whole-image object whose ``objects/texts`` are the answers and
  ``objects/questions`` the questions, so that each (question, answer) pair fills a slot of
  its own and crops keep the pairs together.

Other fields are dropped: later ops see only what they know how to transform.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data_pipelines import alignment, images
from data_pipelines.ops import fields, registry


@registry.register("decode")
def decode() -> registry.Op:
    """The op: builder example -> working example (see the module docstring)."""

    def op(example: Mapping[str, Any], rng: np.random.Generator) -> fields.Example:
        del rng  # deterministic
        image_id = _text(example.get("image/id", ""))
        name = _text(example.get("image/filename", "")) or f"image {image_id}"
        image = _image(example["image"], name=name)
        height, width = image.shape[:2]
        out: fields.Example = {fields.IMAGE: image, fields.IMAGE_ID: image_id}
        if "narratives" in example:
            out[fields.NARRATIVES] = _narratives(example["narratives"], example["utterances"],
                                                 trace=example["trace"], width=width,
                                                 height=height, name=name)
        if "objects" in example:
            out.update(_objects(example, width=width, height=height, name=name))
        if "captions" in example:
            out[fields.NARRATIVES] = [_caption_only(_text(text))
                                      for text in example["captions"]["text"]]
        if "turns" in example:
            out[fields.OBJECT_BOXES] = np.asarray([[0, 0, width, height]], np.float32)
            out[fields.OBJECT_IDS] = np.zeros((1,), np.int64)
            out[fields.OBJECT_TEXTS] = [[_text(a) for a in example["turns"]["answer"]]]
            out[fields.OBJECT_QUESTIONS] = [[_text(q) for q in example["turns"]["question"]]]
        return out

    return op


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _image(value: np.ndarray | bytes, *, name: str) -> np.ndarray:
    if isinstance(value, bytes | bytearray | memoryview):
        return images.read_image(bytes(value), name=name)
    image = np.asarray(value)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name}: image must be uint8 [H, W, 3], got {image.dtype} "
                         f"{image.shape}")
    return image


def _pixels(normalized: Sequence, *, width: int, height: int, last: int) -> np.ndarray:
    """Normalized (x, y, ...) coordinates -> pixels; ``last`` is the size of the last axis."""
    values = np.asarray(normalized, np.float32).reshape(-1, last)
    scale = np.tile(np.asarray([width, height], np.float32), last // 2)
    return values * scale


def _narratives(narratives: Mapping[str, Sequence], utterances: Mapping[str, Sequence], *,
                trace: Mapping[str, Sequence], width: int, height: int,
                name: str) -> list[dict]:
    captions = [_text(c) for c in narratives["caption"]]
    owner = np.asarray(utterances["narrative"], np.int64).reshape(-1)
    if owner.size and (owner.min() < 0 or owner.max() >= len(captions)):
        raise ValueError(f"{name}: utterances point at narratives {sorted(set(owner))}, but "
                         f"there are {len(captions)}")
    texts = [_text(t) for t in utterances["text"]]
    boxes = np.asarray(utterances["box"], np.float32).reshape(-1, 4)
    points = np.asarray(utterances["points"], np.float32).reshape(len(owner), -1, 2)
    valid = np.asarray(utterances["valid"], bool).reshape(-1)
    start_times = np.asarray(utterances["start_time"], np.float64).reshape(-1)
    end_times = np.asarray(utterances["end_time"], np.float64).reshape(-1)
    trace_owner = np.asarray(trace["narrative"], np.int64).reshape(-1)
    trace_xy = np.asarray(trace["xy"], np.float32).reshape(-1, 2)
    trace_t = np.asarray(trace["t"], np.float64).reshape(-1)
    pixels = np.asarray([width, height], np.float32)
    out = []
    for index, caption in enumerate(captions):
        rows = np.flatnonzero(owner == index)
        trace_rows = np.flatnonzero(trace_owner == index)
        stored = alignment.NarrativeTraces(caption=caption,
                                           utterances=tuple(texts[r] for r in rows),
                                           boxes=boxes[rows], points=points[rows],
                                           valid=valid[rows], start_times=start_times[rows],
                                           end_times=end_times[rows],
                                           trace_xy=trace_xy[trace_rows],
                                           trace_t=trace_t[trace_rows])
        out.append({
            fields.CAPTION: caption,
            fields.UTTERANCE_TEXTS: list(stored.utterances),
            fields.UTTERANCE_BOXES: stored.boxes * np.tile(pixels, 2),
            fields.UTTERANCE_POINTS: stored.points * pixels,
            fields.UTTERANCE_VALID: stored.valid,
            fields.UTTERANCE_VISIBLE: np.ones(len(rows), bool),
            fields.TRACE_POINTS: stored.trace_xy * pixels,
            fields.ALIGNMENT_TRACES: stored,
        })
    return out


def _caption_only(caption: str) -> dict:
    """A narrative holding ``caption`` and no utterance or trace point."""
    no_points = np.zeros((0, 2), np.float32)
    empty = np.zeros((0,), bool)
    stored = alignment.NarrativeTraces(
        caption=caption, utterances=(), boxes=np.zeros((0, 4), np.float32),
        points=np.zeros((0, 0, 2), np.float32), valid=empty,
        start_times=np.zeros((0,), np.float64), end_times=np.zeros((0,), np.float64),
        trace_xy=no_points, trace_t=np.zeros((0,), np.float64))
    return {fields.CAPTION: caption, fields.UTTERANCE_TEXTS: [],
            fields.UTTERANCE_BOXES: stored.boxes, fields.UTTERANCE_POINTS: stored.points,
            fields.UTTERANCE_VALID: empty, fields.UTTERANCE_VISIBLE: empty,
            fields.TRACE_POINTS: no_points, fields.ALIGNMENT_TRACES: stored}


def _objects(example: Mapping[str, Any], *, width: int, height: int,
             name: str) -> fields.Example:
    objects = example["objects"]
    boxes = _pixels(objects["box"], width=width, height=height, last=4)
    count = len(boxes)
    out: fields.Example = {
        fields.OBJECT_BOXES: boxes,
        fields.OBJECT_IDS: np.asarray(objects.get("id", np.arange(count)), np.int64).reshape(-1),
    }
    if "phrase" in objects:
        out[fields.OBJECT_TEXTS] = [[_text(p)] for p in objects["phrase"]]
    elif "expressions" in example:
        expressions = example["expressions"]
        owner = np.asarray(expressions["object"], np.int64).reshape(-1)
        texts = [_text(t) for t in expressions["text"]]
        out[fields.OBJECT_TEXTS] = [[texts[r] for r in np.flatnonzero(owner == index)]
                                    for index in range(count)]
    else:
        raise ValueError(f"{name}: objects have neither 'phrase' nor 'expressions'")
    if "mask" in objects:
        masks = np.zeros((count, height, width), bool)
        for index, mask in enumerate(objects["mask"]):
            mask = _mask(mask, name=f"{name} object {index} mask")
            if mask.shape != (height, width):
                raise ValueError(f"{name}: object {index} mask is {mask.shape[1]}x"
                                 f"{mask.shape[0]}, the image {width}x{height}")
            masks[index] = mask
        out[fields.OBJECT_MASKS] = masks
    return out


def _mask(value: np.ndarray | bytes, *, name: str) -> np.ndarray:
    if isinstance(value, bytes | bytearray | memoryview):
        return images.read_image(bytes(value), name=name)[:, :, 0] > 0
    mask = np.asarray(value)
    return (mask[:, :, 0] if mask.ndim == 3 else mask) > 0
