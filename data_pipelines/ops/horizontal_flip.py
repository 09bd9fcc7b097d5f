"""Random horizontal flip that keeps the text true to the mirrored image.

Mirroring a picture of "the man on the left" makes the text wrong; the official VG augmentation
flipped without touching the words. Two fixes, chosen by ``mode``:

* ``"swap"``: "left" and "right" are exchanged as whole words, case kept ("Left" -> "Right",
  "LEFT" -> "RIGHT"), in the context, expressions and their prompts, narrative captions and
  utterances. Words merely containing them ("leftover", "bright") are left alone.
* ``"skip_sided"``: examples whose texts name a side are never flipped; others flip as drawn.

The image content is mirrored within its valid area (the whole image before the canvas ops, the
unpadded part after them), boxes and trace points are mirrored (``x -> width - x``), and masks
are flipped with the image.
"""

from __future__ import annotations

import re

import numpy as np

from data_pipelines.ops import fields, geometry, registry

MODES = ("swap", "skip_sided")
_SIDE = re.compile(r"\b(left|right)\b", re.IGNORECASE)
_OPPOSITE = {"left": "right", "right": "left"}


def swap_sides(text: str) -> str:
    """``text`` with the words "left" and "right" exchanged, keeping each word's case."""

    def replace(match: re.Match) -> str:
        word = match.group(0)
        other = _OPPOSITE[word.lower()]
        if word.isupper():
            return other.upper()
        if word[0].isupper():
            return other.capitalize()
        return other

    return _SIDE.sub(replace, text)


def names_a_side(text: str) -> bool:
    """Whether ``text`` holds the word "left" or "right" (any case)."""
    return _SIDE.search(text) is not None


def flip(example: fields.Example, *, swap_text: bool) -> fields.Example:
    """``example`` mirrored left-right (always; see :func:`horizontal_flip` for the random op)."""
    width, _ = geometry.image_size(example)
    out = geometry.transform_coordinates(example, scale=(-1.0, 1.0), offset=(width, 0.0))
    out[fields.IMAGE] = _mirror(example[fields.IMAGE], width=width, axis=1)
    if fields.OBJECT_MASKS in example:
        out[fields.OBJECT_MASKS] = _mirror(example[fields.OBJECT_MASKS], width=width, axis=2)
    return fields.map_texts(out, swap_sides) if swap_text else out


def _mirror(array: np.ndarray, *, width: int, axis: int) -> np.ndarray:
    """A copy of ``array`` with its first ``width`` entries along ``axis`` reversed."""
    if width == array.shape[axis]:
        return np.flip(array, axis=axis).copy()
    mirrored = array.copy()
    region = (slice(None),) * axis + (slice(0, width),)
    mirrored[region] = np.flip(array[region], axis=axis)
    return mirrored


@registry.register("horizontal_flip")
def horizontal_flip(*, probability: float = 0.5, mode: str = "swap") -> registry.Op:
    """Flip with ``probability``; ``mode`` says how text naming sides is kept true."""
    if mode not in MODES:
        raise ValueError(f"horizontal_flip: unknown mode {mode!r}; expected one of {MODES}")
    if not 0 <= probability <= 1:
        raise ValueError(f"horizontal_flip: probability {probability} is not in [0, 1]")

    def op(example: fields.Example, rng: np.random.Generator) -> fields.Example:
        # Draw first, so the generator advances the same way whatever the text says.
        if rng.uniform() >= probability:
            return example
        if mode == "skip_sided" and any(names_a_side(t) for t in fields.texts(example)):
            return example
        return flip(example, swap_text=mode == "swap")

    return op
