"""LISA (reasoning segmentation): a LLaVA v1 whose ``[SEG]`` hidden state prompts SAM.

  --config=configs/lisa.py:lisa_7b   LISA-7B-v1 (xinlai/LISA-7B-v1): LLaVA-Lightning-7B-v1-1 base
  --config=configs/lisa.py:tiny      the same structure at tiny sizes (seconds on CPU)

`config.model` feeds `pixelllm.models.lisa.checkpoint.build`; the parameter table:
`python -m pixelllm.models.lisa.checkpoint --config=configs/lisa.py:lisa_7b`.

Sources (LISA's code at commit 3cb2d430 and the files it names):
- language model: LLaVA-Lightning-7B-v1-1 = Vicuna v1.1 on LLaMA-1 7B (LISA README); LLaMA-1's
  config.json: width 4096, 32 layers, 32 heads (no grouped-query attention), FFN 11008, silu,
  RMSNorm eps 1e-6, RoPE theta 1e4, untied head, 2048 positions, 32000 tokens.
- added tokens (`train_ds.py`: `add_tokens("[SEG]")`, then `<im_start>`, `<im_end>`; LLaVA's base
  already holds `<im_patch>` at 32000): ids 32000 `<im_patch>`, 32001 `<im_start>`, 32002
  `<im_end>`, 32003 `[SEG]`; the released file's `embed_tokens`/`lm_head` have 32004 rows. Here
  the 32000 pretrained rows are the decoder's table and the 4 others its added token rows
  (`DecoderLM.add_token_rows`), in this order.
- vision tower: `openai/clip-vit-large-patch14` (ViT-L/14 at 224, 256 patch tokens of the
  second-to-last layer); projector Linear(1024, 4096).
- SAM ViT-H (`--vision_pretrained` sam_vit_h_4b8939.pth) at 1024; `text_hidden_fcs`
  Linear(4096, 4096) -> ReLU -> Linear(4096, 256 = `--out_dim`).
- LoRA (`train_ds.py`: `--lora_r` 8, `--lora_alpha` 16, `--lora_dropout` 0.05,
  `--lora_target_modules` "q_proj,v_proj", passed to PEFT's `LoraConfig`): r 8, alpha 16, dropout
  0.05 on `q`, `v`. PEFT's dropout drops the adapters' input only, in training; here it is active
  when the forward gets `rngs` (`Lisa.__call__(..., rngs=...)`). The released weights have the
  adapters merged.
- sizes: `--image_size` 1024 (SAM), CLIP 224, `--num_classes_per_sample` 3 [SEG] per image
  (`max_masks`), `--model_max_length` 512 tokens.
"""

import ml_collections

from configs import common
from configs import sam as sam_config

# The rows LLaVA v1 and LISA append to LLaMA's vocabulary, in id order after it.
ADDED_TOKENS = ("<im_patch>", "<im_start>", "<im_end>", "[SEG]")

# clip.NAMED_CONFIGS["vit_l14_224"], written out (configs hold values, not library lookups;
# tests/configs/test_lisa.py checks they agree).
_CLIP_VIT_L14_224 = dict(width=1024, depth=24, heads=16, mlp_dim=4096, patch_size=14,
                         image_size=224, layer_norm_eps=1e-5)

_LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                 num_heads=32, num_kv_heads=32, head_dim=128, norm_eps=1e-6,
                 rope_theta=10_000.0, max_position_embeddings=2048)

_TINY_CLIP = dict(width=16, depth=2, heads=2, mlp_dim=32, patch_size=4, image_size=8,
                  layer_norm_eps=1e-5)
_TINY_LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                   num_kv_heads=2, head_dim=16, norm_eps=1e-6, rope_theta=10_000.0,
                   max_position_embeddings=512)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "lisa_7b"
    if variant not in ("lisa_7b", "tiny"):
        raise ValueError(f"unknown LISA variant {variant!r}; choose lisa_7b or tiny")
    tiny = variant == "tiny"
    llama = _TINY_LLAMA if tiny else _LLAMA_7B
    sam = sam_config.get_config("tiny" if tiny else "vit_h").model.to_dict()
    clip = _TINY_CLIP if tiny else _CLIP_VIT_L14_224

    config = ml_collections.ConfigDict()
    config.variant = variant
    config.model_class = "pixelllm.models.lisa.lisa.Lisa"
    config.model = ml_collections.ConfigDict({
        "vision_tower": clip,
        "language_model": dict(
            llama, activation="silu", norm_plus_one=False, scale_embeddings=False,
            tie_word_embeddings=False, post_norms=False, qk_norm=False,
            query_pre_attn_scalar=None, attn_logit_softcap=None, final_logit_softcap=None,
            layer_types=None, sliding_window=None, rope_scaling=None, local_rope_theta=None,
            lora=dict(rank=4 if tiny else 8, alpha=8.0 if tiny else 16.0, targets=("q", "v"),
                      dropout=0.05),
            frozen=True, dtype="float32", param_dtype="float32", remat="none",
            scan_layers=False),
        "added_tokens": ADDED_TOKENS,
        # llama vocab_size + ADDED_TOKENS.index("[SEG]"); build() refuses any other value.
        "seg_token_id": llama["vocab_size"] + ADDED_TOKENS.index("[SEG]"),
        "sam": sam,
        # Compute dtype of CLIP and SAM ("bfloat16" on accelerators); the language model's is
        # language_model.dtype.
        "dtype": "float32",
    })
    config.sizes = ml_collections.ConfigDict({
        "clip_image_size": clip["image_size"],
        "image_tokens": (clip["image_size"] // clip["patch_size"]) ** 2,
        "sam_image_size": sam["image_encoder"]["img_size"],
        "max_masks": 3,
        "max_length": 64 if tiny else 512,
    })
    config.sharding = common.sharding_config()
    config.lock()
    return config
