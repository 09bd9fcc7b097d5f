"""The web app's tasks: a request's JSON checked into a :class:`Job`, and a result answered.

A request is a JSON object: ``mode`` (one of :data:`MODES`, the ``pixelllm`` command's
subcommands), ``image`` (the uploaded file's bytes in base64, a ``data:`` URL prefix allowed),
``name`` (the file's name, only echoed back) and the mode's fields: ``prompt`` (caption,
optional), ``expression`` (locate, segment), ``box`` ``[x0, y0, x1, y1]`` or ``points``
``[[x, y], ...]`` (describe; either may also be the text ``"x0,y0,x1,y1"`` / ``"x,y x,y"``), and
``question`` (answer). Every check happens here, before the model is queued, and fails with
:class:`BadRequest` naming the field: the page shows that message.

The answer: ``record``, the JSON the ``pixelllm`` command writes for an image (``image``,
``width``, ``height``, ``task``, ``model``, ``result``), ``overlay``, the result drawn on the
image (:func:`pixelllm.overlay.draw`) as a PNG ``data:`` URL of the image's size, and
``seconds``, the model call's time.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_pipelines.images import ImageError, read_upright_photo
from pixelllm import overlay
from pixelllm.predictor import Predictor, check_box, check_points

MODES = ("caption", "locate", "segment", "describe", "dense", "answer")
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
# Longer texts would only make new token-length buckets (compilations) for nothing a user needs.
MAX_TEXT_CHARACTERS = 200
MAX_NAME_CHARACTERS = 120


class BadRequest(ValueError):
    """Input the page shows as a message; the message names the field."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Limits:
    """What one request may send: ``max_upload_bytes`` of image file, ``max_pixels`` after
    decoding (a small file can hold a huge image)."""

    max_upload_bytes: int = 16 * 2**20
    max_pixels: int = 4096 * 4096


@dataclasses.dataclass(frozen=True, kw_only=True)
class Job:
    """A checked request: ``image`` uint8 RGB ``[H, W, 3]`` (upright) and the predictor's
    ``method`` to call on it with ``arguments`` (per-image lists of one item)."""

    mode: str
    name: str
    image: np.ndarray
    method: str
    arguments: dict[str, Any]

    def run(self, predictor: Predictor) -> Any:
        """The result of :mod:`pixelllm.predictor` that answers the job."""
        return getattr(predictor, self.method)([self.image], **self.arguments)[0]


def parse(request: Any, *, limits: Limits) -> Job:
    """The :class:`Job` of a decoded JSON request; :class:`BadRequest` on any bad field."""
    if not isinstance(request, dict):
        raise BadRequest("request: expected a JSON object")
    mode = request.get("mode")
    if mode not in MODES:
        raise BadRequest(f"mode: {mode!r} is not one of {', '.join(MODES)}")
    name = _name(request.get("name"))
    image = decode_image(request.get("image"), name=name, limits=limits)
    height, width = image.shape[:2]
    if mode == "caption":
        prompt = request.get("prompt")
        method, arguments = "caption", ({} if prompt in (None, "") else
                                        {"prompt": _text(request, "prompt")})
    elif mode in ("locate", "segment"):
        method, arguments = mode, {"expressions": [_text(request, "expression")]}
    elif mode == "describe":
        box, points = request.get("box"), request.get("points")
        if _given(box) == _given(points):
            raise BadRequest("box, points: give a box (drag on the image) or points (click on "
                             "the image), not both and not neither")
        if _given(box):
            box = _checked(check_box, _numbers(box, "box", count=4), width, height, "box")
            method, arguments = "describe_region", {"boxes": [box]}
        else:
            numbers = _numbers(points, "points")
            if len(numbers) % 2:
                raise BadRequest(f"points: {len(numbers)} numbers are not x,y pairs")
            points = _checked(check_points, np.reshape(numbers, (-1, 2)), width, height,
                              "points")
            method, arguments = "describe_region", {"points": [points]}
    elif mode == "dense":
        method, arguments = "dense_caption", {}
    else:
        method, arguments = "answer", {"questions": [_text(request, "question")]}
    return Job(mode=mode, name=name, image=image, method=method, arguments=arguments)


def answer(job: Job, result: Any, *, model: str, seconds: float) -> dict[str, Any]:
    """The response to ``job`` given its ``result`` (module docstring)."""
    height, width = job.image.shape[:2]
    png = io.BytesIO()
    # Level 1: most of a large photo's response time would otherwise go to compression.
    Image.fromarray(overlay.draw(job.image, result.drawing())).save(png, format="PNG",
                                                                    compress_level=1)
    return {
        "record": {"image": job.name, "width": width, "height": height, "task": job.mode,
                   "model": model, "result": result.to_json()},
        "overlay": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode("ascii"),
        "seconds": round(seconds, 4),
    }


def decode_image(data: Any, *, name: str, limits: Limits) -> np.ndarray:
    """The upright uint8 RGB ``[H, W, 3]`` image of base64 ``data``, within ``limits``."""
    if not isinstance(data, str) or not data:
        raise BadRequest("image: no image; upload one or pick an example")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    if len(data) > 4 * (limits.max_upload_bytes // 3 + 1):
        raise BadRequest(f"{name}: the file is over the upload limit of "
                         f"{_megabytes(limits.max_upload_bytes)}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image: not base64 data") from None
    if len(raw) > limits.max_upload_bytes:
        raise BadRequest(f"{name}: {_megabytes(len(raw))} is over the upload limit of "
                         f"{_megabytes(limits.max_upload_bytes)}")
    # The header alone gives the size: a huge image is refused before its pixels are decoded.
    try:
        with Image.open(io.BytesIO(raw)) as header:
            kind, (width, height) = header.format, header.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise BadRequest(f"{name}: not an image; upload a JPEG, PNG or WebP file") from None
    if kind not in IMAGE_FORMATS:
        raise BadRequest(f"{name}: {kind} images are not supported; upload a JPEG, PNG or "
                         "WebP file")
    if width * height > limits.max_pixels:
        raise BadRequest(f"{name}: {width}x{height} pixels is over the limit of "
                         f"{limits.max_pixels / 1e6:.1f} megapixels; resize it first")
    try:
        return read_upright_photo(raw, name=name)
    except ImageError as error:
        raise BadRequest(str(error)) from None


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        return "image"
    return value.strip()[:MAX_NAME_CHARACTERS]


def _text(request: dict, field: str) -> str:
    value = request.get(field)
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"{field}: empty; type some text")
    if len(value) > MAX_TEXT_CHARACTERS:
        raise BadRequest(f"{field}: {len(value)} characters; at most {MAX_TEXT_CHARACTERS}")
    return value.strip()


def _given(value: Any) -> bool:
    return value not in (None, "", [])


def _numbers(value: Any, field: str, *, count: int | None = None) -> list[float]:
    """``value`` (a text of numbers, or a list of numbers or of number lists) flattened."""
    if isinstance(value, str):
        words = value.replace(",", " ").split()
    elif isinstance(value, list):
        words = [v for item in value for v in (item if isinstance(item, list) else [item])]
    else:
        raise BadRequest(f"{field}: expected numbers, got {type(value).__name__}")
    try:
        numbers = [float(word) for word in words if not isinstance(word, bool)]
    except (TypeError, ValueError):
        raise BadRequest(f"{field}: {value!r} is not a list of numbers") from None
    if len(numbers) != len(words) or not numbers or (count is not None and len(numbers) != count):
        raise BadRequest(f"{field}: {value!r}: expected {count or 'some'} numbers")
    return numbers


def _checked(check: Callable[..., np.ndarray], value: Any, width: int, height: int,
             field: str) -> np.ndarray:
    try:
        return check(value, width=width, height=height, name=field)
    except ValueError as error:
        raise BadRequest(str(error)) from None


def _megabytes(count: int) -> str:
    return f"{count / 2**20:.1f} MB"
