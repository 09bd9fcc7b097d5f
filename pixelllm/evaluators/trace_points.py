"""The trace metric: the official PixelLLM ``PointEvaluator`` (``point_l1``).

Per image, with coordinates divided by the resized image's width and height (the unpadded canvas
area, batch ``valid_wh``), so 1.0 is the whole image side:

1. each predicted point of a token takes the smallest mean(|dx|, |dy|) to any ground-truth point
   of that token;
2. these are averaged over the token's predicted points;
3. then over all tokens with a target, pooled over the image's caption slots (one sum over
   slots and tokens divided by the number of such tokens; not per slot first);
4. ``point_l1`` is the mean over images.

The official divides step 3 by ``count + 1e-8``, so an image without any token with a target
scores 0 and still counts in step 4; ``point_l1`` keeps that, and
``point_l1_images_with_points`` is the mean over the other images only.

It consumes token points, so it serves both word-trace alignments (official and exact): the
alignment only decides which tokens have targets and where their ground-truth points lie.
Teacher-forced evaluation (the official) feeds the ground-truth caption, so predicted and
ground-truth tokens line up one to one.

Result keys: ``point_l1`` (official), ``point_l1_images_with_points`` (absent when no image has
a token with a target), ``num_images``, ``num_images_without_points``, ``num_tokens`` (tokens with
a target, all images). Distances are fractions of the image side.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np

from pixelllm.evaluators.results_file import write_results

TOKEN_COUNT_EPSILON = 1e-8  # official: error = sum / (valid_token_mask.sum() + 1e-8)


class TracePointEvaluator:
    """Accumulates per-image trace errors (module docstring).

    Args:
      split: the evaluated split's name, written to the JSON.
    """

    def __init__(self, *, split: str):
        self.split = split
        self._errors: list[float] = []
        self._has_points: list[bool] = []
        self._num_tokens = 0

    def __len__(self) -> int:
        """Number of images added."""
        return len(self._errors)

    def add(self, *, pred_points: np.ndarray, gt_points: np.ndarray, token_mask: np.ndarray,
            valid_wh: Sequence[float]) -> None:
        """Adds one image's S caption slots of L tokens, in canvas pixels.

        Args:
          pred_points: ``[S, L, P, 2]`` predicted ``(x, y)`` points of each token (P = 2 for the
            model's two trace corners).
          gt_points: ``[S, L, K, 2]`` ground-truth points of each token (batch
            ``token_points``); all K are real where ``token_mask`` is set.
          token_mask: ``[S, L]`` bool, tokens with a trace target (batch ``token_points_mask``;
            it plays the part of the official's "padding token or all-zero points" test).
          valid_wh: ``(width, height)`` of the resized image on the canvas.
        """
        pred_points = np.asarray(pred_points, np.float64)
        gt_points = np.asarray(gt_points, np.float64)
        token_mask = np.asarray(token_mask)
        where = f"TracePointEvaluator({self.split!r}) image {len(self._errors)}"
        if pred_points.ndim != 4 or pred_points.shape[-1] != 2:
            raise ValueError(f"{where}: pred_points must be [S, L, P, 2], got "
                             f"{pred_points.shape}")
        if gt_points.ndim != 4 or gt_points.shape[:2] != pred_points.shape[:2] or (
                gt_points.shape[-1] != 2):
            raise ValueError(f"{where}: gt_points must be [S, L, K, 2] with S, L of "
                             f"pred_points {pred_points.shape[:2]}, got {gt_points.shape}")
        if token_mask.dtype != np.bool_ or token_mask.shape != pred_points.shape[:2]:
            raise ValueError(f"{where}: token_mask must be bool {pred_points.shape[:2]}, got "
                             f"{token_mask.dtype} {token_mask.shape}")
        width, height = (float(v) for v in valid_wh)
        if width <= 0 or height <= 0:
            raise ValueError(f"{where}: valid_wh must be positive, got {tuple(valid_wh)}")

        scale = np.array([width, height])
        pred_points, gt_points = pred_points / scale, gt_points / scale
        # [S, L, P, K]: mean over (x, y) of the absolute difference
        distance = np.abs(pred_points[:, :, :, None, :] - gt_points[:, :, None, :, :]).mean(-1)
        # closest ground-truth point, then the mean over predicted points: [S, L]
        token_error = distance.min(axis=-1).mean(axis=-1)
        count = int(token_mask.sum())
        self._errors.append(float(np.where(token_mask, token_error, 0.0).sum()
                                  / (count + TOKEN_COUNT_EPSILON)))
        self._has_points.append(count > 0)
        self._num_tokens += count

    def result(self) -> dict[str, float]:
        """``point_l1`` and companions (module docstring)."""
        if not self._errors:
            raise ValueError(f"TracePointEvaluator({self.split!r}): no image was added")
        errors = np.asarray(self._errors)
        has_points = np.asarray(self._has_points)
        metrics = {"point_l1": float(errors.mean())}
        if has_points.any():
            metrics["point_l1_images_with_points"] = float(errors[has_points].mean())
        metrics.update({
            "num_images": float(errors.size),
            "num_images_without_points": float((~has_points).sum()),
            "num_tokens": float(self._num_tokens),
        })
        return metrics

    def write_json(self, path: str | pathlib.Path) -> None:
        """Writes ``{"split", "metrics"}`` to ``path`` (parent folders created)."""
        write_results(path, {"split": self.split, "metrics": self.result()})
