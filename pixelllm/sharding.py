"""Logical axis names, their mapping to mesh axes, and the activation-constraint helper.

Every parameter carries a tuple of *logical* axis names in its ``logical_axes`` metadata
(one name or ``None`` per array dimension). The vocabulary is small and fixed:

==============  ===============================================================
``embed``       model width (residual stream channels)
``mlp``         hidden width of feed-forward layers
``heads``       attention heads, flattened with the per-head dimension
``kv``          per-head dimension when it is a separate array axis
``vocab``       token vocabulary
``conv_in``     input channels of a convolution kernel
``conv_out``    output channels of a convolution kernel
``batch``       examples (activations only)
``length``      sequence / token positions (activations only)
==============  ===============================================================

Logical names are turned into mesh axes (``data``, ``fsdp``, ``tensor``) by *rules*: an ordered
list of ``(logical_name, mesh_axis | tuple of mesh axes | None)`` pairs kept in the config
(``config.sharding.rules``). The first rule naming a logical axis wins. A mesh axis is used at
most once per array; a dimension that the assigned mesh axes do not divide evenly is left
replicated and reported, instead of failing deep inside XLA.

The same code path runs on one CPU device (a 1x1x1 mesh) and on a multi-host pod.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LOGICAL_AXES = ("embed", "mlp", "heads", "kv", "vocab", "conv_in", "conv_out", "batch", "length")
MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

# Megatron-style tensor parallelism on the wide dimensions, FSDP on the residual width, and the
# batch over both data-parallel axes.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("length", None),
)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh; one entry of ``shape`` may be -1 (fill with the rest).

    Axes are ``Auto``: shardings come from ``jax.jit`` in/out shardings and
    :func:`constrain`, so models stay free of sharding types.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one entry may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh shape {shape} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, have {len(devices)}")
    return jax.make_mesh(
        tuple(shape), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices)


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules,
                    shape: Sequence[int] | None = None, mesh: Mesh | None = None) -> PartitionSpec:
    """Maps logical names to a PartitionSpec.

    With ``shape`` and ``mesh`` given, a dimension is only sharded when the mesh axes divide it;
    otherwise it stays replicated (see :func:`unsharded_report`).
    """
    rule_map: dict[str, MeshAxes] = {}
    for name, axes in rules:
        if name not in LOGICAL_AXES:
            raise ValueError(f"sharding rule for unknown logical axis {name!r}; known: {LOGICAL_AXES}")
        rule_map.setdefault(name, axes)
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in LOGICAL_AXES:
            raise ValueError(f"unknown logical axis {name!r}; known: {LOGICAL_AXES}")
        axes = rule_map.get(name)
        axes_tuple = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        axes_tuple = tuple(a for a in axes_tuple if a not in used and (mesh is None or a in mesh.shape))
        if shape is not None and mesh is not None and axes_tuple:
            if shape[dim] % math.prod(mesh.shape[a] for a in axes_tuple):
                axes_tuple = ()
        used.update(axes_tuple)
        spec.append(None if not axes_tuple else axes_tuple[0] if len(axes_tuple) == 1 else axes_tuple)
    return PartitionSpec(*spec)


def _logical_axes_of(path: tuple, variable: nnx.Variable) -> tuple[str | None, ...]:
    names = variable.get_metadata().get("logical_axes")
    ndim = len(variable.get_value().shape)
    if names is None:
        names = (None,) * ndim
    if len(names) != ndim:
        raise ValueError(
            f"parameter {'/'.join(map(str, path))} has shape {variable.get_value().shape} but "
            f"logical_axes {names}")
    return tuple(names)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
    """A NamedSharding for every variable in ``state`` (real or abstract), from its logical axes."""

    def one(path, variable):
        spec = logical_to_spec(_logical_axes_of(path, variable), rules,
                               variable.get_value().shape, mesh)
        return NamedSharding(mesh, spec)

    return nnx.map_state(one, state)


@dataclasses.dataclass(frozen=True)
class UnshardedParam:
    path: str
    shape: tuple[int, ...]
    logical_axes: tuple[str | None, ...]


def unsharded_report(state: nnx.State, mesh: Mesh, rules: Rules,
                     min_size: int = 1 << 20) -> list[UnshardedParam]:
    """Parameters of at least ``min_size`` elements that end up fully replicated on a mesh with
    more than one device: the ones that cost memory on every device."""
    if mesh.size == 1:
        return []
    found = []
    for path, variable in nnx.to_flat_state(state):
        shape = tuple(variable.get_value().shape)
        if math.prod(shape) < min_size:
            continue
        axes = _logical_axes_of(path, variable)
        if all(s is None for s in logical_to_spec(axes, rules, shape, mesh)):
            found.append(UnshardedParam("/".join(map(str, path)), shape, axes))
    return found


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules) -> nnx.Module:
    """Places every variable of ``model`` (in place) by its logical axes; returns the model."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def array_shardings(arrays: Any, logical_axes: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a pytree of arrays (e.g. a KV cache) from a matching pytree whose leaves
    are tuples of logical axis names."""
    return jax.tree.map(
        lambda axes, x: NamedSharding(mesh, logical_to_spec(axes, rules, x.shape, mesh)),
        logical_axes, arrays, is_leaf=lambda node: isinstance(node, tuple))


def constrain(x: jax.Array, logical_axes: Sequence[str | None], mesh: Mesh | None,
              rules: Rules) -> jax.Array:
    """Activation sharding constraint by logical names; a no-op without a mesh.

    The one helper models use for activations, so the mapping stays in the config rules.
    """
    if mesh is None or mesh.size == 1:
        return x
    spec = logical_to_spec(logical_axes, rules, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def rules_from_config(config: Mapping[str, Any] | Sequence[Any]) -> tuple[tuple[str, MeshAxes], ...]:
    """Normalizes rules read from a ConfigDict (lists become tuples)."""
    out = []
    for name, axes in config:
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes)
        out.append((name, axes))
    return tuple(out)


def param_count(state: nnx.State) -> int:
    """Total number of elements in ``state`` (works on abstract states from ``nnx.eval_shape``)."""
    return int(sum(np.prod(v.get_value().shape) for _, v in nnx.to_flat_state(state)))
