"""Writes the SAM feature cache of a training config (``config.data.sam_feature_cache``).

    python -m pixelllm.tools.sam_cache --config=configs/stages.py:trace \\
        --config.data.data_dir=/data/tfds --config.init.sam=/ckpt/sam_vit_h_4b8939.pth \\
        --config.data.sam_feature_cache.directory=/data/sam_features_trace

Every training source's images are read as the training pipeline reads them (its ops up to the
geometry), each of the ``augmentations`` fixed augmentations per image is applied, and SAM's image
encoder (the config's, initialized from ``config.init`` as the trainer does) runs on the canvases
in batches of ``--batch_size``; the features go to the store (:mod:`data_pipelines.sam_feature_store`)
with SAM's probe (:mod:`pixelllm.train.sam_feature_cache`), which the trainer checks. Training
with the same config and directory then reads them instead of running SAM.

Multi-host: each process reads its share of the records (record ``i`` -> process
``i % count``), writes its own shard, and process 0 writes the manifest once every shard is
closed; the multi-host flags are ``pixelllm.main``'s. Unreadable records and corrupt images are
counted and reported, as in training. An interrupted run, started again with the same flags,
keeps what its shards had flushed (every ``FLUSH_SECONDS``) and computes only the rest.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags
from jax.experimental import multihost_utils
from ml_collections import config_flags

from data_pipelines import pipeline, sam_feature_plan, sam_feature_store
from pixelllm import main as main_lib
from pixelllm.train import sam_feature_cache, train_step, trainer

# How often the shard's index is written: an interrupted writer loses at most this much work.
FLUSH_SECONDS = 300

FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (path:variant).",
                                          lock_config=True, flag_values=FLAGS)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Canvases per SAM call, over all processes.",
                                   flag_values=FLAGS)
_DTYPE = flags.DEFINE_enum("dtype", "float16", ["float16", "float32"],
                           "Storage dtype of the features (float16 halves the disk).",
                           flag_values=FLAGS)
_DISTRIBUTED = main_lib.define_distributed_flags(FLAGS)
flags.mark_flags_as_required(["config"], flag_values=FLAGS)


@dataclasses.dataclass(frozen=True)
class WriteReport:
    """What this process wrote: ``entries`` feature rows, ``seconds`` of wall time."""
    directory: str
    entries: int
    seconds: float
    skips: str


def write(config: Any, *, batch_size: int, dtype: str = "float16") -> WriteReport:
    """Writes the store named by ``config.data.sam_feature_cache.directory``; every process of
    a multi-host run calls it."""
    cache = pipeline.sam_feature_cache(config.data)
    if cache is None:
        raise ValueError("config.data.sam_feature_cache.directory is empty: name the folder "
                         "the features go to")
    directory = cache["directory"]
    start = time.perf_counter()
    model, mesh, rules = trainer.build_model(config)
    index, count = jax.process_index(), jax.process_count()
    shards = train_step.batch_shards(mesh, rules)
    if batch_size % count or batch_size % shards:
        raise ValueError(f"--batch_size {batch_size} must split over {count} processes and the "
                         f"mesh's {shards} batch shards")
    probe = sam_feature_cache.probe_signature(model, mesh, rules)
    encode = sam_feature_cache.make_encoder(model, mesh, rules)
    sharding = train_step.batch_sharding(mesh, rules)
    canvas = probe["canvas"]
    writer = sam_feature_store.ShardWriter(directory, shard=index, num_shards=count,
                                           grid=probe["grid"], channels=probe["channels"],
                                           dtype=dtype)
    # Entries an interrupted earlier run flushed are in the reopened shard: not planned again.
    plan = sam_feature_plan.plan(config.data, process_index=index, process_count=count,
                                 done=writer)
    local = batch_size // count
    entries, flushed = 0, time.monotonic()
    while True:
        chunk = list(itertools.islice(plan.entries, local))
        # Every process joins every SAM call: go on while any process has canvases left.
        if not multihost_utils.process_allgather(np.array(len(chunk))).any():
            break
        padding = local - len(chunk)
        images = np.stack([image for _, image, _ in chunk]
                          + [np.zeros((canvas, canvas, 3), np.float32)] * padding)
        valid_wh = np.stack([wh for _, _, wh in chunk]
                            + [np.full(2, canvas, np.float32)] * padding)
        features = encode(jax.make_array_from_process_local_data(sharding, images),
                          jax.make_array_from_process_local_data(sharding, valid_wh))
        features = np.asarray(multihost_utils.global_array_to_host_local_array(
            features, mesh, sharding.spec))
        for (key, _, _), row in zip(chunk, features):
            writer.add(key, row)
        entries += len(chunk)
        if time.monotonic() - flushed > FLUSH_SECONDS:
            writer.flush()
            flushed = time.monotonic()
    writer.close()
    multihost_utils.sync_global_devices("pixelllm_sam_cache_shards_closed")
    if index == 0:
        sam_feature_store.finalize(directory, num_shards=count,
                                   metadata={sam_feature_cache.PROBE_KEY: probe})
    multihost_utils.sync_global_devices("pixelllm_sam_cache_finalized")
    return WriteReport(directory=directory, entries=entries,
                       seconds=time.perf_counter() - start, skips=plan.skips.summary())


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("pixelllm").setLevel(logging.INFO)
    main_lib.initialize_distributed(_DISTRIBUTED, os.environ)
    report = write(_CONFIG.value, batch_size=_BATCH_SIZE.value, dtype=_DTYPE.value)
    print(f"process {jax.process_index()}: wrote {report.entries} SAM feature rows to "
          f"{report.directory} in {report.seconds:.1f} s\n{report.skips}")


if __name__ == "__main__":
    app.run(main, flags_parser=main_lib.flags_parser(FLAGS))
