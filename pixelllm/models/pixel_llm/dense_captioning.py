"""Dense-captioning label assignment: the training slots of a dense-captioning image, built from
its proposals and ground-truth captions (GRiT's recipe).

The data gives a dense-captioning image (``task_proposals > 0``) no slots, only ground-truth
objects (``gt_*``) and the task prompt in every slot's context. Candidates are the ground-truth
boxes followed by the proposals (as GRiT appends the ground truth to its proposals, so captions
train before proposals are good); each takes the caption of its best-IoU ground truth when that
IoU is >= ``iou_threshold`` (:func:`~pixelllm.models.pixel_llm.proposal_head.assign_captions`);
the first ``num_text_proposals`` matched candidates become the image's slots (prompt box = the
candidate, without gradient), with the text loss on. Their other slots are empty, with no point,
box or mask targets. Other images keep the batch's slots.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from pixelllm import batch as batch_lib
from pixelllm.models.pixel_llm import proposal_head as proposal_lib


def assign_dense_caption_slots(batch: Mapping[str, jax.Array], proposals: jax.Array, *,
                               iou_threshold: float, num_text_proposals: int
                               ) -> dict[str, jax.Array]:
    """Every per-slot key of the batch (:data:`pixelllm.batch.SLOT_KEYS`), with the slots of
    dense-captioning images rebuilt from ``proposals [B, P, 4]`` (canvas pixels).

    Returns the slot inputs the model runs on and the objective reads, shapes as in the batch.
    """
    slots = batch[batch_lib.PROMPT_BOXES].shape[1]
    count = num_text_proposals
    if count > slots:
        raise ValueError(f"num_text_proposals {count} exceeds the batch's {slots} slots")
    gt_boxes, gt_mask = batch[batch_lib.GT_BOXES], batch[batch_lib.GT_MASK].astype(bool)
    candidates = jnp.concatenate([gt_boxes, jax.lax.stop_gradient(proposals)], axis=1)
    candidate_valid = jnp.concatenate([gt_mask, jnp.ones(proposals.shape[:2], bool)], axis=1)
    gt_index, matched = proposal_lib.assign_captions(candidates, gt_boxes, gt_mask,
                                                     iou_threshold=iou_threshold)
    matched &= candidate_valid
    # Matched candidates first, in candidate order (ground truth before proposals).
    order = jnp.argsort(~matched, axis=1, stable=True)[:, :count]
    chosen = jnp.take_along_axis(matched, order, axis=1)
    chosen_gt = jnp.take_along_axis(gt_index, order, axis=1)[..., None]
    text_mask = (jnp.take_along_axis(batch[batch_lib.GT_TEXT_MASK], chosen_gt, axis=1)
                 & chosen[..., None])
    rebuilt = {
        batch_lib.PROMPT_BOXES: jnp.take_along_axis(candidates, order[..., None], axis=1),
        batch_lib.TEXT_TOKENS: jnp.take_along_axis(batch[batch_lib.GT_TEXT_TOKENS], chosen_gt,
                                                   axis=1),
        batch_lib.TEXT_MASK: text_mask,
        batch_lib.SLOT_MASK: chosen,
        batch_lib.TASK_TEXT: chosen,
    }
    dense = batch[batch_lib.TASK_PROPOSALS] > 0

    def slot_input(key: str) -> jax.Array:
        original = batch[key]
        if key in (batch_lib.CONTEXT_TOKENS, batch_lib.CONTEXT_MASK):
            return original  # the task prompt, as inference gives it
        # Slots past the chosen ones, and every target these slots do not train, are empty.
        replacement = jnp.zeros_like(original)
        if key in rebuilt:
            replacement = replacement.at[:, :count].set(rebuilt[key].astype(original.dtype))
        return jnp.where(dense.reshape(dense.shape + (1,) * (original.ndim - 1)), replacement,
                         original)

    return {key: slot_input(key) for key in batch_lib.SLOT_KEYS}
