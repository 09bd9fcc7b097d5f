"""Seeded images of coloured shapes, with each shape's exact visible mask.

A scene holds a few shapes (:data:`SHAPES`) of a named colour (:data:`COLOURS`) and size class
(:data:`SIZES`), drawn back to front in ``depth`` order on a textured, noisy background, so
that later shapes occlude earlier ones. Every pixel belongs to the front-most shape whose
geometry covers its centre (no anti-aliasing), so a shape's **visible mask** (the pixels that
show it) is exact, and its box is tight to that mask. Placement is retried until every shape
keeps at least :data:`MIN_VISIBLE_FRACTION` of its pixels visible, so that each one can still
be seen and named.

Coordinates are pixels with the origin at the top-left corner, pixel ``(row, col)`` covering
``[col, col + 1) x [row, row + 1)``; boxes are ``(x0, y0, x1, y1)`` pixel edges.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (40, 75, 215),
    "yellow": (235, 205, 35),
    "purple": (135, 55, 175),
    "orange": (240, 130, 25),
}
# Size class -> radius range as a fraction of the image's shorter side; the gap between the
# classes keeps "small" and "big" visibly different.
SIZES = {"small": (0.07, 0.09), "big": (0.13, 0.17)}
MIN_VISIBLE_FRACTION = 0.6
# Smallest visible part of an occluded shape worth a name, pixels.
MIN_VISIBLE_PIXELS = 12
# Below this side even a lone small shape would be a few pixels.
MIN_IMAGE_SIDE = 32
_PLACEMENT_TRIES = 40


# eq=False: shapes are compared by identity (two shapes may have equal attributes).
@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class SceneObject:
    """One shape of a scene.

    Attributes:
      shape, colour, size: its names (one of :data:`SHAPES`, :data:`COLOURS`, :data:`SIZES`).
      centre: ``(x, y)`` pixels.
      radius: pixels; the shape's extent from its centre (see :func:`shape_mask`).
      depth: drawing order, 0 at the back.
      full_mask: ``[H, W]`` bool, the pixels the whole shape covers.
      mask: ``[H, W]`` bool, the pixels that show it (``full_mask`` less what is in front).
    """

    shape: str
    colour: str
    size: str
    centre: tuple[float, float]
    radius: float
    depth: int
    full_mask: np.ndarray
    mask: np.ndarray

    @functools.cached_property
    def box(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` pixel edges of the visible mask (tight)."""
        rows = np.flatnonzero(self.mask.any(axis=1))
        cols = np.flatnonzero(self.mask.any(axis=0))
        return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1

    @functools.cached_property
    def area(self) -> int:
        """Visible pixels."""
        return int(self.mask.sum())

    @property
    def visible_fraction(self) -> float:
        return self.area / max(int(self.full_mask.sum()), 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scene:
    """An image and its shapes (by ``depth``, back to front).

    Attributes:
      image: ``[H, W, 3]`` uint8 RGB.
      objects: the shapes, ``objects[i].depth == i``.
    """

    image: np.ndarray
    objects: tuple[SceneObject, ...]


def shape_mask(shape: str, *, centre: tuple[float, float], radius: float, height: int,
               width: int) -> np.ndarray:
    """``[height, width]`` bool: the pixels whose centre lies in the shape.

    A circle of ``radius``; an axis-aligned square of half-side ``0.85 * radius`` and a diamond
    (square turned 45 degrees) of half-diagonal ``1.15 * radius``, both near the circle's area;
    an upright equilateral triangle of circumradius ``1.25 * radius``.
    """
    dx = np.arange(width) + 0.5 - centre[0]
    dy = (np.arange(height) + 0.5 - centre[1])[:, None]
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= radius ** 2
    if shape == "square":
        half = 0.85 * radius
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.15 * radius
    if shape == "triangle":
        circumradius = 1.25 * radius
        top, bottom = -circumradius, circumradius / 2
        # The half-width grows linearly from 0 at the apex to the base's half side.
        half_width = (dy - top) / (bottom - top) * circumradius * np.sqrt(3) / 2
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= half_width)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def sample_scene(rng: np.random.Generator, *, height: int, width: int, min_objects: int,
                 max_objects: int) -> Scene:
    """A random scene of ``min_objects..max_objects`` shapes (fewer, but at least one, when a
    shape finds no place that leaves every shape visible enough, see the module docstring).

    Attributes repeat freely across shapes, so that naming one shape often needs its size, its
    colour or its relation to another.
    """
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, "
                         f"{max_objects}")
    if min(height, width) < MIN_IMAGE_SIDE:
        raise ValueError(f"height and width must be >= {MIN_IMAGE_SIDE}, got {height}x{width}")
    count = int(rng.integers(min_objects, max_objects + 1))
    placed: list[dict] = []  # SceneObject fields but depth and masks
    full_masks: list[np.ndarray] = []
    for _ in range(count):
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        size = list(SIZES)[rng.integers(len(SIZES))]
        low, high = SIZES[size]
        radius = float(rng.uniform(low, high) * min(height, width))
        for _ in range(_PLACEMENT_TRIES):
            margin = 1.25 * radius
            centre = (float(rng.uniform(margin, width - margin)),
                      float(rng.uniform(margin, height - margin)))
            full = shape_mask(shape, centre=centre, radius=radius, height=height, width=width)
            masks = [*full_masks, full]
            if all(_visible_enough(f, v) for f, v in zip(masks, _visible_masks(masks))):
                placed.append(dict(shape=shape, colour=colour, size=size, centre=centre,
                                   radius=radius))
                full_masks = masks
                break
    objects = tuple(
        SceneObject(**fields, depth=depth, full_mask=full, mask=visible)
        for depth, (fields, full, visible)
        in enumerate(zip(placed, full_masks, _visible_masks(full_masks))))
    return Scene(image=_render(rng, objects, height=height, width=width), objects=objects)


def _visible_masks(full_masks: list[np.ndarray]) -> list[np.ndarray]:
    """Each mask less the union of the masks after it (drawn in front)."""
    visible, in_front = [], np.zeros_like(full_masks[0])
    for full in reversed(full_masks):
        visible.append(full & ~in_front)
        in_front = in_front | full
    return visible[::-1]


def _visible_enough(full: np.ndarray, visible: np.ndarray) -> bool:
    """Whether a shape shows enough of itself; an unoccluded one always does (so the first
    shape of a scene is always placed)."""
    area, full_area = int(visible.sum()), int(full.sum())
    return (area >= min(MIN_VISIBLE_PIXELS, full_area)
            and area >= MIN_VISIBLE_FRACTION * full_area)


def _render(rng: np.random.Generator, objects: tuple[SceneObject, ...], *, height: int,
            width: int) -> np.ndarray:
    """``[H, W, 3]`` uint8: a textured background, each shape's visible pixels in its colour
    with shading, then sensor noise over everything."""
    rows = np.arange(height)[:, None]
    cols = np.arange(width)[None, :]
    # Background: a pale, low-saturation base, stripes at a random angle and blotches
    # (coarse noise upsampled), so that edges in the image are not only the shapes' edges.
    base = rng.uniform(110, 200) + rng.uniform(-18, 18, size=3)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(6, 16)
    stripes = 10 * np.sin(2 * np.pi * (np.cos(angle) * cols + np.sin(angle) * rows) / period)
    coarse = rng.normal(0, 14, size=(4, 4))
    blotches = np.kron(coarse, np.ones((-(-height // 4), -(-width // 4))))[:height, :width]
    image = base + (stripes + blotches)[..., None]
    for obj in objects:
        # A light gradient across the shape, so colour is not one flat value.
        tilt = rng.uniform(-1, 1, size=2) * 25 / max(obj.radius, 1.0)
        shading = tilt[0] * (cols - obj.centre[0]) + tilt[1] * (rows - obj.centre[1])
        painted = np.asarray(COLOURS[obj.colour], np.float64) + shading[..., None]
        image = np.where(obj.mask[..., None], painted, image)
    image = image + rng.normal(0, 6, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
