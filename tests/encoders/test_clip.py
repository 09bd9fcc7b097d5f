"""The CLIP vision tower against transformers' `CLIPVisionModel` (tiny random configs), its
converter, config reading, full sizes and sharding."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from pixelllm import sharding
from pixelllm.checkpoints.assign import CheckpointMismatchError
from pixelllm.encoders import clip
from pixelllm.encoders.clip import ClipVision, load, load_clip
from pixelllm.nn import abstract

TINY = dict(width=32, depth=3, heads=4, mlp_dim=64, patch_size=4, layer_norm_eps=1e-5)


def hf_config(image_size, **overrides):
    return CLIPVisionConfig(hidden_size=TINY["width"], intermediate_size=TINY["mlp_dim"],
                            num_hidden_layers=TINY["depth"], num_attention_heads=TINY["heads"],
                            patch_size=TINY["patch_size"], image_size=image_size, **overrides)


def perturbed(model):
    """transformers starts LayerNorms at 1/0 and biases at 0; perturb everything so each tensor
    matters."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def hf_vision(image_size=16):
    torch.manual_seed(0)
    return perturbed(CLIPVisionModel(hf_config(image_size)))


def numpy_state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def ours(image_size=16, **overrides):
    return ClipVision(**{**TINY, **overrides}, image_size=image_size, rngs=nnx.Rngs(0))


forward = nnx.jit(lambda model, x: model(x))
patch_features = nnx.jit(lambda model, x: model.patch_features(x))
# One program for every output the parity test reads: hidden states 0 (the embeddings after
# pre_layrnorm) and -3 (layer 1's output, by negative index) besides the two entries.
everything = nnx.jit(lambda model, x: (
    model.patch_features(x), model(x),
    [model.hidden_state(x, layer=layer) for layer in (0, -3)]))


def pixels(batch=2, size=16, seed=0):
    return np.random.RandomState(seed).randn(batch, 3, size, size).astype(np.float32)


def nhwc(x):
    return jnp.asarray(x.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("image_size", [16, 24])  # the analogues of 224 and 336: 4x4, 6x6 grids
def test_clip_parity_with_transformers(image_size):
    reference = hf_vision(image_size)
    model = load(ours(image_size), numpy_state(reference), source="hf")
    x = pixels(size=image_size)
    with torch.no_grad():
        out = reference(torch.from_numpy(x), output_hidden_states=True)
    assert len(out.hidden_states) == TINY["depth"] + 1
    grid = image_size // TINY["patch_size"]

    got, full, (embeddings, layer1) = everything(model, nhwc(x))
    assert got.shape == (2, grid * grid, 32)
    np.testing.assert_allclose(np.asarray(got), out.hidden_states[-2][:, 1:].numpy(), atol=1e-5,
                               rtol=0)
    np.testing.assert_allclose(np.asarray(full.last_hidden_state),
                               out.last_hidden_state.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(full.pooled), out.pooler_output.numpy(), atol=1e-5,
                               rtol=0)
    np.testing.assert_allclose(np.asarray(embeddings), out.hidden_states[0].numpy(), atol=1e-5,
                               rtol=0)
    np.testing.assert_allclose(np.asarray(layer1), out.hidden_states[1].numpy(), atol=1e-5,
                               rtol=0)


def test_clip_patch_features_skip_the_last_layer():
    model = ours()
    x = nhwc(pixels())
    before = np.asarray(patch_features(model, x))
    # A broken last layer changes the tower's output but not the layer -2 features.
    model.layers[-1].mlp.fc2.kernel[...] = jnp.full_like(model.layers[-1].mlp.fc2.kernel[...],
                                                         jnp.nan)
    np.testing.assert_array_equal(np.asarray(patch_features(model, x)), before)
    assert np.isnan(np.asarray(forward(model, x).last_hidden_state)).all()


@pytest.mark.parametrize("name,image_size", [("vit_l14_224", 224), ("vit_l14_336", 336)])
def test_clip_param_count_matches_transformers(name, image_size):
    config = clip.NAMED_CONFIGS[name]
    assert config["image_size"] == image_size
    model = abstract.build_abstract(lambda rngs: ClipVision(**config, rngs=rngs))
    ours_count = sum(int(np.prod(v.get_value().shape))
                     for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    with torch.device("meta"):
        reference = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
            num_attention_heads=16, patch_size=14, image_size=image_size, projection_dim=768))
    assert ours_count == sum(p.numel() for p in reference.parameters())
    features = nnx.eval_shape(lambda m: m.patch_features(
        jnp.zeros((1, image_size, image_size, 3))), model)
    assert features.shape == (1, (image_size // 14) ** 2, 1024)


def clip_model_state():
    """A whole `CLIPModel` state dict (text tower, projections, logit_scale) and its vision part
    as a `CLIPVisionModel`."""
    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, vocab_size=50,
                                         max_position_embeddings=8),
                        vision_config=hf_config(16).to_dict(), projection_dim=16)
    torch.manual_seed(0)
    whole = perturbed(CLIPModel(config))
    vision = CLIPVisionModel(config.vision_config)
    vision.load_state_dict({k[len("vision_model."):]: v for k, v in whole.state_dict().items()
                            if k.startswith("vision_model.")})
    # Older transformers saved the position_ids buffer; such files must load too.
    state = numpy_state(whole) | {"vision_model.embeddings.position_ids": np.arange(17)[None]}
    return state, vision.eval(), config


def test_clip_loads_a_clip_model_file_and_its_config(tmp_path, caplog):
    state, reference, config = clip_model_state()
    assert any(k.startswith("text_model.") for k in state) and "logit_scale" in state
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    with caplog.at_level(logging.INFO, logger="pixelllm.encoders.clip"):
        model = load_clip(tmp_path)
    assert "not used by ClipVision" in caplog.text and "logit_scale" in caplog.text
    assert (model.depth, model.grid, model.patch_size) == (3, 4, 4)
    x = pixels()
    with torch.no_grad():
        expected = reference(torch.from_numpy(x), output_hidden_states=True).hidden_states[-2]
    np.testing.assert_allclose(np.asarray(patch_features(model, nhwc(x))),
                               expected[:, 1:].numpy(), atol=1e-5, rtol=0)


def test_clip_prefixed_and_bare_vision_keys_load_alike():
    state = numpy_state(hf_vision())
    bare = load(ours(), state, source="v5")
    prefixed = load(ours(), {"vision_model." + k: v for k, v in state.items()}, source="v4")
    x = nhwc(pixels())
    np.testing.assert_array_equal(np.asarray(patch_features(bare, x)),
                                  np.asarray(patch_features(prefixed, x)))


def test_clip_loader_names_missing_and_misshaped_keys():
    state, _, _ = clip_model_state()
    missing = {k: v for k, v in state.items() if k != "vision_model.encoder.layers.1.mlp.fc1.bias"}
    with pytest.raises(CheckpointMismatchError,
                       match=r"(?s)clip.bin: .*missing keys: "
                             r"vision_model\.encoder\.layers\.1\.mlp\.fc1\.bias"):
        load(ours(), missing, source="clip.bin")
    bad = state | {"vision_model.pre_layrnorm.weight": np.zeros(31, np.float32)}
    with pytest.raises(CheckpointMismatchError,
                       match=r"(?s)clip.bin: .*mis-shaped keys: "
                             r"vision_model\.pre_layrnorm\.weight"):
        load(ours(), bad, source="clip.bin")
    with pytest.raises(CheckpointMismatchError, match=r"clip.bin: not a CLIP vision checkpoint"):
        load(ours(), {"text_model.x": np.zeros(1)}, source="clip.bin")


def test_clip_loader_says_what_a_file_of_another_grid_is():
    state = numpy_state(hf_vision(16))
    with pytest.raises(CheckpointMismatchError,
                       match=r"(?s)224.bin: .*4x4 positions.*the model is .*6x6 positions"
                             r".*embeddings\.position_embedding\.weight"):
        load(ours(24), state, source="224.bin")


def test_clip_config_from_hf():
    whole = CLIPConfig(vision_config=dict(hidden_size=1024, intermediate_size=4096,
                                          num_hidden_layers=24, num_attention_heads=16,
                                          patch_size=14, image_size=336)).to_dict()
    assert clip.config_from_hf(whole, source="c.json") == clip.NAMED_CONFIGS["vit_l14_336"]
    vision = CLIPVisionConfig(**{k: v for k, v in whole["vision_config"].items()
                                 if k != "image_size"}).to_dict()
    assert clip.config_from_hf(vision, source="c.json") == clip.NAMED_CONFIGS["vit_l14_224"]
    # Fields a config.json leaves out take transformers' defaults (ViT-B/32).
    assert clip.config_from_hf({"vision_config": {}}, source="c.json")["patch_size"] == 32
    with pytest.raises(ValueError, match=r"c.json: vision_config.hidden_act='gelu'"):
        clip.config_from_hf({"vision_config": {"hidden_act": "gelu"}}, source="c.json")
    with pytest.raises(ValueError, match=r"c.json: image_size=\[224, 336\]"):
        clip.config_from_hf({"image_size": [224, 336]}, source="c.json")


def test_clip_normalize_and_preprocess():
    images = np.random.RandomState(0).uniform(0, 255, (1, 20, 30, 3)).astype(np.float32)
    expected = (images / 255.0 - np.array(clip.PIXEL_MEAN)) / np.array(clip.PIXEL_STD)
    np.testing.assert_allclose(np.asarray(clip.normalize(images)), expected, atol=1e-6)
    out = clip.preprocess(images, image_size=10)  # 20x30 -> 10x15 -> center 10x10
    assert out.shape == (1, 10, 10, 3)
    flat = np.full((1, 20, 30, 3), 128.0, np.float32)
    np.testing.assert_allclose(np.asarray(clip.preprocess(flat, image_size=10)),
                               np.asarray(clip.normalize(flat[:, :10, :10])), atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 16, 16), (2, 20, 16, 3), (2, 3, 16, 16)])
def test_clip_rejects_bad_pixels(shape):
    with pytest.raises(ValueError, match=r"ClipVision expects pixels \[N, 16, 16, 3\]"):
        ours().patch_features(jnp.zeros(shape))


def test_clip_rejects_a_layer_it_does_not_have():
    with pytest.raises(ValueError, match=r"layer=4 is not a hidden state of a 3-layer tower"):
        ours().hidden_state(jnp.zeros((1, 16, 16, 3)), layer=4)


def test_clip_sharded_matches_single_device():
    assert len(jax.devices()) == 8
    state = numpy_state(hf_vision())
    x = nhwc(pixels(batch=4))
    expected = np.asarray(patch_features(load(ours(), state, source="hf"), x))
    mesh = sharding.make_mesh((2, 2, 2))
    model = sharding.shard_model(load(ours(mesh=mesh), state, source="hf"), mesh,
                                 sharding.DEFAULT_RULES)
    assert model.layers[0].self_attn.q_proj.kernel[...].sharding.spec == PartitionSpec(
        "fsdp", "tensor")
    x = jax.device_put(x, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    graphdef, params = nnx.split(model)
    got = jax.jit(lambda p, images: nnx.merge(graphdef, p).patch_features(images))(params, x)
    assert got.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=0)
