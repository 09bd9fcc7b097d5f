"""SAM prompt encoder: parity with segment_anything and transformers (points, boxes, masks,
padding, dense PE), jit with static shapes, full-size parameter count, input validation and
checkpoint key checking (including HF's tied positional matrix)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from segment_anything.modeling.prompt_encoder import PromptEncoder

from pixelllm.checkpoints import key_map
from pixelllm.checkpoints.assign import CheckpointMismatchError, assign, param_shapes
from pixelllm.encoders.sam.prompt_encoder import (
    HF_SHARED_EMBEDDING_RULE, SamPromptEncoder, key_rules)

DIM, MASK_CHANS = 32, 16  # SAM's mask_in_chans: 4 channels in the first LayerNorm2d


@pytest.fixture(scope="module")
def hf_sam():
    """transformers' SAM configuration and modeling modules, imported by the tests that use them."""
    from transformers.models.sam import configuration_sam, modeling_sam
    return configuration_sam, modeling_sam


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter and buffer random (LayerNorm affines included): unit-variance tokens and
    Fourier matrix (as SAM's), conv kernels and vectors at 0.3."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            tensor.copy_(base + torch.randn_like(tensor) * (1.0 if tensor.ndim == 2 else 0.3))
    return module.eval()


def _numpy(state_dict, strip: str = "") -> dict[str, np.ndarray]:
    return {k.removeprefix(strip): v.detach().numpy() for k, v in state_dict.items()}


def _rules(layout: str) -> list:
    return key_rules(layout) + ([HF_SHARED_EMBEDDING_RULE] if layout == "transformers" else [])


def _jax(state_dict, *, layout: str, **kwargs) -> SamPromptEncoder:
    model = nnx.eval_shape(lambda: SamPromptEncoder(**kwargs, rngs=nnx.Rngs(0)))
    return key_map.load(model, state_dict, _rules(layout), source="test")


def _prompts(batch: int, height: int, width: int, seed: int = 1):
    """Points (fractional, one outside the canvas) with every label incl. -1 mid-sequence,
    boxes, and mask logits at 4x the embedding grid."""
    g = torch.Generator().manual_seed(seed)
    points = torch.rand(batch, 5, 2, generator=g) * torch.tensor([width, height]) * 1.1
    labels = torch.tensor([[1, 0, -1, 1, 0], [0, 1, 1, -1, -1]])[:batch]
    corner = torch.rand(batch, 2, generator=g) * torch.tensor([width, height]) / 2
    boxes = torch.cat([corner, corner + torch.tensor([width, height]) / 3], dim=1)
    return points, labels, boxes


def _max_diff(got, want: torch.Tensor) -> float:
    return float(np.abs(np.asarray(got) - want.detach().numpy()).max(initial=0.0))


CASES = ["points", "box", "points_and_box", "points_and_mask", "mask_only"]


def _case(case: str, points, labels, boxes, masks):
    return dict(points=(points, labels) if "points" in case else None,
                boxes=boxes if "box" in case else None,
                masks=masks if "mask" in case else None)


@pytest.mark.parametrize("case", CASES)
def test_sam_prompt_encoder_parity_with_segment_anything(case):
    # Non-square canvas and grid: pins the (x, y) vs (H, W) order of every coordinate.
    grid, canvas = (6, 8), (24, 32)
    reference = _randomize(PromptEncoder(embed_dim=DIM, image_embedding_size=grid,
                                         input_image_size=canvas, mask_in_chans=MASK_CHANS),
                           seed=0)
    model = _jax(_numpy(reference.state_dict()), layout="segment_anything", embed_dim=DIM,
                 image_embedding_size=grid, input_image_size=canvas, mask_in_chans=MASK_CHANS)
    points, labels, boxes = _prompts(2, *canvas)
    masks = torch.randn(2, 1, 4 * grid[0], 4 * grid[1], generator=torch.Generator().manual_seed(2))
    prompts = _case(case, points, labels, boxes, masks)
    with torch.no_grad():
        want_sparse, want_dense = reference(**prompts)
    got_sparse, got_dense = model(
        points=points.numpy() if prompts["points"] else None,
        labels=labels.numpy() if prompts["points"] else None,
        boxes=boxes.numpy() if prompts["boxes"] is not None else None,
        masks=masks.permute(0, 2, 3, 1).numpy() if prompts["masks"] is not None else None)
    assert got_sparse.shape == tuple(want_sparse.shape)
    assert got_sparse.shape[1] == {"points": 6, "box": 2, "points_and_box": 7,
                                   "points_and_mask": 6, "mask_only": 0}[case]
    assert got_dense.shape == (2, *grid, DIM)
    assert _max_diff(got_sparse, want_sparse) <= 1e-4
    assert _max_diff(got_dense, want_dense.permute(0, 2, 3, 1)) <= 1e-4
    with torch.no_grad():
        want_pe = reference.get_dense_pe()[0].permute(1, 2, 0)
    assert model.dense_pe().shape == (*grid, DIM)
    assert _max_diff(model.dense_pe(), want_pe) <= 1e-4


def _hf_model(hf_sam, seed: int = 0):
    configuration_sam, modeling_sam = hf_sam
    config = configuration_sam.SamConfig(
        vision_config=dict(image_size=24, patch_size=2, hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, output_channels=DIM, num_pos_feats=DIM // 2,
                           global_attn_indexes=[0], mlp_dim=32),
        prompt_encoder_config=dict(hidden_size=DIM, mask_input_channels=MASK_CHANS,
                                   image_size=24, patch_size=2),
        mask_decoder_config=dict(hidden_size=DIM, mlp_dim=64, num_attention_heads=4,
                                 iou_head_hidden_dim=DIM))
    model = modeling_sam.SamModel(config)
    _randomize(model.prompt_encoder, seed)
    with torch.no_grad():  # keep the tie explicit whatever the transformers version does
        model.shared_image_embedding.positional_embedding.copy_(
            model.prompt_encoder.shared_embedding.positional_embedding)
    return model.eval()


def _hf_state_dict(model) -> dict[str, np.ndarray]:
    full = _numpy(model.state_dict())
    state_dict = {k.removeprefix("prompt_encoder."): v for k, v in full.items()
                  if k.startswith("prompt_encoder.")}
    state_dict["shared_image_embedding.positional_embedding"] = \
        full["shared_image_embedding.positional_embedding"]
    return state_dict


@pytest.mark.parametrize("case", CASES)
def test_sam_prompt_encoder_parity_with_transformers(hf_sam, case):
    reference = _hf_model(hf_sam)
    grid = (12, 12)  # HF is square: 24 px / patch 2
    model = _jax(_hf_state_dict(reference), layout="transformers", embed_dim=DIM,
                 image_embedding_size=grid, input_image_size=(24, 24), mask_in_chans=MASK_CHANS)
    points, labels, boxes = _prompts(2, 24, 24)
    masks = torch.randn(2, 1, 48, 48, generator=torch.Generator().manual_seed(2))
    prompts = _case(case, points, labels, boxes, masks)
    with torch.no_grad():  # HF adds a "point batch" axis: one prompt set per image here
        want_sparse, want_dense = reference.prompt_encoder(
            input_points=points[:, None] if prompts["points"] else None,
            input_labels=labels[:, None] if prompts["points"] else None,
            input_boxes=boxes[:, None] if prompts["boxes"] is not None else None,
            input_masks=masks if prompts["masks"] is not None else None)
        want_pe = reference.get_image_wide_positional_embeddings()[0].permute(1, 2, 0)
    got_sparse, got_dense = model(
        points=points.numpy() if prompts["points"] else None,
        labels=labels.numpy() if prompts["points"] else None,
        boxes=boxes.numpy() if prompts["boxes"] is not None else None,
        masks=masks.permute(0, 2, 3, 1).numpy() if prompts["masks"] is not None else None)
    if want_sparse is None:  # HF returns None where segment_anything returns [B, 0, C]
        assert got_sparse.shape == (2, 0, DIM)
    else:
        assert _max_diff(got_sparse, want_sparse[:, 0]) <= 1e-4
    assert _max_diff(got_dense, want_dense.permute(0, 2, 3, 1)) <= 1e-4
    assert _max_diff(model.dense_pe(), want_pe) <= 1e-4


def test_sam_prompt_encoder_transformers_tied_positional_matrix(hf_sam):
    state_dict = _hf_state_dict(_hf_model(hf_sam))
    kwargs = dict(embed_dim=DIM, image_embedding_size=(12, 12), input_image_size=(24, 24),
                  mask_in_chans=MASK_CHANS)
    gaussian = state_dict["shared_embedding.positional_embedding"]
    # save_pretrained keeps only the SamModel-level copy of the tied matrix.
    saved = {k: v for k, v in state_dict.items() if k != "shared_embedding.positional_embedding"}
    model = _jax(saved, layout="transformers", **kwargs)
    np.testing.assert_array_equal(model.pe_layer.positional_encoding_gaussian_matrix[...],
                                  gaussian)
    only_own = {k: v for k, v in state_dict.items()
                if k != "shared_image_embedding.positional_embedding"}
    np.testing.assert_array_equal(
        _jax(only_own, layout="transformers", **kwargs)
        .pe_layer.positional_encoding_gaussian_matrix[...], gaussian)
    untied = dict(state_dict, **{"shared_image_embedding.positional_embedding": gaussian + 1})
    with pytest.raises(CheckpointMismatchError,
                       match=r"tied keys that differ: shared_embedding\.positional_embedding and "
                             r"shared_image_embedding\.positional_embedding"):
        _jax(untied, layout="transformers", **kwargs)


def test_sam_prompt_encoder_jit_with_static_shapes_matches_eager():
    model = nnx.eval_shape(lambda: SamPromptEncoder(
        embed_dim=DIM, image_embedding_size=(6, 8), input_image_size=(24, 32),
        mask_in_chans=MASK_CHANS, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    assign(model, {k: rng.standard_normal(s) for k, s in param_shapes(model).items()}, source="r")
    points, labels, boxes = (t.numpy() for t in _prompts(2, 24, 32))
    encode = nnx.jit(lambda m, p, l, b: m(points=p, labels=l, boxes=b))
    got_sparse, got_dense = encode(model, points, labels, boxes)
    want_sparse, want_dense = model(points=points, labels=labels, boxes=boxes)
    assert got_sparse.shape == (2, 7, DIM)
    np.testing.assert_allclose(got_sparse, want_sparse, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got_dense, want_dense, rtol=0, atol=0)
    # A "not a point" (-1) token is the same learned vector wherever the point lies.
    np.testing.assert_allclose(got_sparse[0, 2], model.not_a_point_embed[...], atol=0)
    np.testing.assert_allclose(got_sparse[1, 3], got_sparse[1, 4], atol=0)


def test_sam_prompt_encoder_full_size_parameter_count():
    model = nnx.eval_shape(lambda: SamPromptEncoder(
        embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
        mask_in_chans=16, rngs=nnx.Rngs(0)))
    shapes = param_shapes(model)
    assert sum(int(np.prod(s)) for s in shapes.values()) == 6476
    assert shapes["pe_layer/positional_encoding_gaussian_matrix"] == (2, 128)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = variable.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == len(variable.get_value().shape), path


def test_sam_prompt_encoder_rejects_bad_inputs():
    model = nnx.eval_shape(lambda: SamPromptEncoder(
        embed_dim=DIM, image_embedding_size=(6, 8), input_image_size=(24, 32),
        mask_in_chans=MASK_CHANS, rngs=nnx.Rngs(0)))
    points, labels = np.zeros((2, 3, 2), np.float32), np.ones((2, 3), np.int32)
    with pytest.raises(ValueError, match=r"points must be \[B, N, 2\]"):
        model(points=np.zeros((2, 3, 3)), labels=labels)
    with pytest.raises(ValueError, match=r"labels must be \[B, N\]"):
        model(points=points, labels=np.ones((2, 4), np.int32))
    with pytest.raises(ValueError, match="points and labels must be given together"):
        model(points=points)
    with pytest.raises(ValueError, match=r"boxes must be \[B, 4\]"):
        model(boxes=np.zeros((2, 1, 4)))
    with pytest.raises(ValueError, match=r"boxes must be \[B, 4\]"):
        model(boxes=np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"masks must be \[B, 24, 32, 1\]"):
        model(masks=np.zeros((2, 32, 24, 1)))
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(points=points, labels=labels, boxes=np.zeros((3, 4)))


@pytest.mark.parametrize("layout", ["segment_anything", "transformers"])
def test_sam_prompt_encoder_converter_names_missing_and_unexpected_keys(hf_sam, layout):
    if layout == "segment_anything":
        state_dict = _numpy(PromptEncoder(embed_dim=DIM, image_embedding_size=(6, 8),
                                          input_image_size=(24, 32),
                                          mask_in_chans=MASK_CHANS).state_dict())
        dropped = "mask_downscaling.4.bias"
    else:
        state_dict = _hf_state_dict(_hf_model(hf_sam))
        dropped = "mask_embed.layer_norm2.bias"
    kwargs = dict(embed_dim=DIM, image_embedding_size=(6, 8), input_image_size=(24, 32),
                  mask_in_chans=MASK_CHANS)
    missing = {k: v for k, v in state_dict.items() if k != dropped}
    with pytest.raises(CheckpointMismatchError, match=rf"missing .*{dropped}"):
        _jax(missing, layout=layout, **kwargs)
    extra = dict(state_dict, **{"point_embeddings.4.weight": np.zeros((1, DIM))}) \
        if layout == "segment_anything" else dict(state_dict, **{"point_embed.4.weight": 0})
    with pytest.raises(CheckpointMismatchError, match=r"unexpected .*point_embed"):
        _jax(extra, layout=layout, **kwargs)
    # A file of another width is named by its key, its shape and the model's.
    with pytest.raises(CheckpointMismatchError, match=r"mis-shaped .*no_mask_embed\.weight "
                                                      rf"\(file \(1, {DIM}\)"):
        _jax(state_dict, layout=layout, **{**kwargs, "embed_dim": 2 * DIM})


def test_dense_pe_on_another_grid_encodes_its_cell_centres():
    encoder = SamPromptEncoder(embed_dim=8, image_embedding_size=(3, 3),
                               input_image_size=(12, 12), mask_in_chans=4, rngs=nnx.Rngs(0))
    pe = encoder.dense_pe((2, 4))
    assert pe.shape == (2, 4, 8)
    np.testing.assert_allclose(pe[1, 3], encoder.pe_layer(jnp.array([7 / 8, 3 / 4])), atol=1e-6)
    np.testing.assert_allclose(pe[0, 0], encoder.pe_layer(jnp.array([1 / 8, 1 / 4])), atol=1e-6)
