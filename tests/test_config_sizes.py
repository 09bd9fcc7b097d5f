"""pixelllm/config_sizes.py: the model/data size check, and the trainer running it on the config
it is given (after command-line overrides), before building anything."""

import pytest

from configs import stages
from pixelllm import config_sizes
from pixelllm.train import trainer


def test_a_consistent_stage_passes():
    config_sizes.check(stages.get_config("ref_tiny"))


def test_the_trainer_refuses_an_override_that_breaks_the_sizes(tmp_path):
    config = stages.get_config("ref_tiny")
    config.model.canvas_size = 48  # as --config.model.canvas_size=48 would
    with pytest.raises(ValueError, match=r"model.canvas_size 48 != data.sizes.canvas 32"):
        trainer.train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before writing anything
