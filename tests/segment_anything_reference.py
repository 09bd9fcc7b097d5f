"""segment_anything's ``Sam`` built at one of our SAM configs' sizes with random weights: the
torch reference of every SAM parity test (SAM itself, PixelLLM's loaders, LISA, F-LMM)."""

from __future__ import annotations

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder
from segment_anything.modeling import Sam as TorchSam
from segment_anything.modeling import TwoWayTransformer


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random, 1-D weights (norm scales) around 1, the rest around 0 (torch
    zero-initializes tables, norms and tokens, which would hide mistakes in their use)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1.0 + 0.2 * noise if p.ndim == 1 and name.endswith("weight") else 0.2 * noise)
    return module.eval()


def torch_sam(sam_config, *, img_size: int | None = None, depth: int | None = None,
              seed: int = 0) -> TorchSam:
    """``sam_config``: a ``configs/sam.py`` config (``image_encoder``, ``prompt_encoder``,
    ``mask_decoder``); ``img_size`` defaults to the encoder's ``img_size``, ``depth`` to its depth
    (a shallower file tests the loaders' depth checks)."""
    enc, dec = sam_config.image_encoder, sam_config.mask_decoder
    img_size = img_size or enc.img_size
    grid = img_size // enc.patch_size
    model = TorchSam(
        image_encoder=ImageEncoderViT(
            img_size=img_size, patch_size=enc.patch_size, embed_dim=enc.embed_dim,
            depth=depth or enc.depth, num_heads=enc.num_heads, mlp_ratio=enc.mlp_ratio,
            out_chans=enc.out_chans, qkv_bias=True, use_rel_pos=True,
            window_size=enc.window_size, global_attn_indexes=tuple(enc.global_attn_indexes),
            norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6)),
        prompt_encoder=PromptEncoder(
            embed_dim=sam_config.prompt_encoder.embed_dim, image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size),
            mask_in_chans=sam_config.prompt_encoder.mask_in_chans),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3, transformer_dim=dec.transformer_dim,
            transformer=TwoWayTransformer(depth=dec.transformer_depth,
                                          embedding_dim=dec.transformer_dim,
                                          num_heads=dec.transformer_heads,
                                          mlp_dim=dec.transformer_mlp_dim),
            iou_head_depth=3, iou_head_hidden_dim=dec.iou_head_hidden_dim))
    return randomize(model, seed)
