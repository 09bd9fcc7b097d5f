"""Decoder-only language models (pixelllm/language/decoder.py): Llama 3.x and Gemma 1/2/3 text.

  --config=configs/decoder_lm.py:llama3_2_1b   Llama 3.2 1B (default)
  --config=configs/decoder_lm.py:gemma_2b      Gemma 1 2B
  --config=configs/decoder_lm.py:gemma2_2b     Gemma 2 2B
  --config=configs/decoder_lm.py:gemma3_1b     Gemma 3 1B (text only)
  --config=configs/decoder_lm.py:tiny_llama | tiny_gemma | tiny_gemma2 | tiny_gemma3   seconds on CPU

`config.model` feeds `DecoderLM` (`DecoderConfig.from_mapping`); `config.family` names the
transformers family whose checkpoints and tokenizer match.

Sources for the full sizes: the published Hugging Face `config.json` of each model (named above
each entry below); every value of an entry, the family switches included, equals what
`pixelllm.language.hf_config.language_model_config` reads from that file
(`tests/language/test_hf_config.py` holds the files' values and checks it). Keys a file leaves
out take transformers' config-class defaults, as transformers does (noted where it matters).

LoRA: PixelLLM's official setting on T5 is rank 32 with a plain scale of 2 on q and v; with the
PEFT scale alpha / rank that is alpha 64.
"""

import ml_collections

from configs import common

_FULL = "full_attention"
_SLIDING = "sliding_attention"


def _gemma2_layer_types(num_layers: int) -> tuple[str, ...]:
    """Gemma 2 alternates sliding and full layers, starting with sliding (Gemma2Config)."""
    return tuple(_SLIDING if (i + 1) % 2 else _FULL for i in range(num_layers))


def _gemma3_layer_types(num_layers: int, pattern: int) -> tuple[str, ...]:
    """Gemma 3: every `pattern`-th layer is full, the others sliding (`sliding_window_pattern`)."""
    return tuple(_SLIDING if (i + 1) % pattern else _FULL for i in range(num_layers))


def _llama(**overrides) -> dict:
    return dict(activation="silu", norm_plus_one=False, scale_embeddings=False, post_norms=False,
                qk_norm=False, query_pre_attn_scalar=None, attn_logit_softcap=None,
                final_logit_softcap=None, layer_types=None, sliding_window=None,
                local_rope_theta=None, **overrides)


def _gemma(**overrides) -> dict:
    values = dict(activation="gelu_tanh", norm_plus_one=True, scale_embeddings=True,
                  tie_word_embeddings=True, norm_eps=1e-6, post_norms=False, qk_norm=False,
                  query_pre_attn_scalar=None, attn_logit_softcap=None, final_logit_softcap=None,
                  layer_types=None, sliding_window=None, rope_scaling=None, local_rope_theta=None)
    values.update(overrides)
    return values


_LLAMA3_SCALING = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192)

_VARIANTS = {
    # meta-llama/Llama-3.2-1B config.json: tie_word_embeddings true, rms_norm_eps 1e-5, head_dim 64,
    # rope_theta 5e5 with rope_scaling llama3 (factor 32, low 1, high 4, original 8192),
    # max_position_embeddings 131072.
    "llama3_2_1b": ("llama", _llama(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
        num_kv_heads=8, head_dim=64, norm_eps=1e-5, tie_word_embeddings=True, rope_theta=500_000.0,
        rope_scaling=_LLAMA3_SCALING, max_position_embeddings=131_072)),
    # google/gemma-2b config.json: multi-query attention (num_key_value_heads 1), head_dim 256,
    # hidden_act "gelu" (transformers runs the tanh GELU for this legacy value), no
    # tie_word_embeddings key (GemmaConfig ties by default).
    "gemma_2b": ("gemma", _gemma(
        vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_layers=18, num_heads=8,
        num_kv_heads=1, head_dim=256, rope_theta=10_000.0, max_position_embeddings=8192)),
    # google/gemma-2-2b config.json: query_pre_attn_scalar 256, soft-caps attn 50 / final 30,
    # sliding_window 4096 on every other layer starting with the first (no layer_types key:
    # Gemma2Config's alternation), rope_theta 1e4, tied by default.
    "gemma2_2b": ("gemma2", _gemma(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_layers=26, num_heads=8,
        num_kv_heads=4, head_dim=256, post_norms=True, query_pre_attn_scalar=256,
        attn_logit_softcap=50.0, final_logit_softcap=30.0, layer_types=_gemma2_layer_types(26),
        sliding_window=4096, rope_theta=10_000.0, max_position_embeddings=8192)),
    # google/gemma-3-1b-pt config.json: vocab 262144 (the 4B+ multimodal models use 262208),
    # 4 heads / 1 kv head of 256, sliding_window 512, sliding_window_pattern 6, rope_theta 1e6 on
    # global layers / rope_local_base_freq 1e4 on sliding ones, rope_scaling null (the 4B+ models
    # add linear factor 8 on global layers), max_position_embeddings 32768.
    "gemma3_1b": ("gemma3", _gemma(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_layers=26, num_heads=4,
        num_kv_heads=1, head_dim=256, post_norms=True, qk_norm=True, query_pre_attn_scalar=256,
        layer_types=_gemma3_layer_types(26, 6), sliding_window=512, rope_theta=1_000_000.0,
        local_rope_theta=10_000.0, max_position_embeddings=32_768)),
}

# Tiny variants keep each family's switches. head_dim differs from hidden / heads for Gemma (as in
# the real models), windows are shorter than the test sequences, Gemma 2's soft-caps are small
# enough to bend O(1) logits, and Gemma 3's global layers carry the linear rope scaling of 4B+.
_TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
             max_position_embeddings=131_072)
_TINY_VARIANTS = {
    "tiny_llama": ("llama", _llama(
        num_layers=2, head_dim=16, norm_eps=1e-5, tie_word_embeddings=False, rope_theta=500_000.0,
        rope_scaling=_LLAMA3_SCALING, **_TINY)),
    "tiny_gemma": ("gemma", _gemma(num_layers=2, head_dim=32, rope_theta=10_000.0, **_TINY)),
    "tiny_gemma2": ("gemma2", _gemma(
        num_layers=2, head_dim=32, post_norms=True, query_pre_attn_scalar=24,
        attn_logit_softcap=2.0, final_logit_softcap=3.0, layer_types=_gemma2_layer_types(2),
        sliding_window=4, rope_theta=10_000.0, **_TINY)),
    "tiny_gemma3": ("gemma3", _gemma(
        num_layers=2, head_dim=32, post_norms=True, qk_norm=True, query_pre_attn_scalar=32,
        layer_types=_gemma3_layer_types(2, 2), sliding_window=4, rope_theta=1_000_000.0,
        rope_scaling=dict(rope_type="linear", factor=8.0), local_rope_theta=10_000.0, **_TINY)),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "llama3_2_1b"
    variants = {**_VARIANTS, **_TINY_VARIANTS}
    if variant not in variants:
        raise ValueError(f"unknown decoder LM variant {variant!r}; choose from {sorted(variants)}")
    family, model = variants[variant]
    tiny = variant.startswith("tiny")
    config = ml_collections.ConfigDict()
    config.variant = variant
    config.model_class = "pixelllm.language.decoder.DecoderLM"
    config.family = family
    config.model = ml_collections.ConfigDict(dict(
        model,
        lora=dict(rank=4 if tiny else 32, alpha=8.0 if tiny else 64.0, targets=("q", "v")),
        frozen=True, dtype="float32", param_dtype="float32", remat="none",
        # Stacked blocks run with nnx.scan: one compiled block, same values.
        scan_layers=False))
    config.sharding = common.sharding_config()
    config.lock()
    return config
