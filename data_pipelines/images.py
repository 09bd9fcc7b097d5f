"""Reading data set images into one form: uint8 RGB ``[H, W, 3]``, in the stored pixel frame.

Data sets hold whatever their photographers and crawlers produced: grayscale and palette images,
CMYK JPEGs, PNGs with alpha, 16-bit PNGs, and JPEGs whose pixels are stored sideways with an EXIF
orientation tag saying how to turn them for display. Data set annotations (COCO, RefCOCO, Visual
Genome, Localized Narratives: boxes, traces, masks) are in the **stored** pixel frame, the one
TF, TFDS and pycocotools decode (none applies EXIF orientation), so :func:`read_image` and the
builders never rotate. :func:`read_upright_photo` applies the EXIF orientation, for a user's
photo at inference, which has no annotations and is meant to be seen as displayed.

Conversions made by :func:`read_image`:

* Grayscale (``L``), bilevel (``1``) and palette (``P``) images become RGB by repeating or looking
  up the values.
* CMYK becomes RGB with PIL's conversion (no colour management; ICC profiles are ignored, as
  everywhere else in the pipeline).
* Alpha (``RGBA``, ``LA``, ``PA``, palette or RGB transparency) is dropped by default
  (``alpha="drop"``), as the official pipeline's 3-channel ``tf.image.decode_image`` and PIL's
  ``convert("RGB")`` do: a transparent pixel keeps its stored colour. ``alpha="white"``
  composites on white instead (transparent web images are meant to be seen on a page).
* 16-bit grayscale (``I;16*``) and 32-bit integer (``I``, what PIL makes of 16-bit PNGs) images
  are taken as 16-bit intensities and scaled to 8 bit by ``round(v / 257)`` (65535 -> 255),
  values outside ``[0, 65535]`` clipped first.

Other modes (float ``F``, multi-band scientific formats) are refused with :class:`ImageError`.

**Corrupt files.** A missing, unidentifiable or truncated file, a PNG whose chunk checksum or
zlib stream is wrong, and a JPEG whose header or marker structure is damaged
(:mod:`data_pipelines.jpeg_markers`) raise :class:`ImageError`. Damage inside a JPEG's
entropy-coded data that no marker shows decodes to wrong pixels without an error: libjpeg
recovers with a warning that Pillow does not expose.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from data_pipelines import jpeg_markers

# How alpha is removed: dropped as TF's 3-channel decode does, or composited on white.
ALPHA_DROP = "drop"
ALPHA_ON_WHITE = "white"
ALPHA_MODES = (ALPHA_DROP, ALPHA_ON_WHITE)
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_IMAGE_MODES = frozenset({"RGBA", "LA", "PA"})
_PLAIN_MODES = frozenset({"RGB", "L", "1", "P", "CMYK", "YCbCr"})
# What a stored image may be to be kept byte for byte.
_STORABLE_FORMATS = frozenset({"JPEG", "PNG"})
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageError(ValueError):
    """An image that is missing, cannot be decoded or has an unsupported pixel format; names it."""


def read_image(path_or_bytes: str | os.PathLike | bytes, *, name: str,
               alpha: str = ALPHA_DROP) -> np.ndarray:
    """The image as uint8 RGB ``[H, W, 3]`` in its stored frame (see the module docstring).

    Args:
      path_or_bytes: a file path or the encoded file contents.
      name: how errors name the image (usually its path or data set file name).
      alpha: :data:`ALPHA_DROP` or :data:`ALPHA_ON_WHITE`.

    Raises:
      ImageError: the file is missing, truncated, corrupt or of an unsupported mode.
    """
    with _decoded(path_or_bytes, name=name) as image:
        return _to_rgb_array(image, name=name, alpha=alpha)


def read_upright_photo(path_or_bytes: str | os.PathLike | bytes, *, name: str,
                       alpha: str = ALPHA_DROP) -> np.ndarray:
    """A user's photo as uint8 RGB ``[H, W, 3]`` as displayed: EXIF orientation applied, then
    converted as :func:`read_image`. Never for data set images, whose annotations are in the
    stored frame.

    Raises:
      ImageError: as :func:`read_image`, or the EXIF orientation cannot be read.
    """
    with _decoded(path_or_bytes, name=name) as image:
        try:
            upright = ImageOps.exif_transpose(image)
        except (OSError, ValueError, SyntaxError, KeyError, TypeError) as error:
            raise ImageError(f"{name}: cannot apply the EXIF orientation: {error}") from error
        return _to_rgb_array(upright, name=name, alpha=alpha)


def encode_for_storage(path: str | os.PathLike, *, name: str,
                       alpha: str = ALPHA_DROP) -> tuple[bytes, int, int]:
    """``(encoded, height, width)`` of the image at ``path`` ready for a TFDS ``Image`` feature.

    The file's own bytes are kept when they already decode to 8-bit RGB (a JPEG or PNG in RGB
    mode without PNG transparency or 16-bit samples; an EXIF orientation tag is kept and, like
    every reader here, ignored), so storage costs no re-encoding loss; otherwise the image
    converted by :func:`read_image` is stored as PNG (lossless). Either way the image is fully
    decoded once, so a corrupt file fails here, at build time, naming ``name``. ``height`` and
    ``width`` are those of the stored frame.

    Raises:
      ImageError: as :func:`read_image`.
    """
    _check_alpha(alpha)
    raw = _read_bytes(path, name=name)
    with _decoded(raw, name=name) as image:
        if _is_storable_as_is(image, raw):
            return raw, image.height, image.width
        pixels = _to_rgb_array(image, name=name, alpha=alpha)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue(), pixels.shape[0], pixels.shape[1]


def _check_alpha(alpha: str) -> None:
    if alpha not in ALPHA_MODES:
        raise ValueError(f"unknown alpha handling {alpha!r}; expected one of {ALPHA_MODES}")


def _read_bytes(path: str | os.PathLike, *, name: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as error:
        raise ImageError(f"{name}: image file not found: {os.fspath(path)}") from error
    except OSError as error:
        raise ImageError(f"{name}: cannot read image file {os.fspath(path)}: "
                         f"{error.strerror or error}") from error


def _decoded(path_or_bytes: str | os.PathLike | bytes, *, name: str) -> Image.Image:
    """The opened image with its pixels loaded (a context manager), checked for corruption."""
    raw = (bytes(path_or_bytes) if isinstance(path_or_bytes, bytes | bytearray | memoryview)
           else _read_bytes(path_or_bytes, name=name))
    try:
        image = Image.open(io.BytesIO(raw))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageError(f"{name}: not a readable image: {error}") from error
    # Decoding is lazy; a truncated or corrupt file fails only when the pixels are read.
    try:
        image.load()
        if image.format == "JPEG":
            jpeg_markers.check(raw)
    except jpeg_markers.CorruptJpegError as error:
        image.close()
        raise ImageError(f"{name}: corrupt JPEG data: {error}") from error
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        image.close()
        raise ImageError(f"{name}: corrupt or truncated image: {error}") from error
    return image


def _is_storable_as_is(image: Image.Image, raw: bytes) -> bool:
    if image.format not in _STORABLE_FORMATS or image.mode != "RGB":
        return False
    if image.format == "PNG":
        # IHDR is the first chunk: byte 24 is the bit depth (PIL reads 16-bit RGB as mode RGB).
        if not raw.startswith(_PNG_SIGNATURE) or raw[24] != 8:
            return False
        if "transparency" in image.info:
            return False
    return True


def _to_rgb_array(image: Image.Image, *, name: str, alpha: str) -> np.ndarray:
    _check_alpha(alpha)
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        gray = np.round(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    has_alpha = mode in _ALPHA_IMAGE_MODES or "transparency" in image.info
    if has_alpha and alpha == ALPHA_ON_WHITE:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        opacity = rgba[:, :, 3:] / 255.0
        composited = rgba[:, :, :3] * opacity + 255.0 * (1.0 - opacity)
        return np.round(composited).astype(np.uint8)
    if mode not in _PLAIN_MODES and mode not in _ALPHA_IMAGE_MODES:
        raise ImageError(f"{name}: unsupported image mode {mode!r}")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
