"""SAM two-way transformer: parity with segment_anything and transformers, input forms, dtype,
shape validation and checkpoint key checking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from segment_anything.modeling.transformer import TwoWayTransformer as TorchTwoWayTransformer

from pixelllm.checkpoints import key_map
from pixelllm.checkpoints.assign import CheckpointMismatchError, assign, param_shapes
from pixelllm.encoders.sam.two_way_transformer import TwoWayTransformer, key_rules
from pixelllm.nn.layers import gelu

DIM, HEADS, MLP, BATCH, TOKENS, H, W = 32, 4, 64, 2, 7, 5, 6


@pytest.fixture(scope="module")
def hf_sam():
    """transformers' SAM configuration and modeling modules, imported by the tests that use them."""
    from transformers.models.sam import configuration_sam, modeling_sam
    return configuration_sam, modeling_sam


def _reference(build, seed: int = 0) -> torch.nn.Module:
    """``build()`` under a fixed seed, then random LayerNorm affines and biases too, so that a
    swapped or dropped one shows; weight matrices keep torch's default init."""
    torch.manual_seed(seed)
    module = build()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0)
                        + 0.3 * torch.randn_like(p))
    return module.eval()


def _numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(BATCH, DIM, H, W, generator=g)
    pe = torch.randn(BATCH, DIM, H, W, generator=g)
    tokens = torch.randn(BATCH, TOKENS, DIM, generator=g)
    return image, pe, tokens


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


def _abstract(**kwargs) -> TwoWayTransformer:
    """Built without running initializers (they are overwritten by ``assign`` anyway)."""
    kwargs = dict(dict(depth=2, embedding_dim=DIM, num_heads=HEADS, mlp_dim=MLP,
                       layer_norm_eps=1e-5), **kwargs)
    return nnx.eval_shape(lambda: TwoWayTransformer(**kwargs, rngs=nnx.Rngs(0)))


def _random(seed: int = 0, **kwargs) -> TwoWayTransformer:
    model = _abstract(**kwargs)
    rng = np.random.default_rng(seed)
    params = {k: 0.3 * rng.standard_normal(shape) for k, shape in param_shapes(model).items()}
    return assign(model, params, source="random")


def _jax(state_dict, *, layout: str, **kwargs) -> TwoWayTransformer:
    return key_map.load(_abstract(**kwargs), state_dict, key_rules(layout), source="test")


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_two_way_transformer_parity_with_segment_anything(activation):
    torch_act, jax_act = {"relu": (torch.nn.ReLU, jax.nn.relu),
                          "gelu": (torch.nn.GELU, gelu)}[activation]
    reference = _reference(lambda: TorchTwoWayTransformer(
        depth=3, embedding_dim=DIM, num_heads=HEADS, mlp_dim=MLP, activation=torch_act,
        attention_downsample_rate=2))
    image, pe, tokens = _inputs()
    with torch.no_grad():
        want_q, want_k = reference(image, pe, tokens)
    model = _jax(_numpy(reference), layout="segment_anything", depth=3, layer_norm_eps=1e-5,
                 activation=jax_act)
    got_q, got_k = model(_nhwc(image), _nhwc(pe), tokens.numpy())
    assert got_q.shape == (BATCH, TOKENS, DIM) and got_k.shape == (BATCH, H * W, DIM)
    assert np.abs(np.asarray(got_q) - want_q.numpy()).max() <= 1e-4
    assert np.abs(np.asarray(got_k) - want_k.numpy()).max() <= 1e-4


def test_two_way_transformer_parity_with_transformers(hf_sam):
    configuration_sam, modeling_sam = hf_sam
    config = configuration_sam.SamMaskDecoderConfig(
        hidden_size=DIM, mlp_dim=MLP, num_hidden_layers=2, num_attention_heads=HEADS,
        attention_downsample_rate=2)
    config._attn_implementation = "eager"
    reference = _reference(lambda: modeling_sam.SamTwoWayTransformer(config))
    assert config.layer_norm_eps == 1e-6
    image, pe, tokens = _inputs()
    with torch.no_grad():
        want_q, want_k = reference(tokens[:, None], image, pe, attention_similarity=None)
    # HF: blocks at the config's 1e-6, the final norm at torch's default 1e-5.
    model = _jax(_numpy(reference), layout="transformers", depth=2, layer_norm_eps=1e-6,
                 final_layer_norm_eps=1e-5)
    got_q, got_k = model(_nhwc(image), _nhwc(pe), tokens.numpy())
    assert np.abs(np.asarray(got_q) - want_q[:, 0].numpy()).max() <= 1e-4
    assert np.abs(np.asarray(got_k) - want_k[:, 0].numpy()).max() <= 1e-4


def test_two_way_transformer_accepts_flat_and_unbatched_image_inputs():
    model = _random()
    image, pe, tokens = _inputs()
    image, tokens = _nhwc(image), tokens.numpy()
    pe = np.broadcast_to(_nhwc(pe)[:1], image.shape)
    want_q, want_k = model(image, pe, tokens)
    variants = [
        (image, pe[0]),                                                  # [h, w, C] PE
        (image.reshape(BATCH, H * W, DIM), pe.reshape(BATCH, H * W, DIM)),  # flat
        (image.reshape(BATCH, H * W, DIM), pe[0].reshape(H * W, DIM)),   # flat, unbatched PE
        (image, pe[:1]),                                                 # PE batch of 1
    ]
    for variant_image, variant_pe in variants:
        got_q, got_k = model(variant_image, variant_pe, tokens)
        np.testing.assert_allclose(got_q, want_q, rtol=0, atol=1e-6)
        np.testing.assert_allclose(got_k, want_k, rtol=0, atol=1e-6)


def test_two_way_transformer_bfloat16_compute_tracks_float32():
    full, half = _random(), _random(dtype=jnp.bfloat16)
    image, pe, tokens = _inputs()
    want_q, _ = full(_nhwc(image), _nhwc(pe), tokens.numpy())
    got_q, got_k = half(_nhwc(image), _nhwc(pe), tokens.numpy())
    assert got_q.dtype == jnp.bfloat16 and got_k.dtype == jnp.bfloat16
    assert np.abs(np.asarray(got_q, np.float32) - np.asarray(want_q)).max() < 0.1


def test_two_way_transformer_parameters_carry_logical_axes():
    model = _abstract()
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = variable.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == variable.get_value().ndim, path


def test_two_way_transformer_rejects_bad_shapes():
    model = _random(depth=1)
    image = np.zeros((BATCH, H, W, DIM), np.float32)
    tokens = np.zeros((BATCH, TOKENS, DIM), np.float32)
    with pytest.raises(ValueError, match="point_embedding must be"):
        model(image, image[0], tokens[:1])
    with pytest.raises(ValueError, match="image_pe"):
        model(image, image[0, :, :-1], tokens)
    with pytest.raises(ValueError, match="image_embedding must be"):
        model(image[..., :-1], image[0, ..., :-1], tokens)
    with pytest.raises(ValueError, match="num_heads"):
        TwoWayTransformer(depth=1, embedding_dim=DIM, num_heads=3, mlp_dim=MLP,
                          layer_norm_eps=1e-5, rngs=nnx.Rngs(0))


def test_two_way_transformer_converter_names_missing_and_unexpected_keys():
    reference = TorchTwoWayTransformer(depth=2, embedding_dim=DIM, num_heads=HEADS, mlp_dim=MLP)
    state_dict = _numpy(reference)
    missing = dict(state_dict)
    del missing["layers.1.norm3.bias"]
    with pytest.raises(CheckpointMismatchError, match=r"missing .*layers\.1\.norm3\.bias"):
        _jax(missing, layout="segment_anything")
    extra = dict(state_dict, **{"layers.0.extra.weight": np.zeros(3)})
    with pytest.raises(CheckpointMismatchError, match=r"unexpected .*layers\.0\.extra\.weight"):
        _jax(extra, layout="segment_anything")
    # segment_anything names are unexpected (and HF names missing) under the other layout.
    with pytest.raises(CheckpointMismatchError, match=r"layer_norm_final_attn\.weight"):
        _jax(state_dict, layout="transformers")
    with pytest.raises(ValueError, match="unknown checkpoint layout"):
        key_rules("timm")
