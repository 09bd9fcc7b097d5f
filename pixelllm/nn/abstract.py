"""Building a module abstractly (``nnx.eval_shape``): shapes, dtypes and metadata, no memory.

Under tracing, an ``nnx.Rngs`` counter that is a tracer makes every RNG call cost time linear in
the program traced so far (flax's variable update reads the tracer's ``sharding``, whose error
message walks the whole jaxpr): a 3B-parameter model took minutes to build abstractly. Counters
kept as host (numpy) integers give the same keys (``fold_in(key, count)``) and never become
tracers, and the same build takes seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
from flax import nnx

M = TypeVar("M", bound=nnx.Module)


def host_counted_rngs(seed: int) -> nnx.Rngs:
    """``nnx.Rngs(seed)`` whose call counters are host integers (module docstring)."""
    rngs = nnx.Rngs(seed)
    for _, count in nnx.to_flat_state(nnx.state(rngs, nnx.RngCount)):
        count.set_raw_value(np.zeros(count.get_raw_value().shape, np.uint32))
    return rngs


def build_abstract(make: Callable[[nnx.Rngs], M], *, seed: int = 0) -> M:
    """``make(rngs)`` under ``nnx.eval_shape``: every array a ``jax.ShapeDtypeStruct``."""
    return nnx.eval_shape(lambda: make(host_counted_rngs(seed)))
