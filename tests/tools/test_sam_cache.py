"""The SAM feature cache writer's command line (the writing itself is tested end to end in
tests/train/test_trainer.py: the tool's store, then a run on it)."""

import pytest

from pixelllm.tools import sam_cache
from tests import flag_parsing


@pytest.fixture
def parsed_flags(monkeypatch):
    yield from flag_parsing.parsed_flags(sam_cache.FLAGS, monkeypatch, "sam_cache")


def test_flags_and_overrides_reach_the_writer(parsed_flags, monkeypatch, tmp_path, capsys):
    calls = []

    def write(config, *, batch_size, dtype):
        calls.append((config, batch_size, dtype))
        return sam_cache.WriteReport(directory=config.data.sam_feature_cache.directory,
                                     entries=6, seconds=1.5, skips="no records skipped")

    monkeypatch.setattr(sam_cache, "write", write)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
    parsed_flags("--config=configs/stages.py:trace_tiny",
                 f"--config.data.sam_feature_cache.directory={tmp_path}",
                 "--config.data.sam_feature_cache.augmentations=3", "--batch_size=4",
                 "--dtype=float32")
    sam_cache.main(["sam_cache"])
    [(config, batch_size, dtype)] = calls
    assert (batch_size, dtype) == (4, "float32")
    assert config.data.sam_feature_cache.directory == str(tmp_path)
    assert config.data.sam_feature_cache.augmentations == 3
    assert f"wrote 6 SAM feature rows to {tmp_path}" in capsys.readouterr().out


def test_an_empty_directory_is_refused_before_anything_is_built():
    from configs import stages

    with pytest.raises(ValueError, match="sam_feature_cache.directory is empty"):
        sam_cache.write(stages.get_config("trace_tiny"), batch_size=4)
