"""Segment Anything (SAM): image encoder, prompt encoder and mask decoder.

  --config=configs/sam.py:vit_h     the public sam_vit_h_4b8939.pth model (default)
  --config=configs/sam.py:vit_l | vit_b
  --config=configs/sam.py:tiny      seconds on CPU; exercises window padding and a global block

Input size is configurable (`--config.model.image_encoder.img_size=384`, as PixelLLM uses):
the position embedding and relative-position tables keep their pretrained shapes
(`pretrain_img_size`) and are interpolated to the input grid at run time.
"""

import ml_collections

from configs import common

_VARIANTS = {
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "vit_h"
    if variant != "tiny" and variant not in _VARIANTS:
        raise ValueError(f"unknown SAM variant {variant!r}; choose tiny or one of {sorted(_VARIANTS)}")
    config = ml_collections.ConfigDict()
    config.variant = variant
    config.model_class = "pixelllm.encoders.sam.sam.Sam"
    if variant == "tiny":
        # 40 px / patch 4 = a 10x10 grid: window 4 pads it to 12x12 (3x3 windows); block 1 global.
        image_encoder = dict(img_size=40, pretrain_img_size=40, patch_size=4, embed_dim=32, depth=3,
                             num_heads=4, mlp_ratio=4.0, out_chans=32, window_size=4,
                             global_attn_indexes=(1,), layer_norm_eps=1e-6)
        prompt_embed_dim, mask_in_chans = 32, 4
        decoder = dict(transformer_depth=2, transformer_heads=4, transformer_mlp_dim=64,
                       iou_head_hidden_dim=32)
    else:
        image_encoder = dict(img_size=1024, pretrain_img_size=1024, patch_size=16, mlp_ratio=4.0,
                             out_chans=256, window_size=14, layer_norm_eps=1e-6,
                             **_VARIANTS[variant])
        prompt_embed_dim, mask_in_chans = 256, 16
        decoder = dict(transformer_depth=2, transformer_heads=8, transformer_mlp_dim=2048,
                       iou_head_hidden_dim=256)
    config.model = ml_collections.ConfigDict({
        "image_encoder": image_encoder,
        "prompt_encoder": dict(embed_dim=prompt_embed_dim, mask_in_chans=mask_in_chans),
        # layer_norm_eps: 1e-5 in the original release (torch nn.LayerNorm default); the
        # Hugging Face port uses 1e-6, so its converter path overrides it.
        "mask_decoder": dict(transformer_dim=prompt_embed_dim, attention_downsample_rate=2,
                             num_multimask_outputs=3, iou_head_depth=3, layer_norm_eps=1e-5,
                             **decoder),
    })
    config.sharding = common.sharding_config()
    config.lock()
    return config
