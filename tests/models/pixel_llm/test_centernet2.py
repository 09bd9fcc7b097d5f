"""The CenterNet2 dense-captioning detector: official size, targets, RoI sampling, losses, and
jitted inference with static shapes, on tiny maps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixelllm.models.pixel_llm import centernet2 as cn2
from pixelllm.nn import abstract, box_ops

# Module fixtures compile the tiny model: all of this module runs on one xdist worker
# (launch/test.sh uses --dist loadgroup), so they are built once.
pytestmark = pytest.mark.xdist_group("test_centernet2")

# The official module (scenic FpnCenterNet2 at the T5 densecap config: fused 27x27x1280, FPN 256,
# ViTDet in_dim left at 768 so the transposed conv has 384 channels, roi_num_classes 1,
# roi_fc_dims (1024, 1024), roi_conv_dims ()), counted by hand from its layer list; the same
# numbers come out of jax.eval_shape on the official linen modules.
_CONV3 = 3 * 3 * 256 * 256
OFFICIAL_FPN = (
    (2 * 2 * 1280 * 384 + 384)                     # simfp_3.0 ConvTranspose (bias)
    + (384 * 256 + 512 + _CONV3 + 512)             # simfp_3.1 1x1, LN, simfp_3.2 3x3, LN (no bias)
    + 2 * (1280 * 256 + 512 + _CONV3 + 512)        # simfp_4.*, simfp_5.* the same from 1280
    + 2 * (_CONV3 + 256))                          # top_block p6, p7 (bias)
OFFICIAL_HEAD = (4 * (_CONV3 + 256 + 2 * 256)      # bbox_tower: conv (bias) + GroupNorm
                 + (3 * 3 * 256 * 4 + 4)           # bbox_pred
                 + (3 * 3 * 256 + 1)               # agn_hm
                 + 5)                              # scales.0..4
OFFICIAL_ROI = ((7 * 7 * 256 * 1024 + 1024) + (1024 * 1024 + 1024)  # fc1, fc2
                + (1024 * 2 + 2) + (1024 * 4 + 4))                   # cls_score, bbox_pred


def _count(module):
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_paper_size_parameter_count_equals_the_official_module():
    model = abstract.build_abstract(lambda rngs: cn2.CenterNet2(in_features=1280, canvas_size=384,
                                                          rngs=rngs))
    assert (OFFICIAL_FPN, OFFICIAL_HEAD, OFFICIAL_ROI) == (5_672_832, 2_373_898, 13_901_830)
    assert _count(model.pyramid) == OFFICIAL_FPN
    assert _count(model.head) == OFFICIAL_HEAD
    assert _count(model.box_head) == OFFICIAL_ROI
    assert _count(model) == 21_948_560


@pytest.fixture(scope="module")
def tiny():
    """A tiny detector on 8-channel 7x7 maps (levels 14, 7, 3, 2, 1 at strides 4 ... 64)."""
    settings = dict(in_features=8, canvas_size=28, width=32, upsample_features=16, num_convs=1, roi_hidden=(32,),
                    strides=(4.0, 8.0, 16.0, 32.0, 64.0),
                    size_ranges=((0, 8), (6, 16), (12, 32), (24, 64), (48, 1e5)),
                    min_radius=2.0, pre_nms_train=60, post_nms_train=30, pre_nms_test=40,
                    post_nms_test=16, roi_samples=24, roi_size=3, num_detections=5,
                    detection_score_threshold=0.0)
    # Built under jit: one compilation instead of one per eager initializer.
    return nnx.jit(lambda: cn2.CenterNet2(**settings, rngs=nnx.Rngs(0)))()


def test_pyramid_grids_follow_the_official_layout(tiny):
    model = tiny
    pyramid, levels = nnx.jit(lambda m, x: m(x))(model, jnp.zeros((1, 7, 7, 8)))
    assert [p.shape[1:3] for p in pyramid] == [(14, 14), (7, 7), (3, 3), (2, 2), (1, 1)]
    assert all(h.shape[1:] == p.shape[1:3] and d.shape[1:] == p.shape[1:3] + (4,)
               for (h, d), p in zip(levels, pyramid))
    # Initial prediction: probability 0.01, distances ReLU(8) at every cell.
    np.testing.assert_allclose(jax.nn.sigmoid(levels[0][0]), 0.01, atol=2e-3)


def test_targets_peak_regression_cells_and_level_assignment():
    # One 12x12 box centred at (10, 10): half diagonal 8.49 -> only the level of range (6, 16).
    boxes = jnp.array([[[4.0, 4.0, 16.0, 16.0], [0.0, 0.0, 0.0, 0.0]]])
    mask = jnp.array([[True, True]])  # the zero-area box is dropped as the official does
    grids, strides = [(8, 8), (4, 4)], (4.0, 8.0)
    heatmap, ltrb, regress = jax.jit(lambda b, m: cn2.targets(
        b, m, grids=grids, strides=strides, size_ranges=((0, 6), (6, 16)), min_radius=2.0))(
        boxes, mask)
    fine, coarse = heatmap[0, :64].reshape(8, 8), heatmap[0, 64:].reshape(4, 4)
    # Centre cell at stride 8: trunc(10 / 8) = 1, cell centre 12 (official j s + s // 2).
    assert coarse[1, 1] == 1.0 and int((heatmap == 1.0).sum()) == 1
    # Off-level Gaussian still drawn (official), below 1 everywhere.
    assert 0 < fine.max() < 1.0
    # Gaussian: exp(-d^2 / r^2), r^2 = max(2 delta^2 144, 4), d^2 from cell (2, 1) centre (20, 12).
    radius2 = max(2 * (0.2 / 1.8) ** 2 * 144, 4.0)
    np.testing.assert_allclose(coarse[1, 2], np.exp(-((20 - 10) ** 2 + 2 ** 2) / radius2),
                               rtol=1e-5)
    coarse_regress = np.asarray(regress[0, 64:]).reshape(4, 4)
    # 3x3 around (1, 1) whose centres lie strictly inside the box: centres 4, 12, 20 -> only 12.
    assert coarse_regress.sum() == 1 and coarse_regress[1, 1]
    np.testing.assert_allclose(ltrb[0, 64 + 5], np.array([8, 8, 4, 4]) / 8.0)
    assert not np.asarray(regress[0, :64]).any()


def test_delta_round_trip_and_weights():
    anchors = jnp.array([[10.0, 20.0, 30.0, 60.0]])
    boxes = jnp.array([[12.0, 18.0, 40.0, 50.0]])
    deltas = cn2.encode_deltas(boxes, anchors)
    np.testing.assert_allclose(deltas[0, 0], 10 * (26 - 20) / 20, rtol=1e-6)
    np.testing.assert_allclose(deltas[0, 3], 5 * np.log(32 / 40), rtol=1e-6)
    np.testing.assert_allclose(cn2.decode_deltas(deltas, anchors), boxes, rtol=1e-5)


def test_roi_sampling_is_official_and_seeded():
    rng = np.random.default_rng(0)
    gt = jnp.array([[[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 34.0], [0.0, 0.0, 0.0, 0.0]]])
    gt_mask = jnp.array([[True, True, False]])
    jitter = rng.uniform(-1.5, 1.5, (1, 60, 4))
    candidates = jnp.asarray(np.asarray(gt)[:, rng.integers(0, 2, 60)] + jitter, jnp.float32)
    far = np.sort(rng.uniform(40, 60, (1, 30, 2, 2)), axis=2).transpose(0, 1, 3, 2)
    candidates = jnp.concatenate([candidates, jnp.asarray(far.reshape(1, 30, 4), jnp.float32)],
                                 axis=1)
    valid = jnp.ones(candidates.shape[:2], bool).at[0, 5].set(False)
    sample = jax.jit(lambda key: cn2.sample_rois(candidates, valid, gt, gt_mask, iou_threshold=0.6,
                                         num_samples=40, positive_fraction=0.25, key=key))
    first, again, other = sample(jax.random.key(1)), sample(jax.random.key(1)), sample(
        jax.random.key(2))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first.boxes, other.boxes)
    positive = np.asarray(first.positive[0])
    assert positive.sum() == 10 and positive[:10].all()        # int(40 * 0.25), positives first
    assert np.asarray(first.valid).all()
    overlap = box_ops.iou(first.boxes[0], gt[0][first.gt_index[0]])
    assert (np.asarray(overlap)[positive] >= 0.6).all()
    assert (np.asarray(overlap)[~positive] < 0.6).all()
    # The invalid candidate is never drawn.
    drawn = np.asarray(first.boxes[0])
    assert not (drawn == np.asarray(candidates[0, 5])).all(axis=-1).any()


def test_detect_is_jitted_with_static_shapes(tiny):
    model = tiny
    features = jax.random.normal(jax.random.key(0), (2, 7, 7, 8))
    valid_wh = jnp.array([[28.0, 28.0], [28.0, 20.0]])
    detections = nnx.jit(lambda m, f, wh: m.detect(f, valid_wh=wh))(model, features, valid_wh)
    assert detections.boxes.shape == (2, 5, 4) and detections.valid.shape == (2, 5)
    proposals = nnx.jit(lambda m, f: m.propose(m(f)[1], training=False))(model, features)
    assert proposals.boxes.shape == (2, 16, 4)
    assert bool(proposals.valid.all())
    for image in range(2):
        kept = np.asarray(detections.valid[image])
        scores = np.asarray(detections.scores[image])[kept]
        assert kept.any() and (np.diff(scores) <= 0).all()
        # Clipped to the canvas (28), not to the valid area: the official clips to the padded
        # image.
        boxes = np.asarray(detections.boxes[image])
        assert (boxes <= 28.0).all() and (boxes >= 0).all()


def test_training_losses_are_finite_gated_and_train_every_part(tiny):
    model = tiny
    features = jax.random.normal(jax.random.key(0), (2, 7, 7, 8))
    gt = jnp.array([[[2.0, 2.0, 14.0, 12.0], [10.0, 6.0, 26.0, 24.0]],
                    [[4.0, 4.0, 20.0, 20.0], [0.0, 0.0, 0.0, 0.0]]])
    gt_mask = jnp.array([[True, True], [True, False]])

    def total(model, image_weight):
        outputs = model.train_outputs(features, gt, gt_mask, key=jax.random.key(3))
        terms = model.loss(outputs, gt, gt_mask, image_weight)
        return cn2.weighted_total(terms), (terms, outputs)

    step = nnx.jit(nnx.value_and_grad(total, has_aux=True))
    (value, (terms, outputs)), grads = step(model, jnp.ones((2,)))
    assert set(terms) == set(cn2.OFFICIAL_LOSS_WEIGHTS)
    assert np.isfinite(value) and value > 0
    assert outputs.samples.boxes.shape == (2, 24, 4)
    assert int(outputs.samples.positive.sum()) > 0  # the appended ground truth at least
    # Official normalizers: per image max(#peaks, 1), max(#regressed, 1) summed; the RoI box
    # loss over all R slots.
    assert float(terms["heatmap_pos"].normalizer) >= 2
    assert float(terms["giou"].normalizer) >= 2
    assert float(terms["roi_box"].normalizer) == 2 * 24
    for part in ("pyramid", "head", "box_head"):
        norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(getattr(grads, part)))
        assert norm > 0, part
    # Images of weight 0 add nothing, to sums or normalizers.
    (_, (second_only, _)), _ = step(model, jnp.array([0.0, 1.0]))
    assert float(second_only["roi_box"].normalizer) == 24
    assert float(second_only["heatmap_neg"].total) < float(terms["heatmap_neg"].total)
    (nothing, (none, _)), _ = step(model, jnp.zeros((2,)))
    assert float(nothing) == 0.0
    assert all(float(v.total) == 0 and float(v.normalizer) == 0 for v in none.values())


def test_rejects_wrong_level_count():
    with pytest.raises(ValueError, match="5 pyramid levels"):
        cn2.CenterNet2(in_features=8, canvas_size=28, width=32, strides=(8.0, 16.0),
                       rngs=nnx.Rngs(0))


def test_forward_train_drops_images_without_the_task_and_gives_sampled_rois(tiny):
    """The Detector interface: caption candidates are the sampled RoIs (positives first,
    matched = positive); an image of weight 0 has its ground truth dropped (nothing matches) and
    adds nothing to the terms, which equal the loss of the weighted image alone."""
    model = tiny
    features = jax.random.normal(jax.random.key(0), (2, 7, 7, 8))
    gt = jnp.array([[[2.0, 2.0, 14.0, 12.0], [10.0, 6.0, 26.0, 24.0]],
                    [[4.0, 4.0, 20.0, 20.0], [0.0, 0.0, 0.0, 0.0]]])
    gt_mask = jnp.array([[True, True], [True, False]])
    weight = jnp.array([1.0, 0.0])
    key = jax.random.key(3)
    trained = nnx.jit(lambda m: m.forward_train(features, gt_boxes=gt, gt_mask=gt_mask,
                                                image_weight=weight, valid_wh=None, key=key))(model)
    reference = nnx.jit(lambda m: m.loss(
        m.train_outputs(features, gt, gt_mask & (weight > 0)[:, None], key=key), gt,
        gt_mask & (weight > 0)[:, None], weight))(model)
    candidates = trained.candidates
    assert candidates.boxes.shape == (2, 24, 4) and candidates.matched.shape == (2, 24)
    matched = np.asarray(candidates.matched)
    assert matched[0].any() and not matched[1].any()
    # Positives first: no matched candidate after the first unmatched one.
    first_unmatched = int(np.argmin(matched[0]))
    assert not matched[0, first_unmatched:].any()
    overlap = np.asarray(box_ops.pairwise_iou(candidates.boxes[0], gt[0]))
    chosen = np.asarray(candidates.gt_index[0])
    assert (overlap[np.arange(24), chosen][matched[0]] >= 0.6).all()
    for name, value in reference.items():
        np.testing.assert_allclose(float(trained.terms[name].total), float(value.total),
                                   rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(float(trained.terms[name].normalizer),
                                   float(value.normalizer), err_msg=name)
    assert float(trained.terms["roi_box"].normalizer) == 24
