"""EVA02 vision transformer (timm `eva02_*_patch14_*`, BAAI EVA-02).

  --config=configs/eva02.py:large   EVA02-L/14 (default; 448 input as the released fine-tunes)
  --config=configs/eva02.py:base
  --config=configs/eva02.py:tiny    seconds on CPU

`img_size` sets the model's grid (its `pos_embed` has that grid, as in timm); the converter
resamples a checkpoint's position embedding when its grid differs. RoPE positions follow timm:
`t = arange(S) / S * rope_ref_grid` (see pixelllm/encoders/eva02.py).
"""

import ml_collections

from configs import common

_VARIANTS = {
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "large"
    if variant != "tiny" and variant not in _VARIANTS:
        raise ValueError(f"unknown EVA02 variant {variant!r}; choose tiny or one of {sorted(_VARIANTS)}")
    config = ml_collections.ConfigDict()
    config.variant = variant
    config.model_class = "pixelllm.encoders.eva02.Eva02"
    if variant == "tiny":
        model = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                     rope_ref_grid=4)
    else:
        model = dict(img_size=448, patch_size=14, rope_ref_grid=16, **_VARIANTS[variant])
    model.update(mlp_ratio=4 * 2 / 3, layer_norm_eps=1e-6, final_norm=True)
    config.model = ml_collections.ConfigDict(model)
    config.sharding = common.sharding_config()
    config.lock()
    return config
