"""The objective on its own: a hand-built batch and outputs, every term computed by hand.

Two images, two slots each, L = 4 tokens, a vocabulary of 3, one point per token, a 4x4 canvas:

  slot (0, 0): trace        (text + points)
  slot (0, 1): unused       (slot_mask False, every task mask on: must count for nothing)
  slot (1, 0): refseg       (text + box + mask)
  slot (1, 1): caption only (text; its point/box/mask targets are wrong on purpose)

Image 1's valid area is 4 x 2 (the bottom two rows are canvas padding).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from configs import pixelllm as pixelllm_config

from pixelllm import batch as batch_lib
from pixelllm.models.pixel_llm import objective
from pixelllm.models.pixel_llm.pixel_llm import Outputs, SlotOutputs
from pixelllm.nn.losses import LossValue

B, S, L, V, CANVAS = 2, 2, 4, 3, 4
EPS = 0.1
LN2 = math.log(2.0)
WEIGHTS = {"text": 1.5, "label_smoothing": EPS, "point": 0.1, "box_l1": 0.2, "box_giou": 0.3,
           "mask_focal": 20.0, "mask_dice": 0.5, "mask_iou_mse": 0.7,
           "proposal_heatmap": 0.5, "proposal_giou": 1.0, "proposal_roi_class": 0.7,
           "proposal_roi_box": 0.9, "text_on_referring": False, "mask_overlap_valid_only": False}

# Every position predicts probabilities (1/2, 1/4, 1/4) (logits (ln 2, 0, 0)). With GRiT's
# smoothing (1 - eps on the target, eps / 2 on each other token) a token's cross-entropy is
#   target 0:    (1 - eps) ln 2 + eps/2 (ln 4 + ln 4) = (1 + eps) ln 2
#   target 1, 2: (1 - eps) ln 4 + eps/2 (ln 2 + ln 4) = (2 - eps/2) ln 2
CE_0 = (1.0 + EPS) * LN2
CE_OTHER = (2.0 - EPS / 2) * LN2


def _hand_built(with_masks: bool = True):
    f32 = np.float32
    text_tokens = np.asarray([[[0, 0, 1, 2], [0, 1, 1, 1]],
                              [[0, 2, 0, 0], [0, 1, 2, 2]]], np.int32)
    text_mask = np.asarray([[[1, 1, 1, 0], [1, 1, 1, 1]],
                            [[1, 1, 1, 1], [1, 1, 0, 0]]], bool)
    slot_mask = np.asarray([[1, 0], [1, 1]], bool)
    task = {  # [B, S] per-slot loss masks
        batch_lib.TASK_TEXT: [[1, 1], [1, 1]], batch_lib.TASK_POINTS: [[1, 1], [0, 0]],
        batch_lib.TASK_BOX: [[0, 1], [1, 0]], batch_lib.TASK_MASK: [[0, 1], [1, 0]]}

    # Points (K = 1): slot (0, 0) has targets on tokens 1 and 2 with |errors| (1, 2) and
    # (0.5, 0.5); every other slot has large errors that must be gated out.
    pred_points = np.zeros((B, S, L, 1, 2), f32)
    target_points = np.full((B, S, L, 1, 2), 50.0, f32)
    points_mask = np.ones((B, S, L), bool)
    points_mask[0, 0] = [False, True, True, False]
    pred_points[0, 0, 1, 0] = (1.0, 2.0)
    target_points[0, 0, 1, 0] = (2.0, 4.0)
    target_points[0, 0, 2, 0] = (0.5, 0.5)

    # Boxes: slot (1, 0) predicts (0, 0, 2, 2) for the target (1, 1, 3, 3); others are far off.
    eos_boxes = np.zeros((B, S, 4), f32)
    target_boxes = np.full((B, S, 4), 3.0, f32) + np.asarray([0, 0, 1, 1], f32)
    eos_boxes[1, 0] = (0.0, 0.0, 2.0, 2.0)
    target_boxes[1, 0] = (1.0, 1.0, 3.0, 3.0)

    # Masks at canvas size. Slot (1, 0): logit ln 3 (p = 3/4) at pixel (0, 0), 0 (p = 1/2)
    # elsewhere; target pixels (0, 0) and (0, 1) plus padding rows that must not count.
    mask_logits = np.full((B, S, CANVAS, CANVAS), 5.0, f32)
    mask_logits[1, 0] = 0.0
    mask_logits[1, 0, 0, 0] = math.log(3.0)
    target_masks = np.zeros((B, S, CANVAS, CANVAS), bool)
    target_masks[1, 0, 0, :2] = True
    target_masks[1, 0, 2:] = True               # inside the padding of image 1
    mask_iou = np.full((B, S), 0.1, f32)
    mask_iou[1, 0] = 0.9

    logits = np.zeros((B, S, L, V), f32)
    logits[..., 0] = LN2
    slot_inputs = {
        batch_lib.TEXT_TOKENS: text_tokens, batch_lib.TEXT_MASK: text_mask,
        batch_lib.TOKEN_POINTS: target_points, batch_lib.TOKEN_POINTS_MASK: points_mask,
        batch_lib.TARGET_BOXES: target_boxes, batch_lib.TARGET_MASKS: target_masks,
        batch_lib.SLOT_MASK: slot_mask,
        batch_lib.PROMPT_BOXES: np.zeros((B, S, 4), f32),
        **{key: np.asarray(value, f32) for key, value in task.items()}}
    slots = SlotOutputs(
        logits=jnp.asarray(logits), hidden=jnp.zeros((B, S, L, 2)),
        token_points=jnp.asarray(pred_points), eos_boxes=jnp.asarray(eos_boxes),
        masks=jnp.asarray(mask_logits) if with_masks else None,
        mask_iou=jnp.asarray(mask_iou) if with_masks else None,
        visual_tokens=jnp.zeros((B, S, 1, 2)))
    batch = {batch_lib.IMAGE: np.zeros((B, CANVAS, CANVAS, 3), f32),
             batch_lib.VALID_WH: np.asarray([[4, 4], [4, 2]], f32),
             batch_lib.TASK_PROPOSALS: np.zeros((B,), f32),
             batch_lib.GT_BOXES: np.zeros((B, 1, 4), f32),
             batch_lib.GT_MASK: np.zeros((B, 1), bool)}
    outputs = Outputs(slots=slots, proposal_terms=None,
                      slot_inputs={k: jnp.asarray(v) for k, v in slot_inputs.items()})
    return outputs, batch


# objective.compute as one compiled program (op by op it takes seconds), compiled once per
# structure of its inputs.
_compute = jax.jit(functools.partial(objective.compute, weights=WEIGHTS))


def _mean(value):
    return float(value.total) / float(value.normalizer)


@pytest.fixture(scope="module")
def computed():
    return _compute(*_hand_built())


def test_text_cross_entropy_by_hand(computed):
    _, terms = computed
    # Weighted targets (text_mask[1:] of used text slots): slot (0, 0) -> 0, 1; slot (1, 0)
    # -> 2, 0, 0; slot (1, 1) -> 1. The unused slot (0, 1) adds nothing.
    np.testing.assert_allclose(float(terms["text"].normalizer), 6.0)
    np.testing.assert_allclose(float(terms["text"].total), 3 * CE_0 + 3 * CE_OTHER, rtol=1e-6)


def test_point_l1_by_hand(computed):
    _, terms = computed
    # Only slot (0, 0)'s two marked tokens: |1| + |2| + |0.5| + |0.5| = 4 over 2 tokens x K=1 x 2.
    np.testing.assert_allclose(float(terms["point"].total), 4.0, rtol=1e-6)
    np.testing.assert_allclose(float(terms["point"].normalizer), 4.0)


def test_box_l1_and_giou_by_hand(computed):
    _, terms = computed
    # (0, 0, 2, 2) vs (1, 1, 3, 3): L1 = 4 over 4 coordinates of one box; intersection 1,
    # union 7, enclosing box 9: GIoU = 1/7 - (9 - 7)/9.
    np.testing.assert_allclose(float(terms["box_l1"].total), 4.0, rtol=1e-6)
    np.testing.assert_allclose(float(terms["box_l1"].normalizer), 4.0)
    np.testing.assert_allclose(_mean(terms["box_giou"]), 1.0 - (1 / 7 - 2 / 9), rtol=1e-6)
    np.testing.assert_allclose(float(terms["box_giou"].normalizer), 1.0)


def test_mask_terms_by_hand(computed):
    _, terms = computed
    # Focal (the official alpha 0.5, gamma 2) over the 8 valid pixels of image 1:
    #   (0, 0): p = 3/4, positive: 0.5 * (1/4)^2 * ln(4/3)
    #   (0, 1): p = 1/2, positive: 0.5 * (1/2)^2 * ln 2
    #   6 negatives at p = 1/2:    0.5 * (1/2)^2 * ln 2 each
    focal = (0.5 / 16 * math.log(4 / 3) + 7 * 0.5 / 4 * LN2) / 8
    # Dice and IoU over the whole 4x4 canvas, as the official sam_mask_loss: the 8 padding
    # pixels (p = 1/2, target 1) count. sum p = 3/4 + 15/2, sum t = 10, sum p t = 3/4 + 9/2.
    dice = 1.0 - (2 * 5.25 + 1) / (8.25 + 10 + 1)
    # IoU of (logits > 0) = {(0, 0)} with the 10 target pixels: 1/10; predicted 0.9.
    iou_mse = (0.9 - 0.1) ** 2
    for name, want in (("mask_focal", focal), ("mask_dice", dice), ("mask_iou_mse", iou_mse)):
        np.testing.assert_allclose(_mean(terms[name]), want, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(float(terms[name].normalizer), 1.0, err_msg=name)

    # mask_overlap_valid_only: dice and IoU over the 8 valid pixels only (sum p = 3/4 + 7/2,
    # sum t = 2, sum p t = 3/4 + 1/2; IoU 1/2); the focal term does not change.
    valid_only_weights = {**WEIGHTS, "mask_overlap_valid_only": True}
    _, valid_only = jax.jit(functools.partial(objective.compute, weights=valid_only_weights))(
        *_hand_built())
    np.testing.assert_allclose(_mean(valid_only["mask_dice"]), 1.0 - 3.5 / 7.25, rtol=1e-5)
    np.testing.assert_allclose(_mean(valid_only["mask_iou_mse"]), (0.9 - 0.5) ** 2, rtol=1e-5)
    np.testing.assert_allclose(_mean(valid_only["mask_focal"]), focal, rtol=1e-5)


def test_total_is_the_weighted_sum_of_term_means(computed):
    total, terms = computed
    assert set(terms) == {"text", "point", "box_l1", "box_giou", "mask_focal", "mask_dice",
                          "mask_iou_mse"}
    want = sum(WEIGHTS[name] * _mean(value) for name, value in terms.items())
    np.testing.assert_allclose(float(total), want, rtol=1e-6)
    # And from the hand values directly (text, point, box L1 means: 6 tokens, 1.0, 1.0).
    by_hand = (WEIGHTS["text"] * (3 * CE_0 + 3 * CE_OTHER) / 6 + WEIGHTS["point"] * 1.0
               + WEIGHTS["box_l1"] * 1.0 + WEIGHTS["box_giou"] * (1.0 - (1 / 7 - 2 / 9)))
    mask_part = sum(WEIGHTS[name] * _mean(terms[name])
                    for name in ("mask_focal", "mask_dice", "mask_iou_mse"))
    np.testing.assert_allclose(float(total) - mask_part, by_hand, rtol=1e-6)


def test_caption_only_and_unused_slots_add_no_point_box_or_mask_loss():
    """Changing the predictions of the caption-only slot (1, 1) and the unused slot (0, 1)
    leaves every point, box and mask term unchanged; their text changes only the text term
    (slot (1, 1)) or nothing (slot (0, 1))."""
    outputs, batch = _hand_built()
    _, base = _compute(outputs, batch)
    slots = outputs.slots
    changed = slots._replace(
        token_points=slots.token_points.at[1, 1].add(7.0).at[0, 1].add(7.0),
        eos_boxes=slots.eos_boxes.at[1, 1].set(jnp.asarray([0.0, 0, 1, 1]))
        .at[0, 1].set(jnp.asarray([0.0, 0, 1, 1])),
        masks=slots.masks.at[1, 1].set(-3.0).at[0, 1].set(-3.0),
        mask_iou=slots.mask_iou.at[1, 1].set(0.7).at[0, 1].set(0.7),
        logits=slots.logits.at[0, 1].set(jnp.asarray([0.0, 9.0, 0.0])))
    _, terms = _compute(outputs._replace(slots=changed), batch)
    for name, value in base.items():
        np.testing.assert_allclose(float(terms[name].total), float(value.total), rtol=1e-6,
                                   err_msg=name)
        np.testing.assert_allclose(float(terms[name].normalizer), float(value.normalizer),
                                   err_msg=name)
    # The caption-only slot's text does count.
    text_changed = slots._replace(logits=slots.logits.at[1, 1].set(jnp.asarray([0.0, 9.0, 0.0])))
    _, terms = _compute(outputs._replace(slots=text_changed), batch)
    assert abs(float(terms["text"].total) - float(base["text"].total)) > 1e-3


def test_a_batch_without_a_task_has_zero_normalizer_and_zero_mean():
    """No slot trains boxes or points: those terms have nothing to normalize by and add 0 to
    the total (not NaN)."""
    outputs, batch = _hand_built(with_masks=False)
    inputs = dict(outputs.slot_inputs)
    for key in (batch_lib.TASK_POINTS, batch_lib.TASK_BOX, batch_lib.TASK_MASK):
        inputs[key] = jnp.zeros_like(inputs[key])
    total, terms = _compute(outputs._replace(slot_inputs=inputs), batch)
    assert "mask_focal" not in terms                       # no mask path, no mask terms
    for name in ("point", "box_l1", "box_giou"):
        assert float(terms[name].total) == 0.0 and float(terms[name].normalizer) == 0.0, name
        assert float(terms[name].mean()) == 0.0, name
    np.testing.assert_allclose(float(total), WEIGHTS["text"] * _mean(terms["text"]), rtol=1e-6)


def test_referring_slots_train_text_only_with_the_extension_switch():
    """Official: a referring slot (task_box on, task_text off, as the task table's refer row
    writes it) trains no text; ``text_on_referring`` adds its text, exactly the tokens a
    text-trained slot would count."""
    outputs, batch = _hand_built(with_masks=False)
    inputs = dict(outputs.slot_inputs)
    inputs[batch_lib.TASK_TEXT] = inputs[batch_lib.TASK_TEXT].at[1, 0].set(0.0)  # refer slot
    official = outputs._replace(slot_inputs=inputs)
    _, terms = _compute(official, batch)
    # Slot (1, 0)'s 3 weighted targets (2, 0, 0) drop out: 0, 1 and 1 remain.
    np.testing.assert_allclose(float(terms["text"].normalizer), 3.0)
    np.testing.assert_allclose(float(terms["text"].total), CE_0 + 2 * CE_OTHER, rtol=1e-6)
    extended = jax.jit(functools.partial(objective.compute,
                                         weights={**WEIGHTS, "text_on_referring": True}))
    _, terms = extended(official, batch)
    np.testing.assert_allclose(float(terms["text"].normalizer), 6.0)
    np.testing.assert_allclose(float(terms["text"].total), 3 * CE_0 + 3 * CE_OTHER, rtol=1e-6)


def test_paper_config_trains_the_official_referring_loss():
    """configs/pixelllm.py: box L1 at the official 0.1 in pixels, no GIoU, no referring text
    loss, and the box read from the points (no separate box layer)."""
    for variant in ("t5_xl", "tiny"):
        config = pixelllm_config.get_config(variant)
        assert config.loss.box_l1 == 0.1 and config.loss.point == 0.1
        assert config.loss.box_giou == 0.0 and config.loss.text_on_referring is False
        assert config.model.point_head.box_source == "points"
        objective.check_weights(config.loss)


def test_weights_must_name_every_term_exactly():
    outputs, batch = _hand_built(with_masks=False)
    misspelt = {**{k: v for k, v in WEIGHTS.items() if k != "box_giou"}, "box_gIoU": 1.0}
    with pytest.raises(ValueError, match=r"unknown \['box_gIoU'\], missing \['box_giou'\]"):
        objective.compute(outputs, batch, misspelt)


def test_detector_terms_are_prefixed_and_weighted():
    """The detector's own terms enter as ``proposal_<name>``; both heatmap terms take
    ``proposal_heatmap``, the others their own weight."""
    outputs, batch = _hand_built(with_masks=False)
    detector_terms = {
        "heatmap_pos": LossValue(jnp.float32(3.0), jnp.float32(2.0)),
        "heatmap_neg": LossValue(jnp.float32(1.0), jnp.float32(2.0)),
        "giou": LossValue(jnp.float32(0.5), jnp.float32(1.0)),
        "roi_class": LossValue(jnp.float32(8.0), jnp.float32(16.0)),
        "roi_box": LossValue(jnp.float32(1.0), jnp.float32(4.0))}
    total, terms = _compute(outputs._replace(proposal_terms=detector_terms), batch)
    base, base_terms = _compute(outputs, batch)
    for name, value in detector_terms.items():
        assert float(terms[f"proposal_{name}"].total) == float(value.total)
    assert set(terms) - set(base_terms) == {f"proposal_{name}" for name in detector_terms}
    np.testing.assert_allclose(
        float(total) - float(base),
        0.5 * (1.5 + 0.5) + 1.0 * 0.5 + 0.7 * 0.5 + 0.9 * 0.25, rtol=1e-6)
