"""LISA's training loss: ``1.0 * text CE + 2.0 * mask BCE + 0.5 * dice`` (``train_ds.py``'s
``ce_loss_weight``, ``bce_loss_weight``, ``dice_loss_weight``), masks at the original resolution.

* **Text CE** is LLaVA's shifted cross-entropy, the mean over every supervised token of the batch
  (all conversations together; the prompt is labelled -100).
* **Mask BCE** (LISA's ``sigmoid_ce_loss``): per mask, the mean binary cross-entropy over the
  image's pixels; summed over the masks and divided by the number of masks of the batch.
* **Dice** (LISA's ``dice_loss``, ``scale=1000``, ``eps=1e-6``): per mask,
  ``1 - (2 sum(p/s * t) + eps) / (sum(p/s) + sum(t/s) + eps)`` with ``p = sigmoid``, summed over
  the masks and divided by their number.

LISA computes each image's masks at its own size; here masks are padded to a common size and
``pixel_valid`` marks the image, so padding adds nothing to the sums and the per-mask means
divide by the image's pixel count. LISA's divisions by ``n_i + 1e-8`` per image and then
``N + 1e-8`` for the batch become one division by ``N`` (:class:`~pixelllm.nn.losses.LossValue`,
so micro-batches and devices can add totals and normalizers first); the two differ by a relative
1e-8 or less. With no mask in the batch both mask losses are 0, as LISA's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pixelllm.nn import losses
from pixelllm.nn.losses import LossValue

DICE_SCALE = 1000.0
DICE_EPS = 1e-6


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossWeights:
    """LISA's defaults (``--ce_loss_weight 1.0 --bce_loss_weight 2.0 --dice_loss_weight 0.5``)."""
    ce: float = 1.0
    bce: float = 2.0
    dice: float = 0.5


def text_loss(logits: jax.Array, tokens: jax.Array, label_mask: jax.Array) -> LossValue:
    """``logits [..., L, V]`` at text position t predict ``tokens [..., t + 1]``;
    ``label_mask [..., L]`` is True on the tokens LISA supervises (its labels != -100: the
    answers and their ``</s>``; never text token 0, which is the prompt's last token)."""
    return losses.text_cross_entropy(logits[..., :-1, :], tokens[..., 1:],
                                     label_mask[..., 1:].astype(jnp.float32))


def _over_masks(per_mask: jax.Array, mask_valid: jax.Array) -> LossValue:
    """Sum of ``per_mask [B, M]`` over the valid masks, normalized by their count."""
    # `where`, not a product: an invalid slot's loss may be anything (a zero-size image's NaN).
    return LossValue(jnp.sum(jnp.where(mask_valid, per_mask, 0.0)),
                     jnp.sum(mask_valid).astype(jnp.float32))


def _pixel_sums(values: jax.Array, pixel_valid: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(pixel_valid[:, None], values, 0.0), axis=(-2, -1))


def mask_bce(masks: jax.Array, targets: jax.Array, pixel_valid: jax.Array,
             mask_valid: jax.Array) -> LossValue:
    """LISA's ``sigmoid_ce_loss`` over the batch. ``masks, targets [B, M, H, W]`` (logits, 0/1),
    ``pixel_valid [B, H, W]`` (the image's original extent), ``mask_valid [B, M]``."""
    logits = masks.astype(jnp.float32)
    targets = targets.astype(jnp.float32)
    # binary_cross_entropy_with_logits: max(x, 0) - x t + log(1 + exp(-|x|)).
    per_pixel = jnp.maximum(logits, 0.0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    pixels = jnp.maximum(jnp.sum(pixel_valid, axis=(-2, -1)), 1).astype(jnp.float32)
    per_mask = _pixel_sums(per_pixel, pixel_valid) / pixels[:, None]
    return _over_masks(per_mask, mask_valid.astype(bool))


def mask_dice(masks: jax.Array, targets: jax.Array, pixel_valid: jax.Array,
              mask_valid: jax.Array) -> LossValue:
    """LISA's ``dice_loss`` (scale 1000, eps 1e-6) over the batch; arguments as :func:`mask_bce`."""
    probs = jax.nn.sigmoid(masks.astype(jnp.float32))
    targets = targets.astype(jnp.float32)
    numerator = 2.0 * _pixel_sums(probs / DICE_SCALE * targets, pixel_valid)
    denominator = (_pixel_sums(probs / DICE_SCALE, pixel_valid)
                   + _pixel_sums(targets / DICE_SCALE, pixel_valid))
    per_mask = 1.0 - (numerator + DICE_EPS) / (denominator + DICE_EPS)
    return _over_masks(per_mask, mask_valid.astype(bool))


def lisa_losses(*, logits: jax.Array, tokens: jax.Array, label_mask: jax.Array,
                masks: jax.Array, mask_valid: jax.Array, target_masks: jax.Array,
                original_hw: jax.Array) -> dict[str, LossValue]:
    """The three unweighted terms ``{"ce", "bce", "dice"}`` of a batch: ``logits [B, C, L, V]``,
    ``tokens, label_mask [B, C, L]``, ``masks, target_masks [B, M, H, W]``, ``mask_valid [B, M]``,
    ``original_hw [B, 2]``."""
    pixel_valid = losses.pixel_valid_mask(original_hw, masks.shape[-2:])
    return {"ce": text_loss(logits, tokens, label_mask),
            "bce": mask_bce(masks, target_masks, pixel_valid, mask_valid),
            "dice": mask_dice(masks, target_masks, pixel_valid, mask_valid)}


def total_loss(terms: dict[str, LossValue], weights: LossWeights = LossWeights()) -> jax.Array:
    """``ce * mean(ce) + bce * mean(bce) + dice * mean(dice)`` (LISA's ``loss``)."""
    return sum(getattr(weights, name) * value.mean() for name, value in terms.items())
