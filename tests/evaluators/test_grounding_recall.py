"""PNG average recall on hand-computed cases and against F-LMM's threshold loop."""

import json

import numpy as np
import pytest

from pixelllm.evaluators import grounding_recall
from pixelllm.evaluators.grounding_recall import GroundingRecallEvaluator, average_recall


def _pair(intersection, union, width=8):
    """One-row masks ``[1, width]`` with the given intersection and union pixel counts."""
    pred = np.zeros((1, width), bool)
    gt = np.zeros((1, width), bool)
    pred[0, :union] = True
    gt[0, union - intersection:union] = True
    return pred, gt


def _stack(pairs):
    return np.stack([p for p, _ in pairs]), np.stack([g for _, g in pairs])


# IoU -> its average-recall contribution: 1e-5 times the thresholds i * 1e-5 <= IoU
# (i < 99,999). 1/3 in float32 is 0.33333334: i = 0..33333.
PERFECT, ZERO, THIRD, TWO_SEVENTHS = 0.99999, 0.00001, 0.33334, 0.28572


def _flmm_average_accuracy(ious):
    """F-LMM's average_accuracy, transcribed (the loop over 100,000 thresholds)."""
    thresholds = np.arange(0, 1, 0.00001)
    accuracy = [np.sum(ious >= t) / len(ious) for t in thresholds]
    return sum(abs(b - a) * accuracy[i]
               for i, (a, b) in enumerate(zip(thresholds[:-1], thresholds[1:])))


def test_average_recall_of_chosen_ious():
    assert average_recall(np.float32([1.0])) == pytest.approx(PERFECT, abs=1e-9)
    assert average_recall(np.float32([0.0])) == pytest.approx(ZERO, abs=1e-12)
    assert average_recall(np.float32([1 / 3])) == pytest.approx(THIRD, abs=1e-9)
    assert average_recall(np.float32([1.0, 0.0, 1 / 3, 2 / 7])) == pytest.approx(
        (PERFECT + ZERO + THIRD + TWO_SEVENTHS) / 4, abs=1e-9)


def test_average_recall_matches_flmm_loop():
    ious = np.random.default_rng(0).uniform(0, 1, 7).astype(np.float32)
    ious[:2] = [0.0, 1.0]
    assert average_recall(ious) == pytest.approx(_flmm_average_accuracy(ious), abs=1e-12)


def test_subsets_accuracy_and_counts(tmp_path):
    evaluator = GroundingRecallEvaluator(split="png/val")
    # Narrative 0: a perfect singular thing, a missed singular stuff, a plural (thing) of 1/3.
    pred, gt = _stack([_pair(4, 4), _pair(3, 3), _pair(1, 3)])
    pred[1] = False  # nothing predicted for the stuff phrase (3 pixels): IoU 0
    evaluator.add(phrase_ids=[(0, 0), (0, 1), (0, 2)], pred_masks=pred, gt_masks=gt,
                  is_thing=[True, False, True], plural=[False, False, True])
    # Narrative 1: a singular stuff of 2/7 and one of exactly 1/2; the first again (skipped).
    pred, gt = _stack([_pair(2, 7), _pair(1, 2), _pair(4, 4)])
    evaluator.add(phrase_ids=[(1, 0), (1, 1), (0, 0)], pred_masks=pred, gt_masks=gt,
                  is_thing=[False, False, True], plural=[False, False, False])
    half = 0.50001  # thresholds 0 .. 0.5 (i = 0..50000)
    metrics = evaluator.result()
    expected_ar = {
        "AR": (PERFECT + ZERO + THIRD + TWO_SEVENTHS + half) / 5,
        "AR_things": (PERFECT + THIRD) / 2,
        "AR_stuff": (ZERO + TWO_SEVENTHS + half) / 3,
        "AR_singular": (PERFECT + ZERO + TWO_SEVENTHS + half) / 4,
        "AR_plural": THIRD,
    }
    for key, value in expected_ar.items():
        assert metrics[key] == pytest.approx(value, abs=1e-9), key
    # IoU exactly 0.5 is not > 0.5: only the perfect mask counts.
    assert metrics["Acc@0.5"] == pytest.approx(1 / 5)
    assert metrics["pixel_accuracy"] == pytest.approx(np.mean([1, 5 / 8, 6 / 8, 3 / 8, 7 / 8]))
    assert {k: metrics[k] for k in ("num_phrases", "num_things", "num_stuff", "num_singular",
                                    "num_plural", "num_duplicates_skipped")} == {
        "num_phrases": 5, "num_things": 2, "num_stuff": 3, "num_singular": 4, "num_plural": 1,
        "num_duplicates_skipped": 1}
    evaluator.write_json(tmp_path / "out" / "png.json")
    written = json.loads((tmp_path / "out" / "png.json").read_text())
    assert written["split"] == "png/val" and written["metrics"]["AR"] == metrics["AR"]


def test_empty_subset_has_no_key_and_empty_masks_score_zero():
    evaluator = GroundingRecallEvaluator(split="s")
    empty = np.zeros((1, 2, 2), bool)
    evaluator.add(phrase_ids=[0], pred_masks=empty, gt_masks=empty, is_thing=[True],
                  plural=[False])
    metrics = evaluator.result()
    assert "AR_plural" not in metrics and "AR_stuff" not in metrics
    assert metrics["AR"] == pytest.approx(ZERO, abs=1e-12)
    assert grounding_recall.mask_iou(empty, empty)[0] == 0.0


@pytest.mark.parametrize("change, message", [
    (dict(pred_masks=np.zeros((1, 2, 2), np.uint8)), "pred_masks must be bool"),
    (dict(gt_masks=np.zeros((1, 3, 2), bool)), "differ"),
    (dict(plural=[0]), "plural must be bool"),
])
def test_bad_input_is_named(change, message):
    arguments = dict(phrase_ids=[0], pred_masks=np.zeros((1, 2, 2), bool),
                     gt_masks=np.zeros((1, 2, 2), bool), is_thing=[True], plural=[False])
    with pytest.raises(ValueError, match=message):
        GroundingRecallEvaluator(split="s").add(**{**arguments, **change})
    with pytest.raises(ValueError, match="no phrase"):
        GroundingRecallEvaluator(split="s").result()
