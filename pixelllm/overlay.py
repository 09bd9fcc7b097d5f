"""A result drawn over its image: word traces, boxes, mask outlines and the caption (Pillow).

Every result of :mod:`pixelllm.predictor` says what to draw as a :class:`Drawing`; :func:`draw`
renders one onto a copy of the image, at the image's size: each trace (a word's points) as a
line through its points with a dot per point, in its own colour, labelled with its word; each
box outlined and labelled; each mask's outline; the text wrapped on a dark band at the bottom.
"""

from __future__ import annotations

import dataclasses
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# Distinct colours, cycled over the traces and boxes (Tableau 10).
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
MASK_COLOUR = (255, 255, 0)


@dataclasses.dataclass(frozen=True)
class Drawing:
    """What to draw, in the image's pixels: ``traces`` ``(label, points [P, 2])``, ``boxes``
    ``(label, box [4])`` (x0, y0, x1, y1), ``masks`` ``[H, W]`` bool, and ``text`` (the
    caption) for the bottom band (empty: no band)."""

    traces: tuple[tuple[str, np.ndarray], ...] = ()
    boxes: tuple[tuple[str, np.ndarray], ...] = ()
    masks: tuple[np.ndarray, ...] = ()
    text: str = ""


def _font(image_height: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(8, image_height // 30))


def _mask_outline(mask: np.ndarray) -> Image.Image:
    """An ``L`` image that is 255 on the mask's boundary pixels."""
    inside = Image.fromarray(np.asarray(mask, np.uint8) * 255)
    return Image.fromarray(np.asarray(inside) - np.asarray(inside.filter(ImageFilter.MinFilter(3))))


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str,
           colour: tuple[int, int, int], font) -> None:
    left, top, right, bottom = draw.textbbox(xy, text, font=font)
    draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=colour)
    draw.text(xy, text, fill=(255, 255, 255), font=font)


def draw(image: np.ndarray, drawing: Drawing) -> np.ndarray:
    """``image`` (uint8 ``[H, W, 3]``) with ``drawing`` drawn on it: a new uint8 ``[H, W, 3]``
    array; ``image`` is left unchanged."""
    canvas = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    height = canvas.height
    font = _font(height)
    line = max(1, height // 150)
    for mask in drawing.masks:
        canvas.paste(Image.new("RGB", canvas.size, MASK_COLOUR), mask=_mask_outline(mask))
    pen = ImageDraw.Draw(canvas)
    for i, (label, box) in enumerate(drawing.boxes):
        colour = PALETTE[i % len(PALETTE)]
        x0, y0, x1, y1 = (float(v) for v in box)
        pen.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        _label(pen, (x0 + line, y0 + line), label, colour, font)
    for i, (label, points) in enumerate(drawing.traces):
        points = np.asarray(points, np.float64).reshape(-1, 2)
        if not len(points):
            continue
        colour = PALETTE[i % len(PALETTE)]
        xy = [tuple(p) for p in points]
        if len(xy) > 1:
            pen.line(xy, fill=colour, width=line)
        radius = line + 1
        for x, y in xy:
            pen.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
        _label(pen, tuple(points.mean(axis=0)), label, colour, font)
    if drawing.text:
        _caption_band(canvas, drawing.text, font)
    return np.asarray(canvas)


def _caption_band(canvas: Image.Image, text: str, font) -> None:
    """``text`` wrapped to the image's width on a dark band along the bottom edge."""
    pen = ImageDraw.Draw(canvas)
    char_width = max(1.0, pen.textlength("x", font=font))
    lines = textwrap.wrap(text, width=max(1, int(canvas.width / char_width) - 1))
    line_height = pen.textbbox((0, 0), "Ag", font=font)[3] + 2
    top = max(0, canvas.height - line_height * len(lines) - 2)
    band = Image.new("RGB", (canvas.width, canvas.height - top), (0, 0, 0))
    canvas.paste(Image.blend(canvas.crop((0, top, canvas.width, canvas.height)), band, 0.6),
                 (0, top))
    for i, text_line in enumerate(lines):
        pen.text((2, top + 1 + i * line_height), text_line, fill=(255, 255, 255), font=font)
