"""Moving an example's image and every coordinate field together (resize, crop, flip, pad).

All geometric ops go through these helpers, so boxes, trace boxes and points, and masks follow the
pixels by one rule: a point (x, y) on the source region ``[x0, x1) x [y0, y1)`` resampled to
``w' x h'`` pixels lands at ``((x - x0) * w' / (x1 - x0), (y - y0) * h' / (y1 - y0))``, the
continuous-coordinate map under which pixel edges go to pixel edges (pixel i covers [i, i+1)).
Images are resampled bilinearly (PIL, antialiased when shrinking), masks by nearest neighbour.

After a crop, boxes are clipped to the new image. An object whose clipped box is narrower or
lower than ``min_box_size`` is dropped with all its ``objects/*`` fields (expressions and
prompts included); an utterance whose trace box leaves the image is marked not visible, so its
words get no trace target, and its points are clipped to the image. Raw trace points are moved
but not clipped: the exact alignment tells the points left inside the image from the others.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from data_pipelines.ops import fields

Example = fields.Example


def image_size(example: Example) -> tuple[int, int]:
    """``(width, height)`` of the example's image content (its valid area once padded)."""
    if fields.VALID_WH in example:
        width, height = np.asarray(example[fields.VALID_WH]).round().astype(int)
        return int(width), int(height)
    height, width = example[fields.IMAGE].shape[:2]
    return width, height


def resample(example: Example, *, size_wh: tuple[int, int],
             source_box: tuple[float, float, float, float] | None = None,
             min_box_size: float | None = None) -> Example:
    """The region ``source_box`` (xyxy pixels; the whole image by default) resampled to
    ``size_wh`` pixels, coordinates moved along and clipped to the new image.

    Args:
      example: a working example without ``valid_wh`` (not yet on a canvas).
      size_wh: output ``(width, height)``.
      source_box: the region to keep; may extend past the image only by rounding.
      min_box_size: drop objects whose clipped box is narrower or lower than this (pixels);
        ``None`` keeps every object, clipped.
    """
    if fields.VALID_WH in example:
        raise ValueError(f"example {example.get(fields.IMAGE_ID, '?')}: resample before padding "
                         "to the canvas, not after")
    image = example[fields.IMAGE]
    height, width = image.shape[:2]
    x0, y0, x1, y1 = source_box if source_box is not None else (0.0, 0.0, width, height)
    out_w, out_h = size_wh
    scale = (out_w / (x1 - x0), out_h / (y1 - y0))
    out = transform_coordinates(example, scale=scale, offset=(-x0 * scale[0], -y0 * scale[1]))
    pil_box = (float(x0), float(y0), float(x1), float(y1))
    out[fields.IMAGE] = np.asarray(Image.fromarray(image).resize(
        (out_w, out_h), Image.Resampling.BILINEAR, box=pil_box))
    if fields.OBJECT_MASKS in example:
        out[fields.OBJECT_MASKS] = _resample_masks(example[fields.OBJECT_MASKS],
                                                   size_wh=size_wh, box=pil_box)
    return clip(out, width=out_w, height=out_h, min_box_size=min_box_size)


def transform_coordinates(example: Example, *, scale: tuple[float, float],
                          offset: tuple[float, float]) -> Example:
    """A copy with every coordinate mapped by ``x' = scale_x * x + offset_x`` (same for y); a
    negative scale mirrors, and boxes are re-sorted so ``x0 <= x1``, ``y0 <= y1``."""
    scale_xy = np.asarray(scale, np.float32)
    offset_xy = np.asarray(offset, np.float32)

    def points(p: np.ndarray) -> np.ndarray:
        return (np.asarray(p, np.float32) * scale_xy + offset_xy).astype(np.float32)

    def boxes(b: np.ndarray) -> np.ndarray:
        b = np.asarray(b, np.float32).reshape(-1, 2, 2)
        moved = points(b)
        return np.concatenate([moved.min(axis=1), moved.max(axis=1)], axis=-1)

    out = dict(example)
    if fields.OBJECT_BOXES in example:
        out[fields.OBJECT_BOXES] = boxes(example[fields.OBJECT_BOXES])
    if fields.NARRATIVES in example:
        out[fields.NARRATIVES] = [
            {**n, fields.UTTERANCE_BOXES: boxes(n[fields.UTTERANCE_BOXES]),
             **{key: points(n[key]) for key in (fields.UTTERANCE_POINTS, fields.TRACE_POINTS)
                if key in n}}
            for n in example[fields.NARRATIVES]]
    return out


def clip(example: Example, *, width: float, height: float,
         min_box_size: float | None) -> Example:
    """Coordinates clipped to ``[0, width] x [0, height]``; see the module docstring for what
    happens to objects (``min_box_size``) and utterances that end up outside."""
    limits = np.asarray([width, height, width, height], np.float32)
    out = dict(example)
    if fields.OBJECT_BOXES in example:
        out[fields.OBJECT_BOXES] = np.clip(example[fields.OBJECT_BOXES], 0, limits)
        if min_box_size is not None:
            box_wh = out[fields.OBJECT_BOXES][:, 2:] - out[fields.OBJECT_BOXES][:, :2]
            out = fields.keep_objects(out, (box_wh >= min_box_size).all(axis=1))
    if fields.NARRATIVES in example:
        narratives = []
        for narrative in example[fields.NARRATIVES]:
            box = np.clip(narrative[fields.UTTERANCE_BOXES], 0, limits)
            inside = ((box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1]))
            narratives.append({
                **narrative,
                fields.UTTERANCE_BOXES: box,
                fields.UTTERANCE_POINTS: np.clip(narrative[fields.UTTERANCE_POINTS], 0,
                                                 limits[:2]),
                fields.UTTERANCE_VISIBLE: narrative[fields.UTTERANCE_VISIBLE] & inside,
            })
        out[fields.NARRATIVES] = narratives
    return out


def pad_to_canvas(example: Example, *, canvas: int) -> Example:
    """The image (and masks) zero-padded at the bottom and right to ``canvas x canvas``, with
    ``valid_wh`` set to the original size."""
    image = example[fields.IMAGE]
    height, width = image.shape[:2]
    if height > canvas or width > canvas:
        raise ValueError(f"example {example.get(fields.IMAGE_ID, '?')}: image {width}x{height} "
                         f"does not fit the {canvas}x{canvas} canvas")
    out = dict(example)
    padded = np.zeros((canvas, canvas, 3), np.uint8)
    padded[:height, :width] = image
    out[fields.IMAGE] = padded
    if fields.OBJECT_MASKS in example:
        masks = example[fields.OBJECT_MASKS]
        padded_masks = np.zeros((len(masks), canvas, canvas), bool)
        padded_masks[:, :height, :width] = masks
        out[fields.OBJECT_MASKS] = padded_masks
    out[fields.VALID_WH] = np.asarray([width, height], np.float32)
    return out


def _resample_masks(masks: np.ndarray, *, size_wh: tuple[int, int],
                    box: tuple[float, float, float, float]) -> np.ndarray:
    out = np.zeros((len(masks), size_wh[1], size_wh[0]), bool)
    for i, mask in enumerate(masks):
        resized = Image.fromarray(np.asarray(mask, np.uint8) * 255).resize(
            size_wh, Image.Resampling.NEAREST, box=box)
        out[i] = np.asarray(resized) > 127
    return out
