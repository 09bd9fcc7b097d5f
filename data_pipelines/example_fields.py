"""Reading a TFDS builder's example (``builder.as_data_source()[split][i]``: numpy arrays and
bytes) in the model-family input code (``lisa_inputs``, ``flmm_inputs``): each field that is
missing or malformed raises ``ValueError`` naming the example's image id and the field."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def text(value: Any) -> str:
    """A string field (bytes decoded as UTF-8)."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def texts(values: Any) -> list[str]:
    """A sequence-of-strings field, flattened."""
    return [text(v) for v in np.asarray(values, dtype=object).reshape(-1)]


def field(example: Mapping[str, Any], key: str, image_id: str) -> Any:
    """``example[key]``, or a ``ValueError`` naming the missing field and the ones there are."""
    if key not in example:
        raise ValueError(f"example {image_id}: no field {key!r} (fields: {sorted(example)})")
    return example[key]


def image(example: Mapping[str, Any], image_id: str) -> np.ndarray:
    """The ``image`` field, checked to be uint8 ``[H, W, 3]``."""
    pixels = np.asarray(field(example, "image", image_id))
    if pixels.ndim != 3 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"example {image_id}: field 'image' must be uint8 [H, W, 3], got "
                         f"{pixels.dtype} {list(pixels.shape)}")
    return pixels


def image_id(example: Mapping[str, Any]) -> str:
    """The ``image/id`` field as text."""
    if "image/id" not in example:
        raise ValueError(f"example without field 'image/id' (fields: {sorted(example)})")
    return text(example["image/id"])
