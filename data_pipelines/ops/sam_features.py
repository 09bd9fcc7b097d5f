"""The geometry ops of a source, replayed reproducibly, with the canvas's cached SAM features.

With the SAM feature cache on (``config.data.sam_feature_cache``,
:func:`data_pipelines.pipeline.with_sam_features`), a training source's run of geometry ops
(:data:`GEOMETRY_OPS`) is wrapped by this op: for a decoded image it draws an augmentation
``k`` in ``[0, augmentations)`` from the example's generator, runs the geometry ops with a
generator seeded only by (image, geometry ops, ``k``) (:func:`augmented`), so that canvas is
always the same one, and adds the frozen SAM encoder's output for it, ``sam_features`` float32
``[F, F, C]``, from the store (:mod:`data_pipelines.sam_feature_store`). The cache writer
(:mod:`data_pipelines.sam_feature_plan`) replays the same canvases with :func:`augmented`.

**The price of caching.** With ``augmentations = K`` a source's random flips and crops come
from K fixed draws per image instead of a fresh draw every epoch: over a long run each image is
seen in only K framings. ``augmentations = 1`` with a deterministic chain (``resize_and_pad``)
loses nothing and draws nothing from the example's generator, so the rest of the chain sees the
same randomness as without the cache.

The canvas must depend on the image and the generator only: ``horizontal_flip`` in mode
``"skip_sided"`` (which looks at the texts) is refused.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data_pipelines import sam_feature_store
from data_pipelines.ops import fields, registry
from data_pipelines.sam_feature_store import FeatureStore
from pixelllm.batch import SAM_FEATURES

# The ops that put an image on the canvas: the run the cache replaces in a source's chain.
GEOMETRY_OPS = ("resize_and_pad", "random_scale_crop", "horizontal_flip")
# Those that draw nothing: a run of them makes one canvas per image, whatever K.
DETERMINISTIC_GEOMETRY_OPS = ("resize_and_pad",)


def check_geometry(geometry: Sequence[Mapping[str, Any]]) -> None:
    """Raises ``ValueError`` unless ``geometry`` is a non-empty list of geometry op specs
    (mappings) whose canvas depends on the image and the generator alone."""
    if not geometry:
        raise ValueError("sam_features: no geometry ops to wrap")
    for spec in geometry:
        if not isinstance(spec, Mapping) or spec.get("op") not in GEOMETRY_OPS:
            raise ValueError(f"sam_features: {spec!r} is not a geometry op spec (a mapping "
                             f"naming one of {GEOMETRY_OPS})")
        if spec["op"] == "horizontal_flip" and spec.get("mode", "swap") == "skip_sided":
            raise ValueError("sam_features: horizontal_flip mode 'skip_sided' decides by the "
                             "texts, so the canvas is not a function of the image; use 'swap'")


def augmented(example: fields.Example, geometry_ops: Sequence[registry.Op], *, image_key: str,
              fingerprint: str, augmentation: int) -> fields.Example:
    """``example`` through ``geometry_ops`` with the generator of (``image_key``,
    ``fingerprint``, ``augmentation``): the same canvas for the same image and augmentation,
    whichever record holds the image.

    Args:
      example: a decoded example (``image`` uint8 ``[h, w, 3]``).
      geometry_ops: the built geometry ops (``registry.parse`` of the specs).
      image_key: :func:`~data_pipelines.sam_feature_store.image_key` of the image.
      fingerprint: :func:`~data_pipelines.sam_feature_store.geometry_fingerprint` of the specs.
      augmentation: k, which of the image's fixed augmentations.

    Returns:
      The canvas example (``image`` uint8 ``[canvas, canvas, 3]``, ``valid_wh``, coordinates).
    """
    seed = np.random.SeedSequence([int(image_key, 16), int(fingerprint, 16), augmentation])
    return registry.compose(geometry_ops)(example, np.random.default_rng(seed))


# One open store per directory for the process: a big index is held once, not once per source.
_STORES: dict[tuple[str, int], FeatureStore] = {}
_STORES_LOCK = threading.Lock()


def open_shared(directory: str) -> FeatureStore:
    """The process's :class:`FeatureStore` of ``directory``, opened on first use (reopened
    when its manifest was rewritten)."""
    path = os.path.realpath(directory)
    manifest = os.path.join(path, sam_feature_store.MANIFEST)
    cache_key = (path, os.stat(manifest).st_mtime_ns if os.path.exists(manifest) else -1)
    with _STORES_LOCK:
        if cache_key not in _STORES:
            _STORES[cache_key] = FeatureStore.open(path)
        return _STORES[cache_key]


@registry.register("sam_features")
def sam_features(*, directory: str, geometry: list[dict], augmentations: int = 1
                 ) -> registry.Op:
    """``geometry`` (op specs, e.g. ``[{"op": "random_scale_crop", "canvas": 384}]``) with one
    of ``augmentations`` fixed draws per image, and the canvas's features from the store in
    ``directory``.

    The op maps ``{image [h, w, 3], coordinates}`` to what ``geometry`` makes plus
    ``sam_features`` float32 ``[F, F, C]``. A canvas missing from the store raises
    :class:`~data_pipelines.sam_feature_store.FeatureStoreError` (a stale cache is a
    configuration error, not a bad record).
    """
    if not directory:
        raise ValueError("sam_features: no store directory")
    if augmentations < 1:
        raise ValueError(f"sam_features: augmentations {augmentations} must be >= 1")
    check_geometry(geometry)
    geometry_ops = registry.parse(geometry)
    fingerprint = sam_feature_store.geometry_fingerprint(geometry)
    store: list[FeatureStore] = []  # opened on the first example, not when configs are parsed
    lock = threading.Lock()

    def op(example: fields.Example, rng: np.random.Generator) -> fields.Example:
        if not store:
            with lock:
                if not store:
                    store.append(open_shared(directory))
        key = sam_feature_store.image_key(example[fields.IMAGE])
        k = int(rng.integers(augmentations)) if augmentations > 1 else 0
        out = augmented(example, geometry_ops, image_key=key, fingerprint=fingerprint,
                        augmentation=k)
        features = store[0].get(sam_feature_store.entry_key(key, fingerprint, k))
        return {**out, SAM_FEATURES: features}

    return op
