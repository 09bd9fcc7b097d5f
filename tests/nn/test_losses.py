import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelllm.nn import losses
from pixelllm.nn.losses import LossValue


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _finite(tree):
    return all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(tree))


def test_loss_value_mean_and_empty():
    assert float(LossValue(jnp.float32(6.0), jnp.float32(3.0)).mean()) == 2.0
    assert float(LossValue(jnp.float32(0.0), jnp.float32(0.0)).mean()) == 0.0


def test_text_cross_entropy_hand_values_and_ignored_padding():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.25],
                                [1.0, 1.0, 1.0],
                                [0.0, 1.0, 1.0]]))     # last row: log(0) = -inf at its target
    targets = jnp.array([0, 2, 0])
    weights = jnp.array([1.0, 2.0, 0.0])
    plain = losses.text_cross_entropy(logits, targets, weights)
    np.testing.assert_allclose(plain.total, math.log(2) + 2 * math.log(3), rtol=1e-6)
    assert float(plain.normalizer) == 3.0
    # eps = 0.1, V = 3: target 0.9, others 0.05 each. Row 0: 0.9 ln2 + 2 * 0.05 * ln4 = 1.1 ln2;
    # row 1 is uniform, so any target distribution gives ln3.
    smooth = losses.text_cross_entropy(logits, targets, weights, label_smoothing=0.1)
    np.testing.assert_allclose(smooth.total, 1.1 * math.log(2) + 2 * math.log(3), rtol=1e-6)


def test_text_cross_entropy_matches_grit_target_distribution():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 3, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (2, 3))
    weights = rng.uniform(0, 1, (2, 3)).astype(np.float32)
    eps = 0.2
    one_hot = np.eye(7)[targets]
    smoothed = one_hot * (1 - eps) + (1 - one_hot) * eps / 6
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = np.sum(weights * -(smoothed * log_probs).sum(-1))
    out = losses.text_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights),
                                    label_smoothing=eps)
    np.testing.assert_allclose(out.total, expected, rtol=1e-5)
    np.testing.assert_allclose(out.normalizer, weights.sum(), rtol=1e-6)


def test_sums_and_normalizers_aggregate_across_splits():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((4, 5, 9)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 9, (4, 5)))
    weights = jnp.asarray(rng.integers(0, 2, (4, 5)), jnp.float32)
    full = losses.text_cross_entropy(logits, targets, weights)
    parts = [losses.text_cross_entropy(logits[i:i + 2], targets[i:i + 2], weights[i:i + 2])
             for i in (0, 2)]
    summed = jax.tree.map(jnp.add, *parts)
    np.testing.assert_allclose(summed.mean(), full.mean(), rtol=1e-6)


def test_point_l1_hand_values():
    pred = jnp.array([[[1.0, 2.0], [3.0, 4.0]],
                      [[0.0, 0.0], [0.0, 0.0]]])
    target = jnp.array([[[2.0, 0.0], [3.0, 7.0]],
                        [[1e9, -1e9], [0.0, 0.0]]])
    out = losses.point_l1(pred, target, jnp.array([1.0, 0.0]))
    assert float(out.total) == 1.0 + 2.0 + 0.0 + 3.0
    assert float(out.normalizer) == 1 * 2 * 2
    np.testing.assert_allclose(out.mean(), 1.5)


def test_box_l1_and_giou_hand_values():
    pred = jnp.array([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    target = jnp.array([[2.0, 2.0, 6.0, 8.0], [5.0, 5.0, 9.0, 9.0]])
    weights = jnp.array([2.0, 0.0])
    l1 = losses.box_l1(pred, target, weights)
    assert float(l1.total) == 2.0 * (2 + 2 + 2 + 4)
    assert float(l1.normalizer) == 8.0
    giou = losses.giou_loss(pred, target, weights)
    # IoU 4/36, enclosing 48, union 36 (see test_box_ops).
    np.testing.assert_allclose(giou.total, 2.0 * (1.0 - (4 / 36 - 12 / 48)), rtol=1e-6)
    assert float(giou.normalizer) == 2.0


def test_weights_must_have_the_item_shape():
    with pytest.raises(ValueError, match="^box_l1: weights"):
        losses.box_l1(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3, 4)), jnp.ones((2, 1)))


def test_sigmoid_focal_loss_hand_values():
    logits = jnp.array([0.0, 0.0, 50.0])
    targets = jnp.array([1.0, 0.0, 0.0])
    weights = jnp.array([1.0, 1.0, 0.0])
    out = losses.sigmoid_focal_loss(logits, targets, weights)
    # p = 0.5: BCE ln2, (1 - p_t)^2 = 1/4; alpha_t 0.25 for the positive, 0.75 for the negative.
    np.testing.assert_allclose(out.total, (0.25 + 0.75) * 0.25 * math.log(2), rtol=1e-6)
    assert float(out.normalizer) == 2.0
    # gamma 0 and no alpha: plain binary cross-entropy.
    bce = losses.sigmoid_focal_loss(jnp.array([2.0]), jnp.array([1.0]), jnp.array([1.0]),
                                    alpha=-1.0, gamma=0.0)
    np.testing.assert_allclose(bce.total, -math.log(_sigmoid(2.0)), rtol=1e-6)


def _numpy_focal(logit, target, alpha=0.25, gamma=2.0):
    p = _sigmoid(logit)
    ce = -(target * np.log(p) + (1 - target) * np.log(1 - p))
    p_t = p * target + (1 - p) * (1 - target)
    return (alpha * target + (1 - alpha) * (1 - target)) * ce * (1 - p_t) ** gamma


def test_mask_losses_hand_values():
    logits = np.array([[[2.0, -2.0], [0.5, 10.0]],
                       [[1e30, -1e30], [0.0, 0.0]],      # weight 0: ignored
                       [[-1.0, -1.0], [-1.0, -1.0]]], np.float32)
    targets = np.array([[[1, 0], [0, 1]], [[1, 1], [1, 1]], [[0, 0], [0, 0]]], bool)
    valid = np.array([[[1, 1], [1, 0]], [[1, 1], [1, 1]], [[1, 1], [1, 1]]], bool)
    weights = np.array([1.0, 0.0, 2.0], np.float32)
    predicted_iou = np.array([0.8, 0.3, 0.25], np.float32)
    inputs = tuple(map(jnp.asarray, (logits, targets, valid, weights, predicted_iou)))
    out = losses.mask_losses(*inputs, focal_alpha=0.25, overlap_valid_only=True)

    # Mask 0, valid pixels (0,0) logit 2 target 1, (0,1) -2 / 0, (1,0) 0.5 / 0.
    focal0 = (_numpy_focal(2.0, 1) + _numpy_focal(-2.0, 0) + _numpy_focal(0.5, 0)) / 3
    p = _sigmoid([2.0, -2.0, 0.5])
    dice0 = 1 - (2 * p[0] + 1) / (p.sum() + 1 + 1)
    iou0 = 1 / 2        # predicted {(0,0), (1,0)}, target {(0,0)}
    # Mask 2: no target, all logits -1: focal is the same for all 4 pixels; both masks empty.
    focal2 = _numpy_focal(-1.0, 0)
    dice2 = 1 - 1 / (4 * _sigmoid(-1.0) + 1)
    iou2 = 1.0
    np.testing.assert_allclose(out["focal"].total, focal0 + 2 * focal2, rtol=1e-5)
    np.testing.assert_allclose(out["dice"].total, dice0 + 2 * dice2, rtol=1e-5)
    np.testing.assert_allclose(out["iou_mse"].total,
                               (0.8 - iou0) ** 2 + 2 * (0.25 - iou2) ** 2, rtol=1e-5)
    for value in out.values():
        assert float(value.normalizer) == 3.0

    # Official defaults: focal alpha 0.5; dice and the IoU target over every pixel, so mask 0's
    # padding pixel (1, 1) (logit 10, target 1) counts in both.
    official = losses.mask_losses(*inputs)
    focal0 = sum(_numpy_focal(x, t, alpha=0.5) for x, t in ((2.0, 1), (-2.0, 0), (0.5, 0))) / 3
    np.testing.assert_allclose(official["focal"].total,
                               focal0 + 2 * _numpy_focal(-1.0, 0, alpha=0.5), rtol=1e-5)
    p = _sigmoid([2.0, -2.0, 0.5, 10.0])
    dice0 = 1 - (2 * (p[0] + p[3]) + 1) / (p.sum() + 2 + 1)
    np.testing.assert_allclose(official["dice"].total, dice0 + 2 * dice2, rtol=1e-5)
    np.testing.assert_allclose(official["iou_mse"].total,
                               (0.8 - 2 / 3) ** 2 + 2 * (0.25 - iou2) ** 2, rtol=1e-5)


def test_pixel_valid_mask_marks_each_image_top_left_block():
    valid = np.asarray(losses.pixel_valid_mask(jnp.asarray([[3, 2], [4, 4], [0, 4]]), (4, 5)))
    assert valid.shape == (3, 4, 5)
    expected = np.zeros((3, 4, 5), bool)
    expected[0, :3, :2] = True
    expected[1, :4, :4] = True
    np.testing.assert_array_equal(valid, expected)


def test_mask_losses_gradients_finite_and_iou_target_is_constant():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.standard_normal((2, 4, 4)) * 30, jnp.float32)
    targets = jnp.asarray(rng.uniform(size=(2, 4, 4)) > 0.5)
    valid = jnp.ones((2, 4, 4), bool).at[1].set(False)       # a mask with no valid pixel
    weights = jnp.ones(2)

    def total(logits, predicted_iou, name):
        return losses.mask_losses(logits, targets, valid, weights, predicted_iou)[name].mean()

    for name in ("focal", "dice", "iou_mse"):
        grads = jax.grad(total, argnums=(0, 1))(logits, jnp.array([0.5, 0.5]), name)
        assert _finite(grads), name
    iou_grad_logits = jax.grad(total)(logits, jnp.array([0.5, 0.5]), "iou_mse")
    assert not np.asarray(iou_grad_logits).any()


def test_heatmap_focal_loss_hand_values():
    logits = jnp.array([[0.0, 0.0, 2.0, 5.0, -100.0]])
    heatmap = jnp.array([[1.0, 0.5, 0.0, 0.0, 1.0]])
    valid = jnp.array([[True, True, True, False, True]])
    positive, negative = losses.heatmap_focal_loss(logits, heatmap, valid, alpha=-1.0)
    # Positives: cell 0 (p = 1/2) and cell 4 (p clamped to 1e-4).
    np.testing.assert_allclose(
        positive.total, math.log(2) * 0.25 - math.log(1e-4) * (1 - 1e-4) ** 2, rtol=1e-5)
    # Negatives: cell 1 only: -log(1/2) (1/2)^2 (1 - 1/2)^4. Cell 2 has p = 0.88 >= 0.85
    # (ignored high false positive), cell 3 is invalid, positives have weight (1 - 1)^4 = 0.
    np.testing.assert_allclose(negative.total, math.log(2) * 0.25 * 0.5 ** 4, rtol=1e-5)
    assert float(positive.normalizer) == float(negative.normalizer) == 2.0

    _, keep_all = losses.heatmap_focal_loss(logits, heatmap, valid, alpha=-1.0,
                                            ignore_high_fp=0.0)
    p = _sigmoid(2.0)
    np.testing.assert_allclose(keep_all.total,
                               math.log(2) * 0.25 * 0.5 ** 4 - math.log(1 - p) * p ** 2, rtol=1e-5)

    # The default alpha is CenterNet2's: positives x 0.25, negatives x 0.75.
    weighted_pos, weighted_neg = losses.heatmap_focal_loss(logits, heatmap, valid)
    np.testing.assert_allclose(weighted_pos.total, 0.25 * positive.total, rtol=1e-6)
    np.testing.assert_allclose(weighted_neg.total, 0.75 * negative.total, rtol=1e-6)
    assert float(weighted_pos.normalizer) == float(positive.normalizer)


def test_heatmap_focal_loss_normalizer_without_positives():
    logits = jnp.zeros((1, 2, 2))
    heatmap = jnp.full((1, 2, 2), 0.5)
    positive, negative = losses.heatmap_focal_loss(logits, heatmap, jnp.ones((1, 2, 2), bool))
    assert float(positive.total) == 0.0 and float(positive.normalizer) == 1.0
    assert float(negative.normalizer) == 1.0 and float(negative.total) > 0
    positive, negative = losses.heatmap_focal_loss(logits, heatmap, jnp.zeros((1, 2, 2), bool))
    assert float(negative.total) == float(negative.normalizer) == 0.0
    assert float(negative.mean()) == 0.0


def test_gradients_are_finite_at_extreme_inputs():
    logits = jnp.array([[-80.0, 0.0, 80.0], [30.0, -30.0, 0.0]])
    targets = jnp.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    weights = jnp.ones((2, 3))

    def all_losses(logits, boxes):
        heatmap_pos, heatmap_neg = losses.heatmap_focal_loss(logits, targets, weights > 0)
        return (losses.sigmoid_focal_loss(logits, targets, weights).mean()
                + heatmap_pos.mean() + heatmap_neg.mean()
                + losses.text_cross_entropy(logits, jnp.array([0, 1]), jnp.ones(2),
                                            label_smoothing=0.1).mean()
                + losses.giou_loss(boxes, jnp.zeros_like(boxes), jnp.ones(2)).mean()
                + losses.box_l1(boxes, jnp.zeros_like(boxes), jnp.ones(2)).mean()
                + losses.point_l1(boxes.reshape(2, 2, 2), jnp.zeros((2, 2, 2)),
                                  jnp.ones(2)).mean())

    grads = jax.grad(all_losses, argnums=(0, 1))(logits, jnp.zeros((2, 4)))
    assert _finite(grads)
