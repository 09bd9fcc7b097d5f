"""configs/demo.py: every task trained at once, held-out splits evaluated, everything trained."""

import pytest

from configs import data as data_config
from configs import demo
from configs.experiments import experiment


@pytest.mark.parametrize("run", ["demo", "quick"])
def test_the_demo_config_is_consistent(run):
    config = demo.get_config(run)
    experiment.check(config)
    assert config.train.batch_size == config.data.batch_size == demo.RUNS[run]["batch_size"]
    assert config.optimizer.total_steps == config.train.steps == demo.RUNS[run]["steps"]


def test_every_task_trains_and_is_evaluated_on_its_held_out_split():
    config = demo.get_config()
    trained = {(source["builder"], source["task"]) for source in config.data.train}
    evaluated = {(source["builder"], source["task"]) for source in config.data.eval}
    assert {task for _, task in trained} == {"trace", "caption", "refer", "refseg", "densecap",
                                            "loca"}
    assert trained == evaluated
    assert {source["split"] for source in config.data.train} == {"train"}
    for source in config.data.eval:
        assert source["split"] == demo.HELD_OUT_SPLIT[source["builder"]] != "train"
        assert source["ops"][1]["op"] == "evaluation_metadata"
        # Referring segmentation is scored against the original-size masks, framed at the
        # scenes' side (not COCO's 640).
        segments = source["task"] == "refseg"
        assert source["ops"][1].get("original_masks", 0) == source["sizes"].get(
            "original_masks", 0) == (demo.SCENE_SIDE if segments else 0)


def test_without_pretrained_weights_everything_trains():
    model = demo.get_config().model
    assert tuple(model.frozen) == ()
    assert not model.language_model.model.frozen
    assert model.language_model.model.lora.rank == 0
    assert model.canvas_size == demo.CANVAS == model.sam.image_encoder.img_size


def test_an_unknown_run_is_refused():
    with pytest.raises(ValueError, match="quick"):
        demo.get_config("fast")


def test_the_demo_builds_every_module_though_the_multitask_stage_has_no_mask_adapter():
    from configs import pixelllm as pixelllm_config
    from configs import stages

    assert stages.get_config("multitask_tiny").model.mask_adapter is None
    model = demo.get_config().model
    # The demo segments (a refseg source): the tiny model's own mask adapter.
    assert model.mask_adapter == pixelllm_config.get_config("tiny").model.mask_adapter
    assert model.proposal_head is not None
