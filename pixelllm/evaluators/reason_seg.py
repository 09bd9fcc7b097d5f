"""LISA's segmentation metrics, gIoU and cIoU, as its ``validate()`` computes them.

One :class:`ReasonSegEvaluator` per split (ReasonSeg val or test, or a referring split scored
per sentence as LISA does). Per image it takes the predicted masks (bool, ``logits > 0`` as LISA
thresholds them) and the ground-truth masks, both ``[N, H, W]`` at the **original image's
resolution**. Ground truth is uint8 with 1 the target, 0 the background and 255 pixels to
ignore (ReasonSeg's "ignore" shapes, :mod:`data_pipelines.builders.reason_seg`); a bool mask
is the same without ignored pixels.

LISA scores each mask with ``intersectionAndUnionGPU(pred, gt, 2, ignore_index=255)``: the
prediction is set to 255 where the ground truth is, and pixel histograms over the classes 0
and 1 count the rest, so ignored pixels are in neither the intersection nor the union. Its
metrics are the foreground class's (class 1):

==================  =============================================================================
key                 meaning
==================  =============================================================================
gIoU                sum over masks of intersection / (union + 1e-5), plus 1.0 for each mask
                    whose union is empty (no target and nothing predicted outside the ignored
                    pixels), divided by (number of masks + 1e-5) (LISA's ``AverageMeter`` after
                    ``all_reduce``)
cIoU                total intersection / (total union + 1e-10) over the split
num_masks           masks scored
num_empty_union     masks whose union was empty (each counted as IoU 1.0)
num_duplicates_skipped  masks added again (same id) and ignored
==================  =============================================================================

Sums are in float64 here; LISA sums in float32 on the GPU, which differs in the seventh digit.
"""

from __future__ import annotations

import pathlib
from collections.abc import Hashable, Sequence

import numpy as np

from pixelllm.evaluators.mask_tally import MaskTally, check_masks, pixel_counts
from pixelllm.evaluators.results_file import write_results

IGNORE_VALUE = 255
# train_ds.validate(): intersection / (union + 1e-5) per mask, and the meters' mean divides by
# (count + 1e-5) after all_reduce; cIoU = sum(I) / (sum(U) + 1e-10).
MASK_IOU_EPSILON = 1e-5
COUNT_EPSILON = 1e-5
CIOU_EPSILON = 1e-10


def intersection_and_union(pred_masks: np.ndarray, gt_masks: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Foreground intersection and union pixel counts per mask, ignored pixels left out.

    Args:
      pred_masks: ``[N, H, W]`` bool.
      gt_masks: ``[N, H, W]`` uint8 in {0, 1, 255} (255: ignored) or bool.

    Returns:
      ``(intersection [N], union [N])`` int64.
    """
    target = gt_masks == 1
    counted = gt_masks != IGNORE_VALUE
    return pixel_counts(pred_masks & counted, target)


class ReasonSegEvaluator:
    """Accumulates one split's masks and scores them (module docstring).

    Args:
      split: the split's name, written to the JSON (e.g. ``"reason_seg/val"``).
    """

    def __init__(self, *, split: str):
        self.split = split
        self._tally = MaskTally()

    def __len__(self) -> int:
        """Number of masks scored so far."""
        return len(self._tally)

    def add(self, *, mask_ids: Sequence[Hashable], pred_masks: np.ndarray,
            gt_masks: np.ndarray) -> None:
        """Adds the N masks of one image (original resolution).

        Args:
          mask_ids: ``[N]`` unique ids (an image's query, a sentence id); an id added before is
            skipped (evaluation padding may repeat examples).
          pred_masks: ``[N, H, W]`` bool predicted masks (``logits > 0``).
          gt_masks: ``[N, H, W]`` ground truth: uint8 in {0, 1, 255} or bool.
        """
        where = f"ReasonSegEvaluator({self.split!r})"
        ids = list(mask_ids)
        pred_masks, gt_masks = np.asarray(pred_masks), np.asarray(gt_masks)
        check_masks(where, pred_masks, gt_masks, count=len(ids),
                    pred_hint="threshold logits with > 0")
        if gt_masks.dtype != np.bool_:
            if gt_masks.dtype != np.uint8:
                raise ValueError(f"{where}: gt_masks must be uint8 (0, 1, 255) or bool, got "
                                 f"{gt_masks.dtype}")
            stray = np.setdiff1d(np.unique(gt_masks), [0, 1, IGNORE_VALUE])
            if stray.size:
                raise ValueError(f"{where}: gt_masks hold values {stray.tolist()}; expected 0 "
                                 f"(background), 1 (target), {IGNORE_VALUE} (ignored)")
        keep = self._tally.new(ids)
        if keep.any():
            self._tally.add(*intersection_and_union(pred_masks[keep], gt_masks[keep]))

    def result(self) -> dict[str, float]:
        """The split's metrics (module docstring for the keys)."""
        intersection, union = self._tally.totals(f"ReasonSegEvaluator({self.split!r})")
        empty = union == 0
        # LISA: acc_iou += I / (U + 1e-5); acc_iou[U == 0] += 1.0 ("no-object target").
        iou = intersection / (union + MASK_IOU_EPSILON) + empty
        return {
            "gIoU": float(iou.sum() / (iou.size + COUNT_EPSILON)),
            "cIoU": float(intersection.sum() / (union.sum() + CIOU_EPSILON)),
            "num_masks": float(iou.size),
            "num_empty_union": float(empty.sum()),
            "num_duplicates_skipped": float(self._tally.duplicates),
        }

    def write_json(self, path: str | pathlib.Path) -> None:
        """Writes ``{"split", "metrics"}`` to ``path`` (parent folders created)."""
        write_results(path, {"split": self.split, "metrics": self.result()})
