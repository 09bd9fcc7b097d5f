"""Reading data set images into one form: uint8 RGB ``[H, W, 3]``, upright.

Data sets hold whatever their photographers and crawlers produced: grayscale and palette images,
CMYK JPEGs, PNGs with alpha, 16-bit PNGs, and JPEGs whose pixels are stored sideways with an EXIF
orientation tag saying how to turn them. Annotations (boxes, traces, masks) are drawn on the image
*as displayed*, i.e. after the EXIF rotation, so every reader must apply it, and the builders store
images that need no further interpretation: a TFDS ``Image`` feature is decoded with a plain
``np.asarray(PIL.Image.open(...))`` (or OpenCV), which neither rotates nor converts.

Conversions made by :func:`read_image`:

* EXIF orientation is applied (``ImageOps.exif_transpose``) first.
* Grayscale (``L``), bilevel (``1``) and palette (``P``) images become RGB by repeating or looking
  up the values.
* CMYK becomes RGB with PIL's conversion (no colour management; ICC profiles are ignored, as
  everywhere else in the pipeline).
* Alpha (``RGBA``, ``LA``, ``PA``, palette or RGB transparency) is composited **on white**, then
  dropped. Transparent areas of web images are meant to be seen on a page, usually white; on
  black, the common dark line art on transparent background would vanish.
* 16-bit grayscale (``I;16*``) and 32-bit integer (``I``, what PIL makes of 16-bit PNGs) images
  are taken as 16-bit intensities and scaled to 8 bit by ``round(v / 257)`` (65535 -> 255),
  values outside ``[0, 65535]`` clipped first.

Other modes (float ``F``, multi-band scientific formats) are refused with :class:`ImageError`.
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# EXIF tag 0x0112; 1 means "stored upright".
_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_PLAIN_MODES = frozenset({"RGB", "L", "1", "P", "CMYK", "YCbCr"})
# What a stored image may be to be kept byte for byte.
_STORABLE_FORMATS = frozenset({"JPEG", "PNG"})
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageError(ValueError):
    """An image that is missing, cannot be decoded or has an unsupported pixel format; names it."""


def read_image(path_or_bytes: str | os.PathLike | bytes, *, name: str) -> np.ndarray:
    """The image as uint8 RGB ``[H, W, 3]``, upright (see the module docstring).

    Args:
      path_or_bytes: a file path or the encoded file contents.
      name: how errors name the image (usually its path or data set file name).

    Raises:
      ImageError: the file is missing, truncated, corrupt or of an unsupported mode.
    """
    with _open(path_or_bytes, name=name) as image:
        return _to_rgb_array(image, name=name)


def encode_for_storage(path: str | os.PathLike, *, name: str) -> tuple[bytes, int, int]:
    """``(encoded, height, width)`` of the image at ``path`` ready for a TFDS ``Image`` feature.

    The file's own bytes are kept when they already decode to upright 8-bit RGB (a JPEG or PNG in
    RGB mode without EXIF rotation, PNG transparency or 16-bit samples), so storage costs no
    re-encoding loss; otherwise the image converted by :func:`read_image` is stored as PNG
    (lossless). Either way the image is fully decoded once, so a corrupt file fails here, at
    build time, naming ``name``. ``height`` and ``width`` are those of the stored image.

    Raises:
      ImageError: as :func:`read_image`.
    """
    raw = _read_bytes(path, name=name)
    with _open(raw, name=name) as image:
        _load(image, name=name)
        if _is_storable_as_is(image, raw):
            return raw, image.height, image.width
        pixels = _to_rgb_array(image, name=name)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue(), pixels.shape[0], pixels.shape[1]


def _read_bytes(path: str | os.PathLike, *, name: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as error:
        raise ImageError(f"{name}: image file not found: {os.fspath(path)}") from error
    except OSError as error:
        raise ImageError(f"{name}: cannot read image file {os.fspath(path)}: "
                         f"{error.strerror or error}") from error


def _open(path_or_bytes: str | os.PathLike | bytes, *, name: str) -> Image.Image:
    source: str | os.PathLike | BinaryIO = path_or_bytes
    if isinstance(path_or_bytes, bytes | bytearray | memoryview):
        source = io.BytesIO(path_or_bytes)
    try:
        return Image.open(source)
    except FileNotFoundError as error:
        raise ImageError(f"{name}: image file not found: {os.fspath(path_or_bytes)}") from error
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageError(f"{name}: not a readable image: {error}") from error


def _load(image: Image.Image, *, name: str) -> None:
    # Decoding is lazy; a truncated or corrupt file fails only when the pixels are read.
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageError(f"{name}: corrupt or truncated image: {error}") from error


def _is_storable_as_is(image: Image.Image, raw: bytes) -> bool:
    if image.format not in _STORABLE_FORMATS or image.mode != "RGB":
        return False
    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        return False
    if image.format == "PNG":
        # IHDR is the first chunk: byte 24 is the bit depth (PIL reads 16-bit RGB as mode RGB).
        if not raw.startswith(_PNG_SIGNATURE) or raw[24] != 8:
            return False
        if "transparency" in image.info:
            return False
    return True


def _to_rgb_array(image: Image.Image, *, name: str) -> np.ndarray:
    _load(image, name=name)
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError) as error:
        raise ImageError(f"{name}: cannot apply the EXIF orientation: {error}") from error
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        gray = np.round(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    has_alpha = mode in _ALPHA_MODES or "transparency" in image.info
    if has_alpha:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[:, :, 3:] / 255.0
        composited = rgba[:, :, :3] * alpha + 255.0 * (1.0 - alpha)
        return np.round(composited).astype(np.uint8)
    if mode not in _PLAIN_MODES:
        raise ImageError(f"{name}: unsupported image mode {mode!r}")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
