"""Training losses of PixelLLM's heads, each returned as an unnormalized sum and its normalizer.

Every loss returns :class:`LossValue` ``(total, normalizer)``: ``total`` is the weighted sum of the
per-item losses and ``normalizer`` is what the reference recipe divides that sum by. Keeping the
two apart lets a training step add both across micro-batches and devices (``jax.tree.map(jnp.add,
...)``, ``lax.psum``) and divide once, so the loss is the same however the batch is split;
:meth:`LossValue.mean` does the division.

``weights`` are float masks over the loss's items (0 = ignore; any non-negative value scales the
item). They must have exactly the item shape named in each docstring, not merely broadcast to it,
so that ``sum(weights)`` counts items. Items of weight 0 contribute exactly 0 to ``total``, even if
their own loss is inf or NaN (padding logits, say). All losses are computed in float32.

References: GRiT (Wu et al. 2022) for the label-smoothed text loss; DETR/SAM for focal + dice mask
losses and SAM's IoU regression; CenterNet / CenterNet2 (Zhou et al. 2019, 2021) for the
penalty-reduced heatmap focal loss.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pixelllm.nn import box_ops

_FLOAT = jnp.float32


class LossValue(NamedTuple):
    """A loss as ``total`` (weighted sum) and ``normalizer`` (what the recipe divides by)."""

    total: jax.Array
    normalizer: jax.Array

    def mean(self) -> jax.Array:
        """``total / normalizer``; 0 when both are 0 (nothing to learn from)."""
        return self.total / jnp.maximum(self.normalizer, jnp.finfo(_FLOAT).tiny)


def _check_weights(weights: jax.Array, item_shape: tuple[int, ...], loss: str) -> jax.Array:
    weights = jnp.asarray(weights, _FLOAT)
    if weights.shape != tuple(item_shape):
        raise ValueError(f"{loss}: weights have shape {weights.shape}, "
                         f"expected the item shape {tuple(item_shape)}")
    return weights


def _weighted(per_item: jax.Array, weights: jax.Array, normalizer: jax.Array) -> LossValue:
    # `where` rather than a product alone: 0 * inf would be NaN.
    total = jnp.sum(jnp.where(weights != 0, per_item * weights, 0.0))
    return LossValue(total, jnp.asarray(normalizer, _FLOAT))


def text_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array, *,
                       label_smoothing: float = 0.0) -> LossValue:
    """Next-token cross-entropy with GRiT's label smoothing.

    Args:
      logits: ``[..., L, V]``.
      targets: ``[..., L]`` int token ids.
      weights: ``[..., L]``, 0 on padding.
      label_smoothing: ``eps``; the target distribution puts ``1 - eps`` on the target token and
        ``eps / (V - 1)`` on every other token (GRiT's ``SmoothLabelCrossEntropyLoss``).

    Returns ``total = sum(weights * CE)``, ``normalizer = sum(weights)`` (mean over tokens).
    GRiT logs the KL divergence to the smoothed target, which is this cross-entropy minus the
    target's entropy: a constant, so the gradients are identical.
    """
    vocab = logits.shape[-1]
    if label_smoothing and vocab < 2:
        raise ValueError(f"text_cross_entropy: label smoothing needs a "
                         f"vocabulary of at least 2, got {vocab}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"text_cross_entropy: targets have shape "
                         f"{targets.shape}, logits {logits.shape}")
    weights = _check_weights(weights, targets.shape, "text_cross_entropy")
    # log p = shifted - log_norm, never materialized over the vocabulary: each term needs only
    # per-token reductions of the shifted logits (the log_softmax form costs about as much as the
    # vocabulary projection itself, forward and backward, at a 30k vocabulary on CPU).
    logits = logits.astype(_FLOAT)
    shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    log_norm = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
    target_log_prob = jnp.take_along_axis(shifted, targets[..., None].astype(jnp.int32),
                                          axis=-1)[..., 0] - log_norm
    per_token = -target_log_prob
    if label_smoothing:
        other_log_prob = jnp.sum(shifted, axis=-1) - vocab * log_norm - target_log_prob
        per_token = ((1.0 - label_smoothing) * per_token
                     - label_smoothing / (vocab - 1) * other_log_prob)
    return _weighted(per_token, weights, jnp.sum(weights))


def point_l1(pred: jax.Array, target: jax.Array, weights: jax.Array) -> LossValue:
    """L1 on point traces: ``pred, target: [..., K, 2]``, ``weights: [...]`` (one per K-point item).

    ``normalizer = sum(weights) * K * 2``: the mean absolute error per coordinate, as the official
    L1 loss.
    """
    *item_shape, num_points, _ = pred.shape
    weights = _check_weights(weights, tuple(item_shape), "point_l1")
    per_item = jnp.sum(jnp.abs(pred.astype(_FLOAT) - target.astype(_FLOAT)), axis=(-2, -1))
    return _weighted(per_item, weights, jnp.sum(weights) * num_points * 2)


def box_l1(pred: jax.Array, target: jax.Array, weights: jax.Array) -> LossValue:
    """L1 on boxes ``[..., 4]``, ``weights: [...]``; ``normalizer = sum(weights) * 4``."""
    weights = _check_weights(weights, pred.shape[:-1], "box_l1")
    per_item = jnp.sum(jnp.abs(pred.astype(_FLOAT) - target.astype(_FLOAT)), axis=-1)
    return _weighted(per_item, weights, jnp.sum(weights) * 4)


def giou_loss(pred: jax.Array, target: jax.Array, weights: jax.Array) -> LossValue:
    """``1 - GIoU`` of xyxy boxes ``[..., 4]``, ``weights: [...]``; normalizer ``sum(weights)``."""
    weights = _check_weights(weights, pred.shape[:-1], "giou_loss")
    per_item = 1.0 - box_ops.generalized_iou(pred.astype(_FLOAT), target.astype(_FLOAT))
    return _weighted(per_item, weights, jnp.sum(weights))


def _elementwise_focal(logits: jax.Array, targets: jax.Array, alpha: float,
                       gamma: float) -> jax.Array:
    logits = logits.astype(_FLOAT)
    targets = targets.astype(_FLOAT)
    prob = jax.nn.sigmoid(logits)
    # Binary cross-entropy from logits, stable for large |logits|.
    cross_entropy = jax.nn.softplus(logits) - logits * targets
    prob_of_truth = prob * targets + (1.0 - prob) * (1.0 - targets)
    loss = cross_entropy * (1.0 - prob_of_truth) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1.0 - alpha) * (1.0 - targets)) * loss
    return loss


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array, *,
                       alpha: float = 0.25, gamma: float = 2.0) -> LossValue:
    """Elementwise binary focal loss (Lin et al. 2017): ``alpha_t (1 - p_t)^gamma BCE``.

    Args:
      logits, targets, weights: same shape; ``targets`` in [0, 1].
      alpha: weight of positives (negatives get ``1 - alpha``); a negative value disables it.

    ``normalizer = sum(weights)``: the mean over weighted elements. Recipes that normalize by the
    number of objects instead (DETR, SAM) go through :func:`mask_losses`.
    """
    weights = _check_weights(weights, logits.shape, "sigmoid_focal_loss")
    return _weighted(_elementwise_focal(logits, targets, alpha, gamma), weights, jnp.sum(weights))


def pixel_valid_mask(image_hw: jax.Array, mask_hw: tuple[int, int]) -> jax.Array:
    """Which pixels of masks padded at the bottom and right hold the image: ``image_hw int
    [B, 2]`` ``(h, w)`` -> bool ``[B, H, W]``, True on ``[:h, :w]`` (the ``pixel_valid`` of the
    mask losses)."""
    rows = jnp.arange(mask_hw[0])[None, :, None] < image_hw[:, 0, None, None]
    cols = jnp.arange(mask_hw[1])[None, None, :] < image_hw[:, 1, None, None]
    return rows & cols


def mask_losses(logits: jax.Array, targets: jax.Array, pixel_valid: jax.Array,
                weights: jax.Array, predicted_iou: jax.Array, *, focal_alpha: float = 0.5,
                focal_gamma: float = 2.0,
                overlap_valid_only: bool = False) -> dict[str, LossValue]:
    """SAM's mask losses: focal, dice and the MSE of the IoU prediction.

    Args:
      logits: ``[N, H, W]`` mask logits (any leading dims in place of ``N``).
      targets: ``[N, H, W]`` bool ground-truth masks.
      pixel_valid: ``[N, H, W]`` bool; pixels outside (canvas padding) take no part in the focal
        term (and in dice and IoU with ``overlap_valid_only``).
      weights: ``[N]``, one per mask.
      predicted_iou: ``[N]``, the model's estimate of its mask's IoU.
      focal_alpha, focal_gamma: the focal term's (scenic's defaults 0.5 and 2, which the
        official mask loss uses).
      overlap_valid_only: dice and the IoU target over the valid pixels only (extension); the
        official ``sam_mask_loss`` takes them over the whole canvas, padding included.

    Per mask: ``focal`` is the focal loss averaged over valid pixels; ``dice`` is
    ``1 - (2 |p t| + 1) / (|p| + |t| + 1)`` with sigmoid probabilities; ``iou_mse`` is
    ``(predicted_iou - IoU(logits > 0, targets))^2`` with the actual IoU a constant
    (stop-gradient) and 1 when both masks are empty. Each returns ``normalizer = sum(weights)``:
    DETR/SAM divide by the number of masks.
    """
    if targets.shape != logits.shape or pixel_valid.shape != logits.shape:
        raise ValueError(f"mask_losses: logits {logits.shape}, targets "
                         f"{targets.shape} and pixel_valid {pixel_valid.shape} must match")
    weights = _check_weights(weights, logits.shape[:-2], "mask_losses")
    if predicted_iou.shape != weights.shape:
        raise ValueError(f"mask_losses: predicted_iou has shape "
                         f"{predicted_iou.shape}, expected {weights.shape}")
    pixel_axes = (-2, -1)
    valid = pixel_valid.astype(_FLOAT)
    truth = targets.astype(_FLOAT) * valid
    num_valid = jnp.maximum(jnp.sum(valid, axis=pixel_axes), 1.0)

    focal = jnp.sum(_elementwise_focal(logits, truth, focal_alpha, focal_gamma) * valid,
                    axis=pixel_axes) / num_valid

    overlap_pixels = valid if overlap_valid_only else jnp.ones_like(valid)
    overlap_truth = targets.astype(_FLOAT) * overlap_pixels
    prob = jax.nn.sigmoid(logits.astype(_FLOAT)) * overlap_pixels
    dice = 1.0 - ((2.0 * jnp.sum(prob * overlap_truth, axis=pixel_axes) + 1.0)
                  / (jnp.sum(prob, axis=pixel_axes) + jnp.sum(overlap_truth, axis=pixel_axes)
                     + 1.0))

    overlap_pixels = overlap_pixels.astype(bool)
    predicted_mask = (logits > 0) & overlap_pixels
    true_mask = targets.astype(bool) & overlap_pixels
    intersection = jnp.sum(predicted_mask & true_mask, axis=pixel_axes).astype(_FLOAT)
    union = jnp.sum(predicted_mask | true_mask, axis=pixel_axes).astype(_FLOAT)
    actual_iou = jnp.where(union > 0, intersection / jnp.maximum(union, 1.0), 1.0)
    iou_mse = (predicted_iou.astype(_FLOAT) - jax.lax.stop_gradient(actual_iou)) ** 2

    count = jnp.sum(weights)
    return {"focal": _weighted(focal, weights, count), "dice": _weighted(dice, weights, count),
            "iou_mse": _weighted(iou_mse, weights, count)}


def heatmap_focal_loss(logits: jax.Array, heatmap: jax.Array, valid: jax.Array, *,
                       alpha: float = 0.25, gamma: float = 2.0, beta: float = 4.0,
                       sigmoid_clamp: float = 1e-4,
                       ignore_high_fp: float = 0.85) -> tuple[LossValue, LossValue]:
    """CenterNet's penalty-reduced focal loss on a class-agnostic heatmap.

    Args:
      logits: ``[..., h, w]`` heatmap logits (the loss is elementwise: any shape works, e.g. all
        pyramid levels flattened into one axis so that positives are counted once over all).
      heatmap: same shape, Gaussian targets in [0, 1]; exactly 1 at object centres (positives).
      valid: same shape, bool; cells outside take no part (canvas padding, images without the
        task).
      alpha: positives weigh ``alpha``, negatives ``1 - alpha`` (CenterNet2's
        ``POS_WEIGHT`` 0.25 / ``NEG_WEIGHT`` 0.75); a negative value weighs both 1.
      gamma, beta: focal exponent and the penalty reduction ``(1 - y)^beta`` of negatives.
      sigmoid_clamp: probabilities are clamped to ``[c, 1 - c]`` before the logs.
      ignore_high_fp: negatives predicted with ``p >= ignore_high_fp`` are dropped (CenterNet2's
        ``IGNORE_HIGH_FP``: likely unlabelled objects); a value <= 0 keeps them all.

    Returns ``(positive, negative)``: ``-alpha sum log(p) (1 - p)^gamma`` over positives and
    ``-(1 - alpha) sum log(1 - p) p^gamma (1 - y)^beta`` over all valid cells (positives have ``y = 1`` and so
    weight 0). Both share ``normalizer = max(#positives, 1)`` as CenterNet2 / GRiT, except that it
    is 0 when no cell is valid, so that a shard without the task adds nothing when normalizers are
    summed across devices.
    """
    if heatmap.shape != logits.shape or valid.shape != logits.shape:
        raise ValueError(f"heatmap_focal_loss: logits {logits.shape}, "
                         f"heatmap {heatmap.shape} and valid {valid.shape} must match")
    heatmap = heatmap.astype(_FLOAT)
    valid = valid.astype(bool)
    prob = jnp.clip(jax.nn.sigmoid(logits.astype(_FLOAT)), sigmoid_clamp, 1.0 - sigmoid_clamp)
    positive = (heatmap == 1.0) & valid
    positive_weight, negative_scale = (alpha, 1.0 - alpha) if alpha >= 0 else (1.0, 1.0)
    positive_loss = -positive_weight * jnp.log(prob) * (1.0 - prob) ** gamma
    negative_weight = negative_scale * (1.0 - heatmap) ** beta * valid
    if ignore_high_fp > 0:
        negative_weight = negative_weight * (prob < ignore_high_fp)
    negative_loss = -jnp.log(1.0 - prob) * prob ** gamma
    num_positive = jnp.sum(positive).astype(_FLOAT)
    normalizer = jnp.maximum(num_positive, jnp.any(valid).astype(_FLOAT))
    return (_weighted(positive_loss, positive.astype(_FLOAT), normalizer),
            _weighted(negative_loss, negative_weight, normalizer))
