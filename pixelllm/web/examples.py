"""The example images a page offers one click away, held in memory as PNG bytes.

From a folder the operator names (the demo's held-out scenes, ``demo_out/images``, by default
when they exist), else a few synthetic scenes generated at start-up
(:func:`data_pipelines.synthetic.scenes.sample_scene`, the shapes the demo model learned). The
page asks for them by index only, so no request can name a file.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipelines.images import read_upright_photo
from data_pipelines.synthetic.scenes import sample_scene

SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Example:
    """An example image: ``name``, its ``png`` file bytes and its size."""

    name: str
    png: bytes
    width: int
    height: int


def _example(name: str, image: np.ndarray) -> Example:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return Example(name=name, png=buffer.getvalue(), width=image.shape[1],
                   height=image.shape[0])


def from_folder(folder: Path, *, count: int) -> list[Example]:
    """The first ``count`` images of ``folder`` by name (an unreadable one raises
    :class:`~data_pipelines.images.ImageError` naming it)."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in SUFFIXES)[:count]
    return [_example(path.name, read_upright_photo(path, name=str(path))) for path in files]


def synthetic(*, count: int, size: int = 128, seed: int = 0) -> list[Example]:
    """``count`` generated ``size x size`` scenes of two or three shapes."""
    return [_example(f"scene-{index + 1}.png",
                     sample_scene(np.random.default_rng([seed, index]), height=size, width=size,
                                  min_objects=2, max_objects=3).image)
            for index in range(count)]


def load(folder: Path | None, *, count: int) -> list[Example]:
    """:func:`from_folder` when ``folder`` holds images, else :func:`synthetic`."""
    if folder is not None and Path(folder).is_dir():
        found = from_folder(folder, count=count)
        if found:
            return found
    return synthetic(count=count)
