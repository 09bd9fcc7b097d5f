"""RoIAlign (He et al. 2017) with half-pixel alignment, as matrix products (static shapes).

**Definition.** A box ``(x0, y0, x1, y1)`` in feature-map units (cell ``j`` covers ``[j, j + 1)``)
is split into ``output_size x output_size`` bins; each bin averages ``sampling_ratio^2`` bilinear
samples placed at the centres of a regular sub-grid. A sample at continuous position ``(x, y)``
reads cell centres, i.e. it interpolates at index ``(x - 0.5, y - 0.5)`` (detectron2's
``aligned=True``). Samples outside the map read zeros (zero padding, as the official scenic
``roi_align``); inside ``[0.5, size - 0.5]`` this equals torchvision's ``roi_align(aligned=True)``,
which instead clamps to the border cells.

Bilinear interpolation separates into a row and a column interpolation, so each box's output is
``Wy @ feature @ Wx^T`` with ``Wy [output_size, H]`` and ``Wx [output_size, W]`` interpolation
matrices: one einsum, no gathers.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def _interpolation_matrix(low: jax.Array, high: jax.Array, size: int, output_size: int,
                          sampling_ratio: int) -> jax.Array:
    """``low, high: [T]`` box extents along one axis -> ``[T, output_size, size]``: how much each
    input cell contributes to each output bin (bilinear weights averaged over the bin's
    samples; zero outside the map)."""
    samples = output_size * sampling_ratio
    step = (high - low)[:, None] / samples
    # Sample centres in map units, then as fractional cell indices (cell centres at j + 0.5).
    index = low[:, None] + (jnp.arange(samples, dtype=low.dtype) + 0.5) * step - 0.5
    below = jnp.floor(index)
    upper_weight = index - below
    cells = jnp.arange(size, dtype=low.dtype)
    # [T, samples, size]: one_hot-style weights; indices off the map match no cell (zeros).
    weights = ((cells == below[..., None]) * (1.0 - upper_weight)[..., None]
               + (cells == below[..., None] + 1.0) * upper_weight[..., None])
    return weights.reshape(low.shape[0], output_size, sampling_ratio, size).mean(axis=2)


def roi_align(features: jax.Array, boxes: jax.Array, *, output_size: int,
              sampling_ratio: int) -> jax.Array:
    """``features [B, H, W, C]``, ``boxes [B, T, 4]`` xyxy in feature-map units ->
    ``[B, T, output_size, output_size, C]`` (see the module docstring)."""
    if features.ndim != 4 or boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"roi_align: expected features [B, H, W, C] and boxes [B, T, 4], got "
                         f"{features.shape} and {boxes.shape}")
    if sampling_ratio < 1:
        raise ValueError(f"roi_align: sampling_ratio must be >= 1, got {sampling_ratio}")
    height, width = features.shape[1:3]

    def one_image(feature, image_boxes):
        image_boxes = image_boxes.astype(jnp.float32)
        rows = _interpolation_matrix(image_boxes[:, 1], image_boxes[:, 3], height, output_size,
                                     sampling_ratio)
        columns = _interpolation_matrix(image_boxes[:, 0], image_boxes[:, 2], width,
                                        output_size, sampling_ratio)
        return jnp.einsum("hwc,tyh,txw->tyxc", feature.astype(jnp.float32), rows, columns,
                          optimize=True)

    return jax.vmap(one_image)(features, boxes).astype(features.dtype)


def multilevel_roi_align(levels: Sequence[jax.Array], boxes: jax.Array, level_index: jax.Array,
                         *, strides: Sequence[float], output_size: int,
                         sampling_ratio: int) -> jax.Array:
    """RoIAlign of each box on its own pyramid level.

    Args:
      levels: ``[B, H_l, W_l, C]`` per level (same ``C``).
      boxes: ``[B, T, 4]`` xyxy in image units; level ``l`` reads ``boxes / strides[l]``.
      level_index: ``[B, T]`` int, the level of each box.
      strides: image units per cell of each level.

    Returns ``[B, T, output_size, output_size, C]``. Every level is sampled for every box and the
    box's own level selected (static shapes; the official scenic implementation does the same).
    """
    if len(levels) != len(strides):
        raise ValueError(f"multilevel_roi_align: {len(levels)} levels for {len(strides)} strides")
    result = None
    for index, (level, stride) in enumerate(zip(levels, strides)):
        pooled = roi_align(level, boxes / stride, output_size=output_size,
                           sampling_ratio=sampling_ratio)
        pooled = jnp.where((level_index == index)[..., None, None, None], pooled, 0.0)
        result = pooled if result is None else result + pooled
    return result
