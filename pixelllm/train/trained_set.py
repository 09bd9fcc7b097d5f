"""Which parameters a training stage trains, and the counts the trainer logs at start.

A stage trains the model's own ``trainable()`` set (PixelLLM: every ``nnx.Param`` outside its
frozen modules; LoRA factors included, language-model base weights never) less the parameters
its ``frozen`` patterns match. Patterns are regexes over ``/``-joined parameter paths
(``eva02/blocks/0/attn/q/kernel``), matched at the path's start (``re.match``): ``eva02/``
freezes EVA02, ``.*lora`` every LoRA factor. The trainer splits the model with the returned filter,
so frozen parameters get no gradient, no update and no optimizer state.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from flax import nnx


def path_string(path: tuple) -> str:
    """An nnx path ``('eva02', 'blocks', 0, 'attn')`` -> ``eva02/blocks/0/attn``."""
    return "/".join(str(part) for part in path)


def _weight_paths(model: nnx.Module) -> list[str]:
    # Weights only: RNG state (e.g. the dropout streams of stochastic depth) is not a parameter.
    return [path_string(path) for path, _ in
            nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.RngState)))]


def trained_filter(model: nnx.Module, frozen: Sequence[str]) -> nnx.filterlib.Filter:
    """``model.trainable()`` less every parameter a pattern of ``frozen`` matches. A pattern that
    matches no weight of the model is refused: a misspelt module name would silently train."""
    patterns = []
    for pattern in frozen:
        try:
            patterns.append(re.compile(pattern))
        except re.error as error:
            raise ValueError(f"frozen: bad regex {pattern!r}: {error}") from None
    paths = _weight_paths(model)
    for pattern in patterns:
        if not any(pattern.match(path) for path in paths):
            modules = sorted({path.split("/")[0] for path in paths})
            raise ValueError(f"frozen pattern {pattern.pattern!r} matches no parameter "
                             f"(top-level modules: {modules})")

    def frozen_by_stage(path: tuple, _) -> bool:
        name = path_string(path)
        return any(pattern.match(name) for pattern in patterns)

    return nnx.All(model.trainable(), nnx.Not(frozen_by_stage))


def parameter_counts(model: nnx.Module, trained: nnx.filterlib.Filter
                     ) -> list[tuple[str, int, int]]:
    """``[(top-level module, trained, frozen)]`` sorted by module, then a ``total`` row;
    every weight counts (frozen base weights included, RNG state not)."""
    trained_paths = {path_string(path) for path, _ in nnx.to_flat_state(nnx.state(model, trained))}
    counts: dict[str, list[int]] = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.RngState))):
        name = path_string(path)
        row = counts.setdefault(name.split("/")[0], [0, 0])
        row[0 if name in trained_paths else 1] += int(variable.get_value().size)
    rows = [(module, trained_count, frozen_count)
            for module, (trained_count, frozen_count) in counts.items()]
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    return rows


def format_counts(rows: list[tuple[str, int, int]]) -> str:
    """The rows of :func:`parameter_counts` as the table the trainer logs at start."""
    width = max(len(row[0]) for row in rows)
    lines = [f"{'module':<{width}}  {'trained':>15}  {'frozen':>15}"]
    lines += [f"{name:<{width}}  {trained:>15,}  {frozen:>15,}" for name, trained, frozen in rows]
    return "\n".join(lines)
