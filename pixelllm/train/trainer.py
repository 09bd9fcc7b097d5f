"""The training loop: a stage config in, a trained run in its workdir out, resumable at any point.

:func:`train` builds the mesh, the model (initialized from ``config.init``), the stage's trained
set and optimizer, the jitted train step and the input pipeline; resumes from the workdir's
latest complete checkpoint (parameters, optimizer state, counters, the data iterator's
position), then runs ``config.train.steps`` steps, saving every
``config.checkpoint.save_interval_steps`` and at the end. SIGTERM (preemption) finishes the
current step, saves it and returns normally, so the process exits 0.

The workdir holds::

    config.json        the resolved config (after command-line overrides)
    checkpoints/<step>/ params, opt_state, counters (step, skipped steps), data_iterator,
                       metadata; no frozen parameters: every start (a resume too) rebuilds
                       them from the seed and config.init (the public files and the earlier
                       stage's workdir, which must stay in place while this stage runs)
    metrics.jsonl      one line per logged step (pixelllm.train.metrics_writer)

A resumed run reproduces the uninterrupted one exactly: the model is rebuilt from the same seed
and sources, the step's randomness is ``fold_in(seed, step)`` and the data iterator continues
where the checkpoint left it.

**Evaluation.** ``evaluators`` maps a name to an :data:`Evaluator`, ``(model, step) ->
{name: float}``, called every ``config.train.eval_every`` steps (0: never) with the current
model; its scalars are logged as ``eval/<evaluator>/<name>``. Without any, the default computes
the training objective on the data config's evaluation sources
(:class:`~pixelllm.train.eval_loss.EvalLoss`), and with ``config.train.eval_metrics`` also the
paper's task metrics (:class:`~pixelllm.train.evaluation.TaskMetrics`, logged as
``eval/metrics/<source>/<key>``, JSON in ``eval/<step>/``). ``config.train.eval_only`` runs the
evaluators once on the latest checkpoint (or the initialized model when there is none) and
trains nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.sharding import Mesh
from orbax.checkpoint import multihost

from data_pipelines import pipeline as pipeline_lib
from data_pipelines import sam_feature_store
from pixelllm import config_sizes, sharding
from pixelllm.language.tokenizer import load_tokenizer
from pixelllm.language.vocabulary import check_vocabulary
from pixelllm.models.pixel_llm.pixel_llm import PixelLLM
from pixelllm.train import initialize, optimizer, sam_feature_cache, trained_set
from pixelllm.train import train_step as train_step_lib
from pixelllm.train.checkpointing import Checkpointer, PreemptionGuard
from pixelllm.train.eval_loss import EvalLoss
from pixelllm.train.evaluation import TaskMetrics
from pixelllm.train.metrics_writer import MetricsWriter

log = logging.getLogger(__name__)

Evaluator = Callable[[nnx.Module, int], Mapping[str, float]]
CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
# How long processes wait for each other after building the model (reading public files may
# take minutes longer on some hosts).
MODEL_BUILT_TIMEOUT_SECONDS = 3600


def build_mesh(shape: tuple[int, ...]) -> Mesh:
    """``config.mesh_shape`` as a mesh. A single process given a shape without -1 that needs
    fewer devices than it has uses its first ones (a one-device run on a multi-device host);
    several processes always span all devices."""
    devices = jax.devices()
    needed = math.prod(shape)
    if -1 not in shape and needed < len(devices) and jax.process_count() == 1:
        devices = devices[:needed]
    return sharding.make_mesh(tuple(shape), devices)


@dataclasses.dataclass
class _Run:
    """The built parts of a run."""

    mesh: Mesh
    rules: sharding.Rules
    graphdef: nnx.GraphDef
    frozen: nnx.State
    state: train_step_lib.TrainState
    settings: optimizer.OptimizerSettings
    step_fn: train_step_lib.StepFn
    cached_sam_features: bool


def build_model(config: Any) -> tuple[PixelLLM, Mesh, sharding.Rules]:
    """``(model, mesh, rules)``: the run's model as every start builds it, on
    ``config.mesh_shape``'s mesh, seeded with ``config.seed`` and initialized from
    ``config.init`` (the only source of frozen parameters: checkpoints hold the trained ones),
    the data's tokenizer checked against its vocabulary."""
    mesh = build_mesh(config.mesh_shape)
    rules = sharding.rules_from_config(config.sharding.rules)
    model = PixelLLM.from_config(config.model, rngs=nnx.Rngs(config.seed), mesh=mesh,
                                 rules=rules)
    report = initialize.initialize(model, config.init)
    log.info("initial weights by source:\n%s", report.format())
    if config.data.tokenizer:
        check_vocabulary(load_tokenizer(config.data.tokenizer), model.lm.vocab_size,
                         model_source="config.model.language_model.model.vocab_size")
    return model, mesh, rules


def _check_sam_feature_cache(config: Any, model: PixelLLM, trained: nnx.filterlib.Filter,
                             mesh: Mesh, rules: sharding.Rules) -> bool:
    """Whether the run reads cached SAM features; if it does, that they are this model's."""
    cache = pipeline_lib.sam_feature_cache(config.data)
    if cache is None:
        return False
    directory = cache["directory"]
    sam_feature_cache.check_frozen(model, trained)
    store = sam_feature_store.FeatureStore.open(directory)
    sam_feature_cache.check_store(model, mesh, rules, store.metadata, directory=directory)
    log.info("SAM features come from the cache %s (%d entries); SAM's image encoder does not "
             "run in the train step", directory, len(store))
    return True


def _build(config: Any) -> _Run:
    model, mesh, rules = build_model(config)
    trained = trained_set.trained_filter(model, tuple(config.frozen))
    cached_sam_features = _check_sam_feature_cache(config, model, trained, mesh, rules)
    log.info("parameters per module:\n%s",
             trained_set.format_counts(trained_set.parameter_counts(model, trained)))
    unsharded = sharding.unsharded_report(nnx.state(model), mesh, rules)
    if unsharded:
        log.info("large parameters left unsharded: %s", unsharded)
    graphdef, params, frozen = nnx.split(model, trained, ...)
    settings = optimizer.OptimizerSettings.from_config(config.optimizer)
    tx = optimizer.build(settings, params)
    state = train_step_lib.init_train_state(params, tx)
    step_fn = train_step_lib.make_train_step(
        graphdef, state, frozen, tx=tx, mesh=mesh, rules=rules, loss_weights=config.loss,
        batch_size=config.train.batch_size,
        accumulation_steps=config.train.accumulation_steps,
        # The optimizer clips (settings.grad_clip_norm): clipping twice would change nothing
        # but cost a pass over the gradient.
        clip_norm=None, seed=config.seed, cached_sam_features=cached_sam_features)
    # Processes finish building the model at different times; the first collective (placing
    # the state on the mesh) would set up CPU collectives (gloo), which wait only 30 s for
    # the other processes. They meet first at a barrier of JAX's coordination service.
    multihost.get_barrier_sync_fn()(key="pixelllm_model_built",
                                    timeout_ms=MODEL_BUILT_TIMEOUT_SECONDS * 1000)
    return _Run(mesh=mesh, rules=rules, graphdef=graphdef,
                frozen=train_step_lib.place(frozen, mesh, rules),
                state=train_step_lib.place(state, mesh, rules), settings=settings,
                step_fn=step_fn, cached_sam_features=cached_sam_features)


def _saved_items(state: train_step_lib.TrainState) -> dict[str, Any]:
    return {"params": state.params, "opt_state": state.opt_state,
            "counters": {"step": state.step, "nonfinite_in_a_row": state.nonfinite_in_a_row,
                         "skipped": state.skipped}}


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        tree)


def _restore(run: _Run, checkpointer: Checkpointer, *, data_iterator: Any) -> None:
    """Moves ``run`` (and ``data_iterator``) to the latest complete checkpoint, if any."""
    restored = checkpointer.restore_latest(
        _abstract(_saved_items(run.state)), data_iterator=data_iterator)
    if restored is None:
        return
    items = restored.state
    counters = items["counters"]
    run.state = train_step_lib.TrainState(
        step=counters["step"], params=items["params"], opt_state=items["opt_state"],
        nonfinite_in_a_row=counters["nonfinite_in_a_row"], skipped=counters["skipped"])
    log.info("resumed at step %d from %s", restored.step, restored.directory)


def read_config(workdir: epath.PathLike) -> ml_collections.ConfigDict:
    """The resolved config a run wrote to ``<workdir>/config.json`` (JSON lists stand for the
    config's tuples). Raises ``FileNotFoundError`` naming the file when ``workdir`` holds no
    run."""
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; {workdir} is not a training run's "
                                "work dir")
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not a valid config: {error}") from error


def load_trained_model(workdir: epath.PathLike) -> tuple[ml_collections.ConfigDict, PixelLLM,
                                                         int]:
    """``(config, model, step)``: the run in ``workdir`` at its latest complete checkpoint,
    built by :func:`build_model` from its ``config.json``, trained parameters restored. Reads
    only: nothing in the work dir is created or removed, so a running trainer is left alone.
    Raises ``FileNotFoundError`` naming the checkpoints folder when it holds no complete
    checkpoint."""
    config = read_config(workdir)
    directory = epath.Path(workdir) / CHECKPOINTS
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such folder; the run saved no checkpoint")
    model, mesh, rules = build_model(config)
    trained = trained_set.trained_filter(model, tuple(config.frozen))
    params = train_step_lib.place(nnx.state(model, trained), mesh, rules)
    with Checkpointer(directory, read_only=True) as checkpointer:
        restored = checkpointer.restore_latest({"params": _abstract(params)})
    if restored is None:
        raise FileNotFoundError(f"{directory}: holds no complete checkpoint")
    nnx.update(model, restored.state["params"])
    return config, model, restored.step


def _evaluate(run: _Run, evaluators: Mapping[str, Evaluator], step: int) -> dict[str, float]:
    model = nnx.merge(run.graphdef, run.state.params, run.frozen)
    scalars = {}
    for name, evaluate in evaluators.items():
        start = time.perf_counter()
        for key, value in evaluate(model, step).items():
            scalars[f"eval/{name}/{key}"] = float(value)
        scalars[f"eval/{name}/seconds"] = time.perf_counter() - start
    return scalars


def _to_global(batch: Mapping[str, np.ndarray], shardings: Mapping[str, Any]
               ) -> dict[str, jax.Array]:
    """This host's slice of the batch -> global arrays split over the mesh's batch axes."""
    return {key: jax.make_array_from_process_local_data(shardings[key], value)
            for key, value in batch.items()}


def _check(config: Any) -> None:
    # After --config overrides: model and data sizes still agree.
    config_sizes.check(config)
    if config.train.batch_size != config.data.batch_size:
        raise ValueError(f"config.train.batch_size {config.train.batch_size} != "
                         f"config.data.batch_size {config.data.batch_size}: the pipeline "
                         "batches what the step expects")
    if config.train.steps < 1:
        raise ValueError(f"config.train.steps={config.train.steps} must be positive")


def write_config(config: Any, workdir: epath.Path) -> None:
    """The resolved config as ``<workdir>/config.json`` (process 0)."""
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2) + "\n")


def train(config: Any, workdir: epath.PathLike, *,
          evaluators: Mapping[str, Evaluator] | None = None) -> int:
    """Trains (or, with ``config.train.eval_only``, evaluates) the run in ``workdir``.

    Args:
      config: a training config (``configs/stages.py``; fields in the module docstring of
        ``configs/stages.py`` and the README's Training section).
      workdir: the run's folder; an existing run there is resumed.
      evaluators: ``{name: (model, step) -> {scalar name: value}}``; ``None`` uses
        :class:`~pixelllm.train.eval_loss.EvalLoss` on the data config's evaluation sources,
        plus :class:`~pixelllm.train.evaluation.TaskMetrics` when ``config.train.eval_metrics``.

    Returns the step the run stopped at: ``config.train.steps``, or earlier after SIGTERM.

    Raises :class:`~pixelllm.train.train_step.NonFiniteError` after
    ``config.train.max_nonfinite_in_a_row`` consecutive steps with a non-finite loss or
    gradient (the last checkpoint stays the latest).
    """
    _check(config)
    workdir = epath.Path(workdir)
    write_config(config, workdir)
    run = _build(config)
    if evaluators is None:
        evaluators = {"loss": EvalLoss(
            lambda: pipeline_lib.eval_from_config(config.data), mesh=run.mesh,
            rules=run.rules, loss_weights=config.loss)}
        if config.train.get("eval_metrics", False):
            evaluators["metrics"] = TaskMetrics.from_config(config, mesh=run.mesh,
                                                            rules=run.rules, workdir=workdir)
    keep_period = config.checkpoint.keep_period or None
    checkpointer = Checkpointer(workdir / CHECKPOINTS,
                                save_interval_steps=config.checkpoint.save_interval_steps,
                                max_to_keep=config.checkpoint.max_to_keep,
                                keep_period=keep_period)
    with checkpointer:
        if config.train.eval_only:
            _restore(run, checkpointer, data_iterator=None)
            step = int(run.state.step)
            with MetricsWriter(workdir, total_steps=step, initial_step=step,
                               enabled=jax.process_index() == 0) as writer:
                writer.write(step, _evaluate(run, evaluators, step))
            return step
        data_iterator = iter(pipeline_lib.from_config(config.data))
        _restore(run, checkpointer, data_iterator=data_iterator)
        return _loop(config, run, checkpointer, data_iterator, evaluators, workdir)


def _loop(config: Any, run: _Run, checkpointer: Checkpointer, data_iterator: Any,
          evaluators: Mapping[str, Evaluator], workdir: epath.Path) -> int:
    settings, total = config.train, config.train.steps
    schedule = optimizer.learning_rate_schedule(run.settings)
    shardings = train_step_lib.batch_shardings(run.mesh, run.rules,
                                               cached_sam_features=run.cached_sam_features)
    step = int(run.state.step)
    window: list[dict[str, jax.Array]] = []
    window_start = time.perf_counter()
    guard = PreemptionGuard(reached_preemption=checkpointer.reached_preemption)
    with guard, MetricsWriter(workdir, total_steps=total, initial_step=step,
                              enabled=jax.process_index() == 0) as writer:
        while step < total:
            batch = _to_global(next(data_iterator), shardings)
            run.state, metrics = run.step_fn(run.state, run.frozen, batch)
            step += 1
            window.append(metrics)
            train_step_lib.check_nonfinite(run.state,
                                           max_in_a_row=settings.max_nonfinite_in_a_row)
            writer.advance(step)
            if step % settings.log_every == 0 or step == total:
                window_seconds = time.perf_counter() - window_start
                writer.write(step, _window_scalars(window, run.state, schedule,
                                                   seconds=window_seconds,
                                                   batch_size=settings.batch_size))
                window, window_start = [], time.perf_counter()
            if settings.eval_every and step % settings.eval_every == 0:
                writer.write(step, _evaluate(run, evaluators, step))
                window_start = time.perf_counter()
            stop = guard.should_stop(step)
            checkpointer.save(step, _saved_items(run.state),
                              data_iterator=data_iterator,
                              metadata={"examples": step * settings.batch_size},
                              force=stop or step == total)
            if stop:
                log.warning("stopped at step %d on a preemption signal; checkpoint saved", step)
                break
    return step


def _window_scalars(window: list[dict[str, jax.Array]], state: train_step_lib.TrainState,
                    schedule: optax.Schedule, *, seconds: float, batch_size: int
                    ) -> dict[str, float]:
    """The logged scalars of the steps since the last log: each metric's mean over them, the
    learning rate of the last step, timing and the run's skipped steps."""
    values = jax.device_get(window)
    scalars = {name: float(np.mean([metrics[name] for metrics in values]))
               for name in values[0]}
    scalars["skipped"] = float(np.sum([metrics["skipped"] for metrics in values]))
    skipped_total = int(state.skipped)
    # The optimizer's count (updates applied before the last step) sets its learning rate.
    updates_before_last = int(state.step) - skipped_total - (1 - int(values[-1]["skipped"]))
    scalars["learning_rate"] = float(schedule(updates_before_last))
    scalars["skipped_total"] = float(skipped_total)
    scalars["step_seconds"] = seconds / len(window)
    scalars["examples_per_second"] = batch_size * len(window) / seconds
    return scalars
