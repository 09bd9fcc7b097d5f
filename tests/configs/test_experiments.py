"""Experiment configs tie the model's sizes to the data's and refuse a mismatch."""

import pytest

from configs.experiments import experiment, pixelllm_t5_xl, smoke


@pytest.mark.parametrize("get_config,canvas,slots,text_length", [
    (pixelllm_t5_xl.get_config, 384, 16, 128),
    (smoke.get_config, 32, 2, 16),
    (lambda: smoke.get_config("decoder"), 32, 2, 16),
])
def test_model_sizes_come_from_the_data_sizes(get_config, canvas, slots, text_length):
    config = get_config()
    sizes = config.data.sizes
    assert (sizes.canvas, sizes.slots, sizes.text_length) == (canvas, slots, text_length)
    assert config.model.canvas_size == canvas
    assert config.model.sam.image_encoder.img_size == canvas
    assert config.model.eva02.img_size == canvas
    assert config.model.point_head.num_points == sizes.points_per_token
    experiment.check(config)


def test_paper_experiment_is_flan_t5_xl_on_the_multitask_mixture():
    config = pixelllm_t5_xl.get_config()
    assert config.model.language_model.kind == "t5"
    assert config.model.language_model.model.d_model == 2048
    assert {source["task"] for source in config.data.train} == {"trace", "refer", "densecap"}
    assert config.data.batch_size == 128


def test_canvas_mismatch_names_both_fields():
    config = smoke.get_config()
    config.model.canvas_size = 48
    with pytest.raises(ValueError, match=r"model\.canvas_size 48 != data\.sizes\.canvas 32"):
        experiment.check(config)


def test_points_per_token_mismatch_names_both_fields():
    config = smoke.get_config()
    config.model.point_head.num_points = 4
    with pytest.raises(ValueError, match=r"model\.point_head\.num_points 4 != "
                                         r"data\.sizes\.points_per_token 2"):
        experiment.check(config)


def test_data_sizes_override_without_op_chains_is_refused():
    config = smoke.get_config()
    config.data.sizes.text_length = 20
    with pytest.raises(ValueError, match=r"data\.train\[0\] \(ln_coco_trace\)\.ops\[4\] "
                                         r"\(tokenize\) text_length 16 != data\.sizes\.text_length 20"):
        experiment.check(config)


def test_more_text_proposals_than_slots_is_refused():
    config = smoke.get_config()
    config.model.dense_captioning.num_text_proposals = 3
    with pytest.raises(ValueError, match=r"num_text_proposals 3 > data\.sizes\.slots 2"):
        experiment.check(config)


def test_decoder_sequence_longer_than_its_context_is_refused():
    config = smoke.get_config("decoder")
    config.model.language_model.model.max_position_embeddings = 16
    # 4 visual queries + 8 context + 16 text tokens.
    with pytest.raises(ValueError, match=r"= 28 > model\.language_model\.model\."
                                         r"max_position_embeddings 16"):
        experiment.check(config)


def test_a_second_tokenizer_is_refused():
    config = smoke.get_config()
    config.data.tokenizer = "spiece.model"
    experiment.check(config)
    config.data.train[0]["ops"][4]["tokenizer"] = "other.model"
    with pytest.raises(ValueError, match=r"tokenizer 'other.model' != data.tokenizer 'spiece.model'"):
        experiment.check(config)


def test_experiment_is_locked():
    config = smoke.get_config()
    with pytest.raises(AttributeError, match="skip_policy"):
        config.data.skip_poliy = "fail"
