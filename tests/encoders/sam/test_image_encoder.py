"""SAM image encoder: parity with segment_anything and transformers, non-native input size,
full-size parameter counts, input/checkpoint validation, and sharded execution."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from segment_anything.modeling import ImageEncoderViT

from configs import sam as sam_config
from pixelllm import sharding
from pixelllm.checkpoints import key_map
from pixelllm.checkpoints.assign import CheckpointMismatchError, param_shapes
from pixelllm.encoders.sam.image_encoder import SamImageEncoder, key_rules


def _tiny(**overrides) -> dict:
    config = dict(sam_config.get_config("tiny").model.image_encoder)
    config.update(overrides)
    return config


def _torch_encoder(config: dict, *, img_size: int | None = None, seed: int = 0,
                   randomize: bool = True) -> ImageEncoderViT:
    """segment_anything's encoder as build_sam builds it; every parameter random, including the
    position and relative-position tables that initialize to zero."""
    torch.manual_seed(seed)
    encoder = ImageEncoderViT(
        img_size=img_size or config["pretrain_img_size"], patch_size=config["patch_size"],
        embed_dim=config["embed_dim"], depth=config["depth"], num_heads=config["num_heads"],
        mlp_ratio=config["mlp_ratio"], out_chans=config["out_chans"],
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=config["layer_norm_eps"]),
        use_rel_pos=True, window_size=config["window_size"],
        global_attn_indexes=tuple(config["global_attn_indexes"]))
    if randomize:
        with torch.no_grad():
            for p in encoder.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
    return encoder.eval()


def _numpy(module: torch.nn.Module, strip: str = "") -> dict[str, np.ndarray]:
    return {k.removeprefix(strip): v.detach().numpy() for k, v in module.state_dict().items()}


def _jax_encoder(config: dict, state_dict, *, layout: str) -> SamImageEncoder:
    # Built abstractly (no random init), as real checkpoints are loaded.
    model = nnx.eval_shape(lambda: SamImageEncoder(**config, rngs=nnx.Rngs(0)))
    return key_map.load(model, state_dict, key_rules(layout), source="test")


def _forward(model: SamImageEncoder, images: jax.Array) -> jax.Array:
    graphdef, state = nnx.split(model)
    return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, images)


def _images(size: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _compare(model: SamImageEncoder, reference_nchw: torch.Tensor, images: torch.Tensor) -> float:
    out = np.asarray(_forward(model, jnp.asarray(images.permute(0, 2, 3, 1).numpy())))
    expected = reference_nchw.detach().permute(0, 2, 3, 1).numpy()
    assert out.shape == expected.shape
    return float(np.max(np.abs(out - expected)))


def test_sam_image_encoder_parity_with_segment_anything():
    config = _tiny()
    assert config["img_size"] // config["patch_size"] % config["window_size"] != 0
    assert 0 < config["global_attn_indexes"][0] < config["depth"]
    reference = _torch_encoder(config)
    model = _jax_encoder(config, _numpy(reference), layout="segment_anything")
    images = _images(config["img_size"])
    with torch.no_grad():
        expected = reference(images)
    assert expected.shape == (2, config["out_chans"], 10, 10)
    assert _compare(model, expected, images) <= 1e-4


def test_sam_image_encoder_parity_with_transformers():
    from transformers import SamVisionConfig, SamVisionModel

    config = _tiny()
    hf_config = SamVisionConfig(
        image_size=config["img_size"], patch_size=config["patch_size"],
        hidden_size=config["embed_dim"], num_hidden_layers=config["depth"],
        num_attention_heads=config["num_heads"], mlp_ratio=config["mlp_ratio"],
        output_channels=config["out_chans"], window_size=config["window_size"],
        global_attn_indexes=list(config["global_attn_indexes"]),
        layer_norm_eps=config["layer_norm_eps"])
    torch.manual_seed(0)
    reference = SamVisionModel(hf_config).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    state_dict = _numpy(reference, strip="vision_encoder.")
    assert "layers.1.layer_norm1.weight" in state_dict and "neck.conv2.weight" in state_dict
    model = _jax_encoder(config, state_dict, layout="transformers")
    images = _images(config["img_size"])
    with torch.no_grad():
        expected = reference(pixel_values=images).last_hidden_state
    assert _compare(model, expected, images) <= 1e-4


def test_sam_image_encoder_runs_pretrained_weights_at_another_input_size():
    # Weights of a 48-px model (12x12 grid, 23-row global tables) run at 40 px (10x10 grid).
    config = _tiny(img_size=40, pretrain_img_size=48)
    pretrained = _torch_encoder(config)
    state_dict = _numpy(pretrained)
    model = _jax_encoder(config, state_dict, layout="segment_anything")
    assert param_shapes(model)["pos_embed"] == state_dict["pos_embed"].shape == (1, 12, 12, 32)
    assert param_shapes(model)["blocks/1/attn/rel_pos_h"] == (23, 8)

    reference = _torch_encoder(config, img_size=40, randomize=False)
    own = reference.state_dict()
    with torch.no_grad():
        for name, value in pretrained.state_dict().items():
            if own[name].shape == value.shape:
                own[name].copy_(value)
        reference.pos_embed = torch.nn.Parameter(F.interpolate(
            pretrained.pos_embed.permute(0, 3, 1, 2), size=(10, 10), mode="bicubic",
            align_corners=False).permute(0, 2, 3, 1))
        # Keep the 23-row tables: get_rel_pos interpolates them to 19 rows at run time.
        global_attn = reference.blocks[1].attn
        assert global_attn.rel_pos_h.shape[0] == 19
        global_attn.rel_pos_h = torch.nn.Parameter(pretrained.blocks[1].attn.rel_pos_h.clone())
        global_attn.rel_pos_w = torch.nn.Parameter(pretrained.blocks[1].attn.rel_pos_w.clone())
        images = _images(40)
        expected = reference(images)
    assert expected.shape == (2, 32, 10, 10)
    assert _compare(model, expected, images) <= 1e-4


def _meta_shapes(variant: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The model config and zero-memory arrays shaped as segment_anything's encoder state dict."""
    config = dict(sam_config.get_config(variant).model.image_encoder)
    with torch.device("meta"):
        reference = _torch_encoder(config, randomize=False)
    zero = np.zeros((), np.float32)
    return config, {k: np.broadcast_to(zero, tuple(v.shape))
                    for k, v in reference.state_dict().items()}


@pytest.mark.parametrize("variant", ["vit_h", "vit_l", "vit_b"])
def test_sam_image_encoder_full_size_parameters(variant):
    config, shapes = _meta_shapes(variant)
    torch_count = sum(int(np.prod(v.shape)) for v in shapes.values())
    for img_size in (1024, 384) if variant == "vit_h" else (1024,):
        abstract = nnx.eval_shape(
            lambda: SamImageEncoder(**{**config, "img_size": img_size}, rngs=nnx.Rngs(0)))
        assert sharding.param_count(nnx.state(abstract)) == torch_count
        # The public checkpoint's names and shapes fit both input sizes unchanged.
        key_map.apply_key_map(shapes, key_rules("segment_anything"), source=variant,
                              expected=param_shapes(abstract))
    if variant == "vit_h":
        assert torch_count == 637_026_048


def test_sam_image_encoder_rejects_bad_inputs_and_checkpoints():
    config = _tiny()
    state_dict = _numpy(_torch_encoder(config))
    model = _jax_encoder(config, state_dict, layout="segment_anything")
    with pytest.raises(ValueError, match=r"\[B, 40, 40, 3\].*rank 3 shape \(40, 40, 3\)"):
        model(jnp.zeros((40, 40, 3)))
    with pytest.raises(ValueError, match=r"got 4 channels in shape \(1, 40, 40, 4\)"):
        model(jnp.zeros((1, 40, 40, 4)))
    with pytest.raises(ValueError,
                       match=r"\[B, 40, 40, 3\].*got 48x48 in shape \(1, 48, 48, 3\)"):
        model(jnp.zeros((1, 48, 48, 3)))
    with pytest.raises(ValueError, match="layout"):
        key_rules("timm")

    shallower = _numpy(_torch_encoder(_tiny(depth=2, global_attn_indexes=(1,))))
    with pytest.raises(CheckpointMismatchError,
                       match=r"test: .*\n.*missing keys: blocks\.2\.attn\.proj\.bias"):
        _jax_encoder(config, shallower, layout="segment_anything")
    wider = _numpy(_torch_encoder(_tiny(embed_dim=48)))
    with pytest.raises(CheckpointMismatchError,
                       match=r"blocks\.0\.attn\.qkv\.weight \(file \(144, 48\), after transpose "
                             r"\(48, 144\); model blocks/0/attn/qkv/kernel \(32, 96\)\)"):
        _jax_encoder(config, wider, layout="segment_anything")

    truncated = {k: v for k, v in state_dict.items() if k != "blocks.1.attn.rel_pos_w"}
    with pytest.raises(CheckpointMismatchError,
                       match=r"1 missing keys: blocks\.1\.attn\.rel_pos_w"):
        _jax_encoder(config, truncated, layout="segment_anything")
    extra = {**state_dict, "blocks.0.attn.lora_a": np.zeros((4, 32), np.float32)}
    with pytest.raises(CheckpointMismatchError,
                       match=r"1 unexpected keys: blocks\.0\.attn\.lora_a"):
        _jax_encoder(config, extra, layout="segment_anything")
    with pytest.raises(CheckpointMismatchError,
                       match=r"(?s)50 missing keys: layers\.0\.attn\.proj\.bias.*50 unexpected "
                             r"keys: blocks\.0\.attn\.proj\.bias"):
        _jax_encoder(config, state_dict, layout="transformers")


def test_sam_image_encoder_sharded_matches_single_device():
    config = _tiny()
    model = _jax_encoder(config, _numpy(_torch_encoder(config)), layout="segment_anything")
    images = jax.random.normal(jax.random.key(0), (4, 40, 40, 3))
    expected = np.asarray(_forward(model, images))

    mesh = sharding.make_mesh((2, 2, 2))
    sharding.shard_model(model, mesh, sharding.DEFAULT_RULES)
    qkv = model.blocks[0].attn.qkv.kernel[...]
    assert qkv.sharding.spec == PartitionSpec("fsdp", "tensor")
    batch = jax.device_put(images, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    out = _forward(model, batch)
    assert out.shape == (4, 10, 10, 32)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=0)
