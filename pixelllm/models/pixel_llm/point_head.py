"""The per-token point head and the EOS box head, and PixelLLM's one coordinate conversion.

**Coordinates.** Heads predict *normalized* coordinates: ``(u, v)`` in ``[0, 1]`` across the
*valid* (unpadded) image area of the canvas, bounded by a sigmoid so a prediction can never leave
the image (the official head is unbounded: ``(v + 1) / 2``). Everything outside the heads (targets,
losses, prompts, outputs) is in canvas pixels, the project convention (README, Conventions):
``x = u * valid_w``, ``y = v * valid_h``. :func:`to_canvas` and :func:`to_normalized` are the only
places that convert.

**Points per token.** ``num_points = K``: with ``K = 2`` the points are the two corners of the box
around the token's word trace (the official choice); with ``K > 2`` they are points sampled along
the trace.

**The EOS box** (referring localization) is read at the position that emits EOS (the last word's
token). ``box_source`` says from what: ``"points"`` (the official, default) takes the min/max of
that token's K points, the very output trace captioning trains, so trace pretraining pretrains
the referring box; ``"box_out"`` (an extension) gives the box its own output layer. Either way
the box is ``(x0, y0, x1, y1)`` with sorted corners, so it is always valid.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from pixelllm import sharding
from pixelllm.nn import layers


def to_canvas(normalized: jax.Array, valid_wh: jax.Array) -> jax.Array:
    """``normalized [..., 2m]`` (x, y pairs in [0, 1] of the valid area) -> canvas pixels.

    ``valid_wh [..., 2]`` broadcasts against the leading axes (add axes for slots/tokens/points).
    """
    scale = jnp.tile(valid_wh, normalized.shape[-1] // 2)
    return normalized * scale


def to_normalized(pixels: jax.Array, valid_wh: jax.Array) -> jax.Array:
    """Inverse of :func:`to_canvas` (no clipping)."""
    scale = jnp.tile(valid_wh, pixels.shape[-1] // 2)
    return pixels / jnp.maximum(scale, 1.0)


class HeadOutput(NamedTuple):
    """``points [..., K, 2]`` and ``box [..., 4]`` (x0, y0, x1, y1), both normalized."""
    points: jax.Array
    box: jax.Array


# Where the EOS box comes from (see the module docstring).
BOX_SOURCES = ("points", "box_out")


class PointHead(nnx.Module):
    """``hidden [..., D]`` -> :class:`HeadOutput`.

    LayerNorm, ``depth`` x (Dense ``hidden_features`` + exact GELU), then one Dense to the
    ``2K`` point coordinates (official: LN eps 1e-6, depth 3, 512); with ``box_source="box_out"``
    one more Dense to the 4 box values.

    With a ``mesh``, each layer's output is constrained to the batch layout (``hidden``'s leading
    axis sharded as ``batch``, features replicated): without it, XLA's partitioner (jax 0.10.2,
    CPU) returned wrong *gradients* here with the batch over ``('data', 'fsdp')`` and the kernels
    over ``('fsdp', 'tensor')``, while the forward pass was right.

    ``dtype`` is the MLP's compute dtype (``param_dtype`` the storage dtype); the LayerNorm
    statistics, the sigmoids and the outputs are float32, as coordinates need.
    """

    def __init__(self, *, in_features: int, num_points: int = 2, hidden_features: int = 512,
                 depth: int = 3, box_source: str = "points", layer_norm_eps: float = 1e-6,
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
                 mesh: Mesh | None = None, rules: sharding.Rules = sharding.DEFAULT_RULES,
                 rngs: nnx.Rngs):
        if num_points < 1:
            raise ValueError(f"point_head.num_points must be >= 1, got {num_points}")
        if box_source not in BOX_SOURCES:
            raise ValueError(f"point_head.box_source {box_source!r}; choose from {BOX_SOURCES}")
        self.num_points = num_points
        self.mesh = mesh
        self.rules = sharding.rules_from_config(rules)
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = layers.layer_norm(in_features, eps=layer_norm_eps, **common)
        widths = [in_features] + [hidden_features] * depth
        self.hidden = nnx.List([layers.linear(a, b, axes=("embed", "mlp"), **common)
                                for a, b in zip(widths[:-1], widths[1:])])
        self.points_out = layers.linear(widths[-1], 2 * num_points, axes=("mlp", None), **common)
        self.box_out = (layers.linear(widths[-1], 4, axes=("mlp", None), **common)
                        if box_source == "box_out" else None)

    def _constrain(self, x: jax.Array) -> jax.Array:
        return sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1), self.mesh, self.rules)

    def __call__(self, hidden: jax.Array) -> HeadOutput:
        x = self.norm(self._constrain(hidden.astype(jnp.float32)))
        for layer in self.hidden:
            x = self._constrain(layers.gelu(layer(x)))
        points = jax.nn.sigmoid(self.points_out(x).astype(jnp.float32))
        points = points.reshape(*x.shape[:-1], self.num_points, 2)
        if self.box_out is None:
            corners = points
        else:
            corners = jax.nn.sigmoid(self.box_out(x).astype(jnp.float32))
            corners = corners.reshape(*x.shape[:-1], 2, 2)
        box = jnp.concatenate([corners.min(axis=-2), corners.max(axis=-2)], axis=-1)
        return HeadOutput(points=points, box=box)
