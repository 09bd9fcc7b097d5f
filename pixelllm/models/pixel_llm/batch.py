"""The batch contract between the input pipeline and the model, and its validation.

B images, S caption slots per image, Lc context tokens, L text tokens, K points per token, G
ground-truth objects per image, an H x W canvas. Coordinates are canvas pixels, ``(x, y)`` from
the top-left corner; boxes ``(x0, y0, x1, y1)`` (README, Conventions).

==================  =======================  =================================================
key                 dtype, shape             meaning
==================  =======================  =================================================
image               float32 [B, H, W, 3]     RGB 0-255, aspect-preserving resize, zero padding
                                             bottom/right
valid_wh            float32 [B, 2]           (width, height) of the unpadded image area
prompt_boxes        float32 [B, S, 4]        location prompt per slot (whole valid image for
                                             global tasks)
context_tokens      int32 [B, S, Lc]         task prompt tokens + EOS, then padding
context_mask        bool [B, S, Lc]          True on real context tokens
text_tokens         int32 [B, S, L]          BOS + target text + EOS, then padding
text_mask           bool [B, S, L]           True on BOS..EOS
token_points        float32 [B, S, L, K, 2]  trace target points of each text token
token_points_mask   bool [B, S, L]           tokens with trace targets (words only)
target_boxes        float32 [B, S, 4]        referring box, read where EOS is emitted
target_masks        bool [B, S, H, W]        referring mask on the canvas
slot_mask           bool [B, S]              used slots
task_text           float32 [B, S]           per-slot task masks: which losses apply
task_points         float32 [B, S]
task_box            float32 [B, S]
task_mask           float32 [B, S]
task_proposals      float32 [B]              per image: dense captioning (proposal head, and
                                             slots built from proposals, see
                                             ``PixelLLM.dense_caption_slots``)
gt_boxes            float32 [B, G, 4]        objects for dense captioning
gt_mask             bool [B, G]              real objects
gt_text_tokens      int32 [B, G, L]          each object's caption, laid out as text_tokens
gt_text_mask        bool [B, G, L]
==================  =======================  =================================================

Tasks set these masks (per example, so one batch can mix tasks): captioning with traces
(text + points), captioning / VQA (text), referring localization (text + box), referring
segmentation (text + box + mask), location-conditioned captioning (text, prompt box = object),
dense captioning (``task_proposals``; context "an object of " in every slot).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# key -> (dtype kind, axes); axes name the sizes that must agree across keys.
SPEC: dict[str, tuple[str, tuple[str, ...]]] = {
    "image": ("f", ("B", "H", "W", "3")),
    "valid_wh": ("f", ("B", "2")),
    "prompt_boxes": ("f", ("B", "S", "4")),
    "context_tokens": ("i", ("B", "S", "Lc")),
    "context_mask": ("b", ("B", "S", "Lc")),
    "text_tokens": ("i", ("B", "S", "L")),
    "text_mask": ("b", ("B", "S", "L")),
    "token_points": ("f", ("B", "S", "L", "K", "2")),
    "token_points_mask": ("b", ("B", "S", "L")),
    "target_boxes": ("f", ("B", "S", "4")),
    "target_masks": ("b", ("B", "S", "H", "W")),
    "slot_mask": ("b", ("B", "S")),
    "task_text": ("f", ("B", "S")),
    "task_points": ("f", ("B", "S")),
    "task_box": ("f", ("B", "S")),
    "task_mask": ("f", ("B", "S")),
    "task_proposals": ("f", ("B",)),
    "gt_boxes": ("f", ("B", "G", "4")),
    "gt_mask": ("b", ("B", "G")),
    "gt_text_tokens": ("i", ("B", "G", "L")),
    "gt_text_mask": ("b", ("B", "G", "L")),
}

_KINDS = {"f": "floating", "i": "integer", "b": "bool"}


class BatchError(ValueError):
    """A batch that does not follow the contract; the message names the key."""


def _kind_ok(dtype: np.dtype, kind: str) -> bool:
    if kind == "b":
        return dtype == np.bool_
    if kind == "i":
        return np.issubdtype(dtype, np.integer)
    return np.issubdtype(dtype, np.floating)


def validate(batch: Mapping[str, object]) -> dict[str, int]:
    """Checks keys, dtypes and that shared sizes agree; returns the sizes (``B``, ``S``, ...).

    Works on numpy arrays, jax arrays and ``jax.ShapeDtypeStruct`` s alike (shapes and dtypes only).
    """
    missing = sorted(set(SPEC) - set(batch))
    if missing:
        raise BatchError(f"batch is missing keys {missing}")
    sizes: dict[str, int] = {"2": 2, "3": 3, "4": 4}
    for key, (kind, axes) in SPEC.items():
        value = batch[key]
        shape, dtype = tuple(value.shape), np.dtype(value.dtype)
        if not _kind_ok(dtype, kind):
            raise BatchError(f"batch[{key!r}] must be {_KINDS[kind]}, got {dtype}")
        if len(shape) != len(axes):
            raise BatchError(f"batch[{key!r}] must have shape [{', '.join(axes)}], got {shape}")
        for axis, size in zip(axes, shape):
            expected = sizes.setdefault(axis, size)
            if size != expected:
                raise BatchError(f"batch[{key!r}] has {axis}={size} but other keys have "
                                 f"{axis}={expected} (shape [{', '.join(axes)}] = {shape})")
    return {axis: size for axis, size in sizes.items() if not axis.isdigit()}
