"""hf_config: Hugging Face config.json -> this project's LM config, for every family; and the
named full-size configs equal what it reads from the public config.json files."""

import json

import pytest
import transformers

from configs import decoder_lm, t5 as t5_config
from pixelllm.language import hf_config
from pixelllm.language.decoder import DecoderConfig
from pixelllm.language.t5 import T5Config

# meta-llama/Llama-3.2-1B config.json
LLAMA_3_2_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256}
# google/gemma-2b config.json (no tie_word_embeddings key: GemmaConfig ties by default)
GEMMA_2B = {
    "architectures": ["GemmaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 2, "eos_token_id": 1, "head_dim": 256, "hidden_act": "gelu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 16384,
    "max_position_embeddings": 8192, "model_type": "gemma", "num_attention_heads": 8,
    "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
    "transformers_version": "4.38.0.dev0", "use_cache": True, "vocab_size": 256000}
# google/gemma-2-2b config.json
GEMMA_2_2B = {
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid",
    "eos_token_id": 1, "final_logit_softcapping": 30.0, "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2304, "initializer_range": 0.02, "intermediate_size": 9216,
    "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
    "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
    "sliding_window": 4096, "torch_dtype": "float32", "transformers_version": "4.42.4",
    "use_cache": True, "vocab_size": 256000}
# google/gemma-3-1b-pt config.json
GEMMA_3_1B = {
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid",
    "eos_token_id": 1, "final_logit_softcapping": None, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "initializer_range": 0.02,
    "intermediate_size": 6912, "max_position_embeddings": 32768, "model_type": "gemma3_text",
    "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
    "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": 512, "sliding_window_pattern": 6, "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": 262144}
# google/flan-t5-xl config.json (task_specific_params left out)
FLAN_T5_XL = {
    "architectures": ["T5ForConditionalGeneration"], "d_ff": 5120, "d_kv": 64, "d_model": 2048,
    "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1,
    "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
    "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-06,
    "model_type": "t5", "n_positions": 512, "num_decoder_layers": 24, "num_heads": 32,
    "num_layers": 24, "output_past": True, "pad_token_id": 0,
    "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.23.1",
    "use_cache": True, "vocab_size": 32128}


def _agrees_with_named_config(converted: dict, named_model) -> None:
    named = named_model.to_dict()
    assert set(converted) <= set(named), sorted(set(converted) - set(named))
    named = {key: named[key] for key in converted}
    if named.get("layer_types") is not None:
        named["layer_types"] = tuple(named["layer_types"])
    assert converted == named


@pytest.mark.parametrize("public,variant,family", [
    (LLAMA_3_2_1B, "llama3_2_1b", "llama"), (GEMMA_2B, "gemma_2b", "gemma"),
    (GEMMA_2_2B, "gemma2_2b", "gemma2"), (GEMMA_3_1B, "gemma3_1b", "gemma3")])
def test_named_decoder_configs_equal_the_public_files(public, variant, family):
    converted = hf_config.language_model_config(public)
    config = decoder_lm.get_config(variant)
    assert (converted["kind"], converted["family"], config.family) == ("decoder", family, family)
    _agrees_with_named_config(converted["model"], config.model)


def test_named_flan_t5_xl_equals_the_public_file():
    converted = hf_config.language_model_config(FLAN_T5_XL)
    assert (converted["kind"], converted["family"]) == ("t5", "t5")
    assert converted["model"]["tie_word_embeddings"] is False
    assert converted["model"]["scale_decoder_outputs"] is False
    _agrees_with_named_config(converted["model"], t5_config.get_config("flan_t5_xl").model)


def _saved(tmp_path, hf_cfg) -> dict:
    hf_cfg.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        return json.load(f)


def _decoder(tmp_path, hf_cfg, model_class):
    """Builds the tiny transformers model (its config as the model sees it), saves config.json,
    converts the folder and checks that DecoderConfig accepts the result."""
    model = model_class(hf_cfg)
    saved = _saved(tmp_path, model.config)
    converted = hf_config.language_model_config(tmp_path)
    DecoderConfig.from_mapping(converted["model"])
    return model.config, saved, converted["model"]


def test_tiny_llama3(tmp_path):
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
    hf, saved, ours = _decoder(tmp_path, transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        rope_theta=5e5, rope_scaling=dict(scaling), max_position_embeddings=512,
        tie_word_embeddings=True), transformers.LlamaForCausalLM)
    assert "rope_parameters" in saved  # the 5.x layout
    assert ours == dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, activation="silu", norm_eps=1e-5, norm_plus_one=False,
        scale_embeddings=False, tie_word_embeddings=True, post_norms=False, qk_norm=False,
        query_pre_attn_scalar=None, attn_logit_softcap=None, final_logit_softcap=None,
        layer_types=None, sliding_window=None, rope_theta=5e5,
        rope_scaling=scaling,
        local_rope_theta=None, max_position_embeddings=512)
    assert ours["rope_scaling"] == {k: v for k, v in hf.rope_parameters.items() if k != "rope_theta"}


def test_tiny_gemma(tmp_path):
    hf, _, ours = _decoder(tmp_path, transformers.GemmaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=24, hidden_act="gelu"),
        transformers.GemmaForCausalLM)
    assert hf.hidden_act == "gelu_pytorch_tanh"  # transformers rewrites Gemma 1's legacy "gelu"
    assert (ours["activation"], ours["head_dim"], ours["num_kv_heads"]) == ("gelu_tanh", 24, 1)
    assert ours["norm_plus_one"] and ours["scale_embeddings"] and ours["tie_word_embeddings"]
    assert not ours["post_norms"] and ours["layer_types"] is None
    assert (ours["rope_theta"], ours["rope_scaling"]) == (10_000.0, None)


def test_tiny_gemma2(tmp_path):
    hf, _, ours = _decoder(tmp_path, transformers.Gemma2Config(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        attn_logit_softcapping=7.0, final_logit_softcapping=9.0, sliding_window=5),
        transformers.Gemma2ForCausalLM)
    assert ours["layer_types"] == tuple(hf.layer_types) == (
        "sliding_attention", "full_attention", "sliding_attention")
    assert (ours["sliding_window"], ours["query_pre_attn_scalar"]) == (5, 24)
    assert (ours["attn_logit_softcap"], ours["final_logit_softcap"]) == (7.0, 9.0)
    assert ours["post_norms"] and not ours["qk_norm"] and ours["local_rope_theta"] is None


@pytest.mark.parametrize("nested", [False, True])
def test_tiny_gemma3_rope_per_layer_type(tmp_path, nested):
    text = transformers.Gemma3TextConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=3,
        sliding_window_pattern=2, rope_theta=2e5, rope_local_base_freq=3e3,
        rope_scaling=dict(rope_type="linear", factor=8.0))
    if nested:  # the multimodal file: the language model under text_config
        vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2)
        _saved(tmp_path, transformers.Gemma3Config(text_config=text, vision_config=vision))
        converted = hf_config.language_model_config(tmp_path / "config.json")
        hf, ours = text, converted["model"]
        assert converted["family"] == "gemma3"
    else:
        hf, saved, ours = _decoder(tmp_path, text, transformers.Gemma3ForCausalLM)
        assert set(saved["rope_parameters"]) == {"full_attention", "sliding_attention"}
    assert ours["layer_types"] == tuple(hf.layer_types) == ("sliding_attention", "full_attention") * 2
    assert (ours["rope_theta"], ours["local_rope_theta"]) == (2e5, 3e3)
    assert ours["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    assert ours["qk_norm"] and ours["post_norms"] and ours["sliding_window"] == 3


def test_gemma3_public_layout_pattern_and_local_base():
    ours = hf_config.language_model_config(GEMMA_3_1B)["model"]
    full = [i for i, kind in enumerate(ours["layer_types"]) if kind == "full_attention"]
    assert full == [5, 11, 17, 23]
    assert (ours["rope_theta"], ours["local_rope_theta"]) == (1e6, 1e4)


@pytest.mark.parametrize("tie", [None, True, False])
def test_tiny_t5_tie_and_rescale_follow_transformers(tmp_path, tie):
    kwargs = {} if tie is None else {"tie_word_embeddings": tie}
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, **kwargs))
    saved = _saved(tmp_path, hf.config)
    ours = hf_config.language_model_config(tmp_path)["model"]
    T5Config.from_config(ours)
    assert ours == dict(
        vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
        layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu",
        tie_word_embeddings=saved["tie_word_embeddings"],
        scale_decoder_outputs=hf.config.scale_decoder_outputs, dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    # transformers 5 writes "tied" always; the rescale is the flag the file's author asked for.
    assert ours["tie_word_embeddings"] is True
    assert ours["scale_decoder_outputs"] is (tie is not False)


@pytest.mark.parametrize("tie,scale", [(None, True), (True, True), (False, False)])
def test_t5_4x_files_decide_the_rescale_from_the_tie(tie, scale):
    config = {k: v for k, v in FLAN_T5_XL.items() if k != "tie_word_embeddings"}
    if tie is not None:
        config["tie_word_embeddings"] = tie
    ours = hf_config.language_model_config(config)["model"]
    assert (ours["tie_word_embeddings"], ours["scale_decoder_outputs"]) == (tie is not False, scale)


@pytest.mark.parametrize("change,message", [
    ({"model_type": "mistral"}, "model_type 'mistral' is not supported"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not implemented"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
])
def test_unsupported_settings_name_the_file_and_key(tmp_path, change, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**LLAMA_3_2_1B, **change}))
    with pytest.raises(ValueError, match=f"{path}: .*{message}"):
        hf_config.language_model_config(path)


def test_missing_size_key_is_named():
    config = {k: v for k, v in GEMMA_2_2B.items() if k != "intermediate_size"}
    with pytest.raises(ValueError, match="config mapping: missing key 'intermediate_size'"):
        hf_config.language_model_config(config)
