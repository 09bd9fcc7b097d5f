"""Dense-captioning label assignment: the training slots of a dense-captioning image, built from
its detector's caption candidates and ground-truth captions.

The data gives a dense-captioning image (``task_proposals > 0``) no slots, only ground-truth
objects (``gt_*``) and the task prompt in every slot's context (official: "an object of " and
EOS). The detector (:mod:`~pixelllm.models.pixel_llm.detector`) orders its candidates: the
official CenterNet2 its sampled RoIs, positives first (scenic ``get_matched_proposals_train``
takes the first ``num_text_proposals`` of ``last_proposals``); the light head the ground truth,
then its proposals. The first ``num_text_proposals`` matched candidates, in that order, become
the image's slots (prompt box = the candidate, without gradient; text = the caption of its ground
truth, with the text loss on). Their other slots are empty, with no point, box or mask targets.
Other images keep the batch's slots.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from pixelllm import batch as batch_lib
from pixelllm.models.pixel_llm.detector import CaptionCandidates


def assign_dense_caption_slots(batch: Mapping[str, jax.Array], candidates: CaptionCandidates,
                               *, num_text_proposals: int) -> dict[str, jax.Array]:
    """Every per-slot key of the batch (:data:`pixelllm.batch.SLOT_KEYS`), with the slots of
    dense-captioning images rebuilt from ``candidates`` (``[B, R]``, canvas pixels).

    Returns the slot inputs the model runs on and the objective reads, shapes as in the batch.
    """
    slots = batch[batch_lib.PROMPT_BOXES].shape[1]
    count = num_text_proposals
    if count > slots:
        raise ValueError(f"num_text_proposals {count} exceeds the batch's {slots} slots")
    if candidates.boxes.shape[1] < count:
        raise ValueError(f"num_text_proposals {count} exceeds the detector's "
                         f"{candidates.boxes.shape[1]} caption candidates")
    matched, gt_index = candidates.matched.astype(bool), candidates.gt_index
    # Matched candidates first, in the detector's order.
    order = jnp.argsort(~matched, axis=1, stable=True)[:, :count]
    chosen = jnp.take_along_axis(matched, order, axis=1)
    chosen_gt = jnp.take_along_axis(gt_index, order, axis=1)[..., None]
    text_mask = (jnp.take_along_axis(batch[batch_lib.GT_TEXT_MASK], chosen_gt, axis=1)
                 & chosen[..., None])
    rebuilt = {
        batch_lib.PROMPT_BOXES: jax.lax.stop_gradient(
            jnp.take_along_axis(candidates.boxes, order[..., None], axis=1)),
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
