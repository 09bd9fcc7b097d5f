"""The trainer's default evaluator: the training objective on the data config's evaluation sources.

For each evaluation pipeline (``data_pipelines.pipeline.eval_from_config``: one pass, in order),
every loss term's total and normalizer are summed over all batches before dividing, so the
result is the loss of the whole split, not a mean of batch means. The forward pass is the
training one (teacher forcing) with randomness off (no dropout, no drop path).

Scalars: ``<source>/loss/<term>`` and ``<source>/loss/total`` (the objective's weighted total).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pixelllm import sharding
from pixelllm.models.pixel_llm import objective
from pixelllm.nn.losses import LossValue
from pixelllm.train import train_step

Batches = Callable[[], Mapping[str, Any]]


class EvalLoss:
    """An evaluator ``(model, step) -> scalars`` computing the objective on evaluation data.

    Args:
      pipelines: ``() -> {source name: iterable of host-local batches}``, called at every
        evaluation (a fresh pass each time).
      mesh, rules: the run's mesh and logical rules (batches are split over its batch axes).
      loss_weights: ``config.loss``.
    """

    def __init__(self, pipelines: Batches, *, mesh: Mesh, rules: sharding.Rules,
                 loss_weights: Mapping[str, Any]):
        self._pipelines = pipelines
        self._batch_shardings = train_step.batch_shardings(mesh, rules)
        self._weights = dict(loss_weights)
        objective.check_weights(self._weights)
        # Jitted at the first call over that model's graph, which a run's model keeps (a
        # graphdef cannot be a static jit argument: it is not hashable).
        self._terms: Callable[..., dict[str, LossValue]] | None = None

    def __call__(self, model: nnx.Module, step: int) -> dict[str, float]:
        del step
        graphdef, state = nnx.split(model)
        if self._terms is None:
            def terms_of(state: nnx.State, batch: Mapping[str, jax.Array]
                         ) -> dict[str, LossValue]:
                outputs = nnx.merge(graphdef, state)(batch)
                return objective.compute(outputs, batch, self._weights)[1]
            self._terms = jax.jit(terms_of)
        scalars = {}
        for name, batches in self._pipelines().items():
            totals: dict[str, LossValue] | None = None
            for batch in batches:
                batch = {key: jax.make_array_from_process_local_data(
                    self._batch_shardings[key], value) for key, value in batch.items()}
                terms = jax.device_get(self._terms(state, batch))
                totals = terms if totals is None else {
                    term: LossValue(totals[term].total + value.total,
                                    totals[term].normalizer + value.normalizer)
                    for term, value in terms.items()}
            if totals is None:
                raise ValueError(f"evaluation source {name}: the pipeline gave no batch")
            for term, value in totals.items():
                scalars[f"{name}/loss/{term}"] = float(value.mean())
            total = objective.weighted_total(totals, self._weights)
            scalars[f"{name}/loss/total"] = float(np.asarray(total))
        return scalars
