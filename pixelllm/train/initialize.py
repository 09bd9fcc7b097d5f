"""A training stage's starting weights, from several sources at once, and where each came from.

``config.init`` names the sources (``""`` = none):

==============  ===============================================================================
sam             SAM's public file (``sam_vit_h_4b8939.pth`` or a Hugging Face folder) -> ``sam/``
eva02           EVA02's public file (timm or BAAI) -> ``eva02/``
language_model  the language model's Hugging Face folder -> its frozen base weights in ``lm/``
tokenizer       the tokenizer the data is encoded with, checked against the model's vocabulary
checkpoint      an earlier stage's work dir: the latest step in its ``checkpoints/`` folder
==============  ===============================================================================

The public files go through :func:`pixelllm.models.pixel_llm.pretrained.load_pretrained` (the
converters; strict per file). Then the earlier stage's checkpoint: its saved parameters
(``params``, and ``frozen`` where it saved one; never its optimizer state or step) overwrite the
matching parameters of this model, whichever this stage trains or freezes; a parameter the earlier
stage did not have keeps the value it has (e.g. a module new in this stage). A checkpoint array
the model lacks, or of another shape, refuses the whole checkpoint (naming its folder and the
keys) before anything is read: it comes from another model.

The returned :class:`InitReport` says, per parameter, which source its value came from (the last
one that wrote it) and which kept the model's random initialization; the trainer logs it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from pixelllm.checkpoints.assign import CheckpointMismatchError, check_dtypes, check_keys
from pixelllm.models.pixel_llm import pretrained
from pixelllm.models.pixel_llm.pixel_llm import PixelLLM
from pixelllm.nn.lora import FrozenParam
from pixelllm.train.checkpointing import Checkpointer
from pixelllm.train.trained_set import path_string

RANDOM_INIT = "random init"
# Where a training run's checkpoints live inside its work dir.
CHECKPOINTS = "checkpoints"
# The checkpoint items that hold parameters (the optimizer state is not one).
PARAMETER_ITEMS = ("params", "frozen")
FIELDS = ("sam", "eva02", "language_model", "tokenizer", "checkpoint")
# What each public file fills (``load_pretrained``): the module's parameters of that kind.
_PUBLIC_TARGETS = {"sam": ("sam", nnx.Variable), "eva02": ("eva02", nnx.Variable),
                   "language_model": ("lm", FrozenParam)}


@dataclasses.dataclass(frozen=True)
class InitReport:
    """``sources``: every weight's ``/``-joined path -> the source of its value
    (``"sam: <file>"``, ``"checkpoint: <step folder>"``, or :data:`RANDOM_INIT`);
    ``sizes``: path -> number of values."""

    sources: dict[str, str]
    sizes: dict[str, int]

    def rows(self) -> list[tuple[str, str, int, int]]:
        """``[(top-level module, source, arrays, values)]``, sorted by module, then source."""
        rows: dict[tuple[str, str], list[int]] = {}
        for path, source in self.sources.items():
            row = rows.setdefault((path.split("/")[0], source), [0, 0])
            row[0] += 1
            row[1] += self.sizes[path]
        return [(module, source, arrays, values)
                for (module, source), (arrays, values) in sorted(rows.items())]

    def random_init(self) -> list[str]:
        """The paths that no source loaded."""
        return sorted(path for path, source in self.sources.items() if source == RANDOM_INIT)

    def format(self) -> str:
        """The rows as the table the trainer logs at start."""
        rows = self.rows()
        module_width = max([len("module")] + [len(row[0]) for row in rows])
        source_width = max([len("source")] + [len(row[1]) for row in rows])
        lines = [f"{'module':<{module_width}}  {'source':<{source_width}}  "
                 f"{'arrays':>7}  {'values':>15}"]
        lines += [f"{module:<{module_width}}  {source:<{source_width}}  {arrays:>7}  "
                  f"{values:>15,}" for module, source, arrays, values in rows]
        return "\n".join(lines)


def _weights(model: nnx.Module) -> dict[str, nnx.Variable]:
    """Every weight variable by path (RNG state is not a weight)."""
    return {path_string(path): variable
            for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.RngState)))}


def initialize(model: PixelLLM, init: Mapping[str, str]) -> InitReport:
    """Loads ``init``'s sources (``config.init``) into ``model`` in place; returns the report.

    Raises ``ValueError`` naming ``init.<field>`` for an unknown field or a checkpoint work dir
    without a complete checkpoint, and :class:`CheckpointMismatchError` naming the file or step
    folder when a source does not fit the model.
    """
    init = dict(init)
    unknown = sorted(set(init) - set(FIELDS))
    if unknown:
        raise ValueError(f"init.{unknown[0]} is not an init source; sources: {list(FIELDS)}")
    given = {field: str(init.get(field) or "") for field in FIELDS}
    weights = _weights(model)
    sources = dict.fromkeys(weights, RANDOM_INIT)

    # The checkpoint is checked against the model first: a wrong work dir fails before the
    # public files (gigabytes) are read.
    plan = _plan_restore(weights, given["checkpoint"]) if given["checkpoint"] else None
    public = {field: given[field] or None for field in ("sam", "eva02", "language_model")}
    pretrained.load_pretrained(model, **public, tokenizer=given["tokenizer"] or None)
    for field, path in public.items():
        if path is None:
            continue
        module, kind = _PUBLIC_TARGETS[field]
        filled = nnx.state(getattr(model, module), nnx.All(kind, nnx.Not(nnx.RngState)))
        for name, _ in nnx.to_flat_state(filled):
            sources[f"{module}/{path_string(name)}"] = f"{field}: {path}"
    if plan is not None:
        for name in _restore(weights, plan):
            sources[name] = f"checkpoint: {plan.step_dir}"
    return InitReport(sources=sources,
                      sizes={path: int(np.prod(variable.get_value().shape))
                             for path, variable in weights.items()})


def _disk_path(keypath: tuple) -> str:
    """An on-disk metadata key path -> the parameter's path (an ``nnx.State`` saves each
    variable as ``{"value": array}``)."""
    names = [str(getattr(key, "key", key)) for key in keypath]
    if names and names[-1] == "value":
        names = names[:-1]
    return "/".join(names)


@dataclasses.dataclass(frozen=True)
class _RestorePlan:
    """What to read from an earlier stage: its latest step and, per parameter item, the restore
    target (the saved tree, leaves abstract arrays of the matching weights)."""

    directory: epath.Path
    step_dir: epath.Path
    targets: dict


def _plan_restore(weights: Mapping[str, nnx.Variable], workdir: str) -> _RestorePlan:
    directory = epath.Path(workdir) / CHECKPOINTS
    # A CheckpointManager creates a missing folder; an absent one is a wrong path here.
    if not directory.is_dir():
        raise ValueError(f"init.checkpoint: {directory} does not exist (expected the work dir "
                         f"of an earlier stage, holding {CHECKPOINTS}/)")
    with Checkpointer(directory) as checkpointer:
        steps = checkpointer.all_steps()
    if not steps:
        raise ValueError(f"init.checkpoint: no complete checkpoint in {directory}")
    step_dir = directory / str(max(steps))
    items = [item for item in PARAMETER_ITEMS if (step_dir / item).is_dir()]
    if not items:
        raise CheckpointMismatchError(f"{step_dir}: holds none of the parameter items "
                                      f"{list(PARAMETER_ITEMS)}")
    return _RestorePlan(directory=directory, step_dir=step_dir,
                        targets={item: _restore_target(weights, step_dir / item)
                                 for item in items})


def _restore(weights: Mapping[str, nnx.Variable], plan: _RestorePlan) -> list[str]:
    """Reads the planned items into ``weights``; returns the paths written."""
    with Checkpointer(plan.directory) as checkpointer:
        restored = checkpointer.restore_latest(plan.targets)
    if restored.directory != plan.step_dir:
        raise ValueError(f"init.checkpoint: {plan.directory} changed while loading "
                         f"({plan.step_dir.name} -> {restored.directory.name}); is a run "
                         "still writing it?")
    written = []
    for tree in restored.state.values():
        for keypath, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
            name = _disk_path(keypath)
            weights[name].set_value(value)
            written.append(name)
    return written


def _restore_target(weights: Mapping[str, nnx.Variable], item_dir: epath.Path):
    """The saved tree of ``item_dir`` with every leaf the matching weight's abstract array (its
    shape, dtype and sharding); refuses arrays the model lacks or has in another shape."""
    saved = ocp.StandardCheckpointHandler().metadata(item_dir).tree
    found = {_disk_path(keypath): meta for keypath, meta
             in jax.tree_util.tree_flatten_with_path(saved)[0]}
    ours = {name: weights[name].get_value() for name in found if name in weights}
    check_keys(source=str(item_dir), expected={name: value.shape for name, value in ours.items()},
               found={name: meta.shape for name, meta in found.items()}, what="arrays")
    check_dtypes(source=str(item_dir), expected={name: value.dtype for name, value in ours.items()},
                 found={name: meta.dtype for name, meta in found.items()}, what="arrays")
    return jax.tree_util.tree_map_with_path(
        lambda keypath, _: _abstract(ours[_disk_path(keypath)]), saved)


def _abstract(value: jax.Array) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=value.sharding)
