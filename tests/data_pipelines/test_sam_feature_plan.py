"""Tests for data_pipelines/sam_feature_plan.py: records split over writer processes, a picture
shared by two records planned once, resuming skips what is stored, bad records counted."""

import numpy as np
import pytest

from data_pipelines import sam_feature_plan
from data_pipelines import sam_feature_store as store_lib
from data_pipelines.pipeline import CORRUPT_IMAGE, UNREADABLE_RECORD
from data_pipelines.sam_feature_store import ShardWriter
from data_pipelines.skips import BadRecordError
from tests.data_pipelines.ops.test_sam_features import (fill_store, plan_config, records_from,
                                                        refer_record, synthetic_features)


class _Records(list):
    """Records whose entry ``broken`` raises on reading, as a corrupt TFDS record does."""

    broken = -1

    def __getitem__(self, index):
        if index == self.broken:
            raise OSError("truncated record")
        return super().__getitem__(index)


def test_processes_split_the_records_and_a_shared_picture_is_planned_once(tmp_path,
                                                                         monkeypatch):
    # Records 0 and 2 hold the same picture (as COCO images recur across data sets).
    records = [refer_record(0), refer_record(1), refer_record(2, seed=0), refer_record(3)]
    records_from({"refer": records}, monkeypatch)
    config = plan_config(tmp_path, augment="crop", augmentations=2)
    first, second = fill_store(config, process_count=2)
    # Process 0 reads records 0 and 2 (one picture), process 1 records 1 and 3.
    assert len(first) == 2 and len(second) == 4
    whole = list(sam_feature_plan.plan(config, process_index=0, process_count=1).entries)
    assert len(whole) == 6
    assert {key for key, _, _ in first + second} == {key for key, _, _ in whole}
    store = store_lib.FeatureStore.open(tmp_path)
    assert len(store) == 6
    for key, canvas, valid_wh in whole:
        assert canvas.dtype == np.float32 and canvas.shape == (32, 32, 3)
        assert valid_wh.dtype == np.float32 and (valid_wh > 0).all()
        np.testing.assert_allclose(store.get(key), synthetic_features(canvas), rtol=1e-3)


def test_a_resumed_writer_plans_only_what_it_lacks(tmp_path, monkeypatch):
    records_from({"refer": [refer_record(i) for i in range(3)]}, monkeypatch)
    config = plan_config(tmp_path, augment="crop", augmentations=2)
    entries = sam_feature_plan.plan(config, process_index=0, process_count=1).entries
    with ShardWriter(tmp_path, shard=0, num_shards=1, grid=2, channels=4) as writer:
        for key, canvas, _ in entries:  # interrupted after three entries
            writer.add(key, synthetic_features(canvas))
            if len(writer) == 3:
                break
    resumed = ShardWriter(tmp_path, shard=0, num_shards=1, grid=2, channels=4)
    rest = list(sam_feature_plan.plan(config, process_index=0, process_count=1,
                                      done=resumed).entries)
    assert len(rest) == 3 and not any(key in resumed for key, _, _ in rest)


def test_bad_records_are_counted_and_the_rest_planned(tmp_path, monkeypatch):
    records = _Records([refer_record(0), refer_record(1), refer_record(2)])
    records.broken = 1
    records[2] = {**records[2], "image": b"not an image"}
    records_from({"refer": records}, monkeypatch)
    config = plan_config(tmp_path, augment="none", augmentations=1)
    plan = sam_feature_plan.plan(config, process_index=0, process_count=1)
    assert len(list(plan.entries)) == 1
    assert plan.skips.counts() == {UNREADABLE_RECORD: 1, CORRUPT_IMAGE: 1}
    config.skip_policy = "fail"
    with pytest.raises(BadRecordError, match="refer: record 1: OSError: truncated record"):
        list(sam_feature_plan.plan(config, process_index=0, process_count=1).entries)


def test_a_config_without_a_store_directory_is_refused(tmp_path):
    config = plan_config("", augment="none", augmentations=1)
    with pytest.raises(ValueError, match="sam_feature_cache.directory is empty"):
        sam_feature_plan.plan(config, process_index=0, process_count=1)
