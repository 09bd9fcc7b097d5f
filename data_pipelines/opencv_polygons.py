"""OpenCV's polygon fill (``cv2.fillPoly``, 8-connected, integer vertices), pixel for pixel.

Annotations drawn with OpenCV (ReasonSeg's masks, as LISA's ``get_mask_from_json`` makes them)
are only reproduced exactly by OpenCV's own rasterization, which differs from pycocotools' (and
from any "pixel centre inside the polygon" rule) on the boundary: OpenCV draws every edge as an
8-connected Bresenham line, then fills each scan line between the edges' fixed-point crossings.
This module follows ``modules/imgproc/src/drawing.cpp`` (``CollectPolyEdges``,
``FillEdgeCollection``, ``LineIterator``, ``clipLine``) for ``shift=0`` and ``LINE_8``, so the
data pipeline needs no OpenCV.

``cv2.polylines(mask, [pts], True, value, 1)`` draws the same Bresenham lines that ``fillPoly``
draws first, so one fill gives what LISA's ``polylines`` + ``fillPoly`` pair gives.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# OpenCV's fixed-point scale of x coordinates while filling.
_XY_SHIFT = 16
_XY_ONE = 1 << _XY_SHIFT


def fill_polygon(canvas: np.ndarray, vertices: Sequence[tuple[int, int]], value: int) -> None:
    """Draws the polygon ``vertices`` (``(x, y)`` integer pixels, closed) into ``canvas`` with
    ``value``, as ``cv2.fillPoly(canvas, [np.int32(vertices)], value)`` does.

    Args:
      canvas: uint8 ``[H, W]``, changed in place.
      vertices: one or more integer ``(x, y)`` points; parts outside the canvas are clipped.
      value: the value written into the polygon's pixels.
    """
    height, width = canvas.shape
    points = [(int(x), int(y)) for x, y in vertices]
    if not points:
        raise ValueError("a polygon needs at least one vertex")
    edges = []
    x0, y0 = points[-1]
    for x1, y1 in points:
        for px, py in _line_pixels((x0, y0), (x1, y1), width=width, height=height):
            canvas[py, px] = value
        edge = _scan_edge((x0, y0), (x1, y1), width=width, height=height)
        if edge is not None:
            edges.append(edge)
        x0, y0 = x1, y1
    _fill_edges(canvas, edges, value)


def _trunc_div(a: int, b: int) -> int:
    """C integer division (rounds toward zero), as OpenCV's int64 arithmetic divides."""
    quotient = abs(a) // abs(b)
    return quotient if (a >= 0) == (b >= 0) else -quotient


def _clip_line(width: int, height: int, p1: tuple[int, int], p2: tuple[int, int]
               ) -> tuple[bool, tuple[int, int], tuple[int, int]]:
    """OpenCV's ``clipLine``: the segment cut to the image (by its double-precision steps),
    and whether any of it is inside."""
    right, bottom = width - 1, height - 1
    (x1, y1), (x2, y2) = p1, p2
    if width <= 0 or height <= 0:
        return False, p1, p2
    c1 = (x1 < 0) + (x1 > right) * 2 + (y1 < 0) * 4 + (y1 > bottom) * 8
    c2 = (x2 < 0) + (x2 > right) * 2 + (y2 < 0) * 4 + (y2 > bottom) * 8
    if (c1 & c2) == 0 and (c1 | c2) != 0:
        if c1 & 12:
            a = 0 if c1 < 8 else bottom
            x1 += int(float(a - y1) * (x2 - x1) / (y2 - y1))
            y1 = a
            c1 = (x1 < 0) + (x1 > right) * 2
        if c2 & 12:
            a = 0 if c2 < 8 else bottom
            x2 += int(float(a - y2) * (x2 - x1) / (y2 - y1))
            y2 = a
            c2 = (x2 < 0) + (x2 > right) * 2
        if (c1 & c2) == 0 and (c1 | c2) != 0:
            if c1:
                a = 0 if c1 == 1 else right
                y1 += int(float(a - x1) * (y2 - y1) / (x2 - x1))
                x1 = a
                c1 = 0
            if c2:
                a = 0 if c2 == 1 else right
                y2 += int(float(a - x2) * (y2 - y1) / (x2 - x1))
                x2 = a
                c2 = 0
    return (c1 | c2) == 0, (x1, y1), (x2, y2)


def _outside(point: tuple[int, int], width: int, height: int) -> bool:
    return not (0 <= point[0] < width and 0 <= point[1] < height)


def _line_pixels(p1: tuple[int, int], p2: tuple[int, int], *, width: int, height: int
                 ) -> list[tuple[int, int]]:
    """The ``(x, y)`` pixels of OpenCV's 8-connected ``Line`` (``LineIterator``, left to
    right) from ``p1`` to ``p2``, clipped to the image."""
    if _outside(p1, width, height) or _outside(p2, width, height):
        inside, p1, p2 = _clip_line(width, height, p1, p2)
        if not inside:
            return []
    (x, y), (x2, y2) = p1, p2
    dx, dy = x2 - x, y2 - y
    if dx < 0:
        dx, dy = -dx, -dy
        x, y = x2, y2
    step_y = 1
    if dy < 0:
        dy, step_y = -dy, -1
    steep = dy > dx
    # Along the major axis every step; along the minor one when the error goes negative.
    major, minor = (dy, dx) if steep else (dx, dy)
    major_step = (0, step_y) if steep else (1, 0)
    minor_step = (1, 0) if steep else (0, step_y)
    error = major - 2 * minor
    pixels = []
    for _ in range(major + 1):
        pixels.append((x, y))
        x, y = x + major_step[0], y + major_step[1]
        if error < 0:
            x, y = x + minor_step[0], y + minor_step[1]
            error += 2 * major
        error -= 2 * minor
    return pixels


class _Edge:
    """A non-horizontal edge of the scan conversion: rows ``[y0, y1)``, fixed-point ``x`` at
    the current row and its per-row step ``dx``."""

    __slots__ = ("y0", "y1", "x", "dx")

    def __init__(self, y0: int, y1: int, x: int, dx: int):
        self.y0, self.y1, self.x, self.dx = y0, y1, x, dx


def _scan_edge(p0: tuple[int, int], p1: tuple[int, int], *, width: int, height: int
               ) -> _Edge | None:
    """``CollectPolyEdges``' edge from ``p0`` to ``p1`` (``None`` for a horizontal one): its
    slope is taken from the segment clipped to the image, its rows from the unclipped one."""
    (x0, y0), (x1, y1) = p0, p1
    c0y, c1y = y0, y1
    t0, t1 = p0, p1
    if _outside(t0, width, height) or _outside(t1, width, height):
        _, t0, t1 = _clip_line(width, height, t0, t1)
        if t0[1] != t1[1]:
            c0y, c1y = t0[1], t1[1]
    c0x, c1x = t0[0] << _XY_SHIFT, t1[0] << _XY_SHIFT
    if y0 == y1:
        return None
    dx = _trunc_div(c1x - c0x, c1y - c0y)
    if y0 < y1:
        return _Edge(y0, y1, c0x + (y0 - c0y) * dx, dx)
    return _Edge(y1, y0, c1x + (y1 - c1y) * dx, dx)


def _fill_edges(canvas: np.ndarray, edges: list[_Edge], value: int) -> None:
    """``FillEdgeCollection``: each row filled between consecutive pairs of the active edges
    ordered by x, from ``ceil(left x)`` to ``floor(right x)``."""
    height, width = canvas.shape
    if len(edges) < 2:
        return
    y_min = min(e.y0 for e in edges)
    y_max = max(e.y1 for e in edges)
    ends = [e.x + (e.y1 - e.y0) * e.dx for e in edges]
    x_min = min(min(e.x for e in edges), min(ends))
    x_max = max(max(e.x for e in edges), max(ends))
    if y_max < 0 or y_min >= height or x_max < 0 or x_min >= (width << _XY_SHIFT):
        return
    edges = sorted(edges, key=lambda e: (e.y0, e.x, e.dx))
    y_end = min(y_max, height)
    # Rows above the image draw nothing; every active edge moves one step per row (a closed
    # polygon crosses each row an even number of times, so all are paired), so the state at
    # the first visible row follows directly. Edges tied in x give the same spans in any order.
    y = max(edges[0].y0, 0)
    active = []
    for edge in edges:
        if edge.y0 < y < edge.y1:
            edge.x += (y - edge.y0) * edge.dx
            active.append(edge)
    active.sort(key=lambda e: e.x)
    pending = [e for e in edges if e.y0 >= y]
    next_index = 0
    for y in range(y, y_end):
        walked = []
        position = 0
        while position < len(active) or (next_index < len(pending)
                                         and pending[next_index].y0 == y):
            current = active[position] if position < len(active) else None
            if current is not None and current.y1 == y:
                position += 1
                continue
            incoming = pending[next_index] if next_index < len(pending) else None
            if current is not None and (incoming is None or incoming.y0 > y
                                        or current.x < incoming.x):
                walked.append(current)
                position += 1
            else:
                walked.append(incoming)
                next_index += 1
            if len(walked) % 2 == 0:
                left, right = walked[-2], walked[-1]
                if left.x > right.x:
                    left, right = right, left
                x1 = (left.x + _XY_ONE - 1) >> _XY_SHIFT
                x2 = right.x >> _XY_SHIFT
                if x1 < width and x2 >= 0:
                    canvas[y, max(x1, 0):min(x2, width - 1) + 1] = value
                walked[-2].x += walked[-2].dx
                walked[-1].x += walked[-1].dx
        active = sorted(walked, key=lambda e: e.x)
