"""Greedy non-maximum suppression with static shapes (jit- and vmap-able).

Greedy NMS visits boxes by descending score (ties: lower index first, as a stable sort) and keeps
a box unless a kept box overlaps it with ``IoU >= iou_threshold`` (the official scenic CenterNet2
NMS suppresses at ``>=``; torchvision at ``>``). It stops after ``max_output`` kept boxes. The
output always has ``max_output`` slots; slots past the number of kept boxes are marked invalid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pixelllm.nn import box_ops


def non_max_suppression(boxes: jax.Array, scores: jax.Array, *, iou_threshold: float,
                        max_output: int, valid: jax.Array | None = None
                        ) -> tuple[jax.Array, jax.Array]:
    """Greedy NMS of one set of boxes (``jax.vmap`` it over a batch).

    Args:
      boxes: ``[N, 4]`` xyxy.
      scores: ``[N]``; higher first.
      iou_threshold: a box is suppressed by a kept box of IoU >= this.
      max_output: number of output slots.
      valid: ``[N]`` bool; invalid boxes are never kept and suppress nothing. None: all valid.

    Returns ``indices [max_output]`` int32 into ``boxes`` (kept boxes by descending score; 0 in
    invalid slots) and ``kept [max_output]`` bool.
    """
    boxes, scores = jnp.asarray(boxes, jnp.float32), jnp.asarray(scores, jnp.float32)
    num_boxes = boxes.shape[0]
    if scores.shape != (num_boxes,):
        raise ValueError(f"non_max_suppression: scores have shape {scores.shape}, expected "
                         f"({num_boxes},) for boxes {boxes.shape}")
    if max_output < 1:
        raise ValueError(f"non_max_suppression: max_output must be >= 1, got {max_output}")
    if valid is None:
        valid = jnp.ones((num_boxes,), bool)
    order = jnp.argsort(-scores, stable=True)
    sorted_boxes = boxes[order]
    # Invalid boxes start suppressed: they are skipped and, never kept, suppress nothing.
    suppressed = ~jnp.asarray(valid, bool)[order]
    indices = jnp.zeros((max_output,), jnp.int32)

    def keep_going(state):
        position, count, _, _ = state
        return (position < num_boxes) & (count < max_output)

    def visit(state):
        position, count, suppressed, indices = state
        keep = ~suppressed[position]
        overlap = box_ops.iou(sorted_boxes[position][None, :], sorted_boxes)
        later = jnp.arange(num_boxes) > position
        suppressed = suppressed | (keep & later & (overlap >= iou_threshold))
        indices = jnp.where(keep, indices.at[count].set(order[position].astype(jnp.int32)),
                            indices)
        return position + 1, count + keep.astype(jnp.int32), suppressed, indices

    _, count, _, indices = jax.lax.while_loop(
        keep_going, visit, (jnp.int32(0), jnp.int32(0), suppressed, indices))
    return indices, jnp.arange(max_output) < count
