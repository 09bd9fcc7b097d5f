"""Putting converted arrays into an NNX model, strictly.

Converters turn a source state dict into ``{"path/to/param": array}`` in the model's own layout
(Flax kernels, NHWC), then call :func:`assign`. Nothing is loaded unless every parameter of the
model is supplied exactly once with the right shape, so a checkpoint of another variant or a
truncated file fails with the offending keys named instead of producing a silently wrong model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: missing, unexpected, mis-shaped or wrongly typed keys,
    or a config that disagrees with the model's; the message starts with the file."""


# What a checkpoint holds: every variable but random-number state (dropout / drop-path streams).
WEIGHTS = nnx.Not(nnx.RngState)


def stored_shape(state_dict: Mapping[str, np.ndarray], key: str, *, rank: int, source: str,
                 family: str) -> tuple[int, ...]:
    """The shape of ``state_dict[key]``, which a ``family`` checkpoint (e.g. "SAM") holds as a
    non-empty ``rank``-d array: converters read their sizes from it. A missing key or another
    rank raises :class:`CheckpointMismatchError` naming ``source`` and the key."""
    if key not in state_dict:
        raise CheckpointMismatchError(f"{source}: {family} key {key} is missing")
    found = tuple(np.shape(state_dict[key]))
    if len(found) != rank or 0 in found:
        raise CheckpointMismatchError(f"{source}: {family} key {key} has shape {found}; a "
                                      f"{family} checkpoint holds a non-empty {rank}-d array "
                                      f"there")
    return found


def stack_depth(state_dict: Mapping[str, np.ndarray], prefix: str) -> int:
    """``1 + max(i)`` over keys ``{prefix}{i}.…`` (0 if none): a stack's depth in a file."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return 1 + max((int(m.group(1)) for k in state_dict if (m := pattern.match(k))), default=-1)


def _join(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def param_shapes(model: nnx.Module, wrt: nnx.filterlib.Filter = WEIGHTS
                 ) -> dict[str, tuple[int, ...]]:
    """``{"path/to/param": shape}`` for every variable of ``model`` selected by ``wrt``."""
    return {_join(path): tuple(v.get_value().shape)
            for path, v in nnx.to_flat_state(nnx.state(model, wrt))}


_SHOWN = 20


def _listing(title: str, keys: list[str], fmt) -> list[str]:
    """One message line: ``"  {n} {title}: k1, k2, ..."``, at most ``_SHOWN`` keys named."""
    if not keys:
        return []
    more = f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return [f"  {len(keys)} {title}: " + ", ".join(fmt(k) for k in keys[:_SHOWN]) + more]


def check_keys(*, source: str, expected: Mapping[str, tuple[int, ...]],
               found: Mapping[str, tuple[int, ...]], what: str = "keys") -> None:
    """Raises :class:`CheckpointMismatchError` naming every missing, unexpected and mis-shaped key.

    ``expected`` and ``found`` map a key to its shape; ``source`` names the file for the message.
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(found)
                       if tuple(expected[k]) != tuple(found[k]))
    lines = (_listing(f"missing {what}", missing, str)
             + _listing(f"unexpected {what}", unexpected, str)
             + _listing(f"mis-shaped {what}", misshaped, lambda k: (
                 f"{k} (checkpoint {tuple(found[k])}, model {tuple(expected[k])})")))
    if lines:
        raise CheckpointMismatchError("\n".join([f"{source}: checkpoint does not match the model"]
                                                + lines))


# Casting within a kind (float32 <- bfloat16, int32 <- int64) is loading; across kinds it is not:
# integer weights in a float model are a quantized file (int8 plus scales), not values.
_KINDS = (("bool", jnp.bool_), ("integer", jnp.integer), ("floating", jnp.floating),
          ("complex", jnp.complexfloating))


def _kind(dtype: np.dtype) -> str:
    return next((name for name, kind in _KINDS if jnp.issubdtype(dtype, kind)), str(dtype))


def _dtype(value) -> np.dtype:
    """The dtype of an array (numpy or jax, without copying it to the host) or array-like."""
    return np.dtype(value.dtype) if hasattr(value, "dtype") else np.asarray(value).dtype


def check_dtypes(*, source: str, expected: Mapping[str, np.dtype],
                 found: Mapping[str, np.dtype], what: str = "keys") -> None:
    """Raises :class:`CheckpointMismatchError` naming ``source`` and every key whose ``found``
    dtype is of another kind (bool, integer, floating, complex) than its ``expected`` one."""
    wrong = sorted(k for k in set(expected) & set(found)
                   if _kind(np.dtype(found[k])) != _kind(np.dtype(expected[k])))
    lines = _listing(f"{what} of another dtype kind (a quantized or non-weight file?)", wrong,
                     lambda k: f"{k} (checkpoint {found[k]}, model {expected[k]})")
    if lines:
        raise CheckpointMismatchError("\n".join([f"{source}: checkpoint does not match the model"]
                                                + lines))


def assign(model: nnx.Module, params: Mapping[str, np.ndarray], *, source: str,
           wrt: nnx.filterlib.Filter = WEIGHTS) -> nnx.Module:
    """Replaces every variable of ``model`` selected by ``wrt`` with ``params`` (in place).

    ``wrt`` narrows what the checkpoint must provide, e.g. ``nnx.All(WEIGHTS,
    nnx.Not(nnx.LoRAParam))`` for a base-model file that has no adapters. Values are cast to each
    variable's dtype within its kind (any float width to a float variable); raises
    :class:`CheckpointMismatchError` naming ``source`` (and leaves the model untouched) unless the
    keys and shapes match exactly and every dtype is of its variable's kind. Returns the model.
    """
    check_keys(source=source, expected=param_shapes(model, wrt),
               found={k: np.shape(v) for k, v in params.items()}, what="parameters")
    state = nnx.state(model, wrt)
    check_dtypes(source=source, found={k: _dtype(v) for k, v in params.items()},
                 expected={_join(path): v.get_value().dtype
                           for path, v in nnx.to_flat_state(state)}, what="parameters")

    def replace(path, variable):
        return variable.replace(jnp.asarray(params[_join(path)], dtype=variable.get_value().dtype))

    nnx.update(model, nnx.map_state(replace, state))
    return model
