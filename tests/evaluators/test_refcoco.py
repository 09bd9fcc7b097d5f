"""RefCOCO evaluator on hand-computed cases (official definitions: strict IoU > 0.5 with the
1e-6 box epsilon, mean/mean cIoU with the 1e-5 mask epsilon)."""

import json

import numpy as np
import pytest

from pixelllm.evaluators import refcoco

UNIT = [0.0, 0.0, 1.0, 1.0]


def _boxes_only(pred_boxes, gt_boxes, **kwargs):
    evaluator = refcoco.RefCocoEvaluator(split="val", **kwargs)
    evaluator.add(image_id=1, expression_ids=np.arange(1, len(pred_boxes) + 1),
                  pred_boxes=np.asarray(pred_boxes), gt_boxes=np.asarray(gt_boxes))
    return evaluator.result()


def test_iou_exactly_half_misses_strict_and_hits_inclusive():
    # intersection 1, union 2: IoU 0.5, which the official 1/(2 + 1e-6) puts below 0.5
    result = _boxes_only([[0, 0, 2, 1]], [UNIT])
    assert result["box_P@0.5"] == 0.0
    assert result["box_P@0.5_inclusive"] == 1.0


def test_precision_over_expressions_with_ties_and_near_half():
    pred = [UNIT,                   # IoU 1: hit
            UNIT,                   # same prediction and ground truth again (a tie): hit
            [0, 0, 1, 0.51],        # IoU 0.51: hit both ways
            [0, 0, 1, 0.49],        # IoU 0.49: miss both ways
            [0, 0, 2, 1]]           # IoU 0.5: strict miss, inclusive hit
    result = _boxes_only(pred, [UNIT] * 5)
    assert result["box_P@0.5"] == pytest.approx(3 / 5)
    assert result["box_P@0.5_inclusive"] == pytest.approx(4 / 5)
    assert result["num_expressions"] == 5.0
    assert result["num_images"] == 1.0
    assert "seg_cIoU" not in result


def test_degenerate_and_inverted_boxes_score_zero_without_nan():
    pred = [[0.5, 0.0, 0.5, 1.0],    # zero width inside the ground truth
            [0.0, 0.0, 0.0, 0.0],    # a point
            [1.0, 1.0, 0.0, 0.0],    # inverted corners: area 0, not reordered
            [3.0, 3.0, 3.0, 3.0]]    # degenerate ground truth below too: empty union
    gt = [UNIT, UNIT, UNIT, [3.0, 3.0, 3.0, 3.0]]
    result = _boxes_only(pred, gt)
    assert result["box_P@0.5"] == 0.0
    assert result["box_P@0.5_inclusive"] == 0.0
    iou = refcoco.paired_box_iou(np.asarray(pred, float), np.asarray(gt, float), epsilon=0.0)
    np.testing.assert_array_equal(iou, [0.0, 0.0, 0.0, 0.0])


def _masks(*pixel_sets, shape=(4, 4)):
    """bool [N, H, W] with the given (row, col) pixels set."""
    masks = np.zeros((len(pixel_sets),) + shape, bool)
    for mask, pixels in zip(masks, pixel_sets):
        for row, col in pixels:
            mask[row, col] = True
    return masks


def test_mask_metrics_official_epsilons_and_empty_prediction():
    block = [(0, 0), (0, 1), (1, 0), (1, 1)]           # 2x2 at the top-left, box (0, 0, 2, 2)
    two_rows = [(r, c) for r in range(2) for c in range(4)]  # box (0, 0, 4, 2)
    gt_masks = _masks(block, block, [(3, 3), (3, 2)])
    pred_masks = _masks(block,        # I 4, U 4
                        two_rows,     # I 4, U 8: IoU 0.5 -> seg_AP miss
                        [])           # empty prediction: I 0, U 2
    gt_boxes = np.array([[0, 0, 2, 2], [0, 0, 2, 2], [2, 3, 4, 4]], float)
    evaluator = refcoco.RefCocoEvaluator(split="val")
    evaluator.add(image_id=7, expression_ids=[11, 12, 13], pred_boxes=gt_boxes,
                  gt_boxes=gt_boxes, pred_masks=pred_masks, gt_masks=gt_masks)
    result = evaluator.result()

    intersection, union = np.array([4.0, 4.0, 0.0]), np.array([4.0, 8.0, 2.0])
    c_iou = intersection.mean() / (union.mean() + 1e-5)
    assert result["seg_cIoU"] == pytest.approx(c_iou, rel=0, abs=1e-12)
    # the official's epsilon sits on the mean union, not on the summed union
    assert abs(result["seg_cIoU"] - intersection.sum() / (union.sum() + 1e-5)) > 1e-7
    assert result["seg_gIoU"] == pytest.approx(
        (4 / (4 + 1e-5) + 4 / (8 + 1e-5) + 0.0) / 3, rel=0, abs=1e-12)
    assert result["seg_AP"] == pytest.approx(1 / 3)
    # mask boxes: (0,0,2,2) hit; (0,0,4,2) IoU exactly 0.5; empty -> (0,0,0,0) miss
    assert result["seg_box_P@0.5"] == pytest.approx(1 / 3)
    assert result["seg_box_P@0.5_inclusive"] == pytest.approx(2 / 3)
    assert result["box_P@0.5"] == 1.0


def test_tight_boxes_cover_pixels():
    masks = _masks([(1, 2), (3, 0)], [])
    np.testing.assert_array_equal(refcoco.tight_boxes(masks), [[0, 1, 3, 4], [0, 0, 0, 0]])


def test_per_image_cap_duplicates_and_reported_switch():
    def run(cap):
        evaluator = refcoco.RefCocoEvaluator(split="val", max_expressions_per_image=cap)
        # image 1: hit, hit, miss (third), then a later miss on image 1 and a repeated id
        evaluator.add(image_id=1, expression_ids=[1, 2, 3], pred_boxes=[UNIT, UNIT, [5, 5, 6, 6]],
                      gt_boxes=[UNIT] * 3)
        evaluator.add(image_id=1, expression_ids=[4, 1], pred_boxes=[[5, 5, 6, 6], UNIT],
                      gt_boxes=[UNIT] * 2)
        evaluator.add(image_id=2, expression_ids=[5], pred_boxes=[[5, 5, 6, 6]],
                      gt_boxes=[UNIT])
        return evaluator.result()

    capped = run(2)
    assert capped["box_P@0.5"] == pytest.approx(2 / 3)   # ids 1, 2 (image 1) and 5
    assert capped["num_expressions"] == 3.0
    assert capped["num_expressions_over_cap"] == 2.0
    assert capped["num_duplicates_skipped"] == 1.0
    assert capped["max_expressions_per_image"] == 2.0
    everything = run(None)
    assert everything["box_P@0.5"] == pytest.approx(2 / 5)
    assert everything["num_expressions"] == 5.0
    assert everything["num_expressions_over_cap"] == 0.0
    assert everything["max_expressions_per_image"] == 0.0
    assert everything["num_images"] == 2.0
    assert refcoco.OFFICIAL_MAX_EXPRESSIONS_PER_IMAGE == 16


def test_canvas_boxes_to_original():
    # 200 x 100 image resized to 64 x 32 on the canvas; a box reaching into the padding is clipped
    boxes = refcoco.canvas_boxes_to_original(np.array([[16.0, 8.0, 48.0, 40.0]]),
                                             valid_wh=(64, 32), original_wh=(200, 100))
    np.testing.assert_allclose(boxes, [[50.0, 25.0, 150.0, 100.0]])
    # 101 x 50 -> 64 x 32 (rounded): each axis has its own factor; the valid area maps onto
    # the whole image
    boxes = refcoco.canvas_boxes_to_original(np.array([[0.0, 0.0, 64.0, 32.0],
                                                       [32.0, 16.0, 70.0, 33.0]]),
                                             valid_wh=(64, 32), original_wh=(101, 50))
    np.testing.assert_allclose(boxes, [[0.0, 0.0, 101.0, 50.0], [50.5, 25.0, 101.0, 50.0]])
    with pytest.raises(ValueError, match="valid_wh"):
        refcoco.canvas_boxes_to_original(np.zeros((1, 4)), valid_wh=(0, 32), original_wh=(1, 1))


def _opencv_linear(image, out_hw):
    """OpenCV's ``INTER_LINEAR`` resize written out per pixel, as its source states it (the
    official evaluator's ``cv2.resize``): source coordinate ``(dst + 0.5) * in / out - 0.5``,
    ``sx = floor``; below 0 it reads pixel 0, at or past the last pixel it reads the last; else
    ``(1 - f) * S[sx] + f * S[sx + 1]``; columns, then rows."""
    def taps(in_size, out_size):
        found = []
        for d in range(out_size):
            f = (d + 0.5) * (in_size / out_size) - 0.5
            s = int(np.floor(f))
            f -= s
            if s < 0:
                s, f = 0, 0.0
            if s >= in_size - 1:
                s, f = in_size - 1, 0.0
            found.append((s, min(s + 1, in_size - 1), f))
        return found

    rows, columns = taps(image.shape[0], out_hw[0]), taps(image.shape[1], out_hw[1])
    across = np.asarray([[(1 - f) * line[a] + f * line[b] for a, b, f in columns]
                         for line in image])
    return np.asarray([(1 - f) * across[a] + f * across[b] for a, b, f in rows])


@pytest.mark.parametrize("valid_wh, original_wh", [
    ((16, 10), (9, 7)),      # upscale by non-integer factors, cropped rows
    ((11, 16), (3, 5)),      # downscale (no antialiasing), cropped columns
    ((16, 16), (4, 4)),      # the whole 4 x 4 grid, no resize
])
def test_mask_logits_follow_the_official_crop_and_opencv_bilinear(valid_wh, original_wh):
    logits = np.random.default_rng(0).normal(size=(2, 4, 4)).astype(np.float32)
    # Canvas 16, a 4 x 4 logit grid: the official crop keeps int(valid * 4 / 16) rows/columns.
    crop_w, crop_h = (int(v * 4 / 16) for v in valid_wh)
    masks = refcoco.mask_logits_to_original(logits, valid_wh=valid_wh, canvas=16,
                                            original_wh=original_wh)
    assert masks.shape == (2, original_wh[1], original_wh[0]) and masks.dtype == bool
    for mask, grid in zip(masks, logits):
        expected = _opencv_linear(grid[:crop_h, :crop_w], original_wh[::-1])
        np.testing.assert_array_equal(mask, expected > 0)


def test_mask_logits_by_hand_bilinear_not_nearest_changes_ciou():
    # Logits [-3, 1] over the whole 8-pixel canvas (a 2-wide grid), resized to 4 original
    # columns: source x = (j + 0.5) / 2 - 0.5 = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped
    # to 1) gives -3, -2, 0, 1, and only logit > 0 is the object: [F, F, F, T].
    logits = np.asarray([[[-3.0, 1.0], [-3.0, 1.0]]])
    mask = refcoco.mask_logits_to_original(logits, valid_wh=(8, 8), canvas=8,
                                           original_wh=(4, 2))
    np.testing.assert_array_equal(mask[0], [[False, False, False, True]] * 2)
    # Bilinear to the canvas, threshold, then nearest to the original (the earlier route)
    # reads canvas x = 1, 3, 5, 7 of -3, -3, -2.5, -1.5, -0.5, 0.5, 1, 1: [F, F, T, T].
    gt = np.asarray([[[False, False, True, True]] * 2])
    evaluator = refcoco.RefCocoEvaluator(split="val")
    evaluator.add(image_id=1, expression_ids=[1], pred_boxes=[[3, 0, 4, 2]],
                  gt_boxes=[[2, 0, 4, 2]], pred_masks=mask, gt_masks=gt)
    result = evaluator.result()
    assert result["seg_cIoU"] == pytest.approx(2 / (4 + 1e-5), rel=1e-12)  # not 1
    assert result["seg_AP"] == 0.0  # 2 / (4 + 1e-5) is below 0.5


def test_mask_logits_window_must_fit():
    with pytest.raises(ValueError, match="keeps 0 x 4"):
        refcoco.mask_logits_to_original(np.zeros((1, 4, 4)), valid_wh=(3, 16), canvas=16,
                                        original_wh=(5, 5))
    with pytest.raises(ValueError, match=r"must be \[N, h, w\]"):
        refcoco.mask_logits_to_original(np.zeros((4, 4)), valid_wh=(16, 16), canvas=16,
                                        original_wh=(5, 5))


def test_bad_input_is_named():
    evaluator = refcoco.RefCocoEvaluator(split="testA")
    with pytest.raises(ValueError, match="testA.*no expression"):
        evaluator.result()
    with pytest.raises(ValueError, match="pred_boxes"):
        evaluator.add(image_id=3, expression_ids=[1, 2], pred_boxes=[UNIT], gt_boxes=[UNIT] * 2)
    with pytest.raises(ValueError, match="together"):
        evaluator.add(image_id=3, expression_ids=[1], pred_boxes=[UNIT], gt_boxes=[UNIT],
                      pred_masks=np.zeros((1, 2, 2), bool))
    with pytest.raises(ValueError, match="pred_masks must be bool"):
        evaluator.add(image_id=3, expression_ids=[1], pred_boxes=[UNIT], gt_boxes=[UNIT],
                      pred_masks=np.zeros((1, 2, 2), np.float32),
                      gt_masks=np.zeros((1, 2, 2), bool))
    evaluator.add(image_id=3, expression_ids=[1], pred_boxes=[UNIT], gt_boxes=[UNIT])
    with pytest.raises(ValueError, match="some images"):
        evaluator.add(image_id=4, expression_ids=[2], pred_boxes=[UNIT], gt_boxes=[UNIT],
                      pred_masks=np.zeros((1, 2, 2), bool), gt_masks=np.zeros((1, 2, 2), bool))
    with pytest.raises(ValueError, match="max_expressions_per_image"):
        refcoco.RefCocoEvaluator(split="val", max_expressions_per_image=0)


def test_write_json(tmp_path):
    evaluator = refcoco.RefCocoEvaluator(split="refcoco_unc/val", max_expressions_per_image=16)
    evaluator.add(image_id=1, expression_ids=[1, 2], pred_boxes=[UNIT, [0, 0, 2, 1]],
                  gt_boxes=[UNIT, UNIT])
    assert len(evaluator) == 2
    path = tmp_path / "eval" / "refcoco.json"
    evaluator.write_json(path)
    written = json.loads(path.read_text())
    assert written["split"] == "refcoco_unc/val"
    assert written["max_expressions_per_image"] == 16
    assert written["metrics"] == evaluator.result()
    assert written["metrics"]["box_P@0.5"] == 0.5
