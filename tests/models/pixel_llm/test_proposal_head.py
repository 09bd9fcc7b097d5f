import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pixelllm import sharding
from pixelllm.nn import box_ops
from pixelllm.models.pixel_llm import proposal_head as ph


def _jitted(function, *arrays, **settings):
    """``function(*arrays, **settings)`` as one compiled program (much faster than op-by-op)."""
    return jax.jit(functools.partial(function, **settings))(*arrays)


def test_level_strides_and_default_size_ranges():
    assert ph.level_strides(384, [(24, 24), (12, 12), (6, 6)]) == [16.0, 32.0, 64.0]
    assert ph.level_strides((64, 128), [(4, 8)]) == [16.0]
    with pytest.raises(ValueError, match="different strides"):
        ph.level_strides(64, [(4, 8)])
    assert ph.default_size_ranges([16.0]) == [None]
    # CenterNet2's [0, 80], [64, 160], [128, inf) at strides 8, 16, 32.
    assert ph.default_size_ranges([8.0, 16.0, 32.0]) == [(0.0, 80.0), (64.0, 160.0),
                                                         (128.0, math.inf)]


def test_head_shapes_initialisation_logical_axes_and_sharding():
    head = nnx.jit(lambda: ph.ProposalHead(in_features=12, canvas_size=64, hidden=48, num_convs=1,
                                           num_levels=3, rngs=nnx.Rngs(0)))()
    features = jax.random.normal(jax.random.key(1), (8, 8, 8, 12))
    outputs = nnx.jit(head)(features)
    assert [(h.shape, d.shape) for h, d in outputs] == [
        ((8, 8, 8), (8, 8, 8, 4)), ((8, 4, 4), (8, 4, 4, 4)), ((8, 2, 2), (8, 2, 2, 4))]
    for heatmap_logits, ltrb in outputs:
        assert (np.asarray(ltrb) >= 0).all()
        # Small output weights: logits start near the prior bias -log(99) = -4.6.
        assert np.abs(np.asarray(heatmap_logits) + math.log(99)).max() < 1.0
    np.testing.assert_allclose(head.heatmap.bias.get_value(), [-math.log(99)], rtol=1e-6)
    np.testing.assert_allclose(head.ltrb.bias.get_value(), [8.0] * 4)
    assert head.tower_norms[0].num_groups == 24          # the largest count <= 32 dividing 48
    for path, variable in nnx.to_flat_state(nnx.state(head, nnx.Param)):
        axes = variable.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == variable.get_value().ndim, path
    with pytest.raises(ValueError, match="divisible by 4"):
        head(jnp.zeros((1, 6, 8, 12)))

    # The same head placed on the 8 fake devices by its logical axes computes the same maps.
    sharding.shard_model(head, sharding.make_mesh((2, 4, 1)), sharding.DEFAULT_RULES)
    for (want_heatmap, want_ltrb), (heatmap, ltrb) in zip(outputs, nnx.jit(head)(features)):
        np.testing.assert_allclose(heatmap, want_heatmap, atol=1e-5)
        np.testing.assert_allclose(ltrb, want_ltrb, atol=1e-5)


# One box on a 64-pixel canvas, grid 8x8 (stride 8): centre (26, 28) -> cell (x 3, y 3) whose
# centre is (28, 28). Area 32 * 16 = 512: 2 delta^2 512 = 12.6 < (0.5 cells * 8)^2 = 16, so the
# Gaussian's r^2 = 16.
BOX = [10.0, 20.0, 42.0, 36.0]


def test_targets_hand_checked_on_one_box():
    gt_boxes = jnp.array([[BOX, [0.0, 0.0, 64.0, 64.0]]])
    gt_mask = jnp.array([[True, False]])                       # the second box is padding
    heatmap, ltrb, reg_mask = (np.asarray(a) for a in _jitted(
        ph.targets, gt_boxes, gt_mask, grid=(8, 8), stride=8.0))
    assert heatmap.shape == (1, 8, 8) and ltrb.shape == (1, 8, 8, 4)
    heatmap, ltrb, reg_mask = heatmap[0], ltrb[0], reg_mask[0]
    assert heatmap[3, 3] == 1.0 and (heatmap == 1.0).sum() == 1
    np.testing.assert_allclose(heatmap[3, 2], math.exp(-36 / 16), rtol=1e-5)    # cell (20, 28)
    np.testing.assert_allclose(heatmap[3, 4], math.exp(-100 / 16), rtol=1e-5)   # cell (36, 28)
    np.testing.assert_allclose(heatmap[2, 3], math.exp(-68 / 16), rtol=1e-5)    # cell (28, 20)
    assert heatmap[0, 0] == 0.0                                # below the 1e-4 floor
    # Regression at the 3x3 around the centre cell whose centres are strictly inside the box:
    # rows y = 20 and y = 36 lie on the box's edges, so only row 3 remains.
    expected_mask = np.zeros((8, 8), bool)
    expected_mask[3, 2:5] = True
    np.testing.assert_array_equal(reg_mask, expected_mask)
    np.testing.assert_allclose(ltrb[3, 3], [18.0, 8.0, 14.0, 8.0])
    np.testing.assert_allclose(ltrb[3, 2], [10.0, 8.0, 22.0, 8.0])
    assert not ltrb[~expected_mask].any()

    # Half diagonal sqrt(32^2 + 16^2) / 2 = 17.9: outside (20, 100) the level ignores the box.
    heatmap, _, reg_mask = _jitted(ph.targets, gt_boxes, gt_mask, grid=(8, 8), stride=8.0,
                                   size_range=(20.0, 100.0))
    assert not np.asarray(heatmap).any() and not np.asarray(reg_mask).any()


def test_targets_large_box_radius_and_nearest_owner():
    # A 40x40 box: r^2 = 2 delta^2 1600 = 39.5 > 16. A small box next to it owns its own centre.
    big, small = [4.0, 4.0, 44.0, 44.0], [40.0, 40.0, 56.0, 56.0]
    heatmap, ltrb, reg_mask = _jitted(ph.targets, jnp.array([[big, small]]),
                                      jnp.ones((1, 2), bool), grid=(8, 8), stride=8.0)
    radius2 = 2 * ((1 - 0.8) / (1 + 0.8)) ** 2 * 1600
    # Big centre (24, 24) -> cell (3, 3); cell (x 2, y 3) centre (20, 28): d^2 = 16 + 16.
    np.testing.assert_allclose(heatmap[0, 3, 2], math.exp(-32 / radius2), rtol=1e-5)
    assert heatmap[0, 3, 3] == 1.0 and heatmap[0, 6, 6] == 1.0
    # Cell (x 5, y 5), centre (44, 44): in the 3x3 of the small box (centre cell 6) only, and
    # strictly inside the small box; it regresses the small box.
    assert reg_mask[0, 5, 5]
    np.testing.assert_allclose(ltrb[0, 5, 5], [4.0, 4.0, 12.0, 12.0])


def test_loss_is_zero_for_exact_distances_and_counts_positives():
    boxes = jnp.array([[BOX, [40.0, 40.0, 56.0, 56.0]]])
    mask = jnp.ones((1, 2), bool)
    heatmap, ltrb_target, reg_mask = _jitted(ph.targets, boxes, mask, grid=(8, 8), stride=8.0)
    # Logits +-20 agree with the targets: the positive term is (almost) 0.
    logits = jnp.where(heatmap == 1.0, 20.0, -20.0)
    outputs = [(logits, ltrb_target / 8.0)]
    terms = _jitted(ph.loss, outputs, boxes, mask, canvas_size=64)
    assert set(terms) == {"heatmap_pos", "heatmap_neg", "giou"}
    assert float(terms["heatmap_pos"].normalizer) == 2.0
    assert float(terms["heatmap_pos"].mean()) < 1e-6
    np.testing.assert_allclose(terms["giou"].total, 0.0, atol=1e-5)
    assert float(terms["giou"].normalizer) == float(reg_mask.sum())

    # Halving the distances: each regressed cell's GIoU is 1/4 (boxes nest, same centre point).
    half = _jitted(ph.loss, [(logits, ltrb_target / 16.0)], boxes, mask, canvas_size=64)
    np.testing.assert_allclose(half["giou"].mean(), 0.75, rtol=1e-5)

    # No valid cell (images without the task): nothing is learned.
    none = _jitted(ph.loss, outputs, boxes, mask, canvas_size=64,
                   image_valid=jnp.zeros((1, 8, 8), bool))
    for value in none.values():
        assert float(value.total) == 0.0 and float(value.normalizer) == 0.0


def test_loss_multi_level_assigns_boxes_by_size_and_masks_padding():
    # Strides 8 and 16 with ranges [0, 40] and [32, inf): half diagonals 11.3 and 31.1 go to level
    # 0, 45.3 to level 1.
    boxes = jnp.array([[[0.0, 0.0, 16.0, 16.0], [8.0, 8.0, 52.0, 52.0], [0.0, 0.0, 64.0, 64.0]]])
    mask = jnp.ones((1, 3), bool)
    outputs = [(jnp.zeros((1, 8, 8)), jnp.ones((1, 8, 8, 4))),
               (jnp.zeros((1, 4, 4)), jnp.ones((1, 4, 4, 4)))]
    size_ranges = [(0.0, 40.0), (32.0, math.inf)]
    terms = _jitted(ph.loss, outputs, boxes, mask, canvas_size=64, size_ranges=size_ranges)
    assert float(terms["heatmap_pos"].normalizer) == 3.0
    # The right half of the canvas is padding: the first-level cells x >= 4 and the second-level
    # cells x >= 2 drop out; the 64-pixel box's centre cell (2, 2) on level 1 goes with them.
    valid = jnp.zeros((1, 8, 8), bool).at[:, :, :4].set(True)
    masked = _jitted(ph.loss, outputs, boxes, mask, canvas_size=64, image_valid=valid,
                     size_ranges=size_ranges)
    assert float(masked["heatmap_pos"].normalizer) == 2.0


def _planted_outputs():
    level0 = jnp.full((1, 8, 8), -10.0)
    ltrb0 = jnp.zeros((1, 8, 8, 4))
    level0 = level0.at[0, 2, 5].set(3.0)            # centre (44, 20)
    ltrb0 = ltrb0.at[0, 2, 5].set(jnp.array([1.0, 2.0, 1.5, 0.5]))
    level0 = level0.at[0, 2, 6].set(2.5)            # not a peak: next to 3.0
    level0 = level0.at[0, 6, 1].set(2.0)            # centre (12, 52)
    ltrb0 = ltrb0.at[0, 6, 1].set(jnp.array([0.5, 0.5, 1.0, 1.0]))
    level0 = level0.at[0, 7, 7].set(5.0)            # centre (60, 60): outside the valid area
    level1 = jnp.full((1, 4, 4), -10.0).at[0, 1, 1].set(1.0)    # stride 16, centre (24, 24)
    ltrb1 = jnp.zeros((1, 4, 4, 4)).at[0, 1, 1].set(1.0)
    return [(level0, ltrb0), (level1, ltrb1)]


def test_decode_recovers_planted_boxes():
    boxes, scores = _jitted(ph.decode, _planted_outputs(), strides=[8.0, 16.0], top_k=4,
                            valid_wh=jnp.array([[60.0, 58.0]]))
    assert boxes.shape == (1, 4, 4) and scores.shape == (1, 4)
    np.testing.assert_allclose(scores[0, :3], jax.nn.sigmoid(jnp.array([3.0, 2.0, 1.0])),
                               rtol=1e-6)
    assert float(scores[0, 3]) < 1e-4
    # (44 - 8, 20 - 16, 44 + 12, 20 + 4); (8, 48, 20, 60) clipped to height 58; (8, 8, 40, 40).
    np.testing.assert_allclose(boxes[0, :3], [[36.0, 4.0, 56.0, 24.0], [8.0, 48.0, 20.0, 58.0],
                                              [8.0, 8.0, 40.0, 40.0]])
    with pytest.raises(ValueError, match="top_k 81"):
        ph.decode(_planted_outputs(), strides=[8.0, 16.0], top_k=81,
                  valid_wh=jnp.array([[64.0, 64.0]]))


def test_assign_captions_hand_made_boxes():
    gt_boxes = jnp.array([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0],
                           [20.0, 20.0, 30.0, 30.0]]])
    gt_mask = jnp.array([[False, True, True]])     # slot 0 is padding with a copy of slot 1
    proposals = jnp.array([[[0.0, 0.0, 10.0, 9.0],      # IoU 0.9 with slot 1
                            [20.0, 20.0, 30.0, 27.0],   # IoU 0.7 with slot 2
                            [20.0, 20.0, 30.0, 25.0],   # IoU 0.5: below 0.6
                            [50.0, 50.0, 60.0, 60.0]]])  # no overlap
    gt_index, matched = _jitted(ph.assign_captions, proposals, gt_boxes, gt_mask)
    np.testing.assert_array_equal(gt_index, [[1, 2, 2, 1]])
    np.testing.assert_array_equal(matched, [[True, True, False, False]])
    _, lenient = _jitted(ph.assign_captions, proposals, gt_boxes, gt_mask, iou_threshold=0.4)
    np.testing.assert_array_equal(lenient, [[True, True, True, False]])


def test_tiny_head_learns_two_boxes_through_the_detector_interface():
    @nnx.jit
    def create():
        head = ph.ProposalHead(in_features=16, canvas_size=64, top_k=2, hidden=32, num_convs=1,
                               rngs=nnx.Rngs(0))
        return head, nnx.Optimizer(head, optax.adam(2e-2), wrt=nnx.Param)

    head, optimizer = create()
    features = jax.random.normal(jax.random.key(1), (1, 8, 8, 16))
    gt_boxes = jnp.array([[[4.0, 6.0, 28.0, 30.0], [30.0, 20.0, 60.0, 50.0]]])
    gt_mask = jnp.ones((1, 2), bool)
    valid_wh = jnp.array([[64.0, 64.0]])

    @nnx.jit
    def train_step(head, optimizer):
        def objective(head):
            terms = head.forward_train(features, gt_boxes=gt_boxes, gt_mask=gt_mask,
                                       image_weight=jnp.ones((1,)), valid_wh=valid_wh,
                                       key=jax.random.key(0)).terms
            return (terms["heatmap_pos"].mean() + terms["heatmap_neg"].mean()
                    + 2.0 * terms["giou"].mean())

        value, grads = nnx.value_and_grad(objective)(head)
        optimizer.update(head, grads)
        return value, grads

    first, grads = train_step(head, optimizer)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    for _ in range(119):
        last, _ = train_step(head, optimizer)
    assert float(last) < 0.1 * float(first)
    detections = nnx.jit(lambda h: h.detect(features, valid_wh=valid_wh))(head)
    assert bool(detections.valid.all())
    overlap = np.asarray(box_ops.pairwise_iou(detections.boxes[0], gt_boxes[0]))
    assert overlap.max(axis=0).min() > 0.8, overlap
    assert (np.asarray(detections.scores) > 0.5).all()


def test_forward_train_candidates_are_ground_truth_then_proposals():
    """Candidates: the ground truth (matched where real and the image has the task), then the
    ``top_k`` proposals; an image of weight 0 matches nothing and adds nothing to the terms."""
    head = nnx.jit(lambda: ph.ProposalHead(in_features=8, canvas_size=32, top_k=3, hidden=16,
                                           num_convs=1, rngs=nnx.Rngs(0)))()
    features = jax.random.normal(jax.random.key(1), (2, 4, 4, 8))
    gt_boxes = jnp.array([[[0.0, 0.0, 16.0, 16.0], [8.0, 8.0, 24.0, 24.0]]] * 2)
    gt_mask = jnp.array([[True, False], [True, True]])
    valid_wh = jnp.array([[32.0, 32.0], [32.0, 16.0]])
    out = nnx.jit(lambda h, w: h.forward_train(features, gt_boxes=gt_boxes, gt_mask=gt_mask,
                                               image_weight=w, valid_wh=valid_wh,
                                               key=jax.random.key(0)))
    trained = out(head, jnp.array([1.0, 0.0]))
    assert trained.candidates.boxes.shape == (2, 5, 4)
    np.testing.assert_allclose(trained.candidates.boxes[:, :2], gt_boxes)
    np.testing.assert_array_equal(trained.candidates.matched[:, :2], [[True, False],
                                                                      [False, False]])
    assert not np.asarray(trained.candidates.matched[1]).any()
    np.testing.assert_array_equal(trained.candidates.gt_index[0, :1], [0])
    alone = _jitted(ph.loss, head(features[:1]), gt_boxes[:1], gt_mask[:1], canvas_size=32)
    for name, value in alone.items():
        np.testing.assert_allclose(float(trained.terms[name].total), float(value.total),
                                   rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(float(trained.terms[name].normalizer),
                                   float(value.normalizer), err_msg=name)
