"""PixelLLM's training objective: every task's losses in one batch, gated per example.

Each term is a :class:`~pixelllm.nn.losses.LossValue` (a weighted sum and its normalizer), so
a batch mixing tasks normalizes each loss by the examples that have it (the official code needs one
task per batch and scales by the batch mean of a task mask instead). Total::

    text      * CE(logits, next token; label smoothing)      slots with task_text, real tokens
                                                             (+ task_box if text_on_referring)
  + point     * L1(token points, trace targets)  [pixels]    tokens with token_points_mask, task_points
  + box_l1    * L1(EOS box, target box)          [pixels]    slots with task_box
  + box_giou  * (1 - GIoU(EOS box, target box))              (official weight 0)
  + mask_focal * focal + mask_dice * dice + mask_iou_mse * MSE(IoU prediction)   slots with task_mask
  + proposal_heatmap * (pos + neg focal) + proposal_giou * GIoU              images with task_proposals
  + proposal_roi_class * CE + proposal_roi_box * L1(deltas)    (CenterNet2's RoI stage)

Every per-slot target and weight comes from ``outputs.slot_inputs`` (the slots the model ran,
dense-captioning images' rebuilt from proposals); per-image ones (valid area, ground-truth
objects, ``task_proposals``) from the batch; the detector's terms come computed in
``outputs.proposal_terms`` (each detector knows its own targets). Which task trains which loss is the task table's
business (:mod:`pixelllm.tasks`, written into the batch's loss masks); :data:`WEIGHTS` maps each
of its losses to the weights of its terms. Weights are ``config.loss`` (``configs/pixelllm.py``),
one mapping, with the settings ``label_smoothing``, ``text_on_referring`` and
``mask_overlap_valid_only`` (dice and the IoU target on the valid area only; official: the whole
canvas) beside them; pixel L1 weights follow the official 0.1.

The official referring loss is the box L1 alone, at the token that emits EOS (scenic
``add_task_mask(['point'])`` with ``point_output_ignore='^end-1'``): no text loss, no GIoU. Two
extensions switch on more: ``box_giou > 0`` and ``text_on_referring`` (the referring slots,
those that train the box, also train their expression's text).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from pixelllm import batch as batch_lib
from pixelllm.models.pixel_llm.pixel_llm import Outputs, padding_mask
from pixelllm.nn import losses
from pixelllm.nn.resize import resize_2d

LossValue = losses.LossValue

# The weight names of each loss of the task table (pixelllm.tasks.LOSSES).
WEIGHTS = {
    "text": ("text",),
    "points": ("point",),
    "box": ("box_l1", "box_giou"),
    "mask": ("mask_focal", "mask_dice", "mask_iou_mse"),
    "proposals": ("proposal_heatmap", "proposal_giou", "proposal_roi_class", "proposal_roi_box"),
}
# Settings that live in the same mapping as the weights.
SETTINGS = ("label_smoothing", "text_on_referring", "mask_overlap_valid_only")


def check_weights(weights: Mapping[str, float]) -> None:
    """Raises ``ValueError`` unless ``weights`` has exactly the weight names of :data:`WEIGHTS`
    and :data:`SETTINGS` (a misspelt weight would otherwise be silently ignored)."""
    known = {name for names in WEIGHTS.values() for name in names} | set(SETTINGS)
    unknown, missing = sorted(set(weights) - known), sorted(known - set(weights))
    if unknown or missing:
        raise ValueError(f"loss weights (config.loss): unknown {unknown}, missing {missing}; "
                         f"expected exactly {sorted(known)}")


def _gate(slot_inputs: Mapping[str, jax.Array], loss: str) -> jax.Array:
    """``[B, S]`` float: used slots whose task trains ``loss``."""
    return (slot_inputs[batch_lib.LOSS_MASKS[loss]].astype(jnp.float32)
            * slot_inputs[batch_lib.SLOT_MASK].astype(jnp.float32))


def compute(outputs: Outputs, batch: Mapping[str, jax.Array], weights: Mapping[str, float]
            ) -> tuple[jax.Array, dict[str, LossValue]]:
    """``(total, terms)``: the weighted total and every term before weighting."""
    check_weights(weights)
    slots, inputs = outputs.slots, outputs.slot_inputs
    terms: dict[str, LossValue] = {}

    text_gate = _gate(inputs, "text")
    if weights["text_on_referring"]:
        text_gate = jnp.maximum(text_gate, _gate(inputs, "box"))
    # Position i predicts token i + 1. The last position, which predicts nothing, gets weight 0
    # and a dummy target rather than being sliced off the logits: the slice would copy the
    # [B, S, L, V] logits and its gradient pad them back (same values; the projection and loss,
    # forward and backward, about 9% faster at the harness's sizes on CPU).
    tokens, text_mask = inputs[batch_lib.TEXT_TOKENS], inputs[batch_lib.TEXT_MASK]
    next_tokens = jnp.concatenate([tokens[..., 1:], jnp.zeros_like(tokens[..., :1])], axis=-1)
    predicts = jnp.concatenate([text_mask[..., 1:], jnp.zeros_like(text_mask[..., :1])], axis=-1)
    text_weight = predicts.astype(jnp.float32) * text_gate[..., None]
    # Over [B * S, L, V], the language model's own shape: XLA then folds the model's reshape
    # to [B, S, L, V] away, which it otherwise runs as a copy of the logits when S is 1.
    length, vocab = slots.logits.shape[-2:]
    terms["text"] = losses.text_cross_entropy(
        slots.logits.reshape(-1, length, vocab), next_tokens.reshape(-1, length),
        text_weight.reshape(-1, length), label_smoothing=weights["label_smoothing"])

    point_weight = (inputs[batch_lib.TOKEN_POINTS_MASK].astype(jnp.float32)
                    * _gate(inputs, "points")[..., None])
    terms["point"] = losses.point_l1(slots.token_points, inputs[batch_lib.TOKEN_POINTS],
                                     point_weight)

    box_weight = _gate(inputs, "box")
    target_boxes = inputs[batch_lib.TARGET_BOXES]
    terms["box_l1"] = losses.box_l1(slots.eos_boxes, target_boxes, box_weight)
    terms["box_giou"] = losses.giou_loss(slots.eos_boxes, target_boxes, box_weight)

    if slots.masks is not None:
        height, width = batch[batch_lib.IMAGE].shape[1:3]
        logits = resize_2d(slots.masks[..., None], (height, width), mode="linear")[..., 0]
        valid = jnp.broadcast_to(
            padding_mask(batch[batch_lib.VALID_WH], (height, width))[:, None], logits.shape)
        flat = logits.shape[0] * logits.shape[1]
        mask_terms = losses.mask_losses(
            logits.reshape(flat, height, width),
            inputs[batch_lib.TARGET_MASKS].reshape(flat, height, width),
            valid.reshape(flat, height, width),
            _gate(inputs, "mask").reshape(flat),
            slots.mask_iou.reshape(flat),
            overlap_valid_only=bool(weights["mask_overlap_valid_only"]))
        terms.update({f"mask_{name}": value for name, value in mask_terms.items()})

    if outputs.proposal_terms is not None:
        terms.update({f"proposal_{name}": value
                      for name, value in outputs.proposal_terms.items()})

    return weighted_total(terms, weights), terms


def weighted_total(terms: Mapping[str, LossValue], weights: Mapping[str, float]) -> jax.Array:
    """``sum_t weight_t * terms[t].mean()``: the total of :func:`compute`, also for terms summed
    over several batches (micro-batches, an evaluation split) before dividing."""
    total = jnp.zeros((), jnp.float32)
    for name, value in terms.items():
        total = total + _weight_of(name, weights) * value.mean()
    return total


def _weight_of(name: str, weights: Mapping[str, float]) -> float:
    """The weight of term ``name``: the heatmap's positive and negative focal terms share
    ``proposal_heatmap``."""
    if name.startswith("proposal_heatmap"):
        return weights["proposal_heatmap"]
    return weights[name]
