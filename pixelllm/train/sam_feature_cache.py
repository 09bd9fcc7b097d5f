"""The model side of the SAM feature cache (``config.data.sam_feature_cache``).

Frozen SAM's image encoder is the largest part of PixelLLM (ViT-H, 637M parameters) and gets no
gradient, so its output depends only on the canvas: a store written once
(:mod:`pixelllm.tools.sam_cache`, :mod:`data_pipelines.sam_feature_store`) lets the training
pipeline hand each batch its :data:`pixelllm.batch.SAM_FEATURES` and the train step skip the
encoder. The cached features are SAM's output without drop path (the official trains frozen
SAM with drop path 0.5), so the cache is an improvement switch, off by default.

A store is tied to the SAM it was written with by a *probe*: the writer records SAM's output for
a fixed synthetic canvas (pooled to ``PROBE_POOL x PROBE_POOL``) in the store's metadata, and the
trainer recomputes it before training. Other weights, another canvas or another SAM size give a
different probe and a :class:`SamFeatureCacheError` naming the store, instead of training on
features of another model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from pixelllm import sharding
from pixelllm.models.pixel_llm.pixel_llm import PixelLLM
from pixelllm.train import train_step

# The store metadata's key holding the probe (:func:`probe_signature`).
PROBE_KEY = "sam_probe"
# The probe's features are average-pooled to this many cells per side (x SAM's channels).
PROBE_POOL = 2
# Largest relative L2 distance between the stored and recomputed probes that still counts as
# the same SAM: the writer may have run on other hardware or in bfloat16 (relative error about
# 1e-2), while other weights differ by O(1).
PROBE_TOLERANCE = 0.05


class SamFeatureCacheError(ValueError):
    """A SAM feature store that does not belong to the model being trained."""


def probe_canvas(canvas: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed probe: ``(image [1, canvas, canvas, 3] in 0-255, valid_wh [1, 2])``, a
    seeded pattern with its right quarter as padding (so SAM's padding path counts too)."""
    image = np.random.default_rng(0).uniform(0.0, 255.0, (1, canvas, canvas, 3))
    valid_width = canvas - canvas // 4
    image[:, :, valid_width:] = 0.0
    return image.astype(np.float32), np.array([[valid_width, canvas]], np.float32)


def probe_signature(model: PixelLLM, mesh: Mesh, rules: sharding.Rules) -> dict[str, Any]:
    """SAM's output for :func:`probe_canvas`, pooled, with the canvas and feature sizes: what
    the writer stores under :data:`PROBE_KEY`. Every process of a multi-host run calls it."""
    canvas = model.sam.image_encoder.img_size
    image, valid_wh = probe_canvas(canvas)
    # One copy of the probe per batch shard: the batch axis must split over the mesh.
    copies = train_step.batch_shards(mesh, rules)
    batch = train_step.batch_sharding(mesh, rules)
    image, valid_wh = (jax.make_array_from_callback((copies, *x.shape[1:]), batch,
                                                    lambda index, x=x: np.repeat(
                                                        x, copies, axis=0)[index])
                       for x in (image, valid_wh))
    features = make_encoder(model, mesh, rules)(image, valid_wh)
    features = np.asarray(multihost_utils.process_allgather(features, tiled=True))[0]
    grid, channels = features.shape[0], features.shape[-1]
    cell = grid // PROBE_POOL
    pooled = features[:cell * PROBE_POOL, :cell * PROBE_POOL].reshape(
        PROBE_POOL, cell, PROBE_POOL, cell, channels).mean(axis=(1, 3))
    return {"canvas": canvas, "grid": grid, "channels": channels,
            "pooled": [float(value) for value in pooled.ravel()]}


def check_store(model: PixelLLM, mesh: Mesh, rules: sharding.Rules,
                metadata: Mapping[str, Any], *, directory: str) -> None:
    """Raises :class:`SamFeatureCacheError` naming ``directory`` unless the store's probe
    (``metadata[PROBE_KEY]``) is this model's SAM's."""
    stored = metadata.get(PROBE_KEY)
    if stored is None:
        raise SamFeatureCacheError(f"SAM feature store {directory}: its metadata has no "
                                   f"{PROBE_KEY!r} (not written by pixelllm.tools.sam_cache)")
    ours = probe_signature(model, mesh, rules)
    for field in ("canvas", "grid", "channels"):
        if stored.get(field) != ours[field]:
            raise SamFeatureCacheError(
                f"SAM feature store {directory} was written for SAM {field} "
                f"{stored.get(field)}, this model's is {ours[field]}")
    stored_values = np.asarray(stored["pooled"], np.float64)
    our_values = np.asarray(ours["pooled"], np.float64)
    distance = float(np.linalg.norm(stored_values - our_values)
                     / max(np.linalg.norm(our_values), 1e-12))
    if distance > PROBE_TOLERANCE:
        raise SamFeatureCacheError(
            f"SAM feature store {directory} was written with other SAM weights: its probe "
            f"differs from this model's SAM by {distance:.3g} (relative L2; limit "
            f"{PROBE_TOLERANCE}). Rewrite it with python -m pixelllm.tools.sam_cache and this "
            "run's config.init.sam, or turn config.data.sam_feature_cache off")


def check_frozen(model: PixelLLM, trained: nnx.filterlib.Filter) -> None:
    """Raises :class:`SamFeatureCacheError` if ``trained`` selects any parameter of SAM's image
    encoder: cached features would stop following it."""
    # The filter matches paths from the model's root (the frozen "sam" by name).
    names = ["/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, trained))
             if path[:2] == ("sam", "image_encoder")]
    if names:
        raise SamFeatureCacheError(
            f"config.data.sam_feature_cache is on but this stage trains SAM's image encoder "
            f"({len(names)} arrays, e.g. {names[0]}); cached features need it frozen")


def make_encoder(model: PixelLLM, mesh: Mesh, rules: sharding.Rules
                 ) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """A jitted ``(image [B, H, W, 3], valid_wh [B, 2]) -> SAM features [B, F, F, C]`` float32
    on ``mesh``, the batch split over its batch axes (:func:`train_step.batch_sharding`; pass
    global arrays, e.g. from each process's share of the batch): exactly
    :meth:`PixelLLM.sam_features` without drop path, what the cache stores."""
    graphdef, state = nnx.split(model)
    batch = train_step.batch_sharding(mesh, rules)

    def encode(state, image, valid_wh):
        return nnx.merge(graphdef, state).sam_features(image, valid_wh).astype(jnp.float32)

    encode = jax.jit(encode, in_shardings=(train_step.tree_shardings(state, mesh, rules),
                                           batch, batch), out_shardings=batch)
    return lambda image, valid_wh: encode(state, image, valid_wh)
