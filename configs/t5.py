"""T5 encoder-decoder language models (Flan-T5 / T5 v1.1, original T5), frozen with LoRA.

  --config=configs/t5.py:flan_t5_xl      the official PixelLLM language model (default)
  --config=configs/t5.py:flan_t5_small | flan_t5_base | flan_t5_large | flan_t5_xxl
  --config=configs/t5.py:tiny            seconds on CPU

Sizes are Hugging Face's published `config.json` of `google/flan-t5-{small,base,large,xl,xxl}`
(identical to `google/t5-v1_1-*`): gated-GELU (`gelu_new`, the tanh form), untied `lm_head`,
vocab 32128, 32 relative-position buckets up to distance 128, RMS-norm eps 1e-6, pad and decoder
start 0, EOS 1. Flan-T5-XL also matches the official PixelLLM `flan_t5_xl` (scenic
`projects/t5/model.py`). For the original T5 (`relu`, tied embeddings, `d_model ** -0.5` before
the tied output projection) set `feed_forward_proj="relu"`, `tie_word_embeddings=True` and
`scale_decoder_outputs=True`; the two output switches are independent (transformers 5.x saves
tied files whose config asks for no rescale).

LoRA follows the official PixelLLM: rank 32 on `q` and `v` of the encoder self-, decoder self- and
cross-attention with a plain scale of 2 on the update; the scale is `alpha / rank` (PEFT), so
`alpha = 2 * rank`. `rank=0` builds no adapters. `frozen=True` keeps every pretrained weight out of
`nnx.Param` (see pixelllm/nn/lora.py).
"""

import ml_collections

from configs import common

# (d_model, d_kv, d_ff, encoder layers = decoder layers, heads) of google/flan-t5-<size>/config.json;
# flan_t5_xl is checked against that file's values in tests/language/test_hf_config.py.
_VARIANTS = {
    "flan_t5_small": (512, 64, 1024, 8, 6),
    "flan_t5_base": (768, 64, 2048, 12, 12),
    "flan_t5_large": (1024, 64, 2816, 24, 16),
    "flan_t5_xl": (2048, 64, 5120, 24, 32),
    "flan_t5_xxl": (4096, 64, 10240, 24, 64),
}

_OFFICIAL_LORA_RANK = 32
_OFFICIAL_LORA_SCALE = 2.0


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "flan_t5_xl"
    if variant != "tiny" and variant not in _VARIANTS:
        raise ValueError(f"unknown T5 variant {variant!r}; "
                         f"choose tiny or one of {sorted(_VARIANTS)}")
    if variant == "tiny":
        d_model, d_kv, d_ff, layers, heads, vocab = 64, 16, 128, 2, 4, 128
        lora_rank = 4
    else:
        (d_model, d_kv, d_ff, layers, heads), vocab = _VARIANTS[variant], 32128
        lora_rank = _OFFICIAL_LORA_RANK
    config = ml_collections.ConfigDict()
    config.variant = variant
    config.model_class = "pixelllm.language.t5.T5"
    config.model = ml_collections.ConfigDict({
        "vocab_size": vocab,
        "d_model": d_model,
        "d_kv": d_kv,
        "d_ff": d_ff,
        "num_layers": layers,
        "num_decoder_layers": layers,
        "num_heads": heads,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "layer_norm_epsilon": 1e-6,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
        "scale_decoder_outputs": False,
        # Active only when rngs are passed to encode/decode; PixelLLM trains T5 with 0.1.
        "dropout_rate": 0.1,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "frozen": True,
        "dtype": "float32",
        "param_dtype": "float32",
        # Rematerialization of every encoder/decoder layer (pixelllm/nn/remat.py policy names).
        "remat": "none",
        # Stacked layers run with nnx.scan: one compiled layer per stack, same values.
        "scan_layers": False,
        "lora": {
            "rank": lora_rank,
            "alpha": _OFFICIAL_LORA_SCALE * lora_rank,
            "targets": ("q", "v"),
        },
    })
    config.sharding = common.sharding_config()
    config.lock()
    return config
