"""F-LMM's RefCOCO cIoU / mIoU on hand-computed cases, and against a torch transcription of
its evaluation (multiprocess_eval_refcoco.py's thresholding, mmdetection's RefSegMetric)."""

import json

import numpy as np
import pytest

from pixelllm.evaluators import flmm_refcoco


def _mask(rows):
    return np.array([[c == "#" for c in row] for row in rows])


def test_ciou_pools_pixels_and_miou_averages_masks():
    evaluator = flmm_refcoco.FlmmRefcocoEvaluator(split="refcoco_unc/val")
    # Image 1: I 1 / U 3 and I 2 / U 2.
    evaluator.add(image_id="1", mask_ids=["1/10", "1/11"],
                  pred_masks=np.stack([_mask([".##", "..."]), _mask(["...", "##."])]),
                  gt_masks=np.stack([_mask(["##.", "..."]), _mask(["...", "##."])]).astype(
                      np.uint8))
    # Image 2: nothing predicted, nothing there (U 0: IoU 0, not 1 as in LISA's gIoU).
    evaluator.add(image_id="2", mask_ids=["2/12"], pred_masks=_mask(["..", ".."])[None],
                  gt_masks=_mask(["..", ".."])[None])
    result = evaluator.result()
    assert result["cIoU"] == pytest.approx(3 / 5, rel=1e-12)
    assert result["mIoU"] == pytest.approx((1 / 3 + 1 + 0) / 3, rel=1e-12)
    assert (result["num_masks"], result["num_images"], result["num_duplicates_skipped"]) == (
        3.0, 2.0, 0.0)


def test_repeated_ids_are_skipped_and_gt_is_positive_pixels():
    evaluator = flmm_refcoco.FlmmRefcocoEvaluator(split="val")
    pred = _mask(["#.", ".."])[None]
    evaluator.add(image_id="1", mask_ids=["1/5"], pred_masks=pred,
                  gt_masks=np.array([[[255, 0], [0, 0]]], np.uint8))
    evaluator.add(image_id="1", mask_ids=["1/5"], pred_masks=~pred, gt_masks=pred)
    result = evaluator.result()
    assert (result["cIoU"], result["mIoU"], result["num_masks"],
            result["num_duplicates_skipped"]) == (1.0, 1.0, 1.0, 1.0)
    assert len(evaluator) == 1


def test_all_empty_unions_give_nan_ciou_and_zero_miou():
    evaluator = flmm_refcoco.FlmmRefcocoEvaluator(split="val")
    evaluator.add(image_id="1", mask_ids=["a"], pred_masks=np.zeros((1, 2, 2), bool),
                  gt_masks=np.zeros((1, 2, 2), bool))
    result = evaluator.result()
    assert np.isnan(result["cIoU"]) and result["mIoU"] == 0.0


def _torch_reference(samples):
    """F-LMM's loop body (sigmoid, bilinear resize to the ground truth, > 0.5) and mmdetection
    3.3's RefSegMetric.process / compute_metrics, transcribed; percentages as it prints them."""
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    results = []
    for logits, gt in samples:
        gt_masks = torch.from_numpy(gt) > 0
        pred = functional.interpolate(torch.from_numpy(logits)[None].float().sigmoid(),
                                      size=gt_masks.shape[-2:], mode="bilinear")[0] > 0.5
        overlap, union = pred & gt_masks, pred | gt_masks
        bs = len(pred)
        iou = overlap.reshape(bs, -1).sum(-1) * 1.0 / union.reshape(bs, -1).sum(-1)
        iou = torch.nan_to_num_(iou, nan=0.0)
        results.append((overlap.sum(), union.sum(), iou.sum(), bs))
    cum_i, cum_u, iou, total = (sum(column) for column in zip(*results))
    return float(cum_i * 100 / cum_u), float(iou * 100 / total)


def test_matches_a_torch_transcription_of_flmm_and_refsegmetric():
    rng = np.random.default_rng(0)
    samples = []
    # Logits at the ground truth's size (F-LMM's SAM output), larger and smaller than it.
    for index, (logit_hw, gt_hw) in enumerate([((9, 13), (9, 13)), ((6, 8), (11, 17)),
                                               ((20, 15), (7, 9)), ((5, 5), (5, 5))]):
        count = 1 + index % 3
        smooth = rng.normal(size=(count, *logit_hw)).astype(np.float32) * 3
        gt = (rng.random((count, *gt_hw)) < 0.4).astype(np.uint8)
        if index == 3:
            smooth[0] = -50.0  # nothing predicted,
            gt[0] = 0          # nothing there: IoU 0 in mIoU
        samples.append((smooth, gt))
    evaluator = flmm_refcoco.FlmmRefcocoEvaluator(split="val")
    for index, (logits, gt) in enumerate(samples):
        pred = flmm_refcoco.binarize_mask_logits(logits, out_hw=gt.shape[1:])
        evaluator.add(image_id=index, mask_ids=[(index, k) for k in range(len(gt))],
                      pred_masks=pred, gt_masks=gt)
    ciou, miou = _torch_reference(samples)
    result = evaluator.result()
    assert 0.1 < result["cIoU"] < 0.9 and result["num_masks"] == 7.0
    assert result["cIoU"] * 100 == pytest.approx(ciou, rel=1e-6)
    assert result["mIoU"] * 100 == pytest.approx(miou, rel=1e-6)


def test_binarize_mask_logits_matches_torch_pixel_for_pixel():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    for logit_hw, out_hw in [((7, 10), (7, 10)), ((4, 6), (13, 9)), ((16, 12), (5, 7))]:
        logits = rng.normal(size=(2, *logit_hw)).astype(np.float32) * 4
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(logits)[None].sigmoid(), size=out_hw, mode="bilinear")[0] > 0.5
        got = flmm_refcoco.binarize_mask_logits(logits, out_hw=out_hw)
        assert got.shape == (2, *out_hw) and got.dtype == np.bool_
        np.testing.assert_array_equal(got, expected.numpy())
    # At equal size the resize is the identity: probability > 0.5 is logit > 0 (away from 0).
    logits = np.array([[[-3.0, 0.5], [2.0, -0.1]]], np.float32)
    np.testing.assert_array_equal(flmm_refcoco.binarize_mask_logits(logits, out_hw=(2, 2)),
                                  logits > 0)


def test_bad_inputs_name_the_problem(tmp_path):
    evaluator = flmm_refcoco.FlmmRefcocoEvaluator(split="val")
    with pytest.raises(ValueError, match="no mask was added"):
        evaluator.result()
    with pytest.raises(ValueError, match="pred_masks must be bool"):
        evaluator.add(image_id=1, mask_ids=["a"], pred_masks=np.zeros((1, 2, 2), np.uint8),
                      gt_masks=np.zeros((1, 2, 2), bool))
    with pytest.raises(ValueError, match="differ"):
        evaluator.add(image_id=1, mask_ids=["a"], pred_masks=np.zeros((1, 2, 2), bool),
                      gt_masks=np.zeros((1, 3, 2), bool))
    with pytest.raises(ValueError, match="bool or integer"):
        evaluator.add(image_id=1, mask_ids=["a"], pred_masks=np.zeros((1, 2, 2), bool),
                      gt_masks=np.zeros((1, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"\[N, h, w\]"):
        flmm_refcoco.binarize_mask_logits(np.zeros((2, 2)), out_hw=(2, 2))
    evaluator.add(image_id=1, mask_ids=["a"], pred_masks=np.ones((1, 2, 2), bool),
                  gt_masks=np.ones((1, 2, 2), bool))
    evaluator.write_json(tmp_path / "out" / "flmm.json")
    written = json.loads((tmp_path / "out" / "flmm.json").read_text())
    assert written["split"] == "val" and written["metrics"]["cIoU"] == 1.0
