"""The batch contract between the input pipeline and the models: key names, sizes, the spec
(derived once, from :data:`SPEC`) and its checks.

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
task_text           float32 [B, S]           per-slot loss masks (:data:`LOSS_MASKS`), set
task_points         float32 [B, S]           from the task's row of :mod:`pixelllm.tasks`
task_box            float32 [B, S]
task_mask           float32 [B, S]
task_proposals      float32 [B]              per image: proposal losses, and slots built from
                                             proposals (dense captioning)
gt_boxes            float32 [B, G, 4]        objects for dense captioning
gt_mask             bool [B, G]              real objects
gt_text_tokens      int32 [B, G, L]          each object's caption, laid out as text_tokens
gt_text_mask        bool [B, G, L]
==================  =======================  =================================================

Every example carries its own loss masks, so one batch can mix tasks.

Evaluation-only keys (:data:`EVALUATION_SPEC`): evaluation pipelines built with
``evaluation_keys=True`` (``data_pipelines.pipeline.eval_from_config``) add them, recorded at
decode time by the ``evaluation_metadata`` op; they stay on the host (the evaluation driver,
``pixelllm/train/evaluation.py``, maps canvas predictions and ground truth back to original-image
pixels with them) and are never part of a training batch:

==================  =======================  =================================================
image_id            int64 [B]                the record's ``image/id``: its integer value, or
                                             a 63-bit hash of a non-numeric id; 0 on padding
original_wh         int32 [B, 2]             (width, height) of the stored image before any
                                             resize; 0 on padding examples
original_masks      bool [B, S, M, M]        each slot's referring mask at the original size,
                                             in the top-left ``height x width`` corner of an
                                             ``M x M`` zero frame (the ground truth the official
                                             RefCOCO evaluator decodes at original size); only
                                             where ``Sizes.original_masks`` (M) > 0
==================  =======================  =================================================

Cached-feature key (:data:`CACHED_SPEC`): a training pipeline reading the SAM feature cache
(``config.data.sam_feature_cache``, :mod:`data_pipelines.sam_feature_store`) adds the frozen SAM
image encoder's output for each example's canvas, and the model then skips that encoder; present
only where ``Sizes.sam_grid`` > 0:

==================  =======================  =================================================
sam_features        float32 [B, F, F, C]     SAM's image embedding of ``image`` (F = canvas /
                                             16, C = SAM's ``out_chans``), as computed without
                                             drop path
==================  =======================  =================================================

Checks: :func:`validate` (keys, dtype kinds, ranks, agreeing sizes; shapes and dtypes only, so
it also runs on tracers), :func:`check_token_ids` (values: every id inside the vocabulary) and
:class:`BatchChecker`, both at the train-step boundary on host arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

IMAGE = "image"
VALID_WH = "valid_wh"
PROMPT_BOXES = "prompt_boxes"
CONTEXT_TOKENS = "context_tokens"
CONTEXT_MASK = "context_mask"
TEXT_TOKENS = "text_tokens"
TEXT_MASK = "text_mask"
TOKEN_POINTS = "token_points"
TOKEN_POINTS_MASK = "token_points_mask"
TARGET_BOXES = "target_boxes"
TARGET_MASKS = "target_masks"
SLOT_MASK = "slot_mask"
TASK_TEXT = "task_text"
TASK_POINTS = "task_points"
TASK_BOX = "task_box"
TASK_MASK = "task_mask"
TASK_PROPOSALS = "task_proposals"
GT_BOXES = "gt_boxes"
GT_MASK = "gt_mask"
GT_TEXT_TOKENS = "gt_text_tokens"
GT_TEXT_MASK = "gt_text_mask"
IMAGE_ID = "image_id"
ORIGINAL_WH = "original_wh"
ORIGINAL_MASKS = "original_masks"
SAM_FEATURES = "sam_features"

# The loss masks of the contract, by the loss names of the task table (pixelllm/tasks.py).
LOSS_MASKS = {"text": TASK_TEXT, "points": TASK_POINTS, "box": TASK_BOX, "mask": TASK_MASK,
              "proposals": TASK_PROPOSALS}

# Keys holding token ids: each must lie in [0, vocab_size).
TOKEN_KEYS = (CONTEXT_TOKENS, TEXT_TOKENS, GT_TEXT_TOKENS)


class Field(NamedTuple):
    """One key of the contract: its dtype and the names of its axes (sizes that must agree
    across keys; digits are fixed sizes)."""
    dtype: np.dtype
    axes: tuple[str, ...]


_F32, _I32, _BOOL = np.dtype(np.float32), np.dtype(np.int32), np.dtype(bool)

SPEC: dict[str, Field] = {
    IMAGE: Field(_F32, ("B", "H", "W", "3")),
    VALID_WH: Field(_F32, ("B", "2")),
    PROMPT_BOXES: Field(_F32, ("B", "S", "4")),
    CONTEXT_TOKENS: Field(_I32, ("B", "S", "Lc")),
    CONTEXT_MASK: Field(_BOOL, ("B", "S", "Lc")),
    TEXT_TOKENS: Field(_I32, ("B", "S", "L")),
    TEXT_MASK: Field(_BOOL, ("B", "S", "L")),
    TOKEN_POINTS: Field(_F32, ("B", "S", "L", "K", "2")),
    TOKEN_POINTS_MASK: Field(_BOOL, ("B", "S", "L")),
    TARGET_BOXES: Field(_F32, ("B", "S", "4")),
    TARGET_MASKS: Field(_BOOL, ("B", "S", "H", "W")),
    SLOT_MASK: Field(_BOOL, ("B", "S")),
    TASK_TEXT: Field(_F32, ("B", "S")),
    TASK_POINTS: Field(_F32, ("B", "S")),
    TASK_BOX: Field(_F32, ("B", "S")),
    TASK_MASK: Field(_F32, ("B", "S")),
    TASK_PROPOSALS: Field(_F32, ("B",)),
    GT_BOXES: Field(_F32, ("B", "G", "4")),
    GT_MASK: Field(_BOOL, ("B", "G")),
    GT_TEXT_TOKENS: Field(_I32, ("B", "G", "L")),
    GT_TEXT_MASK: Field(_BOOL, ("B", "G", "L")),
}

# Evaluation-only keys (module docstring): host-side metadata, never validated by the train step.
EVALUATION_SPEC: dict[str, Field] = {
    IMAGE_ID: Field(np.dtype(np.int64), ("B",)),
    ORIGINAL_WH: Field(_I32, ("B", "2")),
    ORIGINAL_MASKS: Field(_BOOL, ("B", "S", "M", "M")),
}
# Evaluation-only keys a pipeline has only when its sizes ask for them (Sizes.original_masks).
OPTIONAL_EVALUATION_KEYS = (ORIGINAL_MASKS,)

# The key a training pipeline adds when it reads cached SAM features (Sizes.sam_grid > 0).
CACHED_SPEC: dict[str, Field] = {SAM_FEATURES: Field(_F32, ("B", "F", "F", "C"))}

# The per-slot keys ([B, S, ...]): what a model may rebuild per slot (dense captioning).
SLOT_KEYS = tuple(key for key, field in SPEC.items() if field.axes[:2] == ("B", "S"))


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The fixed sizes of the batch contract.

    Attributes:
      canvas: H = W, canvas pixels.
      slots: S, caption slots per image.
      context_length: Lc, context tokens per slot.
      text_length: L, text tokens per slot (and per ground-truth object).
      points_per_token: K, trace target points per token.
      objects: G, ground-truth objects per image (dense captioning).
      original_masks: M, the side of the evaluation-only ``original_masks`` frame (at least
        every original image side; COCO's largest is 640); 0: no such key (evaluation sources
        of tasks without masks, and training).
      sam_grid: F, the side of the cached ``sam_features`` grid (canvas / 16); 0: no such key
        (SAM runs in the model).
      sam_channels: C, the channels of ``sam_features`` (SAM's ``out_chans``).
    """

    canvas: int = 384
    slots: int = 16
    context_length: int = 32
    text_length: int = 128
    points_per_token: int = 2
    objects: int = 100
    original_masks: int = 0
    sam_grid: int = 0
    sam_channels: int = 0

    def axes(self) -> dict[str, int]:
        """Axis name -> size, for every axis of :data:`SPEC` and :data:`CACHED_SPEC` but B."""
        return {"H": self.canvas, "W": self.canvas, "S": self.slots, "Lc": self.context_length,
                "L": self.text_length, "K": self.points_per_token, "G": self.objects,
                "F": self.sam_grid, "C": self.sam_channels}

    def fields(self) -> dict[str, Field]:
        """The training keys of a batch of these sizes: :data:`SPEC`, and
        :data:`CACHED_SPEC` where ``sam_grid`` > 0."""
        return {**SPEC, **(CACHED_SPEC if self.sam_grid > 0 else {})}


def _shape(axes: tuple[str, ...], sizes: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(int(axis) if axis.isdigit() else sizes[axis] for axis in axes)


def example_spec(sizes: Sizes, *, evaluation: bool = False
                 ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``key -> (shape, dtype)`` of one example (a batch without its leading B axis); with
    ``evaluation``, the evaluation-only keys (:data:`EVALUATION_SPEC`) too, ``original_masks``
    only where ``sizes.original_masks`` > 0."""
    named = {**sizes.axes(), "M": sizes.original_masks}
    fields = sizes.fields()
    if evaluation:
        fields.update({key: field for key, field in EVALUATION_SPEC.items()
                       if key not in OPTIONAL_EVALUATION_KEYS or sizes.original_masks > 0})
    return {key: (_shape(field.axes[1:], named), field.dtype) for key, field in fields.items()}


def batch_spec(sizes: Sizes, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``key -> (shape, dtype)`` of a training batch of ``batch_size`` examples."""
    named = {**sizes.axes(), "B": batch_size}
    return {key: (_shape(field.axes, named), field.dtype) for key, field in sizes.fields().items()}


_KINDS = {"f": "floating", "i": "integer", "b": "bool"}


class BatchError(ValueError):
    """A batch that does not follow the contract; the message names the key."""


def _kind_ok(dtype: np.dtype, kind: str) -> bool:
    if kind == "b":
        return dtype == np.bool_
    if kind == "i":
        return np.issubdtype(dtype, np.integer)
    return np.issubdtype(dtype, np.floating)


def validate(batch: Mapping[str, Any]) -> dict[str, int]:
    """Checks keys, dtype kinds, ranks and that shared sizes agree; returns the sizes (``B``,
    ``S``, ...).

    Reads shapes and dtypes only, so numpy arrays, jax arrays, tracers and
    ``jax.ShapeDtypeStruct`` s all work (a model may call it while being traced: it then costs
    nothing per step).
    """
    missing = sorted(set(SPEC) - set(batch))
    if missing:
        raise BatchError(f"batch is missing keys {missing}")
    sizes: dict[str, int] = {}
    fields = {**SPEC, **{key: field for key, field in CACHED_SPEC.items() if key in batch}}
    for key, field in fields.items():
        value = batch[key]
        shape, dtype = tuple(value.shape), np.dtype(value.dtype)
        if not _kind_ok(dtype, field.dtype.kind):
            raise BatchError(f"batch[{key!r}] must be {_KINDS[field.dtype.kind]}, got {dtype}")
        if len(shape) != len(field.axes):
            raise BatchError(f"batch[{key!r}] must have shape [{', '.join(field.axes)}], "
                             f"got {shape}")
        for axis, size in zip(field.axes, shape):
            if axis.isdigit() and size != int(axis):
                raise BatchError(f"batch[{key!r}] must have shape [{', '.join(field.axes)}], "
                                 f"got {shape}")
            expected = sizes.setdefault(axis, size)
            if size != expected:
                raise BatchError(f"batch[{key!r}] has {axis}={size} but other keys have "
                                 f"{axis}={expected} (shape [{', '.join(field.axes)}] = {shape})")
    return {axis: size for axis, size in sizes.items() if not axis.isdigit()}


def check_token_ids(batch: Mapping[str, Any], vocab_size: int) -> None:
    """Raises :class:`BatchError` naming the key unless every id of :data:`TOKEN_KEYS` is in
    ``[0, vocab_size)``, padding included (an embedding lookup of an out-of-range id would
    silently read a clamped row on device)."""
    for key in TOKEN_KEYS:
        ids = np.asarray(batch[key])
        if ids.size == 0:
            continue
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise BatchError(f"batch[{key!r}] holds token id {bad}, outside the vocabulary "
                             f"[0, {vocab_size}) (is the tokenizer the language model's?)")


class BatchChecker:
    """The train-step boundary check, called on every host batch before it enters ``jit``.

    The structure (:func:`validate`, and the expected ``sizes`` if given) is checked once per
    (keys, shapes, dtypes) signature, so a steady stream of same-shaped batches pays for it once;
    token ids (:func:`check_token_ids`) are values and are checked on every call.

    Args:
      vocab_size: the language model's vocabulary size.
      sizes: the sizes the model was built for (B is free); None accepts any agreeing sizes.
    """

    def __init__(self, *, vocab_size: int, sizes: Sizes | None = None):
        self.vocab_size = vocab_size
        self.sizes = sizes
        self._seen: set[tuple] = set()

    def __call__(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        """Checks ``batch`` and returns it."""
        signature = tuple(sorted((key, tuple(value.shape), str(value.dtype))
                                 for key, value in batch.items()))
        if signature not in self._seen:
            found = validate(batch)
            if self.sizes is not None:
                fields = self.sizes.fields()
                missing = sorted(set(fields) - set(batch))
                if missing:
                    raise BatchError(f"batch is missing keys {missing} (sizes {self.sizes})")
                for axis, expected in self.sizes.axes().items():
                    key = next((k for k, f in fields.items() if axis in f.axes), None)
                    if key is not None and found[axis] != expected:
                        raise BatchError(f"batch[{key!r}] has {axis}={found[axis]}, the model "
                                         f"expects {axis}={expected}")
            self._seen.add(signature)
        check_token_ids(batch, self.vocab_size)
        return batch
