"""PixelLLM's training objective: every task's losses in one batch, gated per example.

Each term is a :class:`~pixelllm.nn.losses.LossValue` (a weighted sum and its normalizer), so
a batch mixing tasks normalizes each loss by the examples that have it (the official code needs one
task per batch and scales by the batch mean of a task mask instead). Total::

    text      * CE(logits, next token; label smoothing)      slots with task_text, real tokens
  + point     * L1(token points, trace targets)  [pixels]    tokens with token_points_mask, task_points
  + box_l1    * L1(EOS box, target box)          [pixels]    slots with task_box
  + box_giou  * (1 - GIoU(EOS box, target box))
  + mask_focal * focal + mask_dice * dice + mask_iou_mse * MSE(IoU prediction)   slots with task_mask
  + proposal_heatmap * (pos + neg focal) + proposal_giou * GIoU              images with task_proposals

Weights are ``config.loss`` (``configs/pixelllm.py``); pixel L1 weights follow the official 0.1.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from pixelllm.nn import losses
from pixelllm.models.pixel_llm import proposal_head as proposal_lib
from pixelllm.models.pixel_llm.pixel_llm import Outputs, padding_mask
from pixelllm.nn.resize import resize_2d

LossValue = losses.LossValue


def _slot_weight(task: jax.Array, slot_mask: jax.Array) -> jax.Array:
    return task.astype(jnp.float32) * slot_mask.astype(jnp.float32)


def compute(outputs: Outputs, batch: Mapping[str, jax.Array], weights: Mapping[str, float],
            *, canvas_size: int) -> tuple[jax.Array, dict[str, LossValue]]:
    """``(total, terms)``: the weighted total and every term before weighting."""
    slots, inputs = outputs.slots, outputs.slot_inputs
    slot_mask = inputs["slot_mask"]
    terms: dict[str, LossValue] = {}

    text_weight = (inputs["text_mask"][..., 1:].astype(jnp.float32)
                   * _slot_weight(inputs["task_text"], slot_mask)[..., None])
    terms["text"] = losses.text_cross_entropy(
        slots.logits[..., :-1, :], inputs["text_tokens"][..., 1:], text_weight,
        label_smoothing=weights["label_smoothing"])

    point_weight = (batch["token_points_mask"].astype(jnp.float32)
                    * _slot_weight(batch["task_points"], slot_mask)[..., None])
    terms["point"] = losses.point_l1(slots.token_points, batch["token_points"], point_weight)

    box_weight = _slot_weight(batch["task_box"], slot_mask)
    terms["box_l1"] = losses.box_l1(slots.eos_boxes, batch["target_boxes"], box_weight)
    terms["box_giou"] = losses.giou_loss(slots.eos_boxes, batch["target_boxes"], box_weight)

    if slots.masks is not None:
        height, width = batch["image"].shape[1:3]
        logits = resize_2d(slots.masks[..., None], (height, width), mode="linear")[..., 0]
        valid = jnp.broadcast_to(padding_mask(batch["valid_wh"], (height, width))[:, None],
                                 logits.shape)
        flat = logits.shape[0] * logits.shape[1]
        mask_terms = losses.mask_losses(
            logits.reshape(flat, height, width),
            batch["target_masks"].reshape(flat, height, width),
            valid.reshape(flat, height, width),
            _slot_weight(batch["task_mask"], slot_mask).reshape(flat),
            slots.mask_iou.reshape(flat))
        terms.update({f"mask_{name}": value for name, value in mask_terms.items()})

    if outputs.proposals is not None:
        grid = outputs.proposals[0][0].shape[1:3]
        image_valid = (padding_mask(batch["valid_wh"] * grid[1] / canvas_size, grid)
                       & (batch["task_proposals"][:, None, None] > 0))
        proposal_terms = proposal_lib.loss(outputs.proposals, batch["gt_boxes"],
                                           batch["gt_mask"], canvas_size=canvas_size,
                                           image_valid=image_valid)
        terms.update({f"proposal_{name}": value for name, value in proposal_terms.items()})

    total = jnp.zeros((), jnp.float32)
    for name, value in terms.items():
        total = total + _weight_of(name, weights) * value.mean()
    return total, terms


def _weight_of(name: str, weights: Mapping[str, float]) -> float:
    if name.startswith("proposal_heatmap"):
        return weights["proposal_heatmap"]
    return weights[name]
