"""The sharded train step: one ``jax.jit`` over the split model state, with explicit shardings.

The model is split once into its graph definition, the trained parameters and everything else
(frozen parameters: SAM, the language model's base weights). The step is a pure function::

    step(state: TrainState, frozen: nnx.State, batch) -> (TrainState, metrics)

jitted with ``jax.jit`` (not ``nnx.jit``, whose module-graph flattening costs tens of
milliseconds per call), in/out shardings from the parameters' logical axes and the config's
rules (:mod:`pixelllm.sharding`), and the train state donated. Gradients are taken with respect
to the trained parameters only: frozen ones enter as constants, so nothing is differentiated
through SAM's image encoder, and the optimizer state covers the trained parameters alone.

Randomness (dropout, drop path) comes from ``fold_in(key(seed), step)``, then the micro-batch
index: reproducible, and (with jax's partitionable threefry) the same on every mesh shape.

Gradient accumulation splits the batch ``[B, ...]`` into ``k`` strided micro-batches
(``batch[j::k]``, so each device keeps its own examples) and runs them through ``lax.scan``.
Every loss term is a :class:`~pixelllm.nn.losses.LossValue`; the step divides each term's
summed total by its normalizer summed over the *whole* batch, so ``k`` micro-batches give the
loss and gradient of one step on the full batch. Those normalizers are known only after every
micro-batch has run its forward pass (dense-captioning slots come from proposals), so with
``k > 1`` a first scan computes them without gradients; jit keeps only what they depend on
(nothing of the language model; the encoders and proposal head when dense captioning is on).

A step whose loss or gradient is not finite leaves parameters and optimizer state unchanged
(the optimizer's own count, hence the learning-rate schedule, does not advance), increments
``skipped`` and ``nonfinite_in_a_row``; :func:`check_nonfinite` raises once too many come in a
row. ``step`` counts batches consumed, skipped ones included.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pixelllm import batch as batch_lib
from pixelllm import sharding
from pixelllm.models.pixel_llm import objective
from pixelllm.nn.losses import LossValue

Metrics = dict[str, jax.Array]
StepFn = Callable[["TrainState", nnx.State, Mapping[str, jax.Array]],
                  tuple["TrainState", Metrics]]


class TrainState(NamedTuple):
    """What a train step updates (a pytree; every leaf a device array).

    Attributes:
      step: int32 ``[]``, batches consumed so far (skipped ones included).
      params: the trained parameters (``PixelLLM.trainable()``), an ``nnx.State``.
      opt_state: the optimizer's state over ``params`` only.
      nonfinite_in_a_row: int32 ``[]``, consecutive steps skipped for a non-finite loss or
        gradient (0 after any finite step).
      skipped: int32 ``[]``, steps skipped in total.
    """
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    nonfinite_in_a_row: jax.Array
    skipped: jax.Array


class NonFiniteError(RuntimeError):
    """Training stopped after too many consecutive non-finite steps."""


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, trained, frozen)``: the trained parameters by the model's ``trainable()``
    filter, and every other variable (frozen towers, LM base weights)."""
    return nnx.split(model, model.trainable(), ...)


def init_train_state(params: nnx.State, tx: optax.GradientTransformation) -> TrainState:
    """A fresh train state at step 0; the optimizer state covers ``params`` only."""
    # Three distinct buffers: the step donates its state, and one buffer cannot be donated twice.
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      nonfinite_in_a_row=jnp.zeros((), jnp.int32),
                      skipped=jnp.zeros((), jnp.int32))


def tree_shardings(tree: Any, mesh: Mesh, rules: sharding.Rules) -> Any:
    """A sharding prefix tree for ``tree`` (real or abstract): every ``nnx.State`` inside
    (parameters, and the optimizer's moments, which keep the parameters' variables and so their
    logical axes) by its logical axes; any other leaf (counters, scalars) replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(
        lambda node: (sharding.state_shardings(node, mesh, rules)
                      if isinstance(node, nnx.State) else replicated),
        tree, is_leaf=lambda node: isinstance(node, nnx.State))


def place(tree: Any, mesh: Mesh, rules: sharding.Rules) -> Any:
    """``tree`` (a train state, frozen parameters) put on ``mesh`` by :func:`tree_shardings`."""
    return jax.device_put(tree, tree_shardings(tree, mesh, rules))


def batch_sharding(mesh: Mesh, rules: sharding.Rules) -> NamedSharding:
    """An array ``[B, ...]`` split over the mesh's batch axes."""
    return NamedSharding(mesh, sharding.logical_to_spec(("batch",), rules, mesh=mesh))


def batch_shardings(mesh: Mesh, rules: sharding.Rules, *, cached_sam_features: bool = False
                    ) -> dict[str, NamedSharding]:
    """Every key of the batch contract (with ``cached_sam_features``, also
    :data:`pixelllm.batch.SAM_FEATURES`) split over its leading (batch) axis."""
    keys = {**batch_lib.SPEC, **(batch_lib.CACHED_SPEC if cached_sam_features else {})}
    return dict.fromkeys(keys, batch_sharding(mesh, rules))


def batch_shards(mesh: Mesh, rules: sharding.Rules) -> int:
    """How many ways the batch axis is split on ``mesh``."""
    axes = sharding.logical_to_spec(("batch",), rules, mesh=mesh)[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[axis] for axis in axes)


def weighted_total(terms: Mapping[str, LossValue], normalizers: Mapping[str, jax.Array],
                   weights: Mapping[str, Any]) -> jax.Array:
    """:func:`objective.weighted_total` of ``terms`` divided by ``normalizers`` (the whole
    batch's, where ``terms`` are one micro-batch's sums)."""
    return objective.weighted_total(
        {name: LossValue(value.total, normalizers[name]) for name, value in terms.items()},
        weights)


def _split_micro_batches(batch: Mapping[str, jax.Array], k: int, mesh: Mesh,
                         rules: sharding.Rules) -> dict[str, jax.Array]:
    """``[B, ...]`` -> ``[k, B/k, ...]`` with micro-batch ``j = batch[j::k]``: each device's
    contiguous examples hold every micro-batch, so the split moves no data."""
    spec = sharding.logical_to_spec(("batch",), rules, mesh=mesh)

    def split(x):
        x = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(None, *spec)))

    return {key: split(value) for key, value in batch.items()}


def make_train_step(graphdef: nnx.GraphDef, state: TrainState, frozen: nnx.State, *,
                    tx: optax.GradientTransformation, mesh: Mesh, rules: sharding.Rules,
                    loss_weights: Mapping[str, Any], batch_size: int,
                    accumulation_steps: int = 1, clip_norm: float | None = None,
                    seed: int = 0, cached_sam_features: bool = False) -> StepFn:
    """The jitted train step ``(state, frozen, batch) -> (state, metrics)``.

    Args:
      graphdef: from :func:`split_model` of the model built with this ``mesh`` and ``rules``.
      state, frozen: real or abstract (``jax.eval_shape``) trees, read for structure, shapes and
        logical axes only; the step's shardings come from them.
      tx: the optimizer (the one that made ``state.opt_state``).
      loss_weights: ``config.loss`` (:mod:`pixelllm.models.pixel_llm.objective`).
      batch_size: the global batch B; ``B`` must split into ``accumulation_steps`` micro-batches
        that each split over the mesh's batch axes.
      clip_norm: clip the gradient to this global norm (None: no clipping).
      seed: the run's seed; step ``s`` draws its randomness from ``fold_in(key(seed), s)``.
      cached_sam_features: batches carry :data:`pixelllm.batch.SAM_FEATURES` (the SAM feature
        cache) and the step does not run SAM's image encoder.

    Call it with ``state`` and ``frozen`` on the mesh (:func:`place`) and every batch in one
    form (host arrays, or ``jax.device_put(batch, batch_shardings(mesh, rules))``): jit's cache
    key includes whether an argument is already on the mesh, so a state fresh from
    :func:`init_train_state` would compile the step once more at step 2.

    ``metrics``: ``loss/<term>`` (each term's total / normalizer over the whole batch),
    ``loss/total``, ``grad_norm`` (before clipping) and ``skipped`` (1 for a skipped step); all
    float32 scalars, replicated.
    """
    weights = dict(loss_weights)
    objective.check_weights(weights)
    k = accumulation_steps
    shards = batch_shards(mesh, rules)
    if k < 1 or batch_size % (k * shards):
        raise ValueError(f"batch_size {batch_size} must split into accumulation_steps {k} "
                         f"micro-batches of a multiple of the {shards} batch shards of mesh "
                         f"{dict(mesh.shape)}")
    base_key = jax.random.key(seed)

    def terms_of(params, frozen, micro_batch, key) -> dict[str, LossValue]:
        model = nnx.merge(graphdef, params, frozen)
        outputs = model(micro_batch, rngs=nnx.Rngs(dropout=key))
        return objective.compute(outputs, micro_batch, weights)[1]

    def loss_and_grads(params, frozen, batch, key):
        """``(total, terms summed over micro-batches, grads)`` of the whole batch."""
        if k == 1:
            def loss_fn(params):
                terms = terms_of(params, frozen, batch, key)
                normalizers = {name: jax.lax.stop_gradient(value.normalizer)
                               for name, value in terms.items()}
                return weighted_total(terms, normalizers, weights), terms
            (total, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            return total, terms, grads

        micro_batches = _split_micro_batches(batch, k, mesh, rules)
        micro_keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(k))

        def add_normalizers(carry, micro):
            terms = terms_of(params, frozen, *micro)
            return jax.tree.map(jnp.add, carry, {n: v.normalizer for n, v in terms.items()}), None

        abstract = jax.eval_shape(terms_of, params, frozen,
                                  jax.tree.map(lambda x: x[0], micro_batches), micro_keys[0])
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract)
        normalizers, _ = jax.lax.scan(add_normalizers, {n: v.normalizer for n, v in zeros.items()},
                                      (micro_batches, micro_keys))
        normalizers = jax.lax.stop_gradient(normalizers)

        def accumulate(carry, micro):
            terms_sum, grads_sum = carry

            def loss_fn(params):
                terms = terms_of(params, frozen, *micro)
                return weighted_total(terms, normalizers, weights), terms
            (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            return (jax.tree.map(jnp.add, terms_sum, terms),
                    jax.tree.map(jnp.add, grads_sum, grads)), None

        zero_grads = jax.tree.map(jnp.zeros_like, params)
        (terms, grads), _ = jax.lax.scan(accumulate, (zeros, zero_grads),
                                         (micro_batches, micro_keys))
        return weighted_total(terms, normalizers, weights), terms, grads

    def step(state: TrainState, frozen: nnx.State, batch: Mapping[str, jax.Array]
             ) -> tuple[TrainState, Metrics]:
        key = jax.random.fold_in(base_key, state.step)
        total, terms, grads = loss_and_grads(state.params, frozen, batch, key)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        if clip_norm is not None:
            scale = jnp.minimum(1.0, clip_norm / jnp.maximum(grad_norm, jnp.finfo(jnp.float32).tiny))
            grads = jax.tree.map(lambda g: g * scale, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        def keep(new, old):
            # A non-finite step keeps the old parameters and optimizer state bit for bit.
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        skipped = (~finite).astype(jnp.int32)
        new_state = TrainState(
            step=state.step + 1, params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            nonfinite_in_a_row=(state.nonfinite_in_a_row + 1) * skipped,
            skipped=state.skipped + skipped)
        metrics = {f"loss/{name}": value.mean() for name, value in terms.items()}
        metrics.update({"loss/total": total, "grad_norm": grad_norm,
                        "skipped": skipped.astype(jnp.float32)})
        return new_state, metrics

    state_sharding = tree_shardings(state, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step,
                   in_shardings=(state_sharding, tree_shardings(frozen, mesh, rules),
                                 batch_shardings(mesh, rules,
                                                 cached_sam_features=cached_sam_features)),
                   out_shardings=(state_sharding, replicated),
                   donate_argnums=0)


def check_nonfinite(state: TrainState, *, max_in_a_row: int) -> None:
    """Raises :class:`NonFiniteError` once ``max_in_a_row`` consecutive steps were skipped for a
    non-finite loss or gradient (reads two scalars from the device)."""
    in_a_row = int(state.nonfinite_in_a_row)
    if in_a_row >= max_in_a_row:
        raise NonFiniteError(
            f"step {int(state.step) - 1}: the loss or gradient was not finite in {in_a_row} "
            f"consecutive steps (limit max_in_a_row={max_in_a_row}; {int(state.skipped)} "
            f"skipped in total); the parameters are those after step "
            f"{int(state.step) - 1 - in_a_row}")
