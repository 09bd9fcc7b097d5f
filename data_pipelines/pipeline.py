"""The input pipeline: a weighted mixture of sources, preprocessed into batches of the batch
contract (:mod:`pixelllm.batch`), sharded per host, seeded and resumable (grain).

Per source, a grain ``MapDataset`` chain (all index-based, hence reproducible and cheap to
resume)::

    records -> shuffle(seed) -> repeat -> random_map(source ops, seed)
                                                    (None for a skipped bad record)

then the sources are mixed by weight (grain's deterministic interleave: weights 1 and 2 give the
pattern A B B A B B ...) into one stream, the same on every host; each host takes its rows of
every global batch of that stream (:class:`_HostRows`), reads them in threads, leaves bad
records out and batches them. Each example carries its own task masks, so a batch may mix tasks
(unlike the official one-source batches).

* **Hosts.** Global batch ``k`` (host 0's rows, then host 1's, ..., the order in which the mesh
  lays out the hosts' data) is elements ``k * B ... (k + 1) * B - 1`` of the stream, whatever the
  number of hosts: a run on 1 or N hosts sees the same examples in the same rows, while no
  record is skipped as bad (a skipped record shifts its host's later rows). Each host reads and
  preprocesses only its own rows.
* **Seed.** Shuffles and per-example random generators derive from ``seed`` and the source
  index, so one seed gives one stream.
* **Resuming.** The iterator's ``get_state()`` is a small JSON-serializable dict (the position in
  the mixed stream); ``set_state`` on an iterator of an identically built pipeline continues
  with exactly the batches that would have come next. Save it beside the model checkpoint
  (e.g. in an Orbax ``Composite`` with ``args.JsonSave``).
* **Bad records.** A record that raises while being read (TFDS decodes images inside
  ``source[i]``), or whose encoded image does not decode
  (:class:`~data_pipelines.images.ImageError`), is counted in :attr:`InputPipeline.skips`
  (:class:`~data_pipelines.skips.SkipCounter`) and left out; under ``skip_policy="fail"`` it
  raises :class:`~data_pipelines.skips.BadRecordError` instead. Other errors (wrong op
  arguments, a contract mismatch) always raise. Counts cover the records processed so far,
  including a few prefetched ahead of the consumer, and start from zero in a resumed process.
  ``max_consecutive_skips`` records skipped in a row without one good example between them
  raise :class:`ConsecutiveSkipsError`: a source whose records are all bad would otherwise
  repeat forever without producing a batch.
* **Shapes.** Every example is checked against the contract
  (:func:`pixelllm.batch.example_spec`); a partial
  last batch (finite ``num_epochs``, ``drop_remainder=False``) is filled with all-zero examples,
  whose masks are all False.

:func:`from_config` and :func:`eval_from_config` build the pipelines of a data config
(``configs/data.py``) from the builders' prepared data; ``config.batch_size`` is global and
split over the hosts. With ``config.sam_feature_cache.directory`` set, :func:`from_config`'s
batches carry the frozen SAM encoder's cached features (:func:`with_sam_features`,
:mod:`data_pipelines.sam_feature_store`).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from data_pipelines import images, sam_feature_store
from data_pipelines.ops import registry
from data_pipelines.ops import sam_features as sam_features_op
from data_pipelines.skips import SkipCounter
from pixelllm.batch import EVALUATION_SPEC, Sizes, example_spec

Example = dict[str, Any]
Batch = dict[str, np.ndarray]

UNREADABLE_RECORD = "unreadable record"
CORRUPT_IMAGE = "corrupt image"
# Default of InputPipeline's max_consecutive_skips: far above the longest run of bad records in
# a usable source (they are a few in millions), reached in seconds by an unusable one.
MAX_CONSECUTIVE_SKIPS = 1000

# Distinct streams derived from the one seed.
_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1


def check_example(example: Mapping[str, Any], spec: Mapping[str, tuple], *, where: str) -> None:
    """Raises ``ValueError`` naming ``where`` and the key unless ``example`` matches ``spec``
    exactly (keys, shapes, dtypes). Evaluation-only keys (:data:`pixelllm.batch.EVALUATION_SPEC`)
    that ``spec`` leaves out may be present: batching drops them."""
    missing = sorted(set(spec) - set(example))
    extra = sorted(set(example) - set(spec) - set(EVALUATION_SPEC))
    if missing or extra:
        hint = ("evaluation_metadata right after decode?" if set(missing) & set(EVALUATION_SPEC)
                else "slot and tokenize?")
        raise ValueError(f"{where}: example keys differ from the batch contract: missing "
                         f"{missing}, unexpected {extra} (do the ops have {hint})")
    for key, (shape, dtype) in spec.items():
        value = example[key]
        if np.shape(value) != shape or np.asarray(value).dtype != dtype:
            raise ValueError(f"{where}: {key!r} is {np.asarray(value).dtype} "
                             f"{np.shape(value)}, the contract says {dtype} {shape} (do the "
                             "ops' sizes match the pipeline's Sizes?)")


@dataclasses.dataclass(frozen=True)
class Source:
    """One data source of a mixture.

    Attributes:
      name: names the source in logs and errors (e.g. ``"localized_narratives/coco:train"``).
      records: random access to builder examples (``len`` and ``[i]``), e.g.
        ``builder.as_data_source()[split]`` or a list of dicts.
      ops: the preprocessing ops, an op spec (:func:`registry.parse`: a string, or a list of
        strings, mappings or built ops).
      weight: mixture weight (relative; > 0).
    """

    name: str
    records: Sequence[Example]
    ops: str | Sequence[Any]
    weight: float = 1.0


class ConsecutiveSkipsError(RuntimeError):
    """Too many records skipped in a row: the sources' records are unusable."""


class _Skips:
    """A :class:`SkipCounter` shared by the reading threads, which also counts the records
    skipped since the last good example (in the threads' processing order)."""

    def __init__(self, counter: SkipCounter, *, max_consecutive: int):
        self.counter = counter
        self._max_consecutive = max_consecutive
        self._consecutive = 0
        self._lock = threading.Lock()

    def bad(self, reason: str, *, file: str, record: str, detail: str) -> None:
        with self._lock:
            self.counter.bad(reason, file=file, record=record, detail=detail)
            self._consecutive += 1
            if self._consecutive >= self._max_consecutive:
                raise ConsecutiveSkipsError(
                    f"{self._consecutive} records in a row were skipped, the last {file}: "
                    f"{record}: {detail}\n{self.counter.summary()}\nAre the sources' images "
                    "and fields readable? (max_consecutive_skips sets the limit.)")

    def good(self) -> None:
        with self._lock:
            self._consecutive = 0


class _CountingRecords:
    """``records`` whose unreadable entries come back as ``None``, counted."""

    def __init__(self, records: Sequence[Example], *, name: str, skips: _Skips):
        self._records = records
        self._name = name
        self._skips = skips

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Example | None:
        try:
            return self._records[index]
        # Whatever a corrupt record makes the reader raise (image decoders, parsers).
        except Exception as error:  # noqa: BLE001
            self._skips.bad(UNREADABLE_RECORD, file=self._name, record=f"record {index}",
                            detail=f"{type(error).__name__}: {error}")
            return None


class _Preprocess:
    """A source's ops, with corrupt images counted and the result checked against the
    contract."""

    def __init__(self, source: Source, *, spec: Mapping[str, tuple], skips: _Skips):
        self._op = registry.compose(registry.parse(source.ops))
        self._name = source.name
        self._spec = spec
        self._skips = skips

    def __call__(self, record: Example, rng: np.random.Generator) -> Example | None:
        image_id = record.get("image/id", b"?")
        image_id = image_id.decode() if isinstance(image_id, bytes) else str(image_id)
        try:
            example = self._op(record, rng)
        except images.ImageError as error:
            self._skips.bad(CORRUPT_IMAGE, file=self._name, record=f"image {image_id}",
                            detail=str(error))
            return None
        check_example(example, self._spec, where=f"{self._name}: image {image_id}")
        self._skips.good()
        return example


def _derive_seed(seed: int, *key: int) -> int:
    return int(np.random.SeedSequence(seed, spawn_key=key).generate_state(1)[0])


class _HostRows(grain.MapDataset):
    """One host's rows of every global batch of ``parent`` (the mixed stream, identical on every
    host): element ``n`` is the stream's element ``(n // b) * b * count + index * b + n % b``
    for ``b`` rows per host, so the hosts' batches ``k`` together hold the stream's elements
    ``k * b * count ... (k + 1) * b * count - 1``, in order."""

    def __init__(self, parent: grain.MapDataset, *, batch_size: int, process_index: int,
                 process_count: int):
        super().__init__(parent)
        self._batch_size = batch_size
        self._offset = process_index * batch_size
        self._global_batch = batch_size * process_count
        full, rest = divmod(len(parent), self._global_batch)
        self._length = full * batch_size + min(batch_size, max(0, rest - self._offset))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._batch_size)
        return self._parent[batch * self._global_batch + self._offset + row]

    def __str__(self) -> str:
        return (f"_HostRows(rows {self._offset}:{self._offset + self._batch_size} of "
                f"{self._global_batch})")


class InputPipeline:
    """Batches of the model contract from a weighted mixture of sources.

    Args:
      sources: the sources to mix.
      batch_size: examples per batch on this host (the global batch is ``batch_size *
        process_count``).
      sizes: the contract sizes; every example is checked against them.
      seed: makes the stream reproducible (shuffles and augmentation).
      shuffle: shuffle each source (per epoch, reshuffled every epoch).
      num_epochs: passes over every source; ``None`` repeats forever (training). Mixing
        finite sources stops when the first one runs out.
      drop_remainder: drop a last partial batch instead of filling it with empty examples.
      process_index, process_count: this host and the number of hosts; default
        ``jax.process_index()`` / ``jax.process_count()``. Host i reads rows
        ``i * batch_size ... (i + 1) * batch_size - 1`` of every global batch (see the module
        docstring).
      skip_policy: ``"skip"`` or ``"fail"`` for bad records (see the module docstring).
      max_consecutive_skips: records skipped in a row that raise
        :class:`ConsecutiveSkipsError` (see the module docstring).
      num_threads: reading/preprocessing threads.
      prefetch: examples prepared ahead; default two batches.
      evaluation_keys: batches also carry the evaluation-only keys
        (:data:`pixelllm.batch.EVALUATION_SPEC`), which the ops must then make.
    """

    def __init__(self, sources: Sequence[Source], *, batch_size: int, sizes: Sizes, seed: int,
                 shuffle: bool = True, num_epochs: int | None = None,
                 drop_remainder: bool = True, process_index: int | None = None,
                 process_count: int | None = None, skip_policy: str = "skip",
                 max_consecutive_skips: int = MAX_CONSECUTIVE_SKIPS, num_threads: int = 2,
                 prefetch: int | None = None, evaluation_keys: bool = False):
        if not sources:
            raise ValueError("InputPipeline needs at least one source")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be positive, got "
                             f"{max_consecutive_skips}")
        process_index, process_count = _hosts(process_index, process_count)
        self.sizes = sizes
        self.batch_size = batch_size
        self.skips = SkipCounter(policy=skip_policy, logger_name=__name__)
        skips = _Skips(self.skips, max_consecutive=max_consecutive_skips)
        spec = self._spec = example_spec(sizes, evaluation=evaluation_keys)
        datasets = []
        for index, source in enumerate(sources):
            if source.weight <= 0:
                raise ValueError(f"source {source.name}: weight {source.weight} must be > 0")
            records = grain.MapDataset.source(
                _CountingRecords(source.records, name=source.name, skips=skips))
            if shuffle:
                records = records.shuffle(_derive_seed(seed, _SHUFFLE_STREAM, index))
            records = records.repeat(num_epochs)
            datasets.append(records.random_map(
                _Preprocess(source, spec=spec, skips=skips),
                seed=_derive_seed(seed, _AUGMENT_STREAM, index)))
        mixed = (datasets[0] if len(datasets) == 1 else
                 grain.MapDataset.mix(datasets, [source.weight for source in sources]))
        rows = _HostRows(mixed, batch_size=batch_size, process_index=process_index,
                         process_count=process_count)
        if len(rows) == 0:
            raise ValueError(f"sources {[source.name for source in sources]}: "
                             f"{len(mixed)} examples leave none for host {process_index} of "
                             f"{process_count} at {batch_size} per host")
        read_options = grain.ReadOptions(num_threads=num_threads,
                                         prefetch_buffer_size=prefetch or 2 * batch_size)
        self.dataset = rows.to_iter_dataset(read_options).batch(
            batch_size, drop_remainder=drop_remainder, batch_fn=self._stack)

    def __iter__(self) -> grain.DatasetIterator:
        """A fresh iterator from the start; ``get_state()`` / ``set_state()`` resume it."""
        return iter(self.dataset)

    def _stack(self, examples: Sequence[Example]) -> Batch:
        return {key: np.stack([example[key] for example in examples]
                              + [np.zeros(shape, dtype)] * (self.batch_size - len(examples)))
                for key, (shape, dtype) in self._spec.items()}


def with_tokenizer(ops: Sequence[Mapping[str, Any]], tokenizer: str | None) -> list[dict]:
    """``ops`` (op-spec mappings) with ``tokenizer`` filled into ``tokenize`` entries that name
    none."""
    filled = []
    for op in ops:
        op = dict(op.to_dict() if hasattr(op, "to_dict") else op)
        if op.get("op") == "tokenize" and "tokenizer" not in op:
            if not tokenizer:
                raise ValueError("the data config has no tokenizer: set config.tokenizer to the "
                                 "language model's tokenizer file or folder")
            op["tokenizer"] = tokenizer
        filled.append(op)
    return filled


def sources_from_config(entries: Sequence[Mapping[str, Any]], *, data_dir: str | None,
                        tokenizer: str | None) -> list[Source]:
    """:class:`Source` objects for config entries (``configs/data.py``), reading the builders'
    prepared data in ``data_dir`` through ``as_data_source``."""
    # Imported here: only config-driven pipelines need TFDS and the builders (registration).
    import tensorflow_datasets as tfds

    from data_pipelines.builders import (coco_captions, llava_instructions,  # noqa: F401
                                         localized_narratives, refcoco, referring_mixture,
                                         visual_genome)

    if not data_dir:
        raise ValueError("the data config has no data_dir: set config.data_dir to the TFDS "
                         "data folder the builders wrote")
    sources = []
    for entry in entries:
        builder = tfds.builder(entry["builder"], data_dir=data_dir)
        records = builder.as_data_source()[entry["split"]]
        sources.append(Source(name=f"{entry['builder']}:{entry['split']}", records=records,
                              ops=with_tokenizer(entry["ops"], tokenizer),
                              weight=entry["weight"]))
    return sources


def sam_feature_cache(config: Any) -> dict | None:
    """The data config's SAM feature cache setting (``config.sam_feature_cache``) as
    ``{"directory": str, "augmentations": int}``, or ``None`` where it is off (no setting, or
    an empty directory)."""
    cache = config.get("sam_feature_cache")
    if not cache or not cache.get("directory"):
        return None
    augmentations = int(cache.get("augmentations", 1))
    if augmentations < 1:
        raise ValueError(f"sam_feature_cache.augmentations {augmentations} must be >= 1")
    return {"directory": str(cache["directory"]), "augmentations": augmentations}


def with_sam_features(entries: Sequence[Mapping[str, Any]], cache: Mapping[str, Any]
                      ) -> list[dict]:
    """Source entries (``configs/data.py``) whose run of geometry ops
    (:data:`~data_pipelines.ops.sam_features.GEOMETRY_OPS`) is replaced by one ``sam_features``
    op reading ``cache`` (:func:`sam_feature_cache`), with ``cache["augmentations"]`` fixed
    draws per image, or 1 where the run draws nothing (``resize_and_pad`` alone: K copies of
    one canvas would cost K times the SAM passes and the disk for nothing)."""
    rewritten = []
    for entry in entries:
        entry = dict(entry.to_dict() if hasattr(entry, "to_dict") else entry)
        ops = [dict(op.to_dict() if hasattr(op, "to_dict") else op) for op in entry["ops"]]
        where = [i for i, op in enumerate(ops) if op.get("op") in sam_features_op.GEOMETRY_OPS]
        name = entry.get("name", entry.get("builder"))
        if not where:
            raise ValueError(f"source {name}: no geometry op "
                             f"({', '.join(sam_features_op.GEOMETRY_OPS)}) for the SAM feature "
                             "cache to wrap")
        first, last = where[0], where[-1] + 1
        if last - first != len(where):
            raise ValueError(f"source {name}: its geometry ops {[op['op'] for op in ops]} are "
                             "not one run, which the SAM feature cache needs to wrap")
        geometry = ops[first:last]
        draws = any(op["op"] not in sam_features_op.DETERMINISTIC_GEOMETRY_OPS
                    for op in geometry)
        wrapped = {"op": "sam_features", "directory": cache["directory"], "geometry": geometry,
                   "augmentations": cache["augmentations"] if draws else 1}
        rewritten.append({**entry, "ops": [*ops[:first], wrapped, *ops[last:]]})
    return rewritten


def from_config(config: Any, *, process_index: int | None = None,
                process_count: int | None = None) -> InputPipeline:
    """The training pipeline of a data config: its ``train`` mixture, repeated and shuffled,
    ``config.batch_size`` examples per step over all hosts. With the SAM feature cache on
    (:func:`sam_feature_cache`), every source's geometry ops read cached features
    (:func:`with_sam_features`) and the batches carry ``sam_features``."""
    process_index, process_count = _hosts(process_index, process_count)
    if config.batch_size % process_count:
        raise ValueError(f"batch size {config.batch_size} does not split over "
                         f"{process_count} hosts")
    entries, sizes = config.train, Sizes(**config.sizes)
    cache = sam_feature_cache(config)
    if cache:
        entries = with_sam_features(entries, cache)
        manifest = sam_feature_store.read_manifest(cache["directory"])
        sizes = dataclasses.replace(sizes, sam_grid=manifest.grid,
                                    sam_channels=manifest.channels)
    return InputPipeline(
        sources_from_config(entries, data_dir=config.data_dir, tokenizer=config.tokenizer),
        batch_size=config.batch_size // process_count, sizes=sizes,
        seed=config.seed, process_index=process_index, process_count=process_count,
        skip_policy=config.skip_policy, max_consecutive_skips=config.max_consecutive_skips,
        num_threads=config.num_threads)


def eval_from_config(config: Any, *, process_index: int | None = None,
                     process_count: int | None = None,
                     evaluation_keys: bool = False) -> dict[str, InputPipeline]:
    """One pipeline per ``eval`` source of a data config, with the source's own ``sizes`` and
    ``batch_size``: one pass, in order, the last batch filled with empty examples;
    ``evaluation_keys`` adds the evaluation-only keys (the task metrics need them, the
    objective does not)."""
    process_index, process_count = _hosts(process_index, process_count)
    sources = sources_from_config(config.eval, data_dir=config.data_dir,
                                  tokenizer=config.tokenizer)
    return {entry["name"]: InputPipeline(
                [source], batch_size=entry["batch_size"], sizes=Sizes(**entry["sizes"]),
                seed=config.seed, shuffle=False, num_epochs=1, drop_remainder=False,
                process_index=process_index, process_count=process_count,
                skip_policy=config.skip_policy,
                max_consecutive_skips=config.max_consecutive_skips,
                num_threads=config.num_threads, evaluation_keys=evaluation_keys)
            for entry, source in zip(config.eval, sources, strict=True)}


def _hosts(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """``(process_index, process_count)``, each defaulting to JAX's."""
    if process_index is None or process_count is None:
        import jax  # Only for the defaults: the pipeline itself runs without devices.
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return process_index, process_count
