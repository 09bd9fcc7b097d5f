"""Visual Genome dense-captioning mAP, as DenseCap's ``eval/eval_utils.lua`` defines it (the
official PixelLLM ``densecap_evaluator.py`` is a port of it).

Per image (boxes ``(x0, y0, x1, y1)`` in original-image pixels, README Conventions):

1. Ground-truth boxes are merged greedily: the box that overlaps (IoU >= 0.7, itself included)
   the most boxes takes them all, they become their mean box with all their captions as
   references, and are removed; repeated until no box is left.
2. At most ``max_detections_per_image`` (100) detections are kept, by score.
3. In score order, each detection is matched to the merged ground truth of **highest IoU** (not
   the best still available, unlike COCO); it is "ok" if that IoU is > 0 and that ground truth is
   not used yet, which then marks it used.

Over the whole split, detections are ranked by score; one is a true positive for the thresholds
``(t, m)`` iff it is ok, its IoU >= t and the METEOR of its caption against its ground truth's
references is > m (strict). AP interpolates precision at DenseCap's recall points: the mean over
``r`` of the maximum precision at recall >= ``r``, for ``r`` from Lua's ``for t=0,1,0.01`` loop
(100 points, 0 .. 0.99, accumulated in float64 as Lua does). Results (fractions; the paper prints
x 100):

=================================  ==============================================================
key                                meaning
=================================  ==============================================================
mAP                                mean of the 30 APs over IoU {0.3 .. 0.7} x METEOR
                                   {0, 0.05 .. 0.25}
mAP_iou{t:.1f}_meteor{m:.2f}       one of those APs
mAP_detection                      mean over the 5 IoU thresholds of the AP without the METEOR
                                   condition (DenseCap's METEOR threshold -1)
mAP_detection_iou{t:.1f}           one of those APs
num_images                         images scored
num_detections                     detections scored (after the per-image cap)
num_detections_over_cap           detections left out by the per-image cap
num_ground_truth                   merged ground-truth boxes (the recall denominator)
num_ground_truth_before_merge      ground-truth boxes given
num_duplicates_skipped             images added again (same id) and ignored
=================================  ==============================================================

Choices where the sources differ or are silent (the official port is followed for boxes):

- IoU is continuous (no DenseCap ``+1`` pixel in widths, heights and areas), as the official
  port; widths and heights clamp at 0, so a degenerate or inverted predicted box has IoU 0 and is
  a false positive.
- A ground-truth box is always in its own merge cluster (DenseCap's IoU matrix has 1 on the
  diagonal); the official port computes a zero-area box's self-IoU as 0 and drops it.
- A detection that overlaps no ground truth is unmatched and marks nothing used (DenseCap's Lua
  indexes ``used[-1]``, the image's last ground truth, in that case).
- Score ties keep the order given: within an image, the detections' input order; across images,
  the order images were added (a stable sort, as the official port; Lua's sort is unstable).
- Recall points: the official port uses ``r / 100``, which differs from Lua's accumulated ``r``
  only where a recall equals a grid point exactly (e.g. 0.2 >= 0.2 but not >= 0.2 + 4e-17).
- With no detection at all every AP is 0 (Lua fails on the empty maximum).
- METEOR is asked only for ok detections: the others are false positives whatever their
  caption, and METEOR's per-pair score does not depend on the other pairs.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence

import numpy as np

from pixelllm.evaluators.caption_metrics import PairScorer
from pixelllm.evaluators.results_file import write_results

IOU_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
METEOR_THRESHOLDS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)
MERGE_IOU = 0.7
MAX_DETECTIONS_PER_IMAGE = 100


def lua_recall_points() -> np.ndarray:
    """``[100]`` float64: the values Lua's ``for t=0,1,0.01`` takes (``t`` is accumulated, so
    the last is 0.99000...07 and 1.0 is never reached)."""
    points, t = [], 0.0
    while t <= 1.0:
        points.append(t)
        t += 0.01
    return np.asarray(points, np.float64)


def pairwise_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """``[N, 4], [M, 4] -> [N, M]`` continuous IoU; widths and heights clamped at 0; 0 where the
    union is 0."""
    def area(b: np.ndarray) -> np.ndarray:
        return np.maximum(b[..., 2] - b[..., 0], 0.0) * np.maximum(b[..., 3] - b[..., 1], 0.0)

    a, b = boxes_a[:, None, :], boxes_b[None, :, :]
    overlap = np.concatenate([np.maximum(a[..., :2], b[..., :2]),
                              np.minimum(a[..., 2:], b[..., 2:])], axis=-1)
    intersection = area(overlap)
    union = area(a) + area(b) - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def merge_ground_truth(boxes: np.ndarray, captions: Sequence[str], *,
                       iou_threshold: float = MERGE_IOU) -> tuple[np.ndarray, list[list[str]]]:
    """DenseCap's greedy merge (module docstring, step 1).

    Args:
      boxes: ``[M, 4]`` ground-truth boxes.
      captions: ``[M]`` their captions.

    Returns:
      ``[K, 4]`` mean boxes and, per merged box, the captions of its members (in box order).
    """
    overlaps = pairwise_iou(boxes, boxes)
    np.fill_diagonal(overlaps, 1.0)
    merged_boxes, merged_captions = [], []
    while True:
        can_merge = overlaps >= iou_threshold
        cluster_sizes = can_merge.sum(axis=1)
        if cluster_sizes.size == 0 or cluster_sizes.max() == 0:
            break
        members = np.flatnonzero(can_merge[np.argmax(cluster_sizes)])
        merged_boxes.append(boxes[members].mean(axis=0))
        merged_captions.append([captions[i] for i in members])
        overlaps[members, :] = 0.0
        overlaps[:, members] = 0.0
    return np.asarray(merged_boxes, np.float64).reshape(-1, 4), merged_captions


def average_precision(true_positive: np.ndarray, num_ground_truth: int) -> float:
    """DenseCap's interpolated AP of detections ranked by score.

    Args:
      true_positive: ``[N]`` bool, in rank order (false = false positive).
      num_ground_truth: the recall denominator; 0 gives recall 0.
    """
    if true_positive.size == 0:
        return 0.0
    tp = np.cumsum(true_positive, dtype=np.float64)
    precision = tp / np.arange(1, tp.size + 1)
    recall = tp / num_ground_truth if num_ground_truth else np.zeros_like(tp)
    points = lua_recall_points()
    reached = recall[None, :] >= points[:, None]  # [points, N]
    return float(np.mean(np.max(precision[None, :] * reached, axis=1)))


def _as_boxes(values: np.ndarray) -> np.ndarray:
    """float64 boxes; an empty input of any shape becomes ``[0, 4]``."""
    boxes = np.asarray(values, np.float64)
    return boxes.reshape(0, 4) if boxes.size == 0 else boxes


@dataclasses.dataclass(frozen=True, kw_only=True)
class _ImageRecords:
    """One image's kept detections, in the image's score order."""
    scores: np.ndarray      # [D] float64
    ious: np.ndarray        # [D] IoU with the matched (highest-IoU) ground truth, 0 if none
    ok: np.ndarray          # [D] bool: matched ground truth unused and IoU > 0
    candidates: list[str]   # [D] predicted captions
    references: list[list[str] | None]  # [D] the ok detection's references, else None


class DenseCapEvaluator:
    """Accumulates a split's images and scores them (module docstring).

    Args:
      meteor: scores each (caption, references) pair; :class:`MeteorProcess` for the real metric.
      max_detections_per_image: detections kept per image, by score.
      merge_iou: IoU at which ground-truth boxes merge.
    """

    def __init__(self, *, meteor: PairScorer,
                 max_detections_per_image: int = MAX_DETECTIONS_PER_IMAGE,
                 merge_iou: float = MERGE_IOU):
        if max_detections_per_image < 1:
            raise ValueError(f"DenseCapEvaluator: max_detections_per_image must be >= 1, got "
                             f"{max_detections_per_image}")
        self.meteor = meteor
        self.max_detections_per_image = max_detections_per_image
        self.merge_iou = merge_iou
        self._images: dict[str, _ImageRecords] = {}
        self._num_ground_truth = 0
        self._num_ground_truth_before_merge = 0
        self._over_cap = 0
        self._duplicates = 0

    def __len__(self) -> int:
        """Number of images added."""
        return len(self._images)

    def add(self, *, image_id: int | str, pred_boxes: np.ndarray, pred_scores: np.ndarray,
            pred_captions: Sequence[str], gt_boxes: np.ndarray,
            gt_captions: Sequence[str]) -> None:
        """Adds one image (original-image pixels); an image id added before is skipped
        (evaluation padding may repeat examples).

        Args:
          image_id: the image.
          pred_boxes: ``[D, 4]`` detections ``(x0, y0, x1, y1)``.
          pred_scores: ``[D]`` their scores (higher first).
          pred_captions: ``[D]`` their captions.
          gt_boxes: ``[M, 4]`` ground-truth regions (``x1 >= x0``, ``y1 >= y0``).
          gt_captions: ``[M]`` their captions.
        """
        key = str(image_id)
        where = f"DenseCapEvaluator image {image_id!r}"
        pred_boxes, gt_boxes = _as_boxes(pred_boxes), _as_boxes(gt_boxes)
        pred_scores = np.asarray(pred_scores, np.float64).reshape(-1)
        for name, boxes, texts in (("pred_boxes", pred_boxes, pred_captions),
                                   ("gt_boxes", gt_boxes, gt_captions)):
            if boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.shape[0] != len(texts):
                raise ValueError(f"{where}: {name} has shape {boxes.shape}, expected "
                                 f"({len(texts)}, 4) for its {len(texts)} captions")
            if not np.isfinite(boxes).all():
                raise ValueError(f"{where}: {name} has non-finite coordinates")
            if any(not isinstance(t, str) for t in texts):
                raise ValueError(f"{where}: the captions of {name} must be strings")
        if pred_scores.shape[0] != pred_boxes.shape[0] or not np.isfinite(pred_scores).all():
            raise ValueError(f"{where}: pred_scores must be {pred_boxes.shape[0]} finite values, "
                             f"got shape {pred_scores.shape}")
        if (gt_boxes[:, 2:] < gt_boxes[:, :2]).any():
            raise ValueError(f"{where}: gt_boxes has a box with x1 < x0 or y1 < y0")
        if key in self._images:
            self._duplicates += 1
            return

        order = np.argsort(-pred_scores, kind="stable")
        self._over_cap += max(order.size - self.max_detections_per_image, 0)
        order = order[:self.max_detections_per_image]
        merged_boxes, merged_captions = merge_ground_truth(gt_boxes, list(gt_captions),
                                                           iou_threshold=self.merge_iou)
        overlaps = pairwise_iou(pred_boxes[order], merged_boxes)  # [D, K]
        used = np.zeros(merged_boxes.shape[0], bool)
        ious = np.zeros(order.size, np.float64)
        ok = np.zeros(order.size, bool)
        references: list[list[str] | None] = [None] * order.size
        for d in range(order.size if merged_boxes.shape[0] else 0):
            best = int(np.argmax(overlaps[d]))
            ious[d] = overlaps[d, best]
            if ious[d] > 0 and not used[best]:
                used[best] = True
                ok[d] = True
                references[d] = merged_captions[best]
        self._images[key] = _ImageRecords(
            scores=pred_scores[order], ious=ious, ok=ok,
            candidates=[pred_captions[i] for i in order], references=references)
        self._num_ground_truth += merged_boxes.shape[0]
        self._num_ground_truth_before_merge += gt_boxes.shape[0]

    def result(self) -> dict[str, float]:
        """The split's metrics (module docstring for the keys); one METEOR request."""
        if not self._images:
            raise ValueError("DenseCapEvaluator: no image was added")
        images = list(self._images.values())
        scores = np.concatenate([r.scores for r in images])
        ious = np.concatenate([r.ious for r in images])
        ok = np.concatenate([r.ok for r in images])
        candidates = [c for r in images for c in r.candidates]
        references = [refs for r in images for refs in r.references]

        meteor = np.zeros(scores.size, np.float64)
        scored = np.flatnonzero(ok)
        if scored.size:
            meteor[scored] = self.meteor.score_pairs([candidates[i] for i in scored],
                                                     [references[i] for i in scored])
        rank = np.argsort(-scores, kind="stable")
        ious, ok, meteor = ious[rank], ok[rank], meteor[rank]

        metrics: dict[str, float] = {}
        for t in IOU_THRESHOLDS:
            located = ok & (ious >= t)
            for m in METEOR_THRESHOLDS:
                metrics[f"mAP_iou{t:.1f}_meteor{m:.2f}"] = average_precision(
                    located & (meteor > m), self._num_ground_truth)
        metrics["mAP"] = float(np.mean(list(metrics.values())))
        detection = {f"mAP_detection_iou{t:.1f}": average_precision(
            ok & (ious >= t), self._num_ground_truth) for t in IOU_THRESHOLDS}
        metrics["mAP_detection"] = float(np.mean(list(detection.values())))
        metrics.update(detection)
        metrics.update({
            "num_images": float(len(images)),
            "num_detections": float(scores.size),
            "num_detections_over_cap": float(self._over_cap),
            "num_ground_truth": float(self._num_ground_truth),
            "num_ground_truth_before_merge": float(self._num_ground_truth_before_merge),
            "num_duplicates_skipped": float(self._duplicates),
        })
        return metrics

    def write_json(self, path: str | pathlib.Path) -> None:
        """Writes ``{"max_detections_per_image", "metrics"}`` to ``path`` (parent folders
        created)."""
        write_results(path, {"max_detections_per_image": self.max_detections_per_image,
                             "metrics": self.result()})
