"""RefCOCO / RefCOCO+ / RefCOCOg referring evaluation with the official PixelLLM definitions.

One :class:`RefCocoEvaluator` per split. Per referring expression it takes the predicted box
(and optionally mask) and the ground-truth box (and mask) in **original-image pixels**: boxes
``(x0, y0, x1, y1)`` with pixel ``i`` covering ``[i, i+1)`` (README, Conventions), masks bool
``[H, W]`` of the original image. :func:`canvas_boxes_to_original` maps the model's canvas boxes
there as the official evaluator does (per-axis factor original / resized size, then clipped to
the image); ground-truth boxes from the annotations are already original pixels.

Result keys (fractions in [0, 1]; the paper prints percentages):

==========================  ===================================================================
key                         meaning
==========================  ===================================================================
box_P@0.5                   official ``box_Precision@1``: fraction of expressions whose box IoU,
                            computed as intersection / (union + 1e-6), is ``> 0.5`` (an IoU of
                            exactly 0.5 misses)
box_P@0.5_inclusive         fraction with IoU ``>= 0.5``, IoU without epsilon (exactly 0.5 hits)
seg_cIoU                    official: mean(intersection) / (mean(union) + 1e-5) over the split
                            (= sum I / (sum U + N * 1e-5))
seg_gIoU                    official: mean over expressions of intersection / (union + 1e-5)
seg_AP                      official: fraction with intersection / (union + 1e-5) ``> 0.5``
seg_box_P@0.5               official ``seg_box_Precision@1``: the tight box of the predicted mask
                            (``[0, 0, 0, 0]`` when empty) scored like ``box_P@0.5``
seg_box_P@0.5_inclusive     the same with ``>= 0.5`` on the IoU without epsilon
num_expressions             expressions scored
num_images                  images with at least one scored expression
num_expressions_over_cap    expressions left out by ``max_expressions_per_image``
num_duplicates_skipped      expressions added again (same id) and ignored
max_expressions_per_image   the cap used; 0 means no cap (all expressions scored)
==========================  ===================================================================

:func:`mask_logits_to_original` turns the model's mask logits into original-image masks as the
official evaluator does (its ``rescale_and_encode_masks``), for the evaluation driver and the
Predictor alike.

The ``seg_*`` keys appear only when masks were given (for every expression of the split).
Box IoU follows scenic's ``box_iou`` except that widths and heights are clamped at zero, so an
inverted box has area 0 (the official's negative area also gives IoU 0: its intersection is 0).
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np

from pixelllm.evaluators.mask_tally import check_masks, pixel_counts
from pixelllm.evaluators.results_file import write_results

IOU_THRESHOLD = 0.5
BOX_IOU_EPSILON = 1e-6  # scenic box_utils.box_iou: intersection / (union + 1e-6)
MASK_IOU_EPSILON = 1e-5  # RefCocoEvaluator: .../(union + 1e-5) and mean(I)/(mean(U) + 1e-5)
OFFICIAL_MAX_EXPRESSIONS_PER_IMAGE = 16  # the official referring batches hold 16 slots
MASK_THRESHOLD = 0.0  # RefCocoEvaluator.mask_threshold: a pixel is the object where logit > 0


def canvas_boxes_to_original(boxes: np.ndarray, *, valid_wh: Sequence[float],
                             original_wh: Sequence[float]) -> np.ndarray:
    """Canvas-pixel boxes -> original-image pixels, as the official evaluator rescales them.

    The image was resized from ``original_wh`` to ``valid_wh`` (the unpadded canvas area) and
    padded at the bottom/right, so a canvas coordinate divided by the resize factor
    ``valid / original`` of its axis is the original coordinate; the result is clipped to
    ``[0, width] x [0, height]`` of the original image (boxes in the padding collapse onto the
    border).

    Args:
      boxes: ``[..., 4]`` canvas ``(x0, y0, x1, y1)``.
      valid_wh: ``(width, height)`` of the resized image on the canvas (batch ``valid_wh``).
      original_wh: ``(width, height)`` of the original image.

    Returns:
      ``[..., 4]`` float64 boxes in original pixels.
    """
    valid_w, valid_h = (float(v) for v in valid_wh)
    width, height = (float(v) for v in original_wh)
    if min(valid_w, valid_h, width, height) <= 0:
        raise ValueError(f"canvas_boxes_to_original: sizes must be positive, got valid_wh="
                         f"{tuple(valid_wh)}, original_wh={tuple(original_wh)}")
    factor = np.array([width / valid_w, height / valid_h] * 2)
    limits = np.array([width, height] * 2)
    return np.clip(np.asarray(boxes, np.float64) * factor, 0.0, limits)


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's ``INTER_LINEAR`` taps along one axis: ``(low, high, weight of high)``, each
    ``[out_size]``. Source coordinate ``(i + 0.5) * in / out - 0.5``, clamped to the first and
    last pixel (no antialiasing when shrinking)."""
    source = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    return low, high, (source - low).astype(np.float32)


def mask_logits_to_original(logits: np.ndarray, *, valid_wh: Sequence[float], canvas: int,
                            original_wh: Sequence[int]) -> np.ndarray:
    """SAM's low-resolution mask logits -> bool masks of the original image, as the official
    ``rescale_and_encode_masks``: keep the logits over the image's area of the canvas, ``int(valid
    * (mask size / canvas))`` rows and columns (truncated, as there), resize them bilinearly to
    the original size as ``cv2.resize(..., INTER_LINEAR)`` does (half-pixel centres, edge
    clamping, no antialiasing; the weights of torch's ``align_corners=False`` bilinear, columns
    then rows, in float32), and threshold at ``logit > 0`` (:data:`MASK_THRESHOLD`).

    Args:
      logits: ``[N, h, w]`` mask logits over the whole canvas (SAM's ``canvas / 4`` grid).
      valid_wh: ``(width, height)`` of the resized image on the canvas (batch ``valid_wh``).
      canvas: the canvas side in pixels (the model's input size).
      original_wh: ``(width, height)`` of the original image.

    Returns:
      ``[N, height, width]`` bool.
    """
    logits = np.asarray(logits, np.float32)
    valid_w, valid_h = (float(v) for v in valid_wh)
    width, height = (int(v) for v in original_wh)
    if logits.ndim != 3:
        raise ValueError(f"mask_logits_to_original: logits must be [N, h, w], got "
                         f"{logits.shape}")
    crop_h = int(valid_h * (logits.shape[1] / canvas))
    crop_w = int(valid_w * (logits.shape[2] / canvas))
    if min(crop_h, crop_w, width, height) < 1 or crop_h > logits.shape[1] or (
            crop_w > logits.shape[2]):
        raise ValueError(f"mask_logits_to_original: valid_wh={tuple(valid_wh)} on a {canvas} "
                         f"canvas keeps {crop_w} x {crop_h} of the {logits.shape[2]} x "
                         f"{logits.shape[1]} logits; original_wh={tuple(original_wh)} (all must "
                         "be positive, the window inside the logits)")
    # Two taps per output pixel: gathers, far cheaper than dense resize matrices.
    low, high, weight = _linear_taps(crop_w, width)
    across = logits[:, :crop_h, low] * (1 - weight) + logits[:, :crop_h, high] * weight
    low, high, weight = _linear_taps(crop_h, height)
    weight = weight[:, None]
    resized = across[:, low] * (1 - weight) + across[:, high] * weight
    return resized > MASK_THRESHOLD


def paired_box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray, *, epsilon: float) -> np.ndarray:
    """IoU of ``boxes_a[i]`` with ``boxes_b[i]``: intersection / (union + epsilon).

    ``[N, 4], [N, 4] -> [N]``; widths and heights clamped at zero; 0 where the denominator is 0
    (two empty boxes with ``epsilon=0``).
    """
    def area(b: np.ndarray) -> np.ndarray:
        return np.maximum(b[:, 2] - b[:, 0], 0.0) * np.maximum(b[:, 3] - b[:, 1], 0.0)

    overlap = np.concatenate([np.maximum(boxes_a[:, :2], boxes_b[:, :2]),
                              np.minimum(boxes_a[:, 2:], boxes_b[:, 2:])], axis=1)
    intersection = area(overlap)
    denominator = area(boxes_a) + area(boxes_b) - intersection + epsilon
    return np.divide(intersection, denominator, out=np.zeros_like(intersection),
                     where=denominator > 0)


def tight_boxes(masks: np.ndarray) -> np.ndarray:
    """``[N, H, W]`` bool -> ``[N, 4]`` tight boxes ``(x_min, y_min, x_max + 1, y_max + 1)``
    covering the set pixels; ``[0, 0, 0, 0]`` for an empty mask (the official ``mask_to_box``)."""
    boxes = np.zeros((masks.shape[0], 4), np.float64)
    for i, mask in enumerate(masks):
        columns = np.flatnonzero(mask.any(axis=0))
        rows = np.flatnonzero(mask.any(axis=1))
        if columns.size:
            boxes[i] = (columns[0], rows[0], columns[-1] + 1, rows[-1] + 1)
    return boxes


class RefCocoEvaluator:
    """Accumulates one split's referring expressions and scores them (module docstring).

    Args:
      split: the split's name, written to the JSON (e.g. ``"refcoco_unc/val"``).
      max_expressions_per_image: score at most this many expressions of each image, the first
        ones added; ``None`` (default) scores all. The official evaluation scored at most
        :data:`OFFICIAL_MAX_EXPRESSIONS_PER_IMAGE` (its batches hold 16 referring slots).
    """

    def __init__(self, *, split: str, max_expressions_per_image: int | None = None):
        if max_expressions_per_image is not None and max_expressions_per_image < 1:
            raise ValueError(f"RefCocoEvaluator({split!r}): max_expressions_per_image must be "
                             f">= 1 or None, got {max_expressions_per_image}")
        self.split = split
        self.max_expressions_per_image = max_expressions_per_image
        self._per_image: dict[str, int] = {}
        self._seen_ids: set[int] = set()
        self._over_cap = 0
        self._duplicates = 0
        self._with_masks: bool | None = None
        # Per scored expression: box IoUs with and without the official epsilon, mask
        # intersection and union pixel counts, and the mask box's IoUs (masks are not kept).
        self._box_iou: list[np.ndarray] = []
        self._box_iou_exact: list[np.ndarray] = []
        self._intersection: list[np.ndarray] = []
        self._union: list[np.ndarray] = []
        self._mask_box_iou: list[np.ndarray] = []
        self._mask_box_iou_exact: list[np.ndarray] = []

    def __len__(self) -> int:
        """Number of expressions scored so far."""
        return sum(len(iou) for iou in self._box_iou)

    def add(self, *, image_id: int | str, expression_ids: Sequence[int],
            pred_boxes: np.ndarray, gt_boxes: np.ndarray,
            pred_masks: np.ndarray | None = None, gt_masks: np.ndarray | None = None) -> None:
        """Adds the N expressions of one image (original-image pixels).

        Args:
          image_id: the image, for the per-image cap.
          expression_ids: ``[N]`` unique expression (sentence) ids; an id added before is
            skipped (evaluation padding may repeat examples).
          pred_boxes: ``[N, 4]`` predicted ``(x0, y0, x1, y1)``.
          gt_boxes: ``[N, 4]`` ground-truth boxes.
          pred_masks: ``[N, H, W]`` bool predicted masks, or None.
          gt_masks: ``[N, H, W]`` bool ground-truth masks; given exactly when ``pred_masks``
            is, and for every image of the split or none.
        """
        where = f"RefCocoEvaluator({self.split!r}) image {image_id!r}"
        ids = np.asarray(expression_ids).reshape(-1)
        pred_boxes = np.asarray(pred_boxes, np.float64)
        gt_boxes = np.asarray(gt_boxes, np.float64)
        count = ids.shape[0]
        for name, boxes in (("pred_boxes", pred_boxes), ("gt_boxes", gt_boxes)):
            if boxes.shape != (count, 4):
                raise ValueError(f"{where}: {name} has shape {boxes.shape}, expected "
                                 f"({count}, 4) for {count} expression_ids")
        with_masks = pred_masks is not None
        if (gt_masks is not None) != with_masks:
            raise ValueError(f"{where}: pred_masks and gt_masks must be given together")
        if self._with_masks is not None and self._with_masks != with_masks:
            raise ValueError(f"{where}: masks given for some images of the split and not for "
                             "others")
        if with_masks:
            pred_masks, gt_masks = np.asarray(pred_masks), np.asarray(gt_masks)
            check_masks(where, pred_masks, gt_masks, count=count,
                        pred_hint="mask_logits_to_original")
            if gt_masks.dtype != np.bool_:
                raise ValueError(f"{where}: gt_masks must be bool, got {gt_masks.dtype}")
        self._with_masks = with_masks  # only once the input is valid: a refused add changes nothing
        keep = self._select(str(image_id), ids)
        if not keep.any():
            return
        pred_boxes, gt_boxes = pred_boxes[keep], gt_boxes[keep]
        self._box_iou.append(paired_box_iou(pred_boxes, gt_boxes, epsilon=BOX_IOU_EPSILON))
        self._box_iou_exact.append(paired_box_iou(pred_boxes, gt_boxes, epsilon=0.0))
        if with_masks:
            pred_masks, gt_masks = pred_masks[keep], gt_masks[keep]
            intersection, union = pixel_counts(pred_masks, gt_masks)
            self._intersection.append(intersection)
            self._union.append(union)
            mask_boxes = tight_boxes(pred_masks)
            self._mask_box_iou.append(
                paired_box_iou(mask_boxes, gt_boxes, epsilon=BOX_IOU_EPSILON))
            self._mask_box_iou_exact.append(paired_box_iou(mask_boxes, gt_boxes, epsilon=0.0))

    def _select(self, image_key: str, ids: np.ndarray) -> np.ndarray:
        """``[N]`` bool: the expressions to score (new ids, within the image's cap), updating
        the counts."""
        keep = np.zeros(ids.shape[0], bool)
        for i, expression_id in enumerate(ids.tolist()):
            if expression_id in self._seen_ids:
                self._duplicates += 1
                continue
            self._seen_ids.add(expression_id)
            scored = self._per_image.get(image_key, 0)
            if self.max_expressions_per_image is not None and (
                    scored >= self.max_expressions_per_image):
                self._over_cap += 1
                continue
            self._per_image[image_key] = scored + 1
            keep[i] = True
        return keep

    def result(self) -> dict[str, float]:
        """The split's metrics (module docstring for the keys)."""
        if not self._box_iou:
            raise ValueError(f"RefCocoEvaluator({self.split!r}): no expression was added")
        box_iou = np.concatenate(self._box_iou)
        metrics = {
            "box_P@0.5": float(np.mean(box_iou > IOU_THRESHOLD)),
            "box_P@0.5_inclusive": float(
                np.mean(np.concatenate(self._box_iou_exact) >= IOU_THRESHOLD)),
        }
        if self._with_masks:
            intersection = np.concatenate(self._intersection).astype(np.float64)
            union = np.concatenate(self._union).astype(np.float64)
            mask_iou = intersection / (union + MASK_IOU_EPSILON)
            metrics.update({
                "seg_cIoU": float(intersection.mean() / (union.mean() + MASK_IOU_EPSILON)),
                "seg_gIoU": float(mask_iou.mean()),
                "seg_AP": float(np.mean(mask_iou > IOU_THRESHOLD)),
                "seg_box_P@0.5": float(
                    np.mean(np.concatenate(self._mask_box_iou) > IOU_THRESHOLD)),
                "seg_box_P@0.5_inclusive": float(
                    np.mean(np.concatenate(self._mask_box_iou_exact) >= IOU_THRESHOLD)),
            })
        metrics.update({
            "num_expressions": float(box_iou.size),
            "num_images": float(len(self._per_image)),
            "num_expressions_over_cap": float(self._over_cap),
            "num_duplicates_skipped": float(self._duplicates),
            "max_expressions_per_image": float(self.max_expressions_per_image or 0),
        })
        return metrics

    def write_json(self, path: str | pathlib.Path) -> None:
        """Writes ``{"split", "max_expressions_per_image" (null = all), "metrics"}`` to
        ``path`` (parent folders created)."""
        write_results(path, {"split": self.split,
                             "max_expressions_per_image": self.max_expressions_per_image,
                             "metrics": self.result()})
