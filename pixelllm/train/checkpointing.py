"""Training checkpoints (Orbax): state trees, the data iterator and metadata saved together,
resumed from the latest complete step, and a SIGTERM guard for preemption.

A checkpoint step holds one Orbax item per named state tree (``params``: trained parameters,
``opt_state``, and ``frozen`` only where the frozen parameters cannot be reloaded from the
public files, e.g. a stage initialized from an earlier stage), the grain iterator's position
(``data_iterator``, one JSON file per process) and a JSON ``metadata`` item. Saves are
asynchronous: :meth:`Checkpointer.save` returns once the arrays are copied off the devices (so a
train step may donate them right after) and the iterator position is written; the files are
written in the background and the step becomes visible only when complete (Orbax writes into
``<step>.orbax-checkpoint-tmp-<time>`` and renames it, or on GCS writes ``commit_success.txt``
last), so a process killed mid-save leaves nothing that :meth:`Checkpointer.restore_latest`
would pick.

Preemption: inside :class:`PreemptionGuard`, SIGTERM only sets a flag; the train loop polls
``guard.should_stop(step)`` once per step on every process, saves with ``force=True``, closes
the checkpointer and exits 0.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
from collections.abc import Callable, Mapping
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

from pixelllm.checkpoints.assign import CheckpointMismatchError, check_keys

log = logging.getLogger(__name__)

PyTree = Any
DATA_ITERATOR = "data_iterator"
METADATA = "metadata"
_RESERVED = (DATA_ITERATOR, METADATA)


@dataclasses.dataclass(frozen=True)
class Restored:
    """What :meth:`Checkpointer.restore_latest` found.

    ``state`` holds the requested trees, arrays placed with the target's shardings; the data
    iterator, when one was passed, was moved to the saved position in place.
    """

    step: int
    directory: epath.Path
    state: dict[str, PyTree]
    metadata: dict[str, Any]


def _key_name(entry: Any) -> str:
    # Optax states are named tuples (attribute keys) in the target but dicts in Orbax's metadata,
    # tuples become lists: compare by the bare name or index.
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def _flat(tree: PyTree) -> dict[str, Any]:
    """``{"a/b/0": leaf}`` for every leaf of ``tree``."""
    return {"/".join(_key_name(entry) for entry in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


class Checkpointer:
    """Saves and restores training checkpoints in ``directory`` with an ``ocp.CheckpointManager``.

    Args:
      directory: where step folders go (local path or any path ``etils.epath`` reads, e.g. gs://).
      save_interval_steps: :meth:`save` writes only at multiples of this (and at a preemption
        sync point, or with ``force=True``).
      max_to_keep: keep the latest N checkpoints; ``None`` keeps all.
      keep_period: also keep every step that is a multiple of K forever; ``None`` for none.
      async_save: write in a background thread (Orbax's default); ``False`` blocks in
        :meth:`save` until the step is committed.
      read_only: only restore: nothing in ``directory`` is created, deleted or cleaned up (a
        trainer may be writing there, its temporary folders included), and :meth:`save`
        raises. The keep and interval settings are then unused.
    """

    def __init__(self, directory: epath.PathLike, *, save_interval_steps: int = 1,
                 max_to_keep: int | None = None, keep_period: int | None = None,
                 async_save: bool = True, read_only: bool = False):
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        for name, value in (("max_to_keep", max_to_keep), ("keep_period", keep_period)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        # LatestN(None) keeps everything; EveryNSteps alone would delete the latest step.
        preserve = [checkpoint_managers.LatestN(n=max_to_keep)]
        if keep_period is not None:
            preserve.append(checkpoint_managers.EveryNSteps(interval_steps=keep_period))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=checkpoint_managers.AnySavePolicy([
                checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
                checkpoint_managers.PreemptionCheckpointingPolicy()]),
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(preserve),
            enable_async_checkpointing=async_save,
            # Half-written steps of a killed run are never read; removing them at start-up
            # keeps the directory from filling with them over many preemptions.
            cleanup_tmp_directories=True,
        )
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                                   save_interval_steps=0, max_to_keep=None)
        self._read_only = read_only
        self._manager = ocp.CheckpointManager(epath.Path(directory), options=options)

    @property
    def directory(self) -> epath.Path:
        return self._manager.directory

    def all_steps(self) -> list[int]:
        """Steps saved or being saved by this manager, and those it found on disk at start."""
        return list(self._manager.all_steps())

    def reached_preemption(self, step: int) -> bool:
        """True on every process at the same step once any of them was told of a preemption
        (JAX's preemption service under ``jax.distributed``); False in a single process."""
        return self._manager.reached_preemption(step)

    def save(self, step: int, state: Mapping[str, PyTree], *,
             data_iterator: grain.DatasetIterator | grain.DataLoaderIterator | None = None,
             metadata: Mapping[str, Any] | None = None, force: bool = False) -> bool:
        """Saves ``state`` (one item per name), the iterator position and ``metadata`` as ``step``.

        Args:
          step: the number of optimizer steps taken.
          state: named trees of arrays, e.g. ``{"params": ..., "opt_state": ...}``; include
            ``"frozen"`` only for frozen parameters no public file can restore.
          data_iterator: the training iterator; its position is saved before this returns.
          metadata: JSON-serializable facts about the run (config, examples seen).
          force: save even off the save interval (preemption, end of training).

        Returns whether a checkpoint was started (False off the interval or when ``step`` is
        already saved).
        """
        if self._read_only:
            raise ValueError(f"{self.directory}: this checkpointer is read-only")
        reserved = sorted(set(state) & set(_RESERVED))
        if reserved:
            raise ValueError(f"state names {reserved} are reserved for the checkpoint's own items")
        if step in self._manager.all_steps():
            return False
        items = {name: ocp.args.StandardSave(tree) for name, tree in state.items()}
        if data_iterator is not None:
            items[DATA_ITERATOR] = grain.checkpoint.CheckpointSave(data_iterator)
        items[METADATA] = ocp.args.JsonSave(dict(metadata or {}))
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore_latest(self, abstract_state: Mapping[str, PyTree], *,
                       data_iterator: grain.DatasetIterator | grain.DataLoaderIterator | None = None
                       ) -> Restored | None:
        """Restores the latest complete checkpoint onto ``abstract_state``; None if there is none.

        Args:
          abstract_state: named trees like those saved, whose leaves are
            ``jax.ShapeDtypeStruct``\\ s (or arrays) carrying the ``sharding`` each restored array
            gets, so a run resumed on a mesh reads its shards directly. Trees saved but not
            requested (``frozen`` reloaded from public files instead) are not read.
          data_iterator: a fresh iterator of the identically built pipeline; it is moved to the
            saved position, so it yields what the interrupted run would have seen next.

        Raises :class:`~pixelllm.checkpoints.assign.CheckpointMismatchError` naming the step
        folder and the missing, unexpected and mis-shaped keys (or items) when the checkpoint
        does not fit the target, before anything is read.
        """
        # Rescanning the folder while a save is in flight would drop that step from the
        # manager's list; restoring is rare, so let pending saves commit first.
        self._manager.wait_until_finished()
        self._manager.reload()
        step = self._manager.latest_step()
        if step is None:
            return None
        step_dir = self.directory / str(step)
        self._check(step_dir, abstract_state, wants_iterator=data_iterator is not None)
        items = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_state.items()}
        if data_iterator is not None:
            items[DATA_ITERATOR] = grain.checkpoint.CheckpointRestore(data_iterator)
        items[METADATA] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        log.info("resumed from %s", step_dir)
        return Restored(step=step, directory=step_dir,
                        state={name: restored[name] for name in abstract_state},
                        metadata=dict(restored[METADATA]))

    @staticmethod
    def _check(step_dir: epath.Path, abstract_state: Mapping[str, PyTree], *,
               wants_iterator: bool) -> None:
        saved = {path.name for path in step_dir.iterdir() if path.is_dir()}
        wanted = set(abstract_state) | ({DATA_ITERATOR} if wants_iterator else set())
        if wanted - saved:
            raise CheckpointMismatchError(
                f"{step_dir}: checkpoint lacks the items {sorted(wanted - saved)} "
                f"(it holds {sorted(saved)})")
        for name, tree in abstract_state.items():
            source = step_dir / name
            target = _flat(tree)
            unplaced = sorted(key for key, leaf in target.items()
                              if getattr(leaf, "sharding", None) is None)
            if unplaced:
                raise ValueError(f"{source}: the restore target gives no sharding for "
                                 f"{len(unplaced)} arrays: {', '.join(unplaced[:20])}")
            on_disk = _flat(ocp.StandardCheckpointHandler().metadata(source).tree)
            check_keys(source=str(source),
                       expected={key: leaf.shape for key, leaf in target.items()},
                       found={key: leaf.shape for key, leaf in on_disk.items()},
                       what="arrays")

    def wait_until_finished(self) -> None:
        """Blocks until every started save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class PreemptionGuard:
    """Turns SIGTERM into a flag the train loop polls, for as long as the ``with`` block runs.

    ``should_stop(step)`` is True once this process got SIGTERM or, across processes,
    ``reached_preemption(step)`` says all processes reached JAX's preemption sync point. In a
    multi-process run no handler is installed: JAX's preemption service (on by default with
    ``jax.distributed``) catches SIGTERM itself, and a Python handler would replace it, leaving
    this host to stop alone while the others wait in a collective save.

    Args:
      reached_preemption: usually :meth:`Checkpointer.reached_preemption`; called once per step
        on every process.
      process_count: defaults to ``jax.process_count()``.
    """

    def __init__(self, *, reached_preemption: Callable[[int], bool],
                 process_count: int | None = None):
        self._reached_preemption = reached_preemption
        self._installs_handler = (jax.process_count() if process_count is None
                                  else process_count) == 1
        self._signalled = False
        self._previous: Any = None

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        del frame
        log.warning("received signal %d: stopping after this step's checkpoint", signum)
        self._signalled = True

    def __enter__(self) -> PreemptionGuard:
        if self._installs_handler:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._installs_handler:
            # None: a handler installed outside Python, which Python cannot reinstall.
            signal.signal(signal.SIGTERM,
                          signal.SIG_DFL if self._previous is None else self._previous)

    def should_stop(self, step: int) -> bool:
        # Always ask the sync point: every process must call it at every step to agree.
        reached = self._reached_preemption(step)
        return self._signalled or reached

