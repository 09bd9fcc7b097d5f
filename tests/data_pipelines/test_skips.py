"""Tests for data_pipelines/skips.py."""

import logging

import pytest

from data_pipelines.skips import BadRecordError, SkipCounter


def test_skip_policy_counts_per_reason():
    counter = SkipCounter(policy="skip", logger_name="test.skips")
    counter.bad("empty caption", file="a.jsonl", record="line 3", detail="caption is empty")
    counter.bad("empty caption", file="a.jsonl", record="line 9", detail="caption is empty")
    counter.bad("missing image", file="a.jsonl", record="image 7", detail="no file")
    assert counter.counts() == {"empty caption": 2, "missing image": 1}
    assert counter.total == 3
    summary = counter.summary()
    lines = summary.splitlines()
    # Most frequent first, then the total.
    assert "empty caption" in lines[1] and lines[1].split()[-1] == "2"
    assert "missing image" in lines[2] and lines[2].split()[-1] == "1"
    assert lines[-1].split() == ["total", "3"]


def test_empty_counter():
    counter = SkipCounter(policy="skip")
    assert counter.counts() == {} and counter.total == 0
    assert counter.summary() == "no records skipped"


def test_fail_policy_raises_with_file_and_record():
    counter = SkipCounter(policy="fail")
    with pytest.raises(BadRecordError, match=r"^a.jsonl: line 3: caption is empty$"):
        counter.bad("empty caption", file="a.jsonl", record="line 3", detail="caption is empty")
    assert counter.total == 0


def test_warnings_are_logged_for_the_first_few_only(caplog):
    counter = SkipCounter(policy="skip", logger_name="test.skips.log")
    with caplog.at_level(logging.WARNING, logger="test.skips.log"):
        for line in range(20):
            counter.bad("bad json", file="f", record=f"line {line}", detail="x")
    record_messages = [r.getMessage() for r in caplog.records if "line " in r.getMessage()]
    assert len(record_messages) == 5 and "f: line 0: x" in record_messages[0]
    assert any("only counted" in r.getMessage() for r in caplog.records)
    assert counter.counts() == {"bad json": 20}


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="policy"):
        SkipCounter(policy="ignore")
