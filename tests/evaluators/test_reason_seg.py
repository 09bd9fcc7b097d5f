"""LISA's gIoU / cIoU on hand-computed cases, and against LISA's torch computation."""

import json

import numpy as np
import pytest

from pixelllm.evaluators import reason_seg

EPS = 1e-5


def _mask(rows):
    """'#' target (True), '.' background, 'x' ignored (255)."""
    return np.array([[{"#": 1, ".": 0, "x": 255}[c] for c in row] for row in rows], np.uint8)


def _pred(rows):
    return np.array([[c == "#" for c in row] for row in rows])


def _evaluate(pairs):
    evaluator = reason_seg.ReasonSegEvaluator(split="val")
    for index, (pred, gt) in enumerate(pairs):
        evaluator.add(mask_ids=[index], pred_masks=pred[None], gt_masks=gt[None])
    return evaluator.result()


def test_giou_averages_masks_and_ciou_pools_pixels():
    first = (_pred([".##", "..."]), _mask(["##.", "..."]))   # I 1, U 3
    second = (_pred(["...", "#.."]), _mask(["...", "#.."]))  # I 1, U 1
    result = _evaluate([first, second])
    assert result["gIoU"] == pytest.approx((1 / (3 + EPS) + 1 / (1 + EPS)) / (2 + EPS), rel=1e-12)
    assert result["cIoU"] == pytest.approx(2 / 4, rel=1e-9)
    assert result["gIoU"] > 0.66 and result["num_masks"] == 2.0


def test_a_mask_with_empty_union_counts_one():
    nothing = (_pred(["..", ".."]), _mask(["..", ".."]))          # U 0: IoU 1
    false_alarm = (_pred(["#.", ".."]), _mask(["..", ".."]))      # I 0, U 1: IoU 0
    result = _evaluate([nothing, false_alarm])
    assert result["gIoU"] == pytest.approx(1 / (2 + EPS), rel=1e-12)
    assert result["cIoU"] == 0.0
    assert result["num_empty_union"] == 1.0
    only_empty = _evaluate([nothing])
    assert only_empty["gIoU"] == pytest.approx(1 / (1 + EPS), rel=1e-12)
    assert only_empty["cIoU"] == 0.0


def test_ignored_pixels_are_in_neither_intersection_nor_union():
    # The prediction covering an ignored pixel costs nothing; missing one costs nothing.
    covered = (_pred(["##", "#."]), _mask(["#x", "x."]))   # I 1, U 1
    missed = (_pred(["#.", ".."]), _mask(["#x", ".."]))    # I 1, U 1
    intersection, union = reason_seg.intersection_and_union(
        np.stack([covered[0], missed[0]]), np.stack([covered[1], missed[1]]))
    assert intersection.tolist() == [1, 1] and union.tolist() == [1, 1]
    # A prediction only on ignored pixels of a mask without target: empty union, IoU 1.
    only_ignored = (_pred(["##", ".."]), _mask(["xx", ".."]))
    result = _evaluate([only_ignored])
    assert result["num_empty_union"] == 1.0
    assert result["gIoU"] == pytest.approx(1 / (1 + EPS), rel=1e-12)


def test_bool_ground_truth_and_several_masks_per_image():
    evaluator = reason_seg.ReasonSegEvaluator(split="val")
    gt = np.array([[[True, False]], [[True, True]]])
    pred = np.array([[[True, True]], [[True, True]]])
    evaluator.add(mask_ids=["q0", "q1"], pred_masks=pred, gt_masks=gt)
    evaluator.add(mask_ids=["q1"], pred_masks=pred[1:], gt_masks=gt[1:])  # a repeat
    result = evaluator.result()
    assert result["num_masks"] == 2.0 and result["num_duplicates_skipped"] == 1.0
    assert result["gIoU"] == pytest.approx((1 / (2 + EPS) + 2 / (2 + EPS)) / (2 + EPS))
    assert result["cIoU"] == pytest.approx(3 / 4)


@pytest.mark.parametrize("pred, gt, message", [
    (np.zeros((1, 2, 2), np.float32), np.zeros((1, 2, 2), np.uint8), "bool"),
    (np.zeros((1, 2, 2), bool), np.zeros((1, 2, 3), np.uint8), "differ"),
    (np.zeros((1, 2, 2), bool), np.full((1, 2, 2), 2, np.uint8), r"values \[2\]"),
    (np.zeros((1, 2, 2), bool), np.zeros((1, 2, 2), np.int32), "uint8"),
    (np.zeros((2, 2, 2), bool), np.zeros((2, 2, 2), np.uint8), r"\[1, H, W\]"),
])
def test_bad_input_is_refused_naming_the_field(pred, gt, message):
    evaluator = reason_seg.ReasonSegEvaluator(split="val")
    with pytest.raises(ValueError, match=message):
        evaluator.add(mask_ids=[0], pred_masks=pred, gt_masks=gt)
    with pytest.raises(ValueError, match="no mask"):
        evaluator.result()


def _lisa_validate(batches, torch):
    """LISA's train_ds.validate() arithmetic (intersectionAndUnionGPU, the meters' sums and
    all_reduce average), on CPU: histc counts float tensors there."""

    def intersection_and_union(output, target, classes, ignore_index=255):
        output, target = output.view(-1).clone(), target.view(-1)
        output[target == ignore_index] = ignore_index
        intersection = output[output == target]
        area_i = torch.histc(intersection, bins=classes, min=0, max=classes - 1)
        area_o = torch.histc(output, bins=classes, min=0, max=classes - 1)
        area_t = torch.histc(target, bins=classes, min=0, max=classes - 1)
        return area_i, area_o + area_t - area_i

    i_sum, u_sum, acc_sum, count = 0.0, 0.0, 0.0, 0
    for logits, gt in batches:
        output_list = (torch.from_numpy(logits) > 0).int().double()
        masks_list = torch.from_numpy(gt).int().double()
        intersection, union, acc_iou = 0.0, 0.0, 0.0
        for mask_i, output_i in zip(masks_list, output_list):
            intersection_i, union_i = intersection_and_union(output_i, mask_i, 2)
            intersection += intersection_i
            union += union_i
            acc_iou += intersection_i / (union_i + 1e-5)
            acc_iou[union_i == 0] += 1.0
        n = masks_list.shape[0]
        i_sum += intersection.numpy()
        u_sum += union.numpy()
        acc_sum += acc_iou.numpy() / n * n
        count += n
    return (acc_sum / (count + 1e-5))[1], (i_sum / (u_sum + 1e-10))[1]


def test_agrees_with_lisas_torch_computation_on_random_masks():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(6):
        n, h, w = rng.integers(1, 4), rng.integers(3, 12), rng.integers(3, 12)
        gt = (rng.random((n, h, w)) < rng.random()).astype(np.uint8)
        gt[rng.random((n, h, w)) < 0.15] = 255
        if rng.random() < 0.3:
            gt[0] = np.where(gt[0] == 1, 0, gt[0])  # a mask without target
        logits = rng.normal(size=(n, h, w)) + rng.normal()
        batches.append((logits, gt))
    evaluator = reason_seg.ReasonSegEvaluator(split="val")
    for index, (logits, gt) in enumerate(batches):
        evaluator.add(mask_ids=[(index, k) for k in range(len(gt))], pred_masks=logits > 0,
                      gt_masks=gt)
    giou, ciou = _lisa_validate(batches, torch)
    result = evaluator.result()
    assert result["gIoU"] == pytest.approx(giou, rel=1e-12)
    assert result["cIoU"] == pytest.approx(ciou, rel=1e-12)
    assert result["gIoU"] != pytest.approx(result["cIoU"], rel=1e-3)


def test_write_json(tmp_path):
    evaluator = reason_seg.ReasonSegEvaluator(split="reason_seg/val")
    evaluator.add(mask_ids=[0], pred_masks=_pred(["#."])[None], gt_masks=_mask(["##"])[None])
    evaluator.write_json(tmp_path / "out" / "metrics.json")
    content = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert content["split"] == "reason_seg/val"
    assert content["metrics"]["cIoU"] == pytest.approx(0.5)
