"""Tests for data_pipelines/sam_feature_store.py: round trips in both storage dtypes (the
float16 error measured), shards merged, resumed writers, the keys, and errors that name the
file, field or key."""

import json
import os

import numpy as np
import pytest

from data_pipelines import sam_feature_store as store_lib
from data_pipelines.sam_feature_store import FeatureStore, FeatureStoreError, ShardWriter

GRID, CHANNELS = 2, 8


def _features(seed):
    return np.random.default_rng(seed).standard_normal((GRID, GRID, CHANNELS)).astype(np.float32)


def _write(directory, rows, *, shard=0, num_shards=1, dtype="float32"):
    with ShardWriter(directory, shard=shard, num_shards=num_shards, grid=GRID,
                     channels=CHANNELS, dtype=dtype) as writer:
        for key, features in rows.items():
            writer.add(key, features)


def test_float32_round_trip_is_exact_and_keeps_the_metadata(tmp_path):
    rows = {f"key{i}": _features(i) for i in range(5)}
    _write(tmp_path, rows)
    store_lib.finalize(tmp_path, num_shards=1, metadata={"sam": "abc", "canvas": 32})
    store = FeatureStore.open(tmp_path)
    assert (store.grid, store.channels, len(store)) == (GRID, CHANNELS, 5)
    assert store.metadata == {"sam": "abc", "canvas": 32}
    for key, features in rows.items():
        got = store.get(key)
        assert got.dtype == np.float32 and got.flags.writeable
        np.testing.assert_array_equal(got, features)
    assert os.path.getsize(tmp_path / "features-00000-of-00001.bin") == 5 * GRID**2 * CHANNELS * 4


def test_float16_halves_the_disk_within_its_rounding_error(tmp_path):
    rows = {f"key{i}": _features(i) for i in range(50)}
    _write(tmp_path, rows, dtype="float16")
    store_lib.finalize(tmp_path, num_shards=1, metadata={})
    store = FeatureStore.open(tmp_path)
    read = np.stack([store.get(key) for key in rows])
    written = np.stack(list(rows.values()))
    error = np.abs(read - written)
    # Round to nearest: at most half a float16 ulp, 2**-11 relative (2**-25 among subnormals);
    # on these 1600 unit-normal values (|x| < 4) the largest error is about 1e-3.
    assert (error <= 2.0**-11 * np.abs(written) + 2.0**-25).all()
    assert 0 < error.max() < 2e-3
    assert os.path.getsize(tmp_path / "features-00000-of-00001.bin") == 50 * GRID**2 * CHANNELS * 2


def test_two_shards_merge_and_a_shared_key_reads_either_copy(tmp_path):
    _write(tmp_path, {"a": _features(0), "both": _features(9)}, shard=0, num_shards=2)
    _write(tmp_path, {"b": _features(1), "both": _features(9)}, shard=1, num_shards=2)
    store_lib.finalize(tmp_path, num_shards=2, metadata={})
    store = FeatureStore.open(tmp_path)
    assert len(store) == 3 and "both" in store and "c" not in store
    for key, seed in (("a", 0), ("b", 1), ("both", 9)):
        np.testing.assert_array_equal(store.get(key), _features(seed))


def test_an_empty_shard_is_a_shard(tmp_path):
    _write(tmp_path, {"a": _features(0)}, shard=0, num_shards=2)
    _write(tmp_path, {}, shard=1, num_shards=2)
    store_lib.finalize(tmp_path, num_shards=2, metadata={})
    assert len(FeatureStore.open(tmp_path)) == 1


def test_a_reopened_writer_resumes_and_drops_unindexed_rows(tmp_path):
    writer = ShardWriter(tmp_path, shard=0, num_shards=1, grid=GRID, channels=CHANNELS)
    writer.add("a", _features(0))
    writer.flush()
    writer.add("lost", _features(1))  # appended, never indexed: the writer "crashes"
    writer._file.flush()
    resumed = ShardWriter(tmp_path, shard=0, num_shards=1, grid=GRID, channels=CHANNELS)
    assert "a" in resumed and "lost" not in resumed and len(resumed) == 1
    resumed.add("a", _features(5))  # a key already written is kept as it is
    resumed.add("b", _features(2))
    resumed.close()
    store_lib.finalize(tmp_path, num_shards=1, metadata={})
    store = FeatureStore.open(tmp_path)
    assert len(store) == 2
    np.testing.assert_allclose(store.get("a"), _features(0), atol=2.0**-9)
    np.testing.assert_allclose(store.get("b"), _features(2), atol=2.0**-9)
    with pytest.raises(FeatureStoreError, match="field 'channels' is 8, this writer's is 4"):
        ShardWriter(tmp_path, shard=0, num_shards=1, grid=GRID, channels=4)


def test_the_writer_checks_shapes_and_range(tmp_path):
    writer = ShardWriter(tmp_path, shard=0, num_shards=1, grid=GRID, channels=CHANNELS)
    with pytest.raises(FeatureStoreError, match=r"'k' have shape \(2, 2, 4\), the store holds "
                                                r"\[F, F, C\] = \(2, 2, 8\)"):
        writer.add("k", np.zeros((GRID, GRID, 4)))
    with pytest.raises(FeatureStoreError, match="beyond float16's range"):
        writer.add("k", np.full((GRID, GRID, CHANNELS), 1e6))
    writer.close()
    assert len(writer) == 0
    with pytest.raises(FeatureStoreError, match="dtype"):
        ShardWriter(tmp_path / "other", shard=0, num_shards=1, grid=GRID, channels=CHANNELS,
                    dtype="bfloat16")


def test_finalize_refuses_a_missing_shard(tmp_path):
    _write(tmp_path, {"a": _features(0)}, shard=0, num_shards=2)
    with pytest.raises(FeatureStoreError, match="shard 1 of 2 has no index .*"
                                                "index-00001-of-00002.json"):
        store_lib.finalize(tmp_path, num_shards=2, metadata={})
    assert not (tmp_path / "manifest.json").exists()


def test_unreadable_stores_name_the_file_and_field(tmp_path):
    with pytest.raises(FeatureStoreError, match="manifest.json does not exist"):
        FeatureStore.open(tmp_path)
    _write(tmp_path, {"a": _features(0), "b": _features(1)})
    store_lib.finalize(tmp_path, num_shards=1, metadata={})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(FeatureStoreError, match="manifest.json: field 'version' is 99"):
        FeatureStore.open(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    rows = tmp_path / "features-00000-of-00001.bin"
    rows.write_bytes(rows.read_bytes()[:-1])
    with pytest.raises(FeatureStoreError, match="features-00000-of-00001.bin holds 1 rows .*"
                                                "index-00000-of-00001.json field 'rows' says 2"):
        FeatureStore.open(tmp_path)


def test_a_missing_key_names_the_store_and_the_key(tmp_path):
    _write(tmp_path, {"a": _features(0)})
    store_lib.finalize(tmp_path, num_shards=1, metadata={})
    with pytest.raises(FeatureStoreError, match=f"{tmp_path} has no entry 'nope'.*rerun the "
                                                "cache writer"):
        FeatureStore.open(tmp_path).get("nope")


def test_image_keys_follow_the_pixels_and_entry_keys_the_geometry():
    image = np.random.default_rng(0).integers(0, 256, (6, 5, 3), np.uint8)
    assert store_lib.image_key(image) == store_lib.image_key(image.copy())
    changed = image.copy()
    changed[3, 2, 1] ^= 1
    assert store_lib.image_key(changed) != store_lib.image_key(image)
    # Same bytes, another shape: another picture.
    assert store_lib.image_key(image.reshape(5, 6, 3)) != store_lib.image_key(image)
    assert len(store_lib.image_key(image)) == 32
    crop = [{"op": "random_scale_crop", "canvas": 32, "min_scale": 0.75}]
    assert (store_lib.geometry_fingerprint(crop)
            == store_lib.geometry_fingerprint([{"min_scale": 0.75, "canvas": 32,
                                                "op": "random_scale_crop"}]))
    assert (store_lib.geometry_fingerprint(crop)
            != store_lib.geometry_fingerprint([{**crop[0], "canvas": 64}]))
    assert store_lib.entry_key("ab", "cd", 0) != store_lib.entry_key("ab", "cd", 1)
