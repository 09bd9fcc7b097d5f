"""Tests for data_pipelines/ops/sam_features.py: with one augmentation around resize_and_pad the
chain is unchanged but for the features; with K random crops every canvas is one of the K the
cache writer's plan made, all K are used, and each comes with its own features; a stale store
and canvases that depend on the text are refused."""

import dataclasses

import ml_collections
import numpy as np
import pytest

from configs import data as data_config
from data_pipelines import pipeline, sam_feature_plan
from data_pipelines import sam_feature_store as store_lib
from data_pipelines.ops import registry
from data_pipelines.ops.sam_features import sam_features
from data_pipelines.pipeline import Source
from data_pipelines.sam_feature_store import FeatureStoreError, ShardWriter
from pixelllm.batch import Sizes

SIZES = dataclasses.asdict(Sizes(canvas=32, slots=2, context_length=8, text_length=16,
                                 points_per_token=2, objects=4))
BLOCK, CHANNELS = 16, 4  # SAM's patch: a 32-pixel canvas has a 2 x 2 grid


def synthetic_features(canvas):
    """Stand-in SAM features of a canvas (float ``[H, W, 3]``): each 16 x 16 block's mean of
    channel ``c % 3`` plus ``c``, so features made for another canvas do not match."""
    side = canvas.shape[0] // BLOCK
    blocks = canvas.reshape(side, BLOCK, side, BLOCK, 3).mean(axis=(1, 3))
    return np.stack([blocks[..., c % 3] + c for c in range(CHANNELS)], axis=-1)


def refer_record(index, *, width=40, height=24, seed=None):
    """A builder-format referring record with random pixels (``seed``, default ``index``) and
    four expressions, more than the two slots (so ``slot`` draws which to train on)."""
    rng = np.random.default_rng(index if seed is None else seed)
    texts = [b"the dog on the left", b"a dog", b"the cat on the right", b"a cat"]
    return {
        "image": rng.integers(0, 256, (height, width, 3), np.uint8),
        "image/id": str(index).encode(),
        "objects": {"id": [np.int64(1), np.int64(2)], "ref_id": [1, 2],
                    "box": [np.asarray([0.1, 0.1, 0.5, 0.9], np.float32),
                            np.asarray([0.5, 0.1, 0.9, 0.9], np.float32)],
                    "category": [1, 2]},
        "expressions": {"object": [np.int32(i // 2) for i in range(4)], "text": texts,
                        "id": [np.int64(i) for i in range(4)]},
    }


def plan_config(directory, *, augment, augmentations):
    """A data config of one training referring source with ``augment`` and the cache on."""
    config = ml_collections.ConfigDict()
    config.data_dir = "in memory"
    config.skip_policy = "skip"
    config.train = [{"name": "refer", "builder": "refer_coco/x", "split": "train",
                     "task": "refer", "weight": 1.0,
                     "ops": data_config.source_ops(task="refer", train=True, sizes=SIZES,
                                                   augment=augment)}]
    config.sam_feature_cache = {"directory": str(directory), "augmentations": augmentations}
    return config


def records_from(records_by_task, monkeypatch):
    """Makes ``pipeline.sources_from_config`` read in-memory records, by task, instead of
    prepared TFDS data (for the pipeline and the plan)."""

    def sources(entries, *, data_dir, tokenizer):
        del data_dir
        return [Source(entry["name"], records_by_task[entry["task"]],
                       pipeline.with_tokenizer(entry["ops"], tokenizer), entry["weight"])
                for entry in entries]

    monkeypatch.setattr(pipeline, "sources_from_config", sources)


def fill_store(config, *, process_count=1, dtype="float16"):
    """Writes the store of ``config`` as the cache writer does, with synthetic features;
    returns each process's planned entries."""
    directory = config.sam_feature_cache.directory
    planned = []
    for process in range(process_count):
        entries = list(sam_feature_plan.plan(config, process_index=process,
                                             process_count=process_count).entries)
        with ShardWriter(directory, shard=process, num_shards=process_count, grid=2,
                         channels=CHANNELS, dtype=dtype) as writer:
            for key, canvas, _ in entries:
                writer.add(key, synthetic_features(canvas))
        planned.append(entries)
    store_lib.finalize(directory, num_shards=process_count, metadata={"test": True})
    return planned


def _assert_same_examples(first, second):
    assert set(first) == set(second)
    for key in first:
        if isinstance(first[key], np.ndarray):
            np.testing.assert_array_equal(first[key], second[key], err_msg=key)
        else:
            assert first[key] == second[key], key


def _chain(geometry, task="refer"):
    """decode, the training prompt, ``geometry``, slots: the cached op's neighbours."""
    return registry.compose(registry.parse([
        {"op": "decode"}, {"op": "task_prompt", "task": task, "train": True}, *geometry,
        {"op": "slot", "task": task, "slots": 2, "objects": 4, "train": True}]))


def test_one_augmentation_around_resize_and_pad_only_adds_the_features(tmp_path, monkeypatch):
    config = plan_config(tmp_path, augment="none", augmentations=1)
    records_from({"refer": [refer_record(0)]}, monkeypatch)
    [[(key, canvas, valid_wh)]] = fill_store(config, dtype="float32")
    geometry = [{"op": "resize_and_pad", "canvas": 32}]
    plain = _chain(geometry)
    cached = _chain([{"op": "sam_features", "directory": str(tmp_path), "geometry": geometry}])
    record = refer_record(0)
    for seed in range(6):
        expected = plain(record, np.random.default_rng(seed))
        out = cached(record, np.random.default_rng(seed))
        features = out.pop("sam_features")
        # Every other key, the randomly drawn prompts and slots included: no draw was taken.
        _assert_same_examples(out, expected)
        np.testing.assert_array_equal(features, synthetic_features(out["image"]))
        np.testing.assert_array_equal(features, store_lib.FeatureStore.open(tmp_path).get(key))
    np.testing.assert_array_equal(canvas, expected["image"])
    np.testing.assert_array_equal(valid_wh, expected["valid_wh"])


def test_k_random_crops_are_the_plans_canvases_each_with_its_features(tmp_path, monkeypatch):
    config = plan_config(tmp_path, augment="crop", augmentations=3)
    records = [refer_record(i) for i in range(2)]
    records_from({"refer": records}, monkeypatch)
    [planned] = fill_store(config)
    assert len(planned) == 6 and len({key for key, _, _ in planned}) == 6
    [entry] = pipeline.with_sam_features(config.train, config.sam_feature_cache)
    [op_spec] = [op for op in entry["ops"] if op["op"] == "sam_features"]
    op = registry.parse([op_spec])[0]
    decode = registry.parse(["decode"])[0]
    for index, record in enumerate(records):
        canvases = [canvas for _, canvas, _ in planned[3 * index:3 * index + 3]]
        # The three crops differ (a wrong canvas-feature pairing would show).
        assert not np.array_equal(canvases[0], canvases[1])
        reached = set()
        for seed in range(30):
            out = op(decode(record, None), np.random.default_rng(seed))
            [k] = [k for k, canvas in enumerate(canvases)
                   if np.array_equal(canvas, out["image"].astype(np.float32))]
            reached.add(k)
            np.testing.assert_allclose(out["sam_features"], synthetic_features(canvases[k]),
                                       rtol=1e-3)
        assert reached == {0, 1, 2}


def test_a_canvas_missing_from_the_store_is_a_configuration_error(tmp_path, monkeypatch):
    config = plan_config(tmp_path, augment="crop", augmentations=2)
    records_from({"refer": [refer_record(0)]}, monkeypatch)
    fill_store(config)
    # A store written for K = 2 read with K = 4: augmentations 2 and 3 were never written.
    op = sam_features(directory=str(tmp_path), augmentations=4,
                      geometry=[{"op": "random_scale_crop", "canvas": 32, "min_scale": 0.75,
                                 "max_scale": 1.25}])
    example = registry.parse(["decode"])[0](refer_record(0), None)
    with pytest.raises(FeatureStoreError, match=f"{tmp_path} has no entry .*-[23]'.*rerun the "
                                                "cache writer"):
        for seed in range(20):
            op(example, np.random.default_rng(seed))
    empty = sam_features(directory=str(tmp_path / "none"),
                         geometry=[{"op": "resize_and_pad", "canvas": 32}])
    with pytest.raises(FeatureStoreError, match="manifest.json does not exist"):
        empty(example, np.random.default_rng(0))


def test_geometry_that_reads_the_text_or_is_not_geometry_is_refused():
    with pytest.raises(ValueError, match="skip_sided"):
        sam_features(directory="x", geometry=[{"op": "horizontal_flip", "mode": "skip_sided"}])
    with pytest.raises(ValueError, match="not a geometry op spec"):
        sam_features(directory="x", geometry=[{"op": "decode"}])
    with pytest.raises(ValueError, match="augmentations 0"):
        sam_features(directory="x", geometry=[{"op": "resize_and_pad", "canvas": 8}],
                     augmentations=0)
