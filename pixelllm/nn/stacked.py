"""Per-layer modules stacked into one module for ``nnx.scan`` over depth.

A tower with ``scan_layers`` builds its blocks one by one (so both layouts start from the same
weights) and stacks them: every variable gains a leading layer axis, keeps its type (frozen base
weights, LoRA factors and trainable parameters stay what they were) and gets the logical axis
name ``None`` for that axis (layers are never sharded).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
    """Structurally identical modules -> one module whose variables are ``[len(modules), ...]``."""
    graphdef, *_ = nnx.split(modules[0])
    states = [nnx.split(module)[1] for module in modules]
    stacked = jax.tree.map(lambda *values: jnp.stack(values), *states)

    def add_layer_axis(_, variable):
        axes = variable.get_metadata().get("logical_axes")
        return variable if axes is None else variable.replace(logical_axes=(None, *axes))

    return nnx.merge(graphdef, nnx.map_state(add_layer_axis, stacked))


def layer_cache(stacked: dict[str, jax.Array] | None, index: jax.Array
                ) -> dict[str, jax.Array] | None:
    """Layer ``index``'s slice of a stacked cache (``[B, n_layers, ...]`` leaves, batch first as
    the decoding loops need), read inside the scanned body; None passes through."""
    if stacked is None:
        return None
    return {name: jax.lax.dynamic_index_in_dim(value, index, axis=1, keepdims=False)
            for name, value in stacked.items()}


def write_layer_cache(stacked: dict[str, jax.Array] | None, layer: dict[str, jax.Array] | None,
                      index: jax.Array) -> dict[str, jax.Array] | None:
    """``stacked`` with layer ``index``'s slice replaced by ``layer`` (the whole cache is carried
    through the scan and updated in place, not copied to a layer-major layout and back)."""
    if stacked is None:
        return None
    return {name: jax.lax.dynamic_update_index_in_dim(value, layer[name], index, axis=1)
            for name, value in stacked.items()}
