"""Panoptic Narrative Grounding's average recall, as F-LMM's PNG evaluation computes it.

One :class:`GroundingRecallEvaluator` per split. Per narrative it takes each grounded phrase's
predicted mask (bool: F-LMM resizes the logits bilinearly to the ground truth's size, applies
the sigmoid and keeps ``> 0.5``), its ground-truth mask at the **original image's resolution**,
and the phrase's ``is_thing`` and ``plural`` flags (:mod:`data_pipelines.builders.
panoptic_narrative_grounding`; a plural phrase counts as a thing).

Per phrase, IoU = intersection / (union + 1e-12) in float32 (0 when both masks are empty).
Over a set of phrases, recall(t) is the fraction with IoU ``>= t`` at the thresholds
``t_i = numpy.arange(0, 1, 1e-5)``, and the average recall is the left Riemann sum
``sum_i (t_{i+1} - t_i) * recall(t_i)`` over the 99,999 intervals (F-LMM's
``average_accuracy``): a phrase of IoU ``x`` contributes about ``1e-5 * (floor(x / 1e-5) + 1)``,
capped at 0.99999 (a perfect mask), and one of IoU 0 still contributes 1e-5 (``0 >= t_0``).
Thresholds are compared in float64 with the float32 IoUs.

==================  =============================================================================
key                 meaning
==================  =============================================================================
AR                  average recall over every phrase
AR_things           ... over phrases with ``is_thing`` (plural phrases included)
AR_stuff            ... over the others
AR_singular         ... over singular phrases
AR_plural           ... over plural phrases
Acc@0.5             fraction of phrases with IoU ``> 0.5`` (F-LMM's ``aAcc@0.5``; exactly 0.5
                    misses)
pixel_accuracy      mean over phrases of the fraction of pixels where mask and truth agree
num_phrases, num_things, num_stuff, num_singular, num_plural   phrases in each set
num_duplicates_skipped   phrases added again (same id) and ignored
==================  =============================================================================

A subset without phrases (e.g. no plural phrase in a small split) has no ``AR_*`` key; F-LMM
prints NaN there.
"""

from __future__ import annotations

import pathlib
from collections.abc import Hashable, Sequence

import numpy as np

from pixelllm.evaluators.mask_tally import MaskTally, check_masks, pixel_counts
from pixelllm.evaluators.results_file import write_results

IOU_EPSILON = np.float32(1e-12)  # compute_mask_IoU: intersection / (union + 1e-12)
THRESHOLDS = np.arange(0, 1, 0.00001)  # F-LMM's average_accuracy thresholds (100,000)
ACCURACY_IOU = 0.5


def mask_iou(pred_masks: np.ndarray, gt_masks: np.ndarray) -> np.ndarray:
    """Per-mask IoU of bool ``[N, H, W]`` masks as float32 ``[N]`` (F-LMM's
    ``compute_mask_IoU``)."""
    intersection, union = pixel_counts(pred_masks, gt_masks)
    return intersection.astype(np.float32) / (union.astype(np.float32) + IOU_EPSILON)


def average_recall(ious: np.ndarray) -> float:
    """The area under recall(IoU >= t) over F-LMM's thresholds (module docstring) of float32
    ``ious [N]`` (N > 0)."""
    ious = np.sort(np.asarray(ious, np.float32).astype(np.float64))
    # recall(t) = #{iou >= t} / N; searchsorted(left) counts the IoUs below t.
    recall = (ious.size - np.searchsorted(ious, THRESHOLDS[:-1], side="left")) / ious.size
    return float(np.sum(np.abs(np.diff(THRESHOLDS)) * recall))


class GroundingRecallEvaluator:
    """Accumulates one split's phrase masks and scores them (module docstring).

    Args:
      split: the split's name, written to the JSON (e.g. ``"png/val"``).
    """

    def __init__(self, *, split: str):
        self.split = split
        self._tally = MaskTally()
        self._ious: list[np.ndarray] = []
        self._pixel_accuracy: list[np.ndarray] = []
        self._is_thing: list[np.ndarray] = []
        self._plural: list[np.ndarray] = []

    def __len__(self) -> int:
        """Number of phrases scored so far."""
        return sum(len(i) for i in self._ious)

    def add(self, *, phrase_ids: Sequence[Hashable], pred_masks: np.ndarray,
            gt_masks: np.ndarray, is_thing: Sequence[bool], plural: Sequence[bool]) -> None:
        """Adds the N grounded phrases of one narrative (original resolution).

        Args:
          phrase_ids: ``[N]`` unique ids (narrative index and phrase index); an id added before
            is skipped (evaluation padding may repeat examples).
          pred_masks: ``[N, H, W]`` bool predicted masks.
          gt_masks: ``[N, H, W]`` bool ground truth.
          is_thing: ``[N]`` whether each phrase is a thing (plural phrases are).
          plural: ``[N]`` whether each phrase is plural.
        """
        where = f"GroundingRecallEvaluator({self.split!r})"
        ids = list(phrase_ids)
        pred_masks, gt_masks = np.asarray(pred_masks), np.asarray(gt_masks)
        is_thing, plural = np.asarray(is_thing), np.asarray(plural)
        check_masks(where, pred_masks, gt_masks, count=len(ids), pred_hint="logits > 0")
        if gt_masks.dtype != np.bool_:
            raise ValueError(f"{where}: gt_masks must be bool, got {gt_masks.dtype}")
        for name, flags in (("is_thing", is_thing), ("plural", plural)):
            if flags.dtype != np.bool_ or flags.shape != (len(ids),):
                raise ValueError(f"{where}: {name} must be bool [{len(ids)}], got "
                                 f"{flags.dtype} {flags.shape}")
        keep = self._tally.new(ids)
        if not keep.any():
            return
        pred, gt = pred_masks[keep], gt_masks[keep]
        self._ious.append(mask_iou(pred, gt))
        self._pixel_accuracy.append((pred == gt).mean(axis=(1, 2)))
        self._is_thing.append(is_thing[keep])
        self._plural.append(plural[keep])

    def result(self) -> dict[str, float]:
        """The split's metrics (module docstring for the keys)."""
        if not self._ious:
            raise ValueError(f"GroundingRecallEvaluator({self.split!r}): no phrase was added")
        ious = np.concatenate(self._ious)
        is_thing, plural = np.concatenate(self._is_thing), np.concatenate(self._plural)
        subsets = {"": np.ones_like(is_thing), "_things": is_thing, "_stuff": ~is_thing,
                   "_singular": ~plural, "_plural": plural}
        metrics = {f"AR{suffix}": average_recall(ious[chosen])
                   for suffix, chosen in subsets.items() if chosen.any()}
        metrics["Acc@0.5"] = float(np.mean(ious > ACCURACY_IOU))
        metrics["pixel_accuracy"] = float(np.mean(np.concatenate(self._pixel_accuracy)))
        metrics["num_phrases"] = float(ious.size)
        metrics.update({f"num{suffix}": float(chosen.sum())
                        for suffix, chosen in subsets.items() if suffix})
        metrics["num_duplicates_skipped"] = float(self._tally.duplicates)
        return metrics

    def write_json(self, path: str | pathlib.Path) -> None:
        """Writes ``{"split", "metrics"}`` to ``path`` (parent folders created)."""
        write_results(path, {"split": self.split, "metrics": self.result()})
