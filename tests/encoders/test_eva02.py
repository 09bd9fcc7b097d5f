"""EVA02 against timm's `Eva` (tiny random configs), its converter, sizes, modes and sharding."""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from timm.layers.pos_embed_sincos import create_rope_embed
from timm.models.eva import Eva, checkpoint_filter_fn

from configs import eva02 as eva02_config
from pixelllm import sharding
from pixelllm.checkpoints.assign import CheckpointMismatchError
from pixelllm.encoders.eva02 import Eva02, load, rope_table
from pixelllm.nn import abstract

TINY = dict(patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4 * 2 / 3)


def timm_eva(img_size=32, **overrides):
    """A tiny timm EVA02 with the kwargs of timm's `eva02_large_patch14_448`, random weights."""
    kwargs = dict(img_size=img_size, **TINY, qkv_fused=False, swiglu_mlp=True, scale_mlp=True,
                  use_rot_pos_emb=True, ref_feat_shape=(4, 4), global_pool="avg", num_classes=10)
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = Eva(**kwargs).eval()
    # timm starts LayerNorms at 1/0 and biases at 0; perturb everything so each tensor matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def numpy_state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def ours(img_size=32, **overrides):
    kwargs = dict(img_size=img_size, **TINY, rope_ref_grid=4)
    kwargs.update(overrides)
    return Eva02(**kwargs, rngs=nnx.Rngs(0))


# Jitted, so each test compiles one program instead of every eager op.
forward = nnx.jit(lambda model, x: model(x))
forward_tokens = nnx.jit(lambda model, x: model.forward_tokens(x))


def images(batch=2, size=32, seed=0):
    return np.random.RandomState(seed).randn(batch, 3, size, size).astype(np.float32)


def nhwc(x):
    return jnp.asarray(x.transpose(0, 2, 3, 1))


def test_eva02_parity_with_timm(caplog):
    reference = timm_eva()
    model = ours()
    with caplog.at_level(logging.INFO, logger="pixelllm.encoders.eva02"):
        load(model, numpy_state(reference), source="timm")
    assert "head.bias, head.weight" in caplog.text

    x = images()
    with torch.no_grad():
        tokens = reference.forward_features(torch.from_numpy(x))
        normed = reference.fc_norm(tokens[:, 1:]).numpy()
    got_tokens = np.asarray(forward_tokens(model, nhwc(x)))
    got = np.asarray(forward(model, nhwc(x)))
    assert got_tokens.shape == (2, 17, 64)
    assert got.shape == (2, 4, 4, 64)
    assert np.abs(got_tokens - tokens.numpy()).max() <= 1e-4
    assert np.abs(got.reshape(2, 16, 64) - normed).max() <= 1e-4


def test_eva02_rope_table_matches_timm_at_448():
    # EVA02-L at 448: a 32x32 grid, head dim 64, positions scaled to the 16x16 reference grid.
    reference = create_rope_embed(rope_type="cat", dim=1024, num_heads=16, feat_shape=[32, 32],
                                  in_pixels=False, ref_feat_shape=(16, 16))
    sin, cos = reference.get_embed().chunk(2, -1)
    got_sin, got_cos = rope_table((32, 32), 64, (16, 16))
    assert got_sin.shape == (1024, 64)
    assert np.abs(got_sin - sin.numpy()).max() <= 1e-5
    assert np.abs(got_cos - cos.numpy()).max() <= 1e-5


def test_eva02_parity_with_timm_resampled_pos_embed():
    state = numpy_state(timm_eva(img_size=32))
    reference = timm_eva(img_size=48)
    filtered = checkpoint_filter_fn({k: torch.from_numpy(v) for k, v in state.items()}, reference)
    reference.load_state_dict(filtered)
    assert tuple(reference.pos_embed.shape) == (1, 37, 64)

    model = ours(img_size=48)
    load(model, state, source="timm")
    np.testing.assert_allclose(model.pos_embed[...], filtered["pos_embed"].numpy(), atol=1e-5)
    x = images(size=48)
    with torch.no_grad():
        expected = reference.forward_features(torch.from_numpy(x)).numpy()
    assert np.abs(np.asarray(forward_tokens(model, nhwc(x))) - expected).max() <= 1e-4


def params(model):
    return {"/".join(map(str, path)): np.asarray(v.get_value())
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def to_baai(state):
    """timm names -> BAAI EVA-02 names (the inverse of timm's checkpoint_filter_fn renames)."""
    renames = (("attn.q_proj.bias", "attn.q_bias"), ("attn.v_proj.bias", "attn.v_bias"),
               ("mlp.fc1_g.", "mlp.w1."), ("mlp.fc1_x.", "mlp.w2."), ("mlp.norm.", "mlp.ffn_ln."),
               ("mlp.fc2.", "mlp.w3."))
    out = {}
    for key, value in state.items():
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = value
    return out


def test_eva02_baai_names_convert_like_timm(caplog):
    state = numpy_state(timm_eva())
    expected = params(load(ours(), state, source="timm"))

    finetuned = to_baai(state)
    finetuned["rope.freqs_cos"] = np.zeros((16, 16), np.float32)
    finetuned["rope.freqs_sin"] = np.zeros((16, 16), np.float32)
    assert "blocks.0.mlp.w1.weight" in finetuned and "blocks.0.attn.q_bias" in finetuned

    # MIM pretraining checkpoint: final `norm` instead of `fc_norm`, plus mask token and lm_head.
    mim = to_baai(state)
    mim["norm.weight"], mim["norm.bias"] = mim.pop("fc_norm.weight"), mim.pop("fc_norm.bias")
    del mim["head.weight"], mim["head.bias"]
    mim["mask_token"] = np.zeros((1, 1, 64), np.float32)
    mim["lm_head.weight"] = np.zeros((8, 64), np.float32)
    mim["lm_head.bias"] = np.zeros((8,), np.float32)

    for variant in (finetuned, mim):
        with caplog.at_level(logging.INFO, logger="pixelllm.encoders.eva02"):
            got = params(load(ours(), variant, source="baai"))
        assert got.keys() == expected.keys()
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    assert "rope.freqs_cos" in caplog.text
    assert "lm_head.bias, lm_head.weight, mask_token" in caplog.text


@pytest.mark.parametrize("variant, timm_name, count", [
    ("large", "eva02_large_patch14_448", 304_055_232),
    ("base", "eva02_base_patch14_448", None),
])
def test_eva02_param_count_matches_timm(variant, timm_name, count):
    with torch.device("meta"):
        reference = timm.create_model(timm_name, pretrained=False, num_classes=0)
    timm_count = sum(p.numel() for p in reference.parameters())
    config = eva02_config.get_config(variant).model
    model = abstract.build_abstract(lambda rngs: Eva02(**config, rngs=rngs))
    got = sharding.param_count(nnx.state(model, nnx.Param))
    assert got == timm_count
    if count is not None:
        assert got == count


def test_eva02_drop_path_train_and_eval():
    # The drop-path RNG stream is model state that a checkpoint does not hold.
    model = load(ours(drop_path_rate=0.5), numpy_state(timm_eva()), source="timm")
    # Identical examples: a per-example mask makes them differ from each other in train mode.
    x = nhwc(np.repeat(images(batch=1), 8, axis=0))

    reference = np.asarray(forward(model, x))
    np.testing.assert_array_equal(np.asarray(forward(model, x)), reference)  # built in eval mode

    model.train()
    first, second = np.asarray(forward(model, x)), np.asarray(forward(model, x))
    assert np.abs(first - second).max() > 1e-3  # the dropout stream advances
    assert np.abs(first - reference).max() > 1e-3
    assert np.abs(first - first[:1]).max() > 1e-3  # per example, not per batch

    model.eval()
    np.testing.assert_array_equal(np.asarray(forward(model, x)), reference)


@pytest.mark.parametrize("shape", [(2, 32, 32), (2, 32, 32, 4), (2, 40, 40, 3), (2, 3, 32, 32)])
def test_eva02_rejects_bad_images(shape):
    with pytest.raises(ValueError, match=r"expects images \[B, 32, 32, 3\].*received shape "
                                         + re.escape(str(shape))):
        ours()(jnp.zeros(shape))


def test_eva02_converter_names_wrong_variant_keys():
    # timm's eva02_small layout: fused qkv and a packed SwiGLU without sub-LN.
    fused = numpy_state(timm_eva(qkv_fused=True, scale_mlp=False))
    with pytest.raises(CheckpointMismatchError) as info:
        load(ours(), fused, source="fused.pth")
    message = str(info.value)
    for key in ("blocks.0.attn.qkv.weight", "blocks.0.attn.q_bias", "blocks.0.mlp.fc1.weight",
                "blocks.0.attn.q_proj.weight", "blocks.0.mlp.norm.weight"):
        assert key in message

    state = numpy_state(timm_eva())
    broken = dict(state, **{"foo.bar": np.zeros(3, np.float32)})
    del broken["blocks.1.attn.k_proj.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"broken.pth: .*\n.*missing keys: "
                                                      r"blocks\.1\.attn\.k_proj\.weight") as info:
        load(ours(), broken, source="broken.pth")
    assert "unexpected keys: foo.bar" in str(info.value)

    deeper = numpy_state(timm_eva(depth=3))
    with pytest.raises(CheckpointMismatchError,
                       match=r"deeper.pth: .*this looks like an EVA02 of embed_dim 64, depth 3; "
                             r"the model is an EVA02 of embed_dim 64, depth 2\n.*unexpected keys: "
                             r"blocks\.2\."):
        load(ours(), deeper, source="deeper.pth")
    wider = numpy_state(timm_eva(embed_dim=96, num_heads=6))
    with pytest.raises(CheckpointMismatchError,
                       match=r"blocks\.0\.attn\.q_proj\.weight \(file \(96, 96\), after transpose "
                             r"\(96, 96\); model blocks/0/attn/q/kernel \(64, 64\)\)"):
        load(ours(), wider, source="wider.pth")
    # Only what the message reads: the width of cls_token and the number of blocks.
    base = {"cls_token": np.zeros((1, 1, 768), np.float32)} | {
        f"blocks.{i}.norm1.weight": np.zeros(768, np.float32) for i in range(12)}
    with pytest.raises(CheckpointMismatchError, match=r"base.pth: .*this looks like EVA02-B "
                                                      r"\(embed_dim 768, depth 12\); the model is"):
        load(ours(), base, source="base.pth")


def test_eva02_sharded_matches_single_device():
    assert len(jax.devices()) == 8
    state = numpy_state(timm_eva())
    x = nhwc(images(batch=4))
    expected = np.asarray(forward(load(ours(), state, source="timm"), x))

    mesh = sharding.make_mesh((2, 2, 2))
    model = sharding.shard_model(load(ours(mesh=mesh), state, source="timm"), mesh,
                                 sharding.DEFAULT_RULES)
    assert model.blocks[0].attn.q.kernel[...].sharding.spec == PartitionSpec("fsdp", "tensor")
    assert model.blocks[0].mlp.fc2.kernel[...].sharding.spec == PartitionSpec("tensor", "fsdp")
    x = jax.device_put(x, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    graphdef, params = nnx.split(model)
    sharded_forward = jax.jit(lambda p, images: nnx.merge(graphdef, p)(images))
    got = sharded_forward(params, x)
    assert got.shape == (4, 4, 4, 64)
    assert got.sharding.spec[0] == ("data", "fsdp")
    assert np.abs(np.asarray(got) - expected).max() <= 1e-5


def test_eva02_loads_at_a_canvas_not_a_multiple_of_the_patch():
    """The paper's canvas (384 with patch 14) floors to a 27x27 grid; a checkpoint loads there
    and the model equals timm at the floored size (the last pixels are never seen): here 44
    pixels with patch 8 -> a 5x5 grid, the timm reference built at 40."""
    state = numpy_state(timm_eva(img_size=32))
    model = ours(img_size=44)
    load(model, state, source="timm")
    reference = timm_eva(img_size=40)
    reference.load_state_dict(checkpoint_filter_fn(
        {k: torch.from_numpy(v) for k, v in state.items()}, reference))
    x = images(size=44)
    with torch.no_grad():
        expected = reference.forward_features(torch.from_numpy(x[:, :, :40, :40])).numpy()
    got = np.asarray(forward_tokens(model, nhwc(x)))
    assert got.shape == (2, 1 + 5 * 5, 64)
    assert np.abs(got - expected).max() <= 1e-4
