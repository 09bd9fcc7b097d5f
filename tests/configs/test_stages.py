"""The training stages: every one builds, is locked, parses as optimizer settings, freezes what the
official stage freezes, builds what the official stage builds, keeps the official values, and
can start from the checkpoint of the stage it follows."""

import functools

import jax
import numpy as np
import pytest
from configs import stages
from flax import nnx

from pixelllm import batch as batch_lib
from pixelllm.models.pixel_llm.pixel_llm import PixelLLM
from pixelllm.nn import abstract
from pixelllm.train import optimizer, trained_set

NAMES = [name + suffix for name in stages.STAGES for suffix in ("", "_tiny")]


@functools.cache
def tiny_model(name):
    """Stage ``name``'s tiny model, shapes only: the patterns, counts and paths need no values."""
    config = stages.get_config(name + "_tiny").model
    return abstract.build_abstract(lambda rngs: PixelLLM.from_config(config, rngs=rngs))


def weight_shapes(model) -> dict[str, tuple[int, ...]]:
    return {trained_set.path_string(path): tuple(variable.get_value().shape)
            for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.RngState)))}


@pytest.mark.parametrize("name", NAMES)
def test_every_stage_builds_locked_with_the_schema_fields(name):
    config = stages.get_config(name)
    assert config.stage == name
    for field in ("seed", "train", "optimizer", "frozen", "init", "checkpoint", "mesh_shape",
                  "model", "loss", "data", "sharding"):
        assert field in config, field
    assert set(config.init) == {"sam", "eva02", "language_model", "tokenizer", "checkpoint"}
    with pytest.raises(AttributeError, match="cannot be added since the config is locked"):
        config.train.batch_sise = 1
    with pytest.raises(AttributeError, match="cannot be added since the config is locked"):
        config.not_a_field = 1
    settings = optimizer.OptimizerSettings.from_config(config.optimizer)
    assert settings.total_steps == config.train.steps
    assert config.data.batch_size == config.train.batch_size
    assert config.model.dense_captioning.num_text_proposals <= config.data.sizes.slots


@pytest.mark.parametrize("name", [name for name in NAMES if name.endswith("_tiny")])
def test_tiny_stages_train_in_seconds(name):
    config = stages.get_config(name)
    # The multi-task stage's tiny data mixes all its sources (tests/train/test_multitask_tiny.py).
    data = "smoke_multitask" if name == "multitask_tiny" else "smoke"
    assert (config.model_variant, config.data_variant) == ("tiny", data)
    assert (config.train.batch_size, config.train.steps, config.optimizer.warmup_steps,
            config.checkpoint.save_interval_steps) == (4, 4, 1, 2)
    assert config.train.eval_every == 0
    assert set(config.init.values()) == {""}
    full = stages.get_config(name.removesuffix("_tiny"))
    assert config.frozen == full.frozen
    for module in stages.OPTIONAL_MODULES:
        assert (config.model[module] is None) == (full.model[module] is None), module
    assert config.optimizer.lr_multipliers == full.optimizer.lr_multipliers
    assert config.optimizer.layer_decay == full.optimizer.layer_decay


@pytest.mark.parametrize("name", list(stages.STAGES))
def test_frozen_patterns_match_the_model(name):
    config, model = stages.get_config(name + "_tiny"), tiny_model(name)
    for pattern in config.frozen:
        # trained_filter refuses a pattern that matches no parameter.
        trained_set.trained_filter(model, (pattern,))
    trained = trained_set.trained_filter(model, config.frozen)
    counts = {module: count for module, count, _ in
              trained_set.parameter_counts(model, trained) if count}
    towers = {"eva02", "prompt_adapter", "lm"}
    expected = {  # besides "total"
        "trace": towers | {"point_head"},
        "ref": towers | {"point_head"},
        "refseg": {"mask_adapter", "point_head"},
        "densecap": towers | {"proposal_head"},
        "multitask": towers | {"point_head", "proposal_head"},
        "multitask_refseg": {"mask_adapter"},
    }[name] | {"total"}
    assert set(counts) == expected


# The modules each official stage does not build (scenic configs/t5/pixel_llm_t5_<stage>.py):
# box_decoder_name 'none' = no proposal head; mask_adapter_name 'sam_mask_adapter' set only in
# the two refseg configs, the model's default being 'none' (modeling/pixel_llm.py:98).
UNBUILT = {
    "trace": {"mask_adapter", "proposal_head"},  # _trace.py:314 box_decoder_name 'none'
    "ref": {"mask_adapter", "proposal_head"},    # _ref.py:347 box_decoder_name 'none'
    "refseg": {"proposal_head"},                 # _refseg.py:345 'none', :383 sam_mask_adapter
    "densecap": {"mask_adapter"},                # _densecap.py:333 centernet2_det_decoder
    "multitask": {"mask_adapter"},               # _trace_ref_densecap_llava.py:716 centernet2
    "multitask_refseg": set(),                   # _trace_refseg_densecap_llava.py:492, :533
}


@pytest.mark.parametrize("name", NAMES)
def test_stages_build_what_the_official_stage_builds(name):
    config = stages.get_config(name)
    unbuilt = {module for module in stages.OPTIONAL_MODULES if config.model[module] is None}
    assert unbuilt == UNBUILT[name.removesuffix("_tiny")]
    if name.endswith("_tiny"):
        model = tiny_model(name.removesuffix("_tiny"))
        assert {module for module in stages.OPTIONAL_MODULES
                if getattr(model, module) is None} == unbuilt
        assert not any(path.split("/")[0] in unbuilt for path in weight_shapes(model))


@pytest.mark.parametrize("name", [name for name, stage in stages.STAGES.items()
                                  if stage.init_from])
def test_a_stage_has_every_array_of_the_stage_it_starts_from(name):
    """pixelllm.train.initialize refuses a checkpoint array the model lacks, so every weight of
    the earlier stage (its checkpoint holds some of them) is a weight of this one, of the same
    shape: the tiny models' weights, and the full configs' built modules."""
    earlier = stages.STAGES[name].init_from
    later_shapes = weight_shapes(tiny_model(name))
    earlier_shapes = weight_shapes(tiny_model(earlier))
    assert {path: later_shapes.get(path) for path in earlier_shapes} == earlier_shapes
    assert UNBUILT[name] <= UNBUILT[earlier]
    for module in stages.OPTIONAL_MODULES:
        if stages.get_config(earlier).model[module] is not None:
            assert stages.get_config(name).model[module] == stages.get_config(
                earlier).model[module], module


def test_official_values():
    table = {  # batch, steps, warm-up, lr, wd, layer decay (official configs/t5/*.py)
        "trace": (256, 10_000, 250, 5e-5, 0.0, None),
        "ref": (64, 120_000, 1_000, 5e-5, 0.0, None),
        "refseg": (64, 60_000, 500, 5e-5, 0.0, None),
        "densecap": (64, 40_000, 1_000, 1e-4, 0.05, 0.8),
        "multitask": (128, 240_000, 2_000, 1e-4, 0.05, 0.8),
        "multitask_refseg": (128, 30_000, 250, 1e-4, 0.0, None),
    }
    for name, values in table.items():
        config = stages.get_config(name)
        o = config.optimizer
        assert (config.train.batch_size, config.train.steps, o.warmup_steps, o.learning_rate,
                o.weight_decay, o.layer_decay) == values, name
        assert (o.b1, o.b2, o.eps, o.grad_clip_norm) == (0.9, 0.999, 1e-8, None), name
        assert config.model_variant == "t5_xl"
    assert stages.get_config("densecap").model.dense_captioning.num_text_proposals == 32
    assert stages.get_config("multitask").model.dense_captioning.num_text_proposals == 16
    assert stages.get_config("densecap").optimizer.eva02_num_layers == 24
    assert stages.get_config("densecap").checkpoint.save_interval_steps == 5_000
    refseg = optimizer.OptimizerSettings.from_config(stages.get_config("refseg").optimizer)
    assert optimizer.multiplier_of(refseg, "mask_adapter/queries") == 10.0
    assert optimizer.multiplier_of(refseg, "point_head/hidden/0/kernel") == 1.0
    multitask_refseg = stages.get_config("multitask_refseg")
    assert multitask_refseg.optimizer.lr_multipliers == ()
    densecap = optimizer.OptimizerSettings.from_config(stages.get_config("densecap").optimizer)
    np.testing.assert_allclose(
        optimizer.learning_rate_of(densecap, "eva02/blocks/3/attn/q/kernel", 20_000),
        1e-4 * 0.5 * (1 + np.cos(np.pi * 19_000 / 39_000)) * 0.8 ** 21, rtol=1e-6)
    # The official mixtures: COCO captions 1 : Localized Narratives 2 (trace), the UNINEXT
    # referring trio 1 : 5 : 1 (ref), instruction data at weight 5 (multitask).
    assert {(source["task"], source["weight"])
            for source in stages.get_config("trace").data.train} == {("caption", 1.0),
                                                                      ("trace", 2.0)}
    assert [source["weight"] for source in stages.get_config("ref").data.train] == [1.0, 5.0, 1.0]
    assert ("question_answer", 5.0) in {(source["task"], source["weight"])
                                        for source in stages.get_config("multitask").data.train}
    assert {source["task"] for source in stages.get_config("multitask_refseg").data.train} == {
        "refseg"}


def test_init_sources_chain_the_stages():
    init = {name: stages.get_config(name).init for name in stages.STAGES}
    assert {name: i.checkpoint for name, i in init.items()} == {
        "trace": "", "ref": "workdirs/trace", "refseg": "workdirs/ref",
        "densecap": "workdirs/trace", "multitask": "", "multitask_refseg": "workdirs/multitask"}
    # EVA02 from its public file only where the official starts from its WebLI checkpoint.
    assert {name for name, i in init.items() if i.eva02} == {"trace", "multitask"}
    for name, i in init.items():
        assert (i.sam, i.language_model) == (stages.SAM_H, stages.FLAN_T5_XL), name
        assert i.tokenizer == stages.get_config(name).data.tokenizer


def test_unknown_stage_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown stage 'tracee'.*'trace'"):
        stages.get_config("tracee")


@pytest.mark.parametrize("name, lm_trained", [("trace_harness", 8_338_560),
                                               ("trace_harness_lora", 32_768)])
def test_harness_variant_has_the_official_harness_sizes(name, lm_trained):
    """shared/anchors/scenic/README.md, "The tiny configuration": shapes through jax.eval_shape."""
    config = stages.get_config(name)
    assert config.stage == name and config.frozen == ()
    assert (config.train.batch_size, config.data.sizes.canvas, config.data.sizes.slots,
            config.data.sizes.context_length, config.data.sizes.text_length) == (8, 224, 1, 8, 128)
    assert (config.model.mask_adapter, config.model.proposal_head) == (None, None)
    model = abstract.build_abstract(lambda rngs: PixelLLM.from_config(config.model, rngs=rngs))
    counts = {module: (trained, frozen) for module, trained, frozen in trained_set.parameter_counts(
        model, trained_set.trained_filter(model, config.frozen))}
    # Equal to the official groups: EVA02 (git_backbone) and SAM's image encoder (sam_backbone).
    assert counts["eva02"] == (506_408, 0)
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model.sam.image_encoder, nnx.Param))) \
        == 568_832
    assert counts["lm"][0] == lm_trained and counts["sam"][0] == 0
    lm = model.lm.config
    assert (lm.vocab_size, lm.hidden_size, lm.num_layers, lm.num_heads, lm.intermediate_size,
            lm.tie_word_embeddings) == (30522, 128, 2, 4, 512, False)

    batch = {key: jax.ShapeDtypeStruct(shape, dtype) for key, (shape, dtype) in
             batch_lib.batch_spec(batch_lib.Sizes(**config.data.sizes), 8).items()}

    def forward(model, batch):
        features = model.encode_image(batch["image"], batch["valid_wh"])
        return features, model(batch).slots

    features, slots = nnx.eval_shape(forward, model, batch)
    assert features.sam.shape == (8, 14, 14, 64)            # SAM: patch 16, neck 64
    assert features.fused.shape == (8, 16, 16, 192)         # EVA02 16x16x128 + SAM resized
    assert slots.visual_tokens.shape == (8, 1, 32, 128)     # 32 adapter outputs of width 128
    assert slots.logits.shape == (8, 1, 128, 30522)
    assert slots.token_points.shape == (8, 1, 128, 2, 2)
