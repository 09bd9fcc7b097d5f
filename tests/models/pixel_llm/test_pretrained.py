"""Public checkpoints of the reference implementations (segment_anything, timm, transformers) at
tiny random sizes load into PixelLLM's parts exactly as into the standalone models."""

import numpy as np
import pytest
import safetensors.numpy
import torch
from configs import pixelllm as pixelllm_config
from flax import nnx
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder
from segment_anything.modeling import Sam as TorchSam
from segment_anything.modeling import TwoWayTransformer
from timm.models.eva import Eva
from transformers import T5Config, T5ForConditionalGeneration

from pixelllm.checkpoints.assign import CheckpointMismatchError
from pixelllm.encoders import eva02
from pixelllm.encoders.sam import sam
from pixelllm.language import t5
from pixelllm.models.pixel_llm.pixel_llm import PixelLLM
from pixelllm.models.pixel_llm.pretrained import load_pretrained


def _randomized(module, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module.eval()


def _numpy(module):
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _sam_state(config):
    enc, dec = config.sam.image_encoder, config.sam.mask_decoder
    grid = enc.pretrain_img_size // enc.patch_size
    return _numpy(_randomized(TorchSam(
        image_encoder=ImageEncoderViT(
            img_size=enc.pretrain_img_size, patch_size=enc.patch_size, embed_dim=enc.embed_dim,
            depth=enc.depth, num_heads=enc.num_heads, mlp_ratio=enc.mlp_ratio,
            out_chans=enc.out_chans, qkv_bias=True, use_rel_pos=True,
            window_size=enc.window_size, global_attn_indexes=tuple(enc.global_attn_indexes),
            norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6)),
        prompt_encoder=PromptEncoder(
            embed_dim=config.sam.prompt_encoder.embed_dim, image_embedding_size=(grid, grid),
            input_image_size=(enc.pretrain_img_size,) * 2,
            mask_in_chans=config.sam.prompt_encoder.mask_in_chans),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3, transformer_dim=dec.transformer_dim,
            transformer=TwoWayTransformer(depth=dec.transformer_depth,
                                          embedding_dim=dec.transformer_dim,
                                          num_heads=dec.transformer_heads,
                                          mlp_dim=dec.transformer_mlp_dim),
            iou_head_depth=3, iou_head_hidden_dim=dec.iou_head_hidden_dim)), seed=1))


def _eva02_state(config):
    e = config.eva02
    return _numpy(_randomized(Eva(
        img_size=e.img_size, patch_size=e.patch_size, embed_dim=e.embed_dim, depth=e.depth,
        num_heads=e.num_heads, mlp_ratio=e.mlp_ratio, qkv_fused=False, swiglu_mlp=True,
        scale_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(e.rope_ref_grid,) * 2,
        global_pool="avg", num_classes=0), seed=2))


def _t5_folder(config, folder):
    m = config.language_model.model
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=m.vocab_size, d_model=m.d_model, d_kv=m.d_kv, d_ff=m.d_ff,
        num_layers=m.num_layers, num_decoder_layers=m.num_decoder_layers, num_heads=m.num_heads,
        feed_forward_proj=m.feed_forward_proj, tie_word_embeddings=True))
    state = _numpy(_randomized(model, seed=3))
    # Flan-T5 files carry their own lm_head (untied); write one as they do.
    state["lm_head.weight"] = np.random.default_rng(3).normal(
        size=state["shared.weight"].shape).astype(np.float32)
    safetensors.numpy.save_file(state, str(folder / "model.safetensors"))
    return folder


def _flat(module):
    return {path: np.asarray(v.get_value())
            for path, v in nnx.to_flat_state(nnx.state(module, nnx.Not(nnx.RngState)))}


def test_public_checkpoints_fill_the_parts_as_the_standalone_loaders(tmp_path):
    config = pixelllm_config.get_config("tiny").model
    model = PixelLLM.from_config(config, rngs=nnx.Rngs(0))
    adapter_before = _flat(model.prompt_adapter)
    lora_before = {p: v for p, v in _flat(model.lm).items() if "lora" in "/".join(map(str, p))}
    sam_state, eva_state = _sam_state(config), _eva02_state(config)
    folder = _t5_folder(config, tmp_path)

    load_pretrained(model, sam=sam_state, eva02=eva_state, language_model=folder)

    standalone_sam = sam.load_sam(sam_state, config=config.sam, img_size=config.canvas_size)
    standalone_eva = eva02.load(eva02.Eva02(**config.eva02.to_dict(), rngs=nnx.Rngs(5)),
                                eva_state, source="eva02")
    standalone_t5 = t5.T5(config.language_model.model, rngs=nnx.Rngs(6))
    t5.load(standalone_t5, safetensors.numpy.load_file(
        str(folder / "model.safetensors")), source="t5")
    for part, standalone in ((model.sam, standalone_sam), (model.eva02, standalone_eva)):
        got, want = _flat(part), _flat(standalone)
        assert got.keys() == want.keys()
        for path in want:
            np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))
    got, want = _flat(model.lm), _flat(standalone_t5)
    for path, value in want.items():
        if "lora" not in "/".join(map(str, path)):
            np.testing.assert_array_equal(got[path], value, err_msg=str(path))
    # PixelLLM's own modules and the LoRA adapters keep their values.
    for path, value in _flat(model.prompt_adapter).items():
        np.testing.assert_array_equal(value, adapter_before[path])
    for path, value in lora_before.items():
        np.testing.assert_array_equal(_flat(model.lm)[path], value)
    # The pos_embed of the 40-pixel checkpoint is kept as is (resized at run time).
    np.testing.assert_array_equal(model.sam.image_encoder.pos_embed[...][0],
                                  sam_state["image_encoder.pos_embed"][0])


def test_a_checkpoint_of_another_part_is_named(tmp_path):
    config = pixelllm_config.get_config("tiny").model
    model = PixelLLM.from_config(config, rngs=nnx.Rngs(0))
    eva_file = tmp_path / "eva02.safetensors"
    safetensors.numpy.save_file(_eva02_state(config), str(eva_file))
    with pytest.raises(ValueError, match=f"{eva_file}: not a SAM checkpoint"):
        load_pretrained(model, sam=eva_file)
    with pytest.raises(CheckpointMismatchError, match="EVA02 state dict"):
        load_pretrained(model, eva02=_sam_state(config))
