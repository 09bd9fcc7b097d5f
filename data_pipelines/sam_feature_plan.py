"""What the SAM feature cache writer computes: every training canvas the cached pipeline can ask
for, each once.

For every training source of a data config, read as :func:`data_pipelines.pipeline.from_config`
reads it, :func:`plan` runs the ops before the geometry ops (decode, task prompt) on this
process's records (record ``i`` goes to process ``i % process_count``), then for each of the
``K = sam_feature_cache.augmentations`` augmentations the exact canvas the ``sam_features`` op
makes (:func:`data_pipelines.ops.sam_features.augmented`). The writer tool runs SAM on the
canvases and stores the features under the entry keys with a
:class:`~data_pipelines.sam_feature_store.ShardWriter` (shard = process index).

Records that do not read or whose image does not decode are counted in the plan's
:class:`~data_pipelines.skips.SkipCounter` (and left out, or raise under the ``"fail"``
policy), as the pipeline does: the pipeline skips them too, so they need no features.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Container, Iterator
from typing import Any

import numpy as np

from data_pipelines import images, pipeline, sam_feature_store
from data_pipelines.ops import registry
from data_pipelines.ops.sam_features import augmented
from data_pipelines.skips import SkipCounter


@dataclasses.dataclass
class Plan:
    """A writer process's work.

    Attributes:
      entries: ``(entry key, canvas image float32 [H, W, 3], valid_wh float32 [2])`` for each
        entry this process writes, each key once; the canvas as the batch's ``image`` holds it.
        Lazy: records are read as it is consumed.
      skips: the records left out so far (unreadable, or an image that does not decode), of
        the data config's ``skip_policy``.
    """

    entries: Iterator[tuple[str, np.ndarray, np.ndarray]]
    skips: SkipCounter


def plan(config_data: Any, *, process_index: int, process_count: int,
         done: Container[str] = ()) -> Plan:
    """The entries this process writes.

    Args:
      config_data: a data config (``configs/data.py``) with ``sam_feature_cache.directory``
        set (the store to fill; K from ``sam_feature_cache.augmentations``).
      process_index, process_count: this writer process and the number of them.
      done: entry keys not to yield again (the reopened ``ShardWriter``, or an existing
        ``FeatureStore``: an interrupted writer resumes).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    cache = pipeline.sam_feature_cache(config_data)
    if cache is None:
        raise ValueError("the data config's sam_feature_cache.directory is empty: set it to the "
                         "store the writer fills")
    entries = pipeline.with_sam_features(config_data.train, cache)
    heads, wrappers = [], []
    for entry in entries:
        [at] = [i for i, op in enumerate(entry["ops"]) if op["op"] == "sam_features"]
        heads.append({**entry, "ops": entry["ops"][:at]})
        wrappers.append(entry["ops"][at])
    # Only the ops before the geometry run, so no tokenizer is needed.
    sources = pipeline.sources_from_config(heads, data_dir=config_data.data_dir, tokenizer=None)
    skips = SkipCounter(policy=config_data.skip_policy, logger_name=__name__)
    yielded: set[str] = set()
    return Plan(entries=itertools.chain.from_iterable(
        _source_entries(source, wrapper, process_index=process_index,
                        process_count=process_count, done=done, yielded=yielded, skips=skips)
        for source, wrapper in zip(sources, wrappers, strict=True)), skips=skips)


def _source_entries(source: pipeline.Source, wrapper: dict, *, process_index: int,
                    process_count: int, done: Container[str], yielded: set[str],
                    skips: SkipCounter) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    head = registry.compose(registry.parse(source.ops))
    geometry_ops = registry.parse(wrapper["geometry"])
    fingerprint = sam_feature_store.geometry_fingerprint(wrapper["geometry"])
    for index in range(process_index, len(source.records), process_count):
        try:
            record = source.records[index]
        # Whatever a corrupt record makes the reader raise, as the pipeline counts it.
        except Exception as error:  # noqa: BLE001
            skips.bad(pipeline.UNREADABLE_RECORD, file=source.name, record=f"record {index}",
                      detail=f"{type(error).__name__}: {error}")
            continue
        try:
            # The head's randomness (a task prompt's choice) never reaches the image.
            example = head(record, np.random.default_rng(0))
        except images.ImageError as error:
            skips.bad(pipeline.CORRUPT_IMAGE, file=source.name, record=f"record {index}",
                      detail=str(error))
            continue
        key = sam_feature_store.image_key(example["image"])
        for k in range(wrapper["augmentations"]):
            entry = sam_feature_store.entry_key(key, fingerprint, k)
            if entry in yielded or entry in done:
                continue
            yielded.add(entry)
            canvas = augmented(example, geometry_ops, image_key=key, fingerprint=fingerprint,
                               augmentation=k)
            yield entry, canvas["image"].astype(np.float32), np.asarray(canvas["valid_wh"],
                                                                       np.float32)
