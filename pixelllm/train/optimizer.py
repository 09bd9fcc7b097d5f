"""The optimizer of every training stage, as the official trainer builds it.

AdamW (optax, b1 0.9, b2 0.999, eps 1e-8) under scenic's compound schedule
``constant * cosine_decay * linear_warmup``; weight decay on every parameter whose layer slice is
not 1-D (biases, norm scales and offsets are not decayed); per-parameter learning-rate
multipliers: EVA02's layer-wise decay and per-prefix multipliers (the mask adapter at 10x in the
referring-segmentation stage). The optimizer is built over the trained parameters only
(:mod:`pixelllm.train.trained_set`), so frozen ones have no optimizer state.

Parameter paths are ``/``-joined, as ``nnx.to_flat_state`` spells them:
``eva02/blocks/3/attn/q/kernel``, or ``eva02/blocks/attn/q/kernel`` ``[L, ...]`` when EVA02 stores
its blocks stacked for ``nnx.scan``; a stacked parameter gets one multiplier per layer, applied
along its layer axis.

Settings (``config.optimizer``, a mapping or ConfigDict; :meth:`OptimizerSettings.from_config`):

=================  ========================================================================
learning_rate      base learning rate (the schedule's ``constant``)
warmup_steps       linear warm-up length, in updates
total_steps        length of the run; the cosine runs over ``total_steps - warmup_steps``
weight_decay       decoupled AdamW weight decay (times the learning rate, as optax)
b1, b2, eps        Adam moments and epsilon (optax defaults 0.9, 0.999, 1e-8)
layer_decay        None, or EVA02's layer-wise decay (stem x d^(L+1), block i x d^(L-i))
eva02_num_layers   L, EVA02's depth (required with ``layer_decay``; checked against the params)
eva02_path         the EVA02 module's path in the model (``eva02``)
lr_multipliers     ``((regex, multiplier), ...)`` or a mapping; matched at the path's start
                   (``re.match``), first match wins, e.g. ``(("mask_adapter/", 10.0),)``
grad_clip_norm     None, or the global gradient norm to clip to before Adam
=================  ========================================================================
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Path components that hold a tower's layers (EVA02's `blocks`, the transformers' `layers`).
# Followed by an index, a parameter is one layer's; followed by a field name, the list is stored
# stacked for nnx.scan (pixelllm/nn/stacked.py) with the layer on axis 0.
_LAYER_LISTS = ("blocks", "layers")
# EVA02's stem, the official `decay_stem_layers` ('patch_embed.proj', 'pos_embed'). The official
# leaves `cls_token` and the final norm at x1 (they are neither stem nor block).
_EVA02_STEM = ("patch_embed", "pos_embed")
_EVA02_BLOCKS = "blocks"


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerSettings:
    """One stage's optimizer settings; the fields are described in the module docstring."""

    learning_rate: float
    warmup_steps: int
    total_steps: int
    weight_decay: float
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    layer_decay: float | None = None
    eva02_num_layers: int | None = None
    eva02_path: str = "eva02"
    lr_multipliers: tuple[tuple[str, float], ...] = ()
    grad_clip_norm: float | None = None

    def __post_init__(self):
        if self.total_steps <= 0:
            raise ValueError(f"optimizer.total_steps={self.total_steps} must be positive")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(f"optimizer.warmup_steps={self.warmup_steps} must be in "
                             f"[0, total_steps={self.total_steps})")
        if self.layer_decay is not None:
            if not self.layer_decay > 0:
                raise ValueError(f"optimizer.layer_decay={self.layer_decay} must be positive "
                                 "(None turns layer-wise decay off)")
            if not self.eva02_num_layers or self.eva02_num_layers <= 0:
                raise ValueError("optimizer.eva02_num_layers (EVA02's depth) is required with "
                                 f"optimizer.layer_decay={self.layer_decay}")
        for pattern, _ in self.lr_multipliers:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"optimizer.lr_multipliers: bad regex {pattern!r}: {error}"
                                 ) from None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> OptimizerSettings:
        """From ``config.optimizer`` (a mapping or ConfigDict); names unknown or missing fields."""
        given = dict(config)
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(given) - names)
        if unknown:
            raise ValueError(f"optimizer.{unknown[0]} is not an optimizer setting; "
                             f"settings: {sorted(names)}")
        missing = sorted(field.name for field in dataclasses.fields(cls)
                         if field.default is dataclasses.MISSING and field.name not in given)
        if missing:
            raise ValueError(f"optimizer.{missing[0]} is required")
        if "lr_multipliers" in given:
            # dict() reads a mapping and a sequence of pairs alike; ConfigDict keys cannot hold
            # the dots of a regex, so configs write pairs.
            given["lr_multipliers"] = tuple((str(pattern), float(multiplier))
                                            for pattern, multiplier
                                            in dict(given["lr_multipliers"]).items())
        return cls(**given)


def learning_rate_schedule(settings: OptimizerSettings) -> optax.Schedule:
    """Scenic's ``compound`` schedule ``constant * cosine_decay * linear_warmup``, step by step as
    ``scenic/train_lib/lr_schedules.py`` computes it::

        lr(step) = learning_rate * cosine * min(1, step / warmup_steps)
        cosine   = 0.5 * (1 + cos(pi * frac(max(0, step - warmup_steps) / cycle)))
        cycle    = total_steps - warmup_steps

    ``step`` counts updates from 0 (optax's count), so with a warm-up the first update has
    learning rate 0, as in the official run. The cosine restarts after ``total_steps`` (scenic's
    cycle); a run ends there.
    """
    base, warmup = settings.learning_rate, settings.warmup_steps
    cycle = float(settings.total_steps - warmup)

    def schedule(step: jax.Array | int) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        progress = jnp.maximum(0.0, step - warmup) / cycle
        progress = progress - jnp.floor(progress)
        cosine = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * (progress % 1.0))))
        warm = jnp.minimum(1.0, step / warmup) if warmup > 0 else 1.0
        return jnp.asarray(base * cosine * warm, jnp.float32)

    return schedule


def is_stacked(path: str) -> bool:
    """Whether the parameter at ``path`` is a stacked layer list's (its layer on axis 0)."""
    parts = path.split("/")
    return any(name in _LAYER_LISTS and not following.isdigit()
               for name, following in zip(parts, parts[1:]))


def _eva02_layer_decay(settings: OptimizerSettings, path: str) -> np.ndarray:
    """EVA02's layer-wise factor of ``path``: ``()``, or ``[L]`` for a stacked block parameter.
    The official (``optimizer_with_layerwise_decay``, BEiT/MAE style) gives the stem layer id 0,
    block i layer id i + 1, everything else L + 1, and scales by ``d ** (L + 1 - layer_id)``."""
    prefix = settings.eva02_path + "/"
    if settings.layer_decay is None or not path.startswith(prefix):
        return np.asarray(1.0)
    decay, depth = settings.layer_decay, settings.eva02_num_layers
    parts = path[len(prefix):].split("/")
    if parts[0] in _EVA02_STEM:
        return np.asarray(decay ** (depth + 1))
    if parts[0] != _EVA02_BLOCKS or len(parts) < 2:
        return np.asarray(1.0)
    if not parts[1].isdigit():  # stacked: one factor per layer
        return decay ** (depth - np.arange(depth, dtype=np.float64))
    index = int(parts[1])
    if index >= depth:
        raise ValueError(f"parameter {path}: block {index} is beyond "
                         f"optimizer.eva02_num_layers={depth}")
    return np.asarray(decay ** (depth - index))


def multiplier_of(settings: OptimizerSettings, path: str) -> np.ndarray:
    """The learning-rate multiplier of the parameter at ``path``: EVA02's layer-wise factor times
    the first ``lr_multipliers`` entry whose regex matches the path's start (1 if none). Shape
    ``()``, or ``[L]`` (one per layer) for a stacked EVA02 block parameter."""
    prefix = next((multiplier for pattern, multiplier in settings.lr_multipliers
                   if re.match(pattern, path)), 1.0)
    return _eva02_layer_decay(settings, path) * prefix


def learning_rate_of(settings: OptimizerSettings, path: str, step: jax.Array | int) -> jax.Array:
    """The learning rate the parameter at ``path`` trains with at update ``step`` (from 0):
    ``learning_rate * schedule(step) * multiplier``; ``[L]`` for a stacked EVA02 block parameter."""
    return learning_rate_schedule(settings)(step) * jnp.asarray(multiplier_of(settings, path),
                                                                jnp.float32)


def param_path(keypath: tuple[Any, ...]) -> str:
    """A jax key path of a parameter tree (nnx.State or a nested dict) -> ``a/b/0/kernel``."""
    keys = list(keypath)
    # An nnx.Variable leaf flattens to its `value` attribute, which is not part of the name.
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    names = []
    for key in keys:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            names.append(key.name)
        else:
            raise ValueError(f"unsupported key {key!r} in parameter path {keypath!r}")
    return "/".join(names)


def weight_decay_mask(params: Any) -> Any:
    """True for every decayed parameter: the official mask ``ndim != 1`` (scenic's
    ``skip_scale_and_bias_regularization``), taken per layer slice for stacked parameters so both
    layouts decay the same weights."""
    def decayed(keypath, value) -> bool:
        return value.ndim - is_stacked(param_path(keypath)) != 1
    return jax.tree_util.tree_map_with_path(decayed, params)


def _leaf_multipliers(settings: OptimizerSettings, params: Any) -> list[np.ndarray]:
    """One multiplier per leaf of ``params`` in flattening order, broadcastable to the leaf
    (``[L, 1, ...]`` for a stacked EVA02 block parameter); checks EVA02's depth."""
    multipliers, block_indices = [], set()
    blocks = f"{settings.eva02_path}/{_EVA02_BLOCKS}/"
    for keypath, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = param_path(keypath)
        multiplier = multiplier_of(settings, path).astype(np.float32)
        if multiplier.ndim:
            if value.shape[0] != multiplier.shape[0]:
                raise ValueError(f"parameter {path} {tuple(value.shape)}: stacked over "
                                 f"{value.shape[0]} layers, but optimizer.eva02_num_layers="
                                 f"{settings.eva02_num_layers}")
            multiplier = multiplier.reshape(multiplier.shape + (1,) * (value.ndim - 1))
        elif settings.layer_decay is not None and path.startswith(blocks):
            block_indices.add(int(path[len(blocks):].split("/")[0]))
        multipliers.append(multiplier)
    if block_indices and block_indices != set(range(settings.eva02_num_layers)):
        raise ValueError(f"{settings.eva02_path} has blocks {sorted(block_indices)}, but "
                         f"optimizer.eva02_num_layers={settings.eva02_num_layers}")
    return multipliers


def _scale_per_parameter(multipliers: list[np.ndarray]) -> optax.GradientTransformation:
    """Multiplies each leaf's update by its multiplier (no state). Scaling AdamW's update is
    scaling its learning rate: the update is linear in it, weight decay included."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        if len(leaves) != len(multipliers):
            raise ValueError(f"the optimizer was built for {len(multipliers)} parameters, "
                             f"got updates for {len(leaves)}")
        scaled = [leaf * jnp.asarray(m, leaf.dtype) for leaf, m in zip(leaves, multipliers)]
        return jax.tree.unflatten(treedef, scaled), state

    return optax.GradientTransformation(init, update)


def build(settings: OptimizerSettings, params: Any) -> optax.GradientTransformation:
    """The stage's optimizer over ``params``, the trained parameters only (an nnx.State or a
    nested dict; their paths set the multipliers, so init and update must get the same tree)."""
    steps = []
    if settings.grad_clip_norm is not None:
        steps.append(optax.clip_by_global_norm(settings.grad_clip_norm))
    steps.append(optax.adamw(learning_rate_schedule(settings), b1=settings.b1, b2=settings.b2,
                             eps=settings.eps, weight_decay=settings.weight_decay,
                             mask=weight_decay_mask))
    steps.append(_scale_per_parameter(_leaf_multipliers(settings, params)))
    return optax.chain(*steps)
