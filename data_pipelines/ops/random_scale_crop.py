"""Scale jitter and a random crop onto the canvas (the official training augmentation).

As the official ``random_ratio_resize`` + ``fixed_size_crop``: a scale ``s`` is drawn uniformly
from ``[min_scale, max_scale]``, the image is resized (aspect kept) so its longest side is
``canvas * s``, and a random ``canvas x canvas`` window of it (or the whole image along a side
shorter than the canvas) is kept and zero-padded at the bottom and right. Only the kept region is
resampled, so upscaling costs no more than the canvas.

Objects whose box ends up narrower or lower than ``min_box_size`` canvas pixels inside the window
are dropped together with every per-object field: masks, ids, expressions and the context
prompts built from them (the official ``crop`` filtered the text tokens but not the context
tokens, which misaligned "where is ..." prompts from their boxes). Utterances whose trace box
leaves the window lose their trace targets (:mod:`geometry`).
"""

from __future__ import annotations

import numpy as np

from data_pipelines.ops import fields, geometry, registry
from data_pipelines.ops.resize_and_pad import fit_size


@registry.register("random_scale_crop")
def random_scale_crop(*, canvas: int, min_scale: float = 0.75, max_scale: float = 1.25,
                      min_box_size: float = 1.0) -> registry.Op:
    """Random scale in ``[min_scale, max_scale]``, random crop to the canvas, pad.

    The op maps ``{image [h, w, 3], coordinates}`` to ``{image [canvas, canvas, 3], valid_wh
    [2], coordinates in canvas pixels}``.
    """
    if not 0 < min_scale <= max_scale:
        raise ValueError(f"random_scale_crop: need 0 < min_scale <= max_scale, got "
                         f"{min_scale}, {max_scale}")

    def op(example: fields.Example, rng: np.random.Generator) -> fields.Example:
        height, width = example[fields.IMAGE].shape[:2]
        scaled_w, scaled_h = fit_size(width, height, canvas * rng.uniform(min_scale, max_scale))
        crop_w, crop_h = min(canvas, scaled_w), min(canvas, scaled_h)
        left = int(rng.integers(0, scaled_w - crop_w + 1))
        top = int(rng.integers(0, scaled_h - crop_h + 1))
        # The window in source pixels.
        fx, fy = scaled_w / width, scaled_h / height
        source_box = (left / fx, top / fy, (left + crop_w) / fx, (top + crop_h) / fy)
        cropped = geometry.resample(example, size_wh=(crop_w, crop_h), source_box=source_box,
                                    min_box_size=min_box_size)
        return geometry.pad_to_canvas(cropped, canvas=canvas)

    return op
