"""A stage starts from public files and an earlier stage's checkpoint at once; what nothing loaded
keeps its random init, and the report says which source gave what."""

import re

import numpy as np
import optax
import pytest
import safetensors.numpy
import torch
from configs import stages
from flax import nnx
from timm.models.eva import Eva

from pixelllm.checkpoints.assign import CheckpointMismatchError
from pixelllm.models.pixel_llm.pixel_llm import PixelLLM
from pixelllm.train import initialize
from pixelllm.train.checkpointing import Checkpointer
from pixelllm.train.trained_set import path_string


@pytest.fixture(scope="module")
def model_config():
    # The referring-segmentation stage: it starts from ref, which builds no mask adapter.
    return stages.get_config("refseg_tiny").model


def _flat(model):
    return {path_string(path): np.asarray(variable.get_value()) for path, variable
            in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.RngState)))}


def _eva02_file(config, folder):
    e = config.eva02
    torch.manual_seed(2)
    module = Eva(img_size=e.img_size, patch_size=e.patch_size, embed_dim=e.embed_dim,
                 depth=e.depth, num_heads=e.num_heads, mlp_ratio=e.mlp_ratio, qkv_fused=False,
                 swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True,
                 ref_feat_shape=(e.rope_ref_grid,) * 2, global_pool="avg", num_classes=0)
    state = {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
    path = folder / "eva02.safetensors"
    safetensors.numpy.save_file(state, str(path))
    return path


def _not_under(*modules):
    pattern = re.compile("|".join(f"{module}/" for module in modules))
    return lambda path, _: not pattern.match(path_string(path))


def test_public_file_and_earlier_stage_fill_their_parameters_and_the_rest_keeps_its_init(
        tmp_path, model_config):
    # The earlier stage (ref): trained everything but EVA02 here, and builds no mask adapter.
    earlier = PixelLLM.from_config(stages.get_config("ref_tiny").model, rngs=nnx.Rngs(1))
    assert earlier.mask_adapter is None and model_config.mask_adapter is not None
    saved = nnx.state(earlier, nnx.All(earlier.trainable(), _not_under("eva02")))
    with Checkpointer(tmp_path / "ref" / initialize.CHECKPOINTS) as checkpointer:
        checkpointer.save(4, {"params": saved, "opt_state": optax.adam(1e-3).init(saved)})
    saved_values = {path_string(path): np.asarray(variable.get_value())
                    for path, variable in nnx.to_flat_state(saved)}
    eva02_file = _eva02_file(model_config, tmp_path)

    model = PixelLLM.from_config(model_config, rngs=nnx.Rngs(0))
    before = _flat(model)
    report = initialize.initialize(model, dict(sam="", eva02=str(eva02_file), language_model="",
                                               tokenizer="", checkpoint=str(tmp_path / "ref")))
    after = _flat(model)

    step_source = f"checkpoint: {tmp_path / 'ref' / initialize.CHECKPOINTS / '4'}"
    assert any(path.startswith("prompt_adapter/") for path in saved_values)
    assert any("lora" in path for path in saved_values)
    for path, value in saved_values.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)
        assert report.sources[path] == step_source
    eva02_paths = [path for path in after if path.startswith("eva02/")]
    assert eva02_paths
    np.testing.assert_array_equal(
        after["eva02/patch_embed/bias"],
        safetensors.numpy.load_file(str(eva02_file))["patch_embed.proj.bias"])
    assert {report.sources[path] for path in eva02_paths} == {f"eva02: {eva02_file}"}
    # Nothing loaded these: SAM (no file given), the LM base (no folder), the mask adapter
    # (the earlier stage had none).
    untouched = [path for path in after if path not in saved_values
                 and not path.startswith("eva02/")]
    assert any(path.startswith("mask_adapter/") for path in untouched)
    assert any(path.startswith("sam/") for path in untouched)
    for path in untouched:
        np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    assert report.random_init() == sorted(untouched)
    rows = {(module, source): arrays for module, source, arrays, _ in report.rows()}
    assert rows[("mask_adapter", initialize.RANDOM_INIT)] == sum(
        path.startswith("mask_adapter/") for path in after)
    assert ("mask_adapter", step_source) not in rows
    assert rows[("eva02", f"eva02: {eva02_file}")] == len(eva02_paths)
    assert "mask_adapter" in report.format() and step_source in report.format()


def test_a_checkpoint_of_another_model_is_refused_naming_its_folder(tmp_path, model_config):
    model = PixelLLM.from_config(model_config, rngs=nnx.Rngs(0))
    kernel = model.point_head.points_out.kernel.get_value()
    wrong = {"point_head": {"points_out": {"kernel": {"value": np.zeros((5, 5), np.float32)}}},
             "not_a_module": {"w": {"value": np.zeros(2, np.float32)}}}
    with Checkpointer(tmp_path / "ref" / initialize.CHECKPOINTS) as checkpointer:
        checkpointer.save(2, {"params": wrong})
    before = _flat(model)
    with pytest.raises(CheckpointMismatchError) as error:
        initialize.initialize(model, dict(checkpoint=str(tmp_path / "ref")))
    message = str(error.value)
    assert str(tmp_path / "ref" / initialize.CHECKPOINTS / "2" / "params") in message
    assert f"point_head/points_out/kernel (checkpoint (5, 5), model {kernel.shape})" in message
    assert "unexpected arrays: not_a_module/w" in message
    for path, value in _flat(model).items():
        np.testing.assert_array_equal(value, before[path], err_msg=path)


def test_bad_init_fields_are_named(tmp_path, model_config):
    model = PixelLLM.from_config(model_config, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="init.checkpiont is not an init source"):
        initialize.initialize(model, dict(checkpiont=str(tmp_path)))
    with pytest.raises(ValueError, match=f"init.checkpoint: {tmp_path}/none/checkpoints does "
                                         "not exist"):
        initialize.initialize(model, dict(checkpoint=str(tmp_path / "none")))
    (tmp_path / "empty" / initialize.CHECKPOINTS).mkdir(parents=True)
    with pytest.raises(ValueError, match="init.checkpoint: no complete checkpoint in"):
        initialize.initialize(model, dict(checkpoint=str(tmp_path / "empty")))


def test_nothing_given_loads_nothing(model_config):
    model = PixelLLM.from_config(model_config, rngs=nnx.Rngs(0))
    report = initialize.initialize(model, stages.get_config("refseg_tiny").init)
    assert set(report.sources.values()) == {initialize.RANDOM_INIT}
    assert sum(report.sizes.values()) == sum(value.size for value in _flat(model).values())
