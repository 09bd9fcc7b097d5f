"""Aspect-preserving resize onto the square model canvas, zero padding at the bottom and right.

The evaluation transform of every task and the training transform where the official recipe does
not augment (Localized Narratives, scale 1): the longest image side becomes ``canvas * scale``
pixels, the other side keeps the aspect ratio, and the image sits in the top-left corner of a
``canvas x canvas`` zero image. Boxes, traces and masks follow (:mod:`geometry`), and
``valid_wh`` records the unpadded area, which the model uses for its padding mask and to scale
predicted points.
"""

from __future__ import annotations

import numpy as np

from data_pipelines.ops import fields, geometry, registry


def fit_size(width: int, height: int, longest: float) -> tuple[int, int]:
    """``(w, h)`` with the longest side ``round(longest)`` and the aspect ratio kept (each at
    least one pixel)."""
    factor = longest / max(width, height)
    return max(1, round(width * factor)), max(1, round(height * factor))


@registry.register("resize_and_pad")
def resize_and_pad(*, canvas: int, scale: float = 1.0) -> registry.Op:
    """Resize so the longest side is ``canvas * scale`` (``0 < scale <= 1``) and pad.

    The op maps ``{image [h, w, 3], coordinates}`` to ``{image [canvas, canvas, 3], valid_wh
    [2], coordinates in canvas pixels}``.
    """
    if not 0 < scale <= 1:
        raise ValueError(f"resize_and_pad: scale {scale} must be in (0, 1]; larger images do "
                         "not fit the canvas (use random_scale_crop)")

    def op(example: fields.Example, rng: np.random.Generator) -> fields.Example:
        del rng  # deterministic
        height, width = example[fields.IMAGE].shape[:2]
        resized = geometry.resample(example, size_wh=fit_size(width, height, canvas * scale))
        return geometry.pad_to_canvas(resized, canvas=canvas)

    return op
