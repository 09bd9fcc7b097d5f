"""Records what evaluation needs about the original image, before any op changes it.

Placed right after ``decode`` in evaluation chains (``configs/data.py``), the op adds the
evaluation-only keys of the batch contract (:data:`pixelllm.batch.EVALUATION_SPEC`):

* ``image_id`` int64: the record's ``image/id`` as an integer (COCO and Visual Genome ids are
  decimal strings), or, for a non-numeric id, the first 63 bits of its BLAKE2b hash (stable
  across processes, unlike Python's ``hash``);
* ``original_wh`` int32 ``[2]``: the decoded image's (width, height), the frame the annotations
  and the official evaluators use;
* with ``original_masks=M`` (referring segmentation), ``objects/original_mask`` bool
  ``[N, M, M]``: every object's decoded mask at the original size, zero-padded to ``M x M``,
  which ``slot`` lays out per slot as the batch's ``original_masks`` (the ground truth the
  official evaluator decodes from the annotations at original size).

The geometric ops carry unknown keys along (and drop the rows of ``objects/*`` keys together),
``slot`` copies the batch keys into its output and ``tokenize`` keeps them, so they reach the
batch; training chains do not add them.
"""

from __future__ import annotations

import hashlib

import numpy as np

from data_pipelines.ops import fields, registry
from pixelllm import batch

_INT64_MAX = np.iinfo(np.int64).max


def integer_image_id(image_id: str) -> int:
    """``image_id`` as a non-negative int64: its decimal value, else a 63-bit hash of it."""
    text = image_id.strip()
    if text.isdecimal() and int(text) <= _INT64_MAX:
        return int(text)
    digest = hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@registry.register("evaluation_metadata")
def evaluation_metadata(*, original_masks: int = 0) -> registry.Op:
    """The op: adds ``image_id`` and ``original_wh`` to a decoded working example, and with
    ``original_masks`` (M > 0) the objects' masks at the original size in an ``M x M`` frame."""
    if original_masks < 0:
        raise ValueError(f"evaluation_metadata: original_masks must be >= 0, got "
                         f"{original_masks}")

    def op(example: fields.Example, rng: np.random.Generator) -> fields.Example:
        del rng  # deterministic
        if fields.VALID_WH in example:
            raise ValueError(f"example {example.get(fields.IMAGE_ID, '?')}: "
                             "evaluation_metadata must come right after decode, before the "
                             "image is resized onto the canvas")
        height, width = example[fields.IMAGE].shape[:2]
        out = {**example,
               batch.IMAGE_ID: np.int64(integer_image_id(str(example.get(fields.IMAGE_ID, "")))),
               batch.ORIGINAL_WH: np.asarray([width, height], np.int32)}
        if original_masks:
            out[fields.OBJECT_ORIGINAL_MASKS] = _framed_masks(example, original_masks)
        return out

    return op


def _framed_masks(example: fields.Example, side: int) -> np.ndarray:
    """``objects/mask [N, h, w]`` -> bool ``[N, side, side]``, each mask in the top-left
    corner."""
    where = f"example {example.get(fields.IMAGE_ID, '?')}"
    if fields.OBJECT_MASKS not in example:
        raise ValueError(f"{where}: evaluation_metadata(original_masks={side}) needs object "
                         f"masks ({fields.OBJECT_MASKS!r}); the source has none")
    masks = np.asarray(example[fields.OBJECT_MASKS], bool)
    height, width = masks.shape[1:]
    if height > side or width > side:
        raise ValueError(f"{where}: a {width} x {height} image does not fit the "
                         f"original_masks frame of {side} (raise the sizes' original_masks)")
    framed = np.zeros((len(masks), side, side), bool)
    framed[:, :height, :width] = masks
    return framed
