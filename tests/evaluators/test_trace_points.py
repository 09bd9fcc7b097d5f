"""The official trace metric (PointEvaluator) on hand-computed cases and against a plain loop."""

import json

import numpy as np
import pytest

from pixelllm.evaluators import trace_points


def _image_one():
    """valid 10 x 20; one slot, 3 tokens, the middle one without a target. Error 0.15."""
    pred = np.array([[[[1, 2], [10, 20]],      # normalised (.1,.1), (1,1) vs gt (0,0), (1,1)
                      [[99, 99], [99, 99]],    # no target: ignored
                      [[5, 0], [0, 10]]]], float)  # (.5,0), (0,.5) vs (.5,.5) twice
    gt = np.array([[[[0, 0], [10, 20]],
                    [[0, 0], [0, 0]],
                    [[5, 10], [5, 10]]]], float)
    mask = np.array([[True, False, True]])
    # token 0: min distances 0.1 and 0 -> 0.05; token 2: 0.25 and 0.25 -> 0.25
    return dict(pred_points=pred, gt_points=gt, token_mask=mask, valid_wh=(10, 20)), 0.15


def _image_two():
    """valid 40 x 10; two slots pooled (not averaged per slot). Error 0.075."""
    pred = np.array([[[[4, 1], [36, 9]], [[0, 0], [0, 0]]],
                     [[[20, 5], [28, 5]], [[4, 2], [0, 0]]]], float)
    gt = np.array([[[[0, 0], [40, 10]], [[0, 0], [0, 0]]],
                   [[[20, 5], [20, 5]], [[0, 0], [0, 0]]]], float)
    mask = np.array([[True, False], [True, True]])
    # slot 0 token 0: 0.1, 0.1 -> 0.1; slot 1 token 0: 0, 0.1 -> 0.05;
    # slot 1 token 1 (a real target at the origin): 0.15, 0 -> 0.075
    return dict(pred_points=pred, gt_points=gt, token_mask=mask, valid_wh=(40, 10)), 0.075


def _image_without_targets():
    shape = (1, 2, 2, 2)
    return dict(pred_points=np.ones(shape), gt_points=np.zeros(shape),
                token_mask=np.zeros((1, 2), bool), valid_wh=(32, 32))


def test_hand_computed_images_of_different_sizes():
    evaluator = trace_points.TracePointEvaluator(split="ln_coco/validation")
    (one, error_one), (two, error_two) = _image_one(), _image_two()
    evaluator.add(**one)
    evaluator.add(**two)
    evaluator.add(**_image_without_targets())
    result = evaluator.result()
    # the official counts an image without targets as error 0 in the mean over images
    assert result["point_l1"] == pytest.approx((error_one + error_two + 0.0) / 3, rel=1e-7)
    assert result["point_l1_images_with_points"] == pytest.approx(
        (error_one + error_two) / 2, rel=1e-7)
    assert result["num_images"] == 3.0
    assert result["num_images_without_points"] == 1.0
    assert result["num_tokens"] == 5.0
    assert len(evaluator) == 3


def test_slots_pooled_not_averaged_per_slot():
    evaluator = trace_points.TracePointEvaluator(split="val")
    two, error_two = _image_two()
    evaluator.add(**two)
    per_slot_first = (0.1 + (0.05 + 0.075) / 2) / 2
    assert evaluator.result()["point_l1"] == pytest.approx(error_two, rel=1e-7)
    assert abs(error_two - per_slot_first) > 1e-3


def test_tie_between_ground_truth_points_and_more_points():
    # a predicted point halfway between two ground-truth points: either gives 0.25; K = 4 as
    # the exact alignment may give, P = 2
    gt = np.array([[[[0, 0], [8, 8], [4, 4], [4, 4]]]], float)
    pred = np.array([[[[0, 8], [4, 4]]]], float)
    evaluator = trace_points.TracePointEvaluator(split="val")
    evaluator.add(pred_points=pred, gt_points=gt, token_mask=np.ones((1, 1), bool),
                  valid_wh=(16, 16))
    # (0, 8)/16 = (0, .5): to (0,0) 0.25, to (.5,.5) 0.25, to (.25,.25) 0.25; (4,4) hits -> 0
    assert evaluator.result()["point_l1"] == pytest.approx(0.125, rel=1e-7)


def test_only_images_without_targets():
    evaluator = trace_points.TracePointEvaluator(split="val")
    evaluator.add(**_image_without_targets())
    result = evaluator.result()
    assert result["point_l1"] == 0.0
    assert "point_l1_images_with_points" not in result


def _loop_reference(images):
    """The official definition written as plain loops."""
    per_image = []
    for image in images:
        width, height = image["valid_wh"]
        total, count = 0.0, 0
        for s, l in zip(*np.nonzero(image["token_mask"])):
            token = []
            for px, py in image["pred_points"][s, l]:
                token.append(min((abs(px - gx) / width + abs(py - gy) / height) / 2
                                 for gx, gy in image["gt_points"][s, l]))
            total += sum(token) / len(token)
            count += 1
        per_image.append(total / (count + 1e-8))
    return sum(per_image) / len(per_image)


def test_matches_plain_loops_on_random_images():
    rng = np.random.default_rng(0)
    images = []
    for _ in range(4):
        slots, length, pred_count, gt_count = rng.integers(1, 4, size=4)
        wh = tuple(rng.integers(8, 33, size=2).astype(float))
        images.append(dict(
            pred_points=rng.uniform(0, 32, (slots, length, pred_count, 2)),
            gt_points=rng.uniform(0, 32, (slots, length, gt_count, 2)),
            token_mask=rng.random((slots, length)) < 0.6, valid_wh=wh))
    evaluator = trace_points.TracePointEvaluator(split="val")
    for image in images:
        evaluator.add(**image)
    assert evaluator.result()["point_l1"] == pytest.approx(_loop_reference(images), rel=1e-12)


def test_bad_input_is_named(tmp_path):
    evaluator = trace_points.TracePointEvaluator(split="val")
    with pytest.raises(ValueError, match="val.*no image"):
        evaluator.result()
    good, _ = _image_one()
    with pytest.raises(ValueError, match="pred_points"):
        evaluator.add(**{**good, "pred_points": good["pred_points"][:, :, 0]})
    with pytest.raises(ValueError, match="gt_points"):
        evaluator.add(**{**good, "gt_points": good["gt_points"][:, :2]})
    with pytest.raises(ValueError, match="token_mask"):
        evaluator.add(**{**good, "token_mask": good["token_mask"].astype(int)})
    with pytest.raises(ValueError, match="valid_wh"):
        evaluator.add(**{**good, "valid_wh": (0, 20)})
    evaluator.add(**good)
    evaluator.write_json(tmp_path / "trace.json")
    written = json.loads((tmp_path / "trace.json").read_text())
    assert written == {"split": "val", "metrics": evaluator.result()}
