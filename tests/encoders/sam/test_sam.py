"""Whole SAM: loading public-format files (original .pth and Hugging Face folders) end to end,
prompted segmentation against the references, full-size parameter counts, wrong files."""

import numpy as np
import pytest
import torch
from flax import nnx

from configs import sam as sam_config
from pixelllm import sharding
from pixelllm.checkpoints.assign import CheckpointMismatchError
from pixelllm.encoders.sam import sam
from pixelllm.nn import abstract
from tests import segment_anything_reference

TINY = sam_config.get_config("tiny").model


def _torch_sam(depth: int | None = None):
    return segment_anything_reference.torch_sam(TINY, depth=depth)


def _inputs():
    rng = np.random.default_rng(0)
    size = TINY.image_encoder.img_size
    pixels = rng.uniform(0, 255, (2, size, size, 3)).astype(np.float32)
    boxes = np.array([[3.0, 5.0, 30.0, 22.0], [10.0, 0.0, 39.0, 39.0]], np.float32)
    return pixels, boxes


def _torch_predict(model, pixels, boxes, multimask: bool):
    """segment_anything decodes one image at a time (its batch axis holds the prompts)."""
    masks, ious = [], []
    with torch.no_grad():
        images = (torch.from_numpy(pixels).permute(0, 3, 1, 2) - model.pixel_mean) / model.pixel_std
        embeddings = model.image_encoder(images)
        for i in range(len(pixels)):
            sparse, dense = model.prompt_encoder(points=None, boxes=torch.from_numpy(boxes[i:i + 1]),
                                                 masks=None)
            mask, iou = model.mask_decoder(
                image_embeddings=embeddings[i:i + 1], image_pe=model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                multimask_output=multimask)
            masks.append(mask.numpy())
            ious.append(iou.numpy())
    return np.concatenate(masks), np.concatenate(ious)


@pytest.mark.parametrize("multimask", [False, True])
def test_sam_parity_with_segment_anything_through_a_pth_file(tmp_path, multimask):
    reference = _torch_sam()
    path = tmp_path / "sam_tiny.pth"
    torch.save(reference.state_dict(), path)
    model = sam.load_sam(path, config=TINY)
    pixels, boxes = _inputs()
    masks, iou = model(sam.normalize(pixels), boxes=boxes, multimask_output=multimask)
    want_masks, want_iou = _torch_predict(reference, pixels, boxes, multimask)
    assert masks.shape == want_masks.shape == (2, 3 if multimask else 1, 40, 40)
    assert np.abs(np.asarray(masks) - want_masks).max() <= 1e-4
    assert np.abs(np.asarray(iou) - want_iou).max() <= 1e-4


def test_sam_parity_with_transformers_through_a_saved_folder(tmp_path):
    from transformers import (SamConfig, SamMaskDecoderConfig, SamModel,
                              SamPromptEncoderConfig, SamVisionConfig)

    enc, dec = TINY.image_encoder, TINY.mask_decoder
    config = SamConfig(
        vision_config=SamVisionConfig(
            image_size=enc.img_size, patch_size=enc.patch_size, hidden_size=enc.embed_dim,
            num_hidden_layers=enc.depth, num_attention_heads=enc.num_heads,
            output_channels=enc.out_chans, window_size=enc.window_size,
            global_attn_indexes=list(enc.global_attn_indexes),
            num_pos_feats=TINY.prompt_encoder.embed_dim // 2, mlp_dim=int(enc.embed_dim * 4)),
        prompt_encoder_config=SamPromptEncoderConfig(
            hidden_size=TINY.prompt_encoder.embed_dim, image_size=enc.img_size,
            patch_size=enc.patch_size, mask_input_channels=TINY.prompt_encoder.mask_in_chans),
        mask_decoder_config=SamMaskDecoderConfig(
            hidden_size=dec.transformer_dim, mlp_dim=dec.transformer_mlp_dim,
            num_attention_heads=dec.transformer_heads, iou_head_hidden_dim=dec.iou_head_hidden_dim))
    torch.manual_seed(0)
    reference = segment_anything_reference.randomize(SamModel(config), seed=1)
    # HF ties the prompt encoder's Fourier matrix to the top-level shared one.
    with torch.no_grad():
        reference.prompt_encoder.shared_embedding.positional_embedding.copy_(
            reference.shared_image_embedding.positional_embedding)
    reference.save_pretrained(tmp_path)
    model = sam.load_sam(tmp_path, config=TINY)

    pixels, boxes = _inputs()
    images = sam.normalize(pixels)
    with torch.no_grad():
        out = reference(pixel_values=torch.from_numpy(np.array(images)).permute(0, 3, 1, 2),
                        input_boxes=torch.from_numpy(boxes)[:, None], multimask_output=False)
    masks, iou = model(images, boxes=boxes, multimask_output=False)
    assert np.abs(np.asarray(masks) - out.pred_masks[:, 0].numpy()).max() <= 1e-4
    assert np.abs(np.asarray(iou) - out.iou_scores[:, 0].numpy()).max() <= 1e-4


def test_sam_vit_h_parameter_counts():
    config = sam_config.get_config("vit_h")
    model = abstract.build_abstract(lambda rngs: sam.Sam.from_config(config.model, rngs=rngs))
    assert sharding.param_count(nnx.state(model)) == 641_090_864
    assert sharding.param_count(nnx.state(model.image_encoder)) == 637_026_048
    # PixelLLM's 384 input changes no parameter shape.
    config.model.image_encoder.img_size = 384
    model = abstract.build_abstract(lambda rngs: sam.Sam.from_config(config.model, rngs=rngs))
    assert sharding.param_count(nnx.state(model)) == 641_090_864


def test_sam_wrong_files_are_named(tmp_path):
    shallow = tmp_path / "sam_depth2.pth"
    torch.save(_torch_sam(depth=2).state_dict(), shallow)
    with pytest.raises(CheckpointMismatchError,
                       match=r"sam_depth2.pth: .*this looks like a SAM image encoder of embed_dim "
                             r"32, depth 2; the model is a SAM image encoder of embed_dim 32, depth "
                             r"3\n.*missing keys: image_encoder\.blocks\.2\."):
        sam.load_sam(shallow, config=TINY)

    other = tmp_path / "not_sam.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, other)
    with pytest.raises(CheckpointMismatchError, match="not_sam.pth: not a SAM checkpoint"):
        sam.load_sam(other, config=TINY)

    stray = {k: v.numpy() for k, v in _torch_sam().state_dict().items()} | {
        "extra_head.weight": np.zeros(1)}
    model = abstract.build_abstract(lambda rngs: sam.Sam.from_config(TINY, rngs=rngs))
    with pytest.raises(CheckpointMismatchError,
                       match=r"stray.pth: .*\n  1 unexpected keys: extra_head\.weight$"):
        sam.load(model, stray, source="stray.pth")


def test_sam_file_of_a_released_size_is_named():
    # Only the shapes the message reads: the width of pos_embed and the number of blocks.
    vit_b = {"image_encoder.pos_embed": np.zeros((1, 1, 1, 768), np.float32)} | {
        f"image_encoder.blocks.{i}.norm1.weight": np.zeros(768, np.float32) for i in range(12)}
    model = abstract.build_abstract(lambda rngs: sam.Sam.from_config(TINY, rngs=rngs))
    with pytest.raises(CheckpointMismatchError, match=r"vit_b.pth: .*this looks like vit_b "
                                                      r"\(embed_dim 768, depth 12\); the model is"):
        sam.load(model, vit_b, source="vit_b.pth")


def test_sam_built_from_the_file_at_another_input_size(tmp_path):
    reference = _torch_sam()
    path = tmp_path / "sam_tiny.pth"
    torch.save(reference.state_dict(), path)
    state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
    # Every field but the decoder's head count (not in any shape) comes from the file.
    expected = TINY.to_dict()
    expected["mask_decoder"]["transformer_heads"] = 8
    assert sam.config_from_state_dict(state_dict, source="tiny") == expected

    from_file = sam.load_sam(path, img_size=48)
    from_config = sam.load_sam(path, config=TINY, img_size=48)
    pixels = np.random.default_rng(1).uniform(0, 255, (1, 48, 48, 3)).astype(np.float32)
    got = np.asarray(from_file.image_encoder(sam.normalize(pixels)))
    assert got.shape == (1, 12, 12, TINY.image_encoder.out_chans)
    np.testing.assert_array_equal(got, from_config.image_encoder(sam.normalize(pixels)))
    # The HF file layout sets the decoder's block eps; this file is segment_anything's.
    assert from_file.mask_decoder.transformer.layers[0].norm1.epsilon == 1e-5
