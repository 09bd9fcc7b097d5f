"""Box geometry on ``(x0, y0, x1, y1)`` boxes: area, IoU, generalized IoU, clipping.

Boxes follow the project convention (README, Conventions): canvas pixels, origin top-left, x right,
y down. Every function broadcasts over leading dimensions and is differentiable.

**Degenerate boxes** (zero or negative width/height, all-zero padding boxes) are safe: sizes are
clamped at zero, and wherever a ratio would divide by zero (two boxes with an empty union, or an
empty enclosing box in GIoU) the ratio is defined as 0. The divisions use the "double where" form,
so gradients stay finite there too (a plain ``where(den > 0, num / den, 0)`` would still
back-propagate NaN from the untaken branch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """``numerator / denominator`` where ``denominator > 0``, else 0; finite gradients."""
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


def _size(boxes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Width and height ``[...]``, clamped at zero."""
    return (jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0),
            jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0))


def area(boxes: jax.Array) -> jax.Array:
    """``boxes: [..., 4]`` -> ``[...]``; inverted boxes have area 0."""
    width, height = _size(boxes)
    return width * height


def _intersection_and_union(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    overlap = jnp.concatenate([jnp.maximum(a[..., :2], b[..., :2]),
                               jnp.minimum(a[..., 2:], b[..., 2:])], axis=-1)
    intersection = area(overlap)
    return intersection, area(a) + area(b) - intersection


def iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Elementwise IoU of ``a: [..., 4]`` and ``b: [..., 4]`` (broadcast) -> ``[...]``.

    0 where the union is empty.
    """
    intersection, union = _intersection_and_union(a, b)
    return _safe_divide(intersection, union)


def pairwise_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a: [..., N, 4]``, ``b: [..., M, 4]`` -> ``[..., N, M]``: IoU of every pair."""
    return iou(a[..., :, None, :], b[..., None, :, :])


def generalized_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Elementwise GIoU (Rezatofighi et al. 2019) of ``a, b: [..., 4]`` -> ``[...]``, in [-1, 1].

    ``IoU - (C - U) / C`` with ``C`` the area of the smallest box enclosing both and ``U`` the
    union. Each ratio is 0 where its denominator is 0 (e.g. two identical points give 0).
    """
    intersection, union = _intersection_and_union(a, b)
    enclosing = area(jnp.concatenate([jnp.minimum(a[..., :2], b[..., :2]),
                                      jnp.maximum(a[..., 2:], b[..., 2:])], axis=-1))
    return _safe_divide(intersection, union) - _safe_divide(enclosing - union, enclosing)


def clip(boxes: jax.Array, wh: jax.Array) -> jax.Array:
    """Clips ``boxes: [..., 4]`` to ``[0, w] x [0, h]``.

    ``wh: [..., 2]`` is ``(width, height)`` and broadcasts against ``boxes[..., :2]``: for boxes
    ``[B, N, 4]`` and one size per image pass ``wh[:, None, :]`` (``[B, 1, 2]``).
    """
    wh = jnp.asarray(wh, boxes.dtype)
    limits = jnp.concatenate([wh, wh], axis=-1)
    return jnp.clip(boxes, 0.0, limits)
