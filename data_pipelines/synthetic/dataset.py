"""A seeded set of synthetic scenes with their annotations and one split per image.

Image ``i`` (id ``i + 1``) is made from its own random stream, seeded by ``(seed, i)``: its
pixels, narrative and expressions do not depend on how many images are made. The split of each
image is drawn once, from ``seed`` alone (a permutation of the ids; the first ones go to
``val``, the next to ``test``, the rest to ``train``), and every format writes the image under
that split, so no image is in two splits of any source.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipelines.synthetic.language import referring_expressions
from data_pipelines.synthetic.narratives import Narration, narrate
from data_pipelines.synthetic.scenes import Scene, sample_scene

SPLITS = ("train", "val", "test")
# Annotator ids drawn for the narratives, as the public files number their annotators.
NUM_ANNOTATORS = 40


@dataclasses.dataclass(frozen=True, kw_only=True)
class SyntheticImage:
    """One image and everything said about it.

    Attributes:
      image_id: its id in every format (> 0).
      split: one of :data:`SPLITS`.
      scene: pixels and shapes.
      narration: the narrative and its trace.
      annotator_id: who "spoke" the narrative.
      expressions: per shape (``scene.objects`` order), the expressions that pick it out alone
        (possibly none).
    """

    image_id: int
    split: str
    scene: Scene
    narration: Narration
    annotator_id: int
    expressions: tuple[tuple[str, ...], ...]


def split_sizes(num_images: int, *, val_fraction: float, test_fraction: float
                ) -> dict[str, int]:
    """Images per split: ``round(fraction * num_images)`` for val and test, at least one for a
    non-zero fraction while train keeps at least one; the rest train."""
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must "
                         "be >= 0 with a sum below 1")
    sizes = {}
    left = num_images
    for split, fraction in (("val", val_fraction), ("test", test_fraction)):
        count = round(fraction * num_images)
        if fraction > 0 and count == 0 and left > 1:
            count = 1
        sizes[split] = min(count, max(left - 1, 0))
        left -= sizes[split]
    return {"train": left, **sizes}


def generate(*, num_images: int, seed: int, height: int = 128, width: int = 128,
             min_objects: int = 3, max_objects: int = 6, val_fraction: float = 0.1,
             test_fraction: float = 0.1) -> list[SyntheticImage]:
    """``num_images`` scenes of ``height x width`` pixels (module docstring), by image id."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    sizes = split_sizes(num_images, val_fraction=val_fraction, test_fraction=test_fraction)
    split_of = np.empty(num_images, object)
    order = np.random.default_rng(seed).permutation(num_images)
    split_of[order[:sizes["val"]]] = "val"
    split_of[order[sizes["val"]:sizes["val"] + sizes["test"]]] = "test"
    split_of[order[sizes["val"] + sizes["test"]:]] = "train"
    images = []
    for index in range(num_images):
        rng = np.random.default_rng([seed, index])
        scene = sample_scene(rng, height=height, width=width, min_objects=min_objects,
                             max_objects=max_objects)
        narration = narrate(scene, rng)
        expressions = tuple(
            tuple(referring_expressions(obj, scene.objects, rng=rng, height=height,
                                        width=width))
            for obj in scene.objects)
        images.append(SyntheticImage(
            image_id=index + 1, split=str(split_of[index]), scene=scene, narration=narration,
            annotator_id=int(rng.integers(NUM_ANNOTATORS)), expressions=expressions))
    return images
