"""F-LMM's training loss: sigmoid BCE + naive dice, weight 1 each, on the coarse mask and on SAM's.

F-LMM builds mmdet's ``CrossEntropyLoss(use_sigmoid=True, reduction="mean", loss_weight=1)`` and
``DiceLoss(use_sigmoid=True, activate=True, naive_dice=True, eps=1, loss_weight=1)`` and applies
both twice per image (``FrozenLlava._compute``): to the coarse logits against the ground truth
resized to the coarse window's size (``F.interpolate``, mode nearest), and to SAM's logits at the
original size. Per image with ``n`` masks of ``N`` pixels each:

* **BCE** = ``sum(bce) / (n N + eps)`` over all its masks' pixels (``avg_factor = numel``);
* **dice** = ``sum_i (1 - (2 sum(p t) + 1) / (sum p + sum t + 1)) / (n + eps)`` with
  ``p = sigmoid`` (``avg_factor = n``);

``eps = finfo(float32).eps`` (mmdet's ``weight_reduce_loss``). ``compute_loss`` weighs each image's
terms by ``n`` and divides by the batch's masks: here ``LossValue(sum_b n_b loss_b, sum_b n_b)``,
so micro-batches and devices add totals and normalizers first. (F-LMM trains with one image per
GPU, so across its GPUs the gradient is the mean over images; within one batch it weighs by
masks, which is what this computes.) The terms are F-LMM's ``loss_mask``, ``loss_dice``,
``sam_loss_mask``, ``sam_loss_dice``; the loss is their sum.

Masks are padded to static shapes: ``mask_valid [B, P]`` marks real phrases, the coarse window
and ``original_hw`` mark each image's pixels; padding adds nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pixelllm.nn.losses import LossValue, pixel_valid_mask

DICE_EPS = 1.0
# mmdet's weight_reduce_loss divides by `avg_factor + finfo(float32).eps`.
AVG_FACTOR_EPS = float(jnp.finfo(jnp.float32).eps)


def nearest_window_matrix(start: jax.Array, out_valid: jax.Array, in_valid: jax.Array, *,
                          out_size: int, in_size: int) -> jax.Array:
    """``[out_size, in_size]`` one-hot: torch's ``mode="nearest"`` resize of the first
    ``in_valid`` inputs onto outputs ``[start, start + out_valid)``; output ``start + i`` reads
    ``min(floor(i * (in_valid / out_valid)), in_valid - 1)``, the scale and product in float32
    as torch's kernel computes them. Other rows are zero."""
    scale = in_valid.astype(jnp.float32) / out_valid.astype(jnp.float32)
    offset = jnp.arange(out_size) - start
    source = jnp.minimum(jnp.floor(offset.astype(jnp.float32) * scale).astype(jnp.int32),
                         in_valid - 1)
    inside = (offset >= 0) & (offset < out_valid)
    return jnp.where(inside[:, None], jax.nn.one_hot(source, in_size), 0.0)


def window_valid_mask(window: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """``window (top, left, height, width) int [B, 4]`` -> bool ``[B, H, W]``, True inside."""
    y = jnp.arange(hw[0])[None, :, None]
    x = jnp.arange(hw[1])[None, None, :]
    top, left, height, width = (window[:, i, None, None] for i in range(4))
    return (y >= top) & (y < top + height) & (x >= left) & (x < left + width)


def coarse_targets(targets: jax.Array, original_hw: jax.Array, coarse_window: jax.Array,
                   coarse_hw: tuple[int, int]) -> jax.Array:
    """``targets [B, P, Hm, Wm]`` (0/1, valid on ``[:H0, :W0]``) resized nearest onto each
    image's coarse window ``[B, 4]`` of the ``coarse_hw`` grid -> ``[B, P, Hc, Wc]`` float32,
    zero outside."""
    mask_hw = targets.shape[-2:]

    def matrices(window, original):
        return tuple(nearest_window_matrix(window[axis], window[2 + axis], original[axis],
                                           out_size=coarse_hw[axis], in_size=mask_hw[axis])
                     for axis in (0, 1))

    rows, cols = jax.vmap(matrices)(coarse_window, original_hw)
    return jnp.einsum("bYh,bphw,bXw->bpYX", rows, targets.astype(jnp.float32), cols,
                      precision=jax.lax.Precision.HIGHEST)


def _per_image(per_mask_sums: jax.Array, mask_valid: jax.Array,
               avg_factor: jax.Array) -> LossValue:
    """``sum_b n_b * (sum over image b's valid masks) / (avg_factor_b + eps)`` over
    ``sum_b n_b``."""
    count = jnp.sum(mask_valid, axis=-1).astype(jnp.float32)
    # `where`, not a product: a padding slot's value may be anything.
    image_sums = jnp.sum(jnp.where(mask_valid, per_mask_sums, 0.0), axis=-1)
    return LossValue(jnp.sum(count * image_sums / (avg_factor + AVG_FACTOR_EPS)), jnp.sum(count))


def mask_bce(logits: jax.Array, targets: jax.Array, pixel_valid: jax.Array,
             mask_valid: jax.Array) -> LossValue:
    """F-LMM's ``loss_mask``: ``logits, targets [B, P, H, W]``, ``pixel_valid [B, H, W]`` (the
    image's pixels on this grid), ``mask_valid [B, P]`` bool."""
    logits = logits.astype(jnp.float32)
    per_pixel = jax.nn.softplus(logits) - logits * targets.astype(jnp.float32)
    per_mask = jnp.sum(jnp.where(pixel_valid[:, None], per_pixel, 0.0), axis=(-2, -1))
    pixels = jnp.sum(pixel_valid, axis=(-2, -1)).astype(jnp.float32)
    count = jnp.sum(mask_valid, axis=-1).astype(jnp.float32)
    return _per_image(per_mask, mask_valid, count * pixels)


def mask_dice(logits: jax.Array, targets: jax.Array, pixel_valid: jax.Array,
              mask_valid: jax.Array) -> LossValue:
    """F-LMM's ``loss_dice`` (naive dice, eps 1); arguments as :func:`mask_bce`."""
    probs = jnp.where(pixel_valid[:, None], jax.nn.sigmoid(logits.astype(jnp.float32)), 0.0)
    targets = jnp.where(pixel_valid[:, None], targets.astype(jnp.float32), 0.0)
    overlap = jnp.sum(probs * targets, axis=(-2, -1))
    per_mask = 1.0 - (2.0 * overlap + DICE_EPS) / (
        jnp.sum(probs, axis=(-2, -1)) + jnp.sum(targets, axis=(-2, -1)) + DICE_EPS)
    return _per_image(per_mask, mask_valid, jnp.sum(mask_valid, axis=-1).astype(jnp.float32))


def flmm_losses(*, coarse: jax.Array, coarse_window: jax.Array, masks: jax.Array,
                target_masks: jax.Array, original_hw: jax.Array,
                mask_valid: jax.Array) -> dict[str, LossValue]:
    """The four terms of a batch.

    Args:
      coarse: ``[B, P, Hc, Wc]`` the U-Net's logits; ``coarse_window`` int ``[B, 4]`` the image's
        ``(top, left, height, width)`` on that grid.
      masks: ``[B, P, Hm, Wm]`` SAM's logits at the original size.
      target_masks: ``[B, P, Hm, Wm]`` 0/1 ground truth at the original size.
      original_hw: int ``[B, 2]``; mask_valid: bool ``[B, P]``.

    Returns ``{"mask", "dice", "sam_mask", "sam_dice"}`` (F-LMM's ``loss_mask``, ``loss_dice``,
    ``sam_loss_mask``, ``sam_loss_dice``).
    """
    mask_valid = mask_valid.astype(bool)
    coarse_hw = coarse.shape[-2:]
    coarse_truth = coarse_targets(target_masks, original_hw, coarse_window, coarse_hw)
    coarse_valid = window_valid_mask(coarse_window, coarse_hw)
    pixel_valid = pixel_valid_mask(original_hw, masks.shape[-2:])
    return {"mask": mask_bce(coarse, coarse_truth, coarse_valid, mask_valid),
            "dice": mask_dice(coarse, coarse_truth, coarse_valid, mask_valid),
            "sam_mask": mask_bce(masks, target_masks, pixel_valid, mask_valid),
            "sam_dice": mask_dice(masks, target_masks, pixel_valid, mask_valid)}


def total_loss(terms: dict[str, LossValue]) -> jax.Array:
    """The sum of the terms' means (every loss weight is 1 in F-LMM's config)."""
    return sum(value.mean() for value in terms.values())
