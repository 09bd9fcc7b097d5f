"""Static-shape greedy NMS against a plain numpy greedy NMS (ties, invalid boxes, output caps)."""

import jax
import numpy as np
import pytest

from pixelllm.nn.nms import non_max_suppression


def _numpy_greedy(boxes, scores, iou_threshold, max_output, valid):
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))  # ties: lower index first
    kept = []
    for i in order:
        if not valid[i]:
            continue
        suppressed = False
        for j in kept:
            x0, y0 = max(boxes[i, 0], boxes[j, 0]), max(boxes[i, 1], boxes[j, 1])
            x1, y1 = min(boxes[i, 2], boxes[j, 2]), min(boxes[i, 3], boxes[j, 3])
            inter = max(x1 - x0, 0) * max(y1 - y0, 0)
            union = ((boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1])
                     + (boxes[j, 2] - boxes[j, 0]) * (boxes[j, 3] - boxes[j, 1]) - inter)
            if union > 0 and inter / union >= iou_threshold:
                suppressed = True
                break
        if not suppressed:
            kept.append(i)
        if len(kept) == max_output:
            break
    return kept


def _random_boxes(rng, count):
    # Few distinct sizes on a coarse grid: many exact duplicates and IoUs at the threshold.
    low = rng.integers(0, 6, (count, 2)) * 4.0
    size = rng.integers(1, 4, (count, 2)) * 4.0
    return np.concatenate([low, low + size], axis=1).astype(np.float32)


@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.9])
def test_matches_numpy_greedy_nms_with_ties(iou_threshold):
    rng = np.random.default_rng(0)
    batch, count, max_output = 6, 40, 12
    boxes = np.stack([_random_boxes(rng, count) for _ in range(batch)])
    scores = rng.integers(0, 5, (batch, count)).astype(np.float32) / 4.0  # heavy ties
    valid = rng.uniform(size=(batch, count)) > 0.2
    nms = jax.jit(jax.vmap(lambda b, s, v: non_max_suppression(
        b, s, iou_threshold=iou_threshold, max_output=max_output, valid=v)))
    indices, kept = map(np.asarray, nms(boxes, scores, valid))
    for image in range(batch):
        expected = _numpy_greedy(boxes[image], scores[image], iou_threshold, max_output,
                                 valid[image])
        assert kept[image].sum() == len(expected)
        assert indices[image][kept[image]].tolist() == expected
        assert not kept[image][len(expected):].any()


def test_more_slots_than_boxes_and_all_kept():
    boxes = np.array([[0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5]], np.float32)
    scores = np.array([0.1, 0.9, 0.5], np.float32)
    indices, kept = non_max_suppression(boxes, scores, iou_threshold=0.5, max_output=5)
    assert kept.tolist() == [True, True, True, False, False]
    assert indices[:3].tolist() == [1, 2, 0]


def test_suppresses_at_the_threshold_itself():
    # IoU exactly 0.5: suppressed at threshold 0.5 (the official >=), kept at 0.51.
    boxes = np.array([[0, 0, 4, 2], [0, 0, 2, 2]], np.float32)
    scores = np.array([1.0, 0.5], np.float32)
    assert non_max_suppression(boxes, scores, iou_threshold=0.5, max_output=2)[1].tolist() == [
        True, False]
    assert non_max_suppression(boxes, scores, iou_threshold=0.51, max_output=2)[1].tolist() == [
        True, True]


def test_rejects_mismatched_scores():
    with pytest.raises(ValueError, match="scores"):
        non_max_suppression(np.zeros((3, 4), np.float32), np.zeros((2,), np.float32),
                            iou_threshold=0.5, max_output=2)
