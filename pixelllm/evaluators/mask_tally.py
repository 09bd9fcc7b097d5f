"""What the per-mask evaluators share (PixelLLM's and F-LMM's RefCOCO, ReasonSeg, grounding
recall): the checks of a batch of predicted and ground-truth masks, per-mask pixel counts of
intersection and union, and a split's tally in which each mask id counts once (evaluation
padding repeats examples)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np


def check_masks(where: str, pred_masks: np.ndarray, gt_masks: np.ndarray, *, count: int,
                pred_hint: str) -> None:
    """Raises ``ValueError`` (prefixed ``where``) unless ``pred_masks`` is bool ``[count, H, W]``
    and ``gt_masks`` has its shape; ``pred_hint`` says how to make the predictions."""
    if pred_masks.dtype != np.bool_ or pred_masks.ndim != 3 or pred_masks.shape[0] != count:
        raise ValueError(f"{where}: pred_masks must be bool [{count}, H, W] ({pred_hint}), got "
                         f"{pred_masks.dtype} {pred_masks.shape}")
    if gt_masks.shape != pred_masks.shape:
        raise ValueError(f"{where}: gt_masks {gt_masks.shape} and pred_masks "
                         f"{pred_masks.shape} differ (both at the original resolution)")


def pixel_counts(predicted: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(intersection [N], union [N])`` int64 pixel counts of bool ``[N, H, W]`` masks."""
    return ((predicted & target).sum(axis=(1, 2), dtype=np.int64),
            (predicted | target).sum(axis=(1, 2), dtype=np.int64))


class MaskTally:
    """One split's masks: ids seen, duplicates skipped, per-mask intersection and union."""

    def __init__(self):
        self._seen_ids: set[Hashable] = set()
        self.duplicates = 0
        self._intersection: list[np.ndarray] = []
        self._union: list[np.ndarray] = []

    def new(self, ids: Sequence[Hashable]) -> np.ndarray:
        """``[N]`` bool: which of ``ids`` were not seen before (now seen); the others count as
        duplicates."""
        keep = np.zeros(len(ids), bool)
        for index, mask_id in enumerate(ids):
            if mask_id in self._seen_ids:
                self.duplicates += 1
            else:
                self._seen_ids.add(mask_id)
                keep[index] = True
        return keep

    def add(self, intersection: np.ndarray, union: np.ndarray) -> None:
        """Records ``[N]`` masks' pixel counts (:func:`pixel_counts`)."""
        self._intersection.append(intersection)
        self._union.append(union)

    def __len__(self) -> int:
        return sum(len(i) for i in self._intersection)

    def totals(self, where: str) -> tuple[np.ndarray, np.ndarray]:
        """``(intersection, union)``, float64 ``[masks]``; raises naming ``where`` if empty."""
        if not self._intersection:
            raise ValueError(f"{where}: no mask was added")
        return (np.concatenate(self._intersection).astype(np.float64),
                np.concatenate(self._union).astype(np.float64))
