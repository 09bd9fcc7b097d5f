"""Rematerialization (gradient checkpointing) of a tower's blocks, chosen by name in configs.

Every tower has a ``remat`` field holding one of :data:`REMAT_POLICIES`:

* ``"none"``: no rematerialization; the backward pass keeps every activation.
* ``"full"``: keep only each block's inputs; everything inside is recomputed in the backward pass.
* ``"dots_saveable"``: keep the outputs of matrix multiplications, recompute the cheap
  elementwise work (norms, activations, softmax) around them.
* ``"dots_with_no_batch_dims_saveable"``: keep only the projections (matmuls without batch
  dimensions); attention's batched ``q k^T`` and ``p v`` are recomputed.

Rematerialization changes memory and compute, never values: outputs and gradients are the same
with any policy (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax
from flax import nnx

F = TypeVar("F", bound=Callable)

# jax.checkpoint policy per name; None is jax's default (save nothing but the inputs).
_POLICIES: dict[str, Callable[..., bool] | None] = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_POLICIES = ("none", *_POLICIES)


def check_remat(name: str, *, field: str = "remat") -> str:
    """Returns ``name`` if it is one of :data:`REMAT_POLICIES`; otherwise raises naming ``field``."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"{field}={name!r} is not a remat policy; expected one of "
                         f"{', '.join(repr(p) for p in REMAT_POLICIES)}")
    return name


def remat_policy(name: str) -> Callable[..., bool] | None:
    """The ``jax.checkpoint`` policy for a remat name other than ``"none"``."""
    if check_remat(name) == "none":
        raise ValueError("remat='none' has no checkpoint policy: it means no rematerialization")
    return _POLICIES[name]


def remat(fn: F, name: str, *, static_argnums: int | tuple[int, ...] = ()) -> F:
    """``fn`` rematerialized with ``nnx.remat`` under the named policy; ``fn`` itself for "none".

    ``fn`` takes the module(s) it runs as explicit arguments (``nnx.remat`` refuses bound methods
    and modules captured in closures), e.g. ``remat(lambda block, x: block(x, sin, cos), name)``;
    non-array arguments must be listed in ``static_argnums`` or closed over.
    """
    if check_remat(name) == "none":
        return fn
    # graph_updates=False: the blocks only read their parameters, and merging them back into the
    # caller's Variables fails for frozen ones in the jitted train step (merged from a state
    # traced by the jit but not by the gradient: "Cannot mutate Param from a different trace
    # level"). Random-number counters still advance (tested).
    return nnx.remat(fn, policy=remat_policy(name), static_argnums=static_argnums,
                     graph_updates=False)
