"""Prints a config's parameter table from ``nnx.eval_shape``: exact counts, no memory.

  python -m pixelllm.tools.param_table --config=configs/sam.py:vit_h [--depth=2]
  python -m pixelllm.tools.param_table --config=configs/eva02.py:large --config.model.img_size=224

Rows group parameters by the first ``depth`` components of their path; ``trainable`` counts what
the model's ``trainable()`` filter selects where it has one (PixelLLM: every ``nnx.Param`` outside
its frozen modules), else every ``nnx.Param`` (LoRA factors included); ``frozen`` the rest.
"""

from __future__ import annotations

import collections
import importlib

import ml_collections
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from pixelllm.nn import abstract

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file with :variant.",
                                          lock_config=True)
_DEPTH = flags.DEFINE_integer("depth", 2, "Path components per row.")


def build_abstract(config: ml_collections.ConfigDict) -> nnx.Module:
    """The model named by ``config.model_class`` ("module.path.Class"), built abstractly."""
    module_name, class_name = config.model_class.rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), class_name)
    return abstract.build_abstract(lambda rngs: cls.from_config(config.model, rngs=rngs))


def param_rows(model: nnx.Module, depth: int) -> list[tuple[str, int, int]]:
    """``[(path prefix, trainable, frozen)]`` in first-seen order, then a ``total`` row."""
    trainable: dict[str, int] = collections.defaultdict(int)
    frozen: dict[str, int] = collections.defaultdict(int)
    trained_filter = model.trainable() if hasattr(model, "trainable") else nnx.Param
    trained_paths = {path for path, _ in nnx.to_flat_state(nnx.state(model, trained_filter))}
    # Weights only: RNG state (e.g. the dropout streams of stochastic depth) is not a parameter.
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.RngState))):
        prefix = "/".join(str(p) for p in path[:depth])
        size = int(variable.get_value().size)
        (trainable if path in trained_paths else frozen)[prefix] += size
    prefixes = list(dict.fromkeys([*trainable, *frozen]))
    rows = [(p, trainable[p], frozen[p]) for p in prefixes]
    rows.append(("total", sum(trainable.values()), sum(frozen.values())))
    return rows


def format_rows(rows: list[tuple[str, int, int]]) -> str:
    width = max(len(r[0]) for r in rows)
    lines = [f"{'module':<{width}}  {'total':>15}  {'trainable':>15}  {'frozen':>15}"]
    for name, train, froz in rows:
        lines.append(f"{name:<{width}}  {train + froz:>15,}  {train:>15,}  {froz:>15,}")
    return "\n".join(lines)


def main(argv):
    del argv
    print(format_rows(param_rows(build_abstract(_CONFIG.value), _DEPTH.value)))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
