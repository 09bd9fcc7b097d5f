"""Putting converted arrays into an NNX model, strictly.

Converters turn a source state dict into ``{"path/to/param": array}`` in the model's own layout
(Flax kernels, NHWC), then call :func:`assign`. Nothing is loaded unless every parameter of the
model is supplied exactly once with the right shape, so a checkpoint of another variant or a
truncated file fails with the offending keys named instead of producing a silently wrong model.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: missing, unexpected or mis-shaped keys."""


# What a checkpoint holds: every variable but random-number state (dropout / drop-path streams).
WEIGHTS = nnx.Not(nnx.RngState)


def _join(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def param_shapes(model: nnx.Module, wrt: nnx.filterlib.Filter = WEIGHTS
                 ) -> dict[str, tuple[int, ...]]:
    """``{"path/to/param": shape}`` for every variable of ``model`` selected by ``wrt``."""
    return {_join(path): tuple(v.get_value().shape)
            for path, v in nnx.to_flat_state(nnx.state(model, wrt))}


def check_keys(*, source: str, expected: Mapping[str, tuple[int, ...]],
               found: Mapping[str, tuple[int, ...]], what: str = "keys") -> None:
    """Raises :class:`CheckpointMismatchError` naming every missing, unexpected and mis-shaped key.

    ``expected`` and ``found`` map a key to its shape; ``source`` names the file for the message.
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(found)
                       if tuple(expected[k]) != tuple(found[k]))
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{source}: checkpoint does not match the model"]

    def listing(title, keys, fmt):
        if keys:
            shown = keys[:20]
            lines.append(f"  {len(keys)} {title} {what}: " + ", ".join(fmt(k) for k in shown)
                         + (f", ... ({len(keys) - len(shown)} more)" if len(keys) > len(shown) else ""))

    listing("missing", missing, str)
    listing("unexpected", unexpected, str)
    listing("mis-shaped", misshaped,
            lambda k: f"{k} (checkpoint {tuple(found[k])}, model {tuple(expected[k])})")
    raise CheckpointMismatchError("\n".join(lines))


def assign(model: nnx.Module, params: Mapping[str, np.ndarray], *, source: str,
           wrt: nnx.filterlib.Filter = WEIGHTS) -> nnx.Module:
    """Replaces every variable of ``model`` selected by ``wrt`` with ``params`` (in place).

    ``wrt`` narrows what the checkpoint must provide, e.g. ``nnx.All(WEIGHTS,
    nnx.Not(nnx.LoRAParam))`` for a base-model file that has no adapters. Values are cast to each
    variable's dtype. Raises :class:`CheckpointMismatchError` (and leaves the model untouched)
    unless the keys and shapes match exactly. Returns the model.
    """
    check_keys(source=source, expected=param_shapes(model, wrt),
               found={k: np.shape(v) for k, v in params.items()}, what="parameters")
    state = nnx.state(model, wrt)

    def replace(path, variable):
        return variable.replace(jnp.asarray(params[_join(path)], dtype=variable.get_value().dtype))

    nnx.update(model, nnx.map_state(replace, state))
    return model
