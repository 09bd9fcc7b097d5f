"""F-LMM's RefCOCO/+/g metrics, cIoU and mIoU, as its ``scripts/multiprocess_eval_refcoco.py``
computes them with mmdetection 3.3's ``RefSegMetric``.

One :class:`FlmmRefcocoEvaluator` per split. F-LMM's protocol (``--concat``, as its README runs
it): **one forward per image**, the caption holding every referred object of the image once
(refs of one annotation merged), each with its **first sentence** (:mod:`data_pipelines.
flmm_inputs`, :func:`~data_pipelines.flmm_inputs.refcoco_eval_sample`); one predicted mask per
object. Masks are compared at the **original image's resolution**: the predicted mask logits go
through the sigmoid, are resized bilinearly (``align_corners=False``, no antialiasing) to the
ground truth's size and kept where ``> 0.5`` (:func:`binarize_mask_logits`; F-LMM's SAM logits are
already at the original size, so the resize is the identity there); the ground truth is
``mask > 0``.

Per mask, ``I`` and ``U`` are the pixel counts of intersection and union:

==========================  =====================================================================
key                         meaning
==========================  =====================================================================
cIoU                        total I / total U over the split (NaN if every union is empty)
mIoU                        mean over masks of I / U, a mask with an empty union counting 0
                            (``torch.nan_to_num_(iou, nan=0.0)``); no epsilon anywhere
num_masks                   masks scored (objects, one sentence each)
num_images                  images with at least one scored mask
num_duplicates_skipped      masks added again (same id) and ignored
==========================  =====================================================================

Values are fractions; F-LMM prints them times 100 (its published LLaVA-1.5-7B RefCOCO
val/testA/testB cIoU 75.2/79.1/71.9 are those). Sums here are float64; mmdetection divides in
float32 and sums the per-mask IoUs in float32, which differs in the seventh digit.

How the three RefCOCO protocols of this project differ (same ``refer_coco`` data):

* **F-LMM** (this module): per *image and object*; one sentence per object (the first), all of an
  image's objects in one caption, so each phrase is grounded with the others in context;
  duplicate refs of one annotation scored once; mIoU counts an empty union as 0; no epsilons.
* **PixelLLM** (:mod:`pixelllm.evaluators.refcoco`): per *referring expression*, every sentence
  of every ref its own query; the box is the main metric (``box_P@0.5``, IoU > 0.5), masks add
  ``seg_cIoU = mean(I) / (mean(U) + 1e-5)`` and ``seg_gIoU`` with ``+ 1e-5``; SAM's low-resolution
  logits resized as OpenCV does and thresholded at ``logit > 0``; at most 16 expressions per
  image in the official setting.
* **LISA** (:mod:`pixelllm.evaluators.reason_seg`, its ``validate()``): per *sentence*, every
  sentence of every ref its own conversation; ``gIoU`` = mean of ``I / (U + 1e-5)`` with an
  empty union counting **1.0**, ``cIoU = sum I / (sum U + 1e-10)``.

So F-LMM's numbers weigh each object once where the other two weigh each sentence (RefCOCO val:
3,811 objects, 10,834 sentences), and its mIoU is not LISA's gIoU.
"""

from __future__ import annotations

import pathlib
from collections.abc import Hashable, Sequence

import numpy as np

from pixelllm.evaluators.mask_tally import MaskTally, check_masks, pixel_counts
from pixelllm.evaluators.results_file import write_results
from pixelllm.nn.resize import resize_matrix

PROBABILITY_THRESHOLD = 0.5  # multiprocess_eval_refcoco.py: sigmoid(logits) > 0.5


def binarize_mask_logits(logits: np.ndarray, *, out_hw: Sequence[int]) -> np.ndarray:
    """F-LMM's predicted masks: ``sigmoid`` in float32, bilinear resize to ``out_hw`` as
    ``F.interpolate(mode='bilinear')`` (``align_corners=False``, no antialias; the identity at
    equal size), then ``> 0.5``.

    Args:
      logits: ``[N, h, w]`` mask logits over the image only (crop any padding first).
      out_hw: ``(H, W)`` of the ground truth (the original image).

    Returns:
      ``[N, H, W]`` bool.
    """
    logits = np.asarray(logits, np.float32)
    if logits.ndim != 3 or min(logits.shape[1:]) < 1:
        raise ValueError(f"binarize_mask_logits: logits must be [N, h, w] with h, w >= 1, got "
                         f"{logits.shape}")
    height, width = (int(v) for v in out_hw)
    if min(height, width) < 1:
        raise ValueError(f"binarize_mask_logits: out_hw must be positive, got {tuple(out_hw)}")
    # exp(-x) overflows to inf for very negative logits, giving probability 0 as torch does.
    with np.errstate(over="ignore"):
        probs = np.float32(1.0) / (np.float32(1.0) + np.exp(-logits))
    if probs.shape[1:] != (height, width):
        rows = resize_matrix(probs.shape[1], height, "linear", False).astype(np.float32)
        cols = resize_matrix(probs.shape[2], width, "linear", False).astype(np.float32)
        probs = np.einsum("oh,nhw,pw->nop", rows, probs, cols)
    return probs > PROBABILITY_THRESHOLD


class FlmmRefcocoEvaluator:
    """Accumulates one split's masks and scores them (module docstring).

    Args:
      split: the split's name, written to the JSON (e.g. ``"refcoco_unc/val"``).
    """

    def __init__(self, *, split: str):
        self.split = split
        self._tally = MaskTally()
        self._images: set[Hashable] = set()

    def __len__(self) -> int:
        """Number of masks scored so far."""
        return len(self._tally)

    def add(self, *, image_id: Hashable, mask_ids: Sequence[Hashable], pred_masks: np.ndarray,
            gt_masks: np.ndarray) -> None:
        """Adds the N objects of one image (original resolution).

        Args:
          image_id: the image (counted in ``num_images``).
          mask_ids: ``[N]`` unique ids (``"<image id>/<annotation id>"``); an id added before is
            skipped (evaluation padding may repeat images).
          pred_masks: ``[N, H, W]`` bool (:func:`binarize_mask_logits`).
          gt_masks: ``[N, H, W]`` bool or integer, the object where ``> 0``.
        """
        where = f"FlmmRefcocoEvaluator({self.split!r})"
        ids = list(mask_ids)
        pred_masks, gt_masks = np.asarray(pred_masks), np.asarray(gt_masks)
        check_masks(where, pred_masks, gt_masks, count=len(ids),
                    pred_hint="binarize_mask_logits")
        if not (gt_masks.dtype == np.bool_ or np.issubdtype(gt_masks.dtype, np.integer)):
            raise ValueError(f"{where}: gt_masks must be bool or integer, got {gt_masks.dtype}")
        keep = self._tally.new(ids)
        if keep.any():
            self._images.add(image_id)
            self._tally.add(*pixel_counts(pred_masks[keep], gt_masks[keep] > 0))

    def result(self) -> dict[str, float]:
        """The split's metrics (module docstring for the keys)."""
        intersection, union = self._tally.totals(f"FlmmRefcocoEvaluator({self.split!r})")
        total_union = union.sum()
        iou = np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)
        return {
            "cIoU": float(intersection.sum() / total_union) if total_union else float("nan"),
            "mIoU": float(iou.mean()),
            "num_masks": float(iou.size),
            "num_images": float(len(self._images)),
            "num_duplicates_skipped": float(self._tally.duplicates),
        }

    def write_json(self, path: str | pathlib.Path) -> None:
        """Writes ``{"split", "metrics"}`` to ``path`` (parent folders created)."""
        write_results(path, {"split": self.split, "metrics": self.result()})
