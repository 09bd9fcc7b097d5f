"""SAM mask decoder: parity with segment_anything and transformers (single- and multi-mask
outputs), transposed-convolution orientation, full-size parameter count, input validation and
checkpoint key checking."""

import numpy as np
import pytest
import torch
from flax import nnx
from segment_anything.modeling.mask_decoder import MaskDecoder
from segment_anything.modeling.transformer import TwoWayTransformer as TorchTwoWayTransformer

from configs import sam as sam_config
from pixelllm.checkpoints import key_map
from pixelllm.checkpoints.assign import CheckpointMismatchError, assign, param_shapes
from pixelllm.encoders.sam.mask_decoder import (
    SamMaskDecoder, conv_transpose_kernel_from_torch, key_rules)
from pixelllm.nn import abstract

DIM, HEADS, MLP, IOU_HIDDEN, H, W, PROMPTS, TOKENS = 32, 4, 64, 24, 5, 6, 3, 4


@pytest.fixture(scope="module")
def hf_sam():
    """transformers' SAM configuration and modeling modules, imported by the tests that use them."""
    from transformers.models.sam import configuration_sam, modeling_sam
    return configuration_sam, modeling_sam


def _reference(build, seed: int = 0) -> torch.nn.Module:
    """``build()`` under a fixed seed, then random tokens, LayerNorm affines and biases too
    (torch initializes norms to 1 / 0); weight matrices keep torch's default init."""
    torch.manual_seed(seed)
    module = build()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0)
                        + 0.3 * torch.randn_like(p))
            elif name in ("iou_token.weight", "mask_tokens.weight"):
                p.copy_(torch.randn_like(p))
    return module.eval()


def _numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _jax(state_dict, *, layout: str, **overrides) -> SamMaskDecoder:
    kwargs = dict(transformer_dim=DIM, transformer_depth=2, transformer_heads=HEADS,
                  transformer_mlp_dim=MLP, attention_downsample_rate=2, num_multimask_outputs=3,
                  iou_head_depth=3, iou_head_hidden_dim=IOU_HIDDEN, layer_norm_eps=1e-5)
    kwargs.update(overrides)
    model = abstract.build_abstract(lambda rngs: SamMaskDecoder(**kwargs, rngs=rngs))
    return key_map.load(model, state_dict,
                        key_rules(layout, iou_head_depth=kwargs["iou_head_depth"]), source="test")


def _random(config: dict) -> SamMaskDecoder:
    model = abstract.build_abstract(lambda rngs: SamMaskDecoder(**config, rngs=rngs))
    rng = np.random.default_rng(0)
    return assign(model, {k: rng.standard_normal(s) for k, s in param_shapes(model).items()},
                  source="random")


def _inputs(image_batch: int, prompt_batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(image_batch, DIM, H, W, generator=g)
    pe = torch.randn(1, DIM, H, W, generator=g)
    sparse = torch.randn(prompt_batch, TOKENS, DIM, generator=g)
    dense = torch.randn(prompt_batch, DIM, H, W, generator=g)
    return image, pe, sparse, dense


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


def _max_diff(got, want: torch.Tensor) -> float:
    return float(np.abs(np.asarray(got) - want.numpy()).max())


@pytest.mark.parametrize("multimask_output", [False, True])
def test_sam_mask_decoder_parity_with_segment_anything(multimask_output):
    reference = _reference(lambda: MaskDecoder(
        transformer_dim=DIM,
        transformer=TorchTwoWayTransformer(depth=2, embedding_dim=DIM, num_heads=HEADS,
                                           mlp_dim=MLP),
        num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=IOU_HIDDEN))
    model = _jax(_numpy(reference), layout="segment_anything")
    # segment_anything's usage: one image, several prompts.
    image, pe, sparse, dense = _inputs(image_batch=1, prompt_batch=PROMPTS)
    with torch.no_grad():
        want_masks, want_iou = reference(image, pe, sparse, dense, multimask_output)
    got_masks, got_iou = model(_nhwc(image), _nhwc(pe)[0], sparse.numpy(), _nhwc(dense),
                               multimask_output)
    count = 3 if multimask_output else 1
    assert got_masks.shape == (PROMPTS, count, 4 * H, 4 * W)
    assert got_iou.shape == (PROMPTS, count)
    assert _max_diff(got_masks, want_masks) <= 1e-4
    assert _max_diff(got_iou, want_iou) <= 1e-4


@pytest.mark.parametrize("multimask_output", [False, True])
def test_sam_mask_decoder_parity_with_transformers(hf_sam, multimask_output):
    configuration_sam, modeling_sam = hf_sam
    config = configuration_sam.SamMaskDecoderConfig(
        hidden_size=DIM, mlp_dim=MLP, num_hidden_layers=2, num_attention_heads=HEADS,
        attention_downsample_rate=2, num_multimask_outputs=3, iou_head_depth=4,
        iou_head_hidden_dim=IOU_HIDDEN)
    config._attn_implementation = "eager"
    assert config.layer_norm_eps == 1e-6
    reference = _reference(lambda: modeling_sam.SamMaskDecoder(config))
    # iou_head_depth 4 exercises HF's proj_in / layers.{0,1} / proj_out naming.
    model = _jax(_numpy(reference), layout="transformers", layer_norm_eps=1e-6,
                 iou_head_depth=4)
    # HF's usage: a batch of images, each with a "point batch" of prompt sets.
    images, point_batch = 2, 2
    image, pe, sparse, _ = _inputs(image_batch=images, prompt_batch=images * point_batch)
    dense = torch.randn(images, DIM, H, W, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want_masks, want_iou = reference(
            image, pe.expand(images, -1, -1, -1), sparse.reshape(images, point_batch, TOKENS, DIM),
            dense, multimask_output)
    got_masks, got_iou = model(np.repeat(_nhwc(image), point_batch, axis=0), _nhwc(pe)[0],
                               sparse.numpy(), np.repeat(_nhwc(dense), point_batch, axis=0),
                               multimask_output)
    count = 3 if multimask_output else 1
    assert _max_diff(got_masks, want_masks.reshape(images * point_batch, count, 4 * H, 4 * W)) \
        <= 1e-4
    assert _max_diff(got_iou, want_iou.reshape(images * point_batch, count)) <= 1e-4


def test_sam_mask_decoder_conv_transpose_orientation_matches_torch():
    """k2s2 ConvTranspose2d: output pixel (2i + a, 2j + b) takes torch kernel tap (a, b)."""
    torch.manual_seed(0)
    reference = torch.nn.ConvTranspose2d(3, 5, kernel_size=2, stride=2)
    x = torch.randn(2, 3, 4, 5)
    with torch.no_grad():
        want = reference(x).permute(0, 2, 3, 1)
    layer = nnx.ConvTranspose(3, 5, (2, 2), (2, 2), padding="VALID", rngs=nnx.Rngs(0))
    layer.kernel.set_value(conv_transpose_kernel_from_torch(reference.weight.detach().numpy()))
    layer.bias.set_value(reference.bias.detach().numpy())
    got = layer(x.permute(0, 2, 3, 1).numpy())
    assert got.shape == (2, 8, 10, 5)
    assert _max_diff(got, want) <= 1e-5
    # Without the spatial flip the taps land on the wrong output pixels.
    layer.kernel.set_value(np.transpose(reference.weight.detach().numpy(), (2, 3, 0, 1)))
    assert _max_diff(layer(x.permute(0, 2, 3, 1).numpy()), want) > 0.1


def test_sam_mask_decoder_full_size_parameter_count():
    config = sam_config.get_config("vit_h").model.mask_decoder
    model = abstract.build_abstract(lambda rngs: SamMaskDecoder(**config, rngs=rngs))
    shapes = param_shapes(model)
    assert sum(int(np.prod(s)) for s in shapes.values()) == 4_058_340
    assert shapes["upscale_conv1/kernel"] == (2, 2, 256, 64)
    assert shapes["transformer/layers/0/cross_attn_token_to_image/q_proj/kernel"] == (256, 128)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = variable.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == len(variable.get_value().shape), path


def test_sam_mask_decoder_rejects_bad_inputs():
    config = dict(sam_config.get_config("tiny").model.mask_decoder)
    model = _random(config)
    dim = config["transformer_dim"]
    image, pe = np.zeros((2, H, W, dim)), np.zeros((H, W, dim))
    sparse, dense = np.zeros((2, TOKENS, dim)), np.zeros((2, H, W, dim))
    with pytest.raises(ValueError, match=r"sparse_prompt_embeddings must be \[B, N, 32\]"):
        model(image, pe, sparse[0], dense, True)
    with pytest.raises(ValueError, match=r"image_embeddings must be \[1 or B=3"):
        model(image, pe, np.zeros((3, TOKENS, dim)), np.zeros((3, H, W, dim)), True)
    with pytest.raises(ValueError, match="dense_prompt_embeddings must be"):
        model(image, pe, sparse, dense[:, :-1], True)
    with pytest.raises(ValueError, match="image_pe"):
        model(image, pe[:-1], sparse, dense, True)


@pytest.mark.parametrize("layout", ["segment_anything", "transformers"])
def test_sam_mask_decoder_converter_names_missing_and_unexpected_keys(hf_sam, layout):
    if layout == "segment_anything":
        reference = MaskDecoder(transformer_dim=DIM, transformer=TorchTwoWayTransformer(
            depth=2, embedding_dim=DIM, num_heads=HEADS, mlp_dim=MLP),
            iou_head_hidden_dim=IOU_HIDDEN)
        dropped = ("output_upscaling.1.weight", "output_hypernetworks_mlps.2.layers.1.bias")
    else:
        configuration_sam, modeling_sam = hf_sam
        reference = modeling_sam.SamMaskDecoder(configuration_sam.SamMaskDecoderConfig(
            hidden_size=DIM, mlp_dim=MLP, num_attention_heads=HEADS,
            iou_head_hidden_dim=IOU_HIDDEN))
        dropped = ("upscale_layer_norm.weight", "transformer.layers.1.layer_norm4.bias")
    state_dict = _numpy(reference)
    missing = {k: v for k, v in state_dict.items() if k not in dropped}
    with pytest.raises(CheckpointMismatchError, match="2 missing keys") as error:
        _jax(missing, layout=layout)
    assert all(key in str(error.value) for key in dropped)
    extra = dict(state_dict, **{"transformer.layers.0.extra.weight": np.zeros(3)})
    with pytest.raises(CheckpointMismatchError,
                       match=r"unexpected keys: transformer\.layers\.0\.extra\.weight"):
        _jax(extra, layout=layout)
    # A file of another depth: its extra layer's keys are named as the file spells them.
    with pytest.raises(CheckpointMismatchError,
                       match=r"36 unexpected keys: transformer\.layers\.1\.cross_attn_image_to_"):
        _jax(state_dict, layout=layout, transformer_depth=1)
