"""Dense-captioning mAP: hand-computed cases with a fake METEOR, an independent straightforward
re-implementation on random cases, and one case with the real Java METEOR."""

import json

import numpy as np
import pytest

from pixelllm.evaluators import densecap

# Recall points of Lua's `for t=0,1,0.01`: 34 of them are <= 1/3, 67 are <= 2/3, 20 are <= 0.2
# (the 21st is 0.2 + 4e-17), 50 are <= 0.5 (the 51st is 0.5 + 2e-16).
AP_RECALL_THIRD = 0.34
AP_RECALL_TWO_THIRDS = 0.67


class NumberScorer:
    """Fake METEOR: a candidate caption is the score it gets ("0.1" scores 0.1); records the
    pairs it was asked for."""

    def __init__(self):
        self.requests = []

    def score_pairs(self, candidates, references):
        self.requests.append((list(candidates), [list(r) for r in references]))
        return np.asarray([float(c) for c in candidates], np.float64)


def evaluate(images, **kwargs):
    scorer = NumberScorer()
    evaluator = densecap.DenseCapEvaluator(meteor=scorer, **kwargs)
    for image_id, image in enumerate(images):
        evaluator.add(image_id=image_id, **image)
    return evaluator.result(), scorer


def image(pred_boxes=(), pred_scores=(), pred_captions=(), gt_boxes=(), gt_captions=None):
    return dict(pred_boxes=np.asarray(pred_boxes, np.float64),
                pred_scores=np.asarray(pred_scores, np.float64),
                pred_captions=list(pred_captions),
                gt_boxes=np.asarray(gt_boxes, np.float64),
                gt_captions=gt_captions if gt_captions is not None else [
                    f"region {i}" for i in range(len(gt_boxes))])


BOX = [0.0, 0.0, 10.0, 10.0]
FAR = [100.0, 100.0, 110.0, 110.0]


def test_recall_points_are_luas():
    points = densecap.lua_recall_points()
    assert points.size == 100 and points[0] == 0.0 and 0.99 < points[-1] < 0.9901
    assert (points <= 1 / 3).sum() == 34 and (points <= 2 / 3).sum() == 67
    assert (points <= 0.2).sum() == 20 and (points <= 0.5).sum() == 50


def test_one_perfect_detection():
    metrics, scorer = evaluate([image([BOX], [0.9], ["0.3"], [BOX])])
    assert metrics["mAP"] == 1.0 and metrics["mAP_detection"] == 1.0
    assert len([k for k in metrics if k.startswith("mAP_iou")]) == 30
    assert len([k for k in metrics if k.startswith("mAP_detection_iou")]) == 5
    assert scorer.requests == [(["0.3"], [["region 0"]])]


def test_meteor_threshold_is_strict():
    metrics, _ = evaluate([image([BOX], [0.9], ["0.1"], [BOX])])
    # METEOR 0.1 passes m = 0 and 0.05 but not 0.1 (> is strict): 2 of the 6 thresholds.
    assert metrics["mAP_iou0.5_meteor0.05"] == 1.0
    assert metrics["mAP_iou0.5_meteor0.10"] == 0.0
    assert metrics["mAP"] == pytest.approx(2 / 6)
    assert metrics["mAP_detection"] == 1.0
    zero, _ = evaluate([image([BOX], [0.9], ["0.0"], [BOX])])
    assert zero["mAP"] == 0.0 and zero["mAP_detection"] == 1.0


def test_iou_threshold_is_inclusive():
    # IoU exactly 0.5: a hit for t in {0.3, 0.4, 0.5}, a miss for 0.6 and 0.7.
    metrics, _ = evaluate([image([[0, 0, 10, 5]], [0.9], ["1"], [BOX])])
    assert metrics["mAP_detection_iou0.5"] == 1.0 and metrics["mAP_detection_iou0.6"] == 0.0
    assert metrics["mAP"] == pytest.approx(0.6) and metrics["mAP_detection"] == pytest.approx(0.6)


def test_recall_exactly_on_a_grid_point_follows_lua():
    # 1 of 5 ground truths found: recall 0.2 reaches 20 recall points, not 21 (the official
    # port's r / 100 would count 0.2 itself).
    gts = [BOX] + [[100.0 * i, 0, 100.0 * i + 10, 10] for i in range(1, 5)]
    metrics, _ = evaluate([image([BOX], [0.9], ["1"], gts)])
    assert metrics["mAP"] == pytest.approx(0.2) and metrics["num_ground_truth"] == 5


def test_score_ties_across_images_keep_the_order_added():
    found = image([BOX], [0.5], ["1"], [BOX])
    missed = image([FAR], [0.5], ["1"], [BOX, [20, 0, 30, 10]])
    first, _ = evaluate([found, missed])   # ranked [TP, FP], recall 1/3
    assert first["mAP"] == pytest.approx(AP_RECALL_THIRD)
    second, _ = evaluate([missed, found])  # ranked [FP, TP]: precision 1/2 at recall 1/3
    assert second["mAP"] == pytest.approx(AP_RECALL_THIRD / 2)


def test_score_ties_and_duplicates_within_an_image():
    # Two detections on one ground truth with equal scores: the first given is matched, the
    # other is a duplicate (a false positive) whatever its caption.
    bad_first, scorer = evaluate([image([BOX, BOX], [0.5, 0.5], ["0", "1"], [BOX])])
    assert bad_first["mAP"] == 0.0 and bad_first["mAP_detection"] == 1.0
    assert scorer.requests == [(["0"], [["region 0"]])]  # duplicates need no METEOR
    good_first, _ = evaluate([image([BOX, BOX], [0.5, 0.5], ["1", "0"], [BOX])])
    assert good_first["mAP"] == 1.0
    # Ranked by score, not by input order.
    by_score, _ = evaluate([image([BOX, BOX], [0.4, 0.6], ["0", "1"], [BOX])])
    assert by_score["mAP"] == 1.0


def test_match_is_the_highest_iou_ground_truth_not_the_best_available():
    # The second detection overlaps the used ground truth most (IoU 0.83) and the free one
    # with IoU 0.6: DenseCap counts it as a false positive (COCO would match the free one).
    gts = [BOX, [0, 0, 20, 10], FAR]
    metrics, _ = evaluate([image([BOX, [0, 0, 12, 10]], [0.9, 0.8], ["1", "1"], gts)])
    assert metrics["num_ground_truth"] == 3
    assert metrics["mAP_detection_iou0.3"] == pytest.approx(AP_RECALL_THIRD)
    assert metrics["mAP"] == pytest.approx(AP_RECALL_THIRD)


def test_overlapping_ground_truths_merge_greedily_largest_cluster_first():
    # B overlaps A (0.83) and C (0.83); A and C overlap 0.69 < 0.7: B's cluster {A, B, C} is the
    # largest, so all three become one box; D stays alone.
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 12], [0, 0, 10, 14.5], FAR], np.float64)
    merged, captions = densecap.merge_ground_truth(boxes, ["a", "b", "c", "d"])
    np.testing.assert_allclose(merged, [[0, 0, 10, 36.5 / 3], FAR])
    assert captions == [["a", "b", "c"], ["d"]]
    # The detection's references are all the merged captions; recall counts merged boxes.
    metrics, scorer = evaluate([image([[0, 0, 10, 12]], [0.9], ["1"], boxes,
                                      ["a", "b", "c", "d"])])
    assert scorer.requests == [(["1"], [["a", "b", "c"]])]
    assert metrics["num_ground_truth"] == 2 and metrics["num_ground_truth_before_merge"] == 4
    # Recall 1/2 reaches 50 recall points (Lua's 51st is 0.5 + 2e-16).
    assert metrics["mAP_detection"] == pytest.approx(0.5)


def test_merge_leaves_separate_boxes_and_keeps_degenerate_ones():
    boxes = np.array([BOX, [0, 0, 10, 14.5], [5, 5, 5, 8]], np.float64)  # IoU 0.69; zero area
    merged, captions = densecap.merge_ground_truth(boxes, ["a", "b", "c"])
    np.testing.assert_array_equal(merged, boxes)
    assert captions == [["a"], ["b"], ["c"]]
    empty, none = densecap.merge_ground_truth(np.zeros((0, 4)), [])
    assert empty.shape == (0, 4) and none == []


def test_degenerate_predicted_boxes_are_false_positives():
    metrics, scorer = evaluate([image([[5, 5, 5, 5], [10, 10, 0, 0], BOX], [0.9, 0.8, 0.7],
                                      ["1", "1", "1"], [BOX])])
    assert scorer.requests == [(["1"], [["region 0"]])]
    # Ranked [FP, FP, TP], recall 1 at the third: precision 1/3 at every recall point.
    assert metrics["mAP"] == pytest.approx(1 / 3)


def test_empty_predictions_and_images_without_detections_or_ground_truth():
    nothing, scorer = evaluate([image(gt_boxes=[BOX]), image()])
    assert nothing["mAP"] == 0.0 and nothing["mAP_detection"] == 0.0
    assert nothing["num_detections"] == 0 and nothing["num_images"] == 2
    assert scorer.requests == []
    # Ground truth without detections lowers recall; detections without ground truth are FPs.
    metrics, _ = evaluate([image([BOX], [0.9], ["1"], [BOX]),
                           image(gt_boxes=[BOX, FAR]),
                           image([BOX], [0.95], ["1"], [])])
    # Ranked [FP (0.95), TP (0.9)]: precision 1/2 at recall 1/3.
    assert metrics["mAP"] == pytest.approx(AP_RECALL_THIRD / 2)


def test_at_most_max_detections_per_image_by_score():
    boxes = [FAR, FAR, BOX]
    metrics, _ = evaluate([image(boxes, [0.9, 0.8, 0.1], ["1"] * 3, [BOX])],
                          max_detections_per_image=2)
    assert metrics["mAP_detection"] == 0.0 and metrics["num_detections_over_cap"] == 1
    kept, _ = evaluate([image(boxes, [0.9, 0.8, 0.85], ["1"] * 3, [BOX])],
                       max_detections_per_image=2)
    assert kept["mAP_detection"] == pytest.approx(0.5)


def test_duplicate_images_are_skipped_and_bad_input_is_named(tmp_path):
    evaluator = densecap.DenseCapEvaluator(meteor=NumberScorer())
    evaluator.add(image_id=7, **image([BOX], [0.9], ["1"], [BOX]))
    evaluator.add(image_id=7, **image([FAR], [0.9], ["1"], [BOX]))
    assert len(evaluator) == 1
    evaluator.write_json(tmp_path / "out" / "densecap.json")
    written = json.loads((tmp_path / "out" / "densecap.json").read_text())
    assert written["metrics"]["mAP"] == 1.0
    assert written["metrics"]["num_duplicates_skipped"] == 1.0
    with pytest.raises(ValueError, match="image 3.*pred_boxes has shape"):
        evaluator.add(image_id=3, **image([BOX], [0.9], ["1", "2"], [BOX]))
    with pytest.raises(ValueError, match="image 3.*pred_scores"):
        evaluator.add(image_id=3, **image([BOX], [np.nan], ["1"], [BOX]))
    with pytest.raises(ValueError, match="image 3.*gt_boxes has a box with x1 < x0"):
        evaluator.add(image_id=3, **image([BOX], [0.9], ["1"], [[10, 0, 0, 10]]))
    with pytest.raises(ValueError, match="no image"):
        densecap.DenseCapEvaluator(meteor=NumberScorer()).result()


# An independent, straightforward computation (scalar loops, DenseCap's Lua structure).

def naive_iou(a, b):
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    union = (max(a[2] - a[0], 0) * max(a[3] - a[1], 0) + max(b[2] - b[0], 0)
             * max(b[3] - b[1], 0) - iw * ih)
    return iw * ih / union if union > 0 else 0.0


def naive_merge(boxes, captions):
    n = len(boxes)
    overlap = [[1.0 if i == j else naive_iou(boxes[i], boxes[j]) for j in range(n)]
               for i in range(n)]
    merged = []
    while True:
        sizes = [sum(1 for j in range(n) if overlap[i][j] >= 0.7) for i in range(n)]
        if not sizes or max(sizes) == 0:
            return merged
        top = sizes.index(max(sizes))
        members = [j for j in range(n) if overlap[top][j] >= 0.7]
        box = [sum(boxes[j][k] for j in members) / len(members) for k in range(4)]
        merged.append((box, [captions[j] for j in members]))
        for j in members:
            for k in range(n):
                overlap[j][k] = overlap[k][j] = 0.0


def naive_map(images, scorer, max_detections):
    records, num_gt = [], 0
    for img in images:
        gts = naive_merge(img["gt_boxes"].tolist(), img["gt_captions"])
        num_gt += len(gts)
        dets = sorted(zip(img["pred_scores"].tolist(), img["pred_boxes"].tolist(),
                          img["pred_captions"]), key=lambda d: -d[0])[:max_detections]
        used = [False] * len(gts)
        for score, box, caption in dets:
            best, best_iou = -1, 0.0
            for j, (gt_box, _) in enumerate(gts):
                iou = naive_iou(box, gt_box)
                if iou > best_iou:
                    best, best_iou = j, iou
            ok = best >= 0 and not used[best]
            if ok:
                used[best] = True
            meteor = scorer.score_pairs([caption], [gts[best][1]])[0] if ok else 0.0
            records.append((score, ok, best_iou, meteor))
    records.sort(key=lambda r: -r[0])

    def ap(min_iou, min_meteor):
        tp = fp = 0
        precision, recall = [], []
        for _, ok, iou, meteor in records:
            if ok and iou >= min_iou and meteor > min_meteor:
                tp += 1
            else:
                fp += 1
            precision.append(tp / (tp + fp))
            recall.append(tp / num_gt if num_gt else 0.0)
        total, count, t = 0.0, 0, 0.0
        while t <= 1:
            total += max([p for p, r in zip(precision, recall) if r >= t], default=0.0)
            count += 1
            t += 0.01
        return total / count

    aps = [ap(i, m) for i in (0.3, 0.4, 0.5, 0.6, 0.7)
           for m in (0, 0.05, 0.1, 0.15, 0.2, 0.25)]
    det = [ap(i, -1) for i in (0.3, 0.4, 0.5, 0.6, 0.7)]
    return sum(aps) / len(aps), sum(det) / len(det)


@pytest.mark.parametrize("seed", range(10))
def test_matches_an_independent_computation_on_random_cases(seed):
    rng = np.random.default_rng(seed)
    meteor_values = ["0", "0.05", "0.1", "0.12", "0.2", "0.3", "1"]
    images = []
    for _ in range(int(rng.integers(1, 5))):
        num_gt, num_det = int(rng.integers(0, 5)), int(rng.integers(0, 8))
        corners = rng.integers(0, 12, size=(num_gt, 2))
        gt_boxes = np.concatenate([corners, corners + rng.integers(0, 9, (num_gt, 2))], 1)
        if num_gt:  # near-copies, so that ground truths merge
            gt_boxes = np.concatenate([gt_boxes, gt_boxes[rng.integers(0, num_gt, 2)]
                                       + rng.integers(0, 2, (2, 4)) * [0, 0, 1, 1]])
        # Detections: jittered copies of ground truths (integers: IoUs hit thresholds exactly;
        # some degenerate) or random boxes, with scores from a small set (ties).
        anchors = gt_boxes[rng.integers(0, len(gt_boxes), num_det)] if num_gt else (
            rng.integers(0, 12, (num_det, 4)))
        det_boxes = anchors + rng.integers(-1, 2, (num_det, 4))
        images.append(image(det_boxes, rng.choice([0.1, 0.5, 0.7, 0.9], num_det),
                            rng.choice(meteor_values, num_det), gt_boxes,
                            [f"gt {i}" for i in range(len(gt_boxes))]))
    metrics, _ = evaluate(images, max_detections_per_image=5)
    expected_map, expected_det = naive_map(images, NumberScorer(), 5)
    assert metrics["mAP"] == pytest.approx(expected_map, abs=1e-12)
    assert metrics["mAP_detection"] == pytest.approx(expected_det, abs=1e-12)


def test_with_the_real_java_meteor(meteor):
    gts = [BOX, [20, 0, 30, 10], FAR]
    captions = ["a man riding a horse", "a red car", "a green tree"]
    evaluator = densecap.DenseCapEvaluator(meteor=meteor)
    evaluator.add(image_id="vg/1", pred_boxes=np.array([BOX, [20, 0, 30, 10]], np.float64),
                  pred_scores=np.array([0.9, 0.8]),
                  pred_captions=["a man riding a horse", "blue sky above"],
                  gt_boxes=np.array(gts, np.float64), gt_captions=captions)
    metrics = evaluator.result()
    # Both detections are located; only the first caption matches (METEOR 1 vs 0).
    assert metrics["mAP_detection"] == pytest.approx(AP_RECALL_TWO_THIRDS)
    assert metrics["mAP"] == pytest.approx(AP_RECALL_THIRD)
