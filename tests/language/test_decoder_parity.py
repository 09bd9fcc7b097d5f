"""DecoderLM against transformers' Llama / Gemma / Gemma 2 / Gemma 3 at tiny random sizes, its
Hugging Face converter, and full-size parameter counts against models on the meta device."""

import functools
import math
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from configs import decoder_lm
from pixelllm import sharding
from pixelllm.checkpoints.assign import CheckpointMismatchError
from pixelllm.checkpoints.state_dict import read_state_dict
from pixelllm.language import decoder
from pixelllm.nn import lora

TINY = ("tiny_llama", "tiny_gemma", "tiny_gemma2", "tiny_gemma3")
FULL = ("llama3_2_1b", "gemma_2b", "gemma2_2b", "gemma3_1b")
# Longer than the tiny sliding windows (4), so windowed layers drop keys.
LENGTH = 11
POSITION_OFFSET = 1000  # far-away positions make RoPE frequency errors visible


def hf_config(config):
    """The transformers config with the same values as our `config` (configs/decoder_lm.py)."""
    m = config.model
    common = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                  intermediate_size=m.intermediate_size, num_hidden_layers=m.num_layers,
                  num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
                  head_dim=m.head_dim, rms_norm_eps=m.norm_eps,
                  max_position_embeddings=m.max_position_embeddings,
                  tie_word_embeddings=m.tie_word_embeddings, attn_implementation="eager")
    rope = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.rope_scaling:
        rope.update(m.rope_scaling.to_dict())
    if config.family == "llama":
        return transformers.LlamaConfig(**common, hidden_act="silu", rope_parameters=rope)
    if config.family == "gemma":
        return transformers.GemmaConfig(**common, hidden_act="gelu_pytorch_tanh", rope_parameters=rope)
    gemma = dict(common, hidden_activation="gelu_pytorch_tanh",
                 query_pre_attn_scalar=m.query_pre_attn_scalar,
                 sliding_window=m.sliding_window, layer_types=list(m.layer_types),
                 attn_logit_softcapping=m.attn_logit_softcap,
                 final_logit_softcapping=m.final_logit_softcap)
    if config.family == "gemma2":
        return transformers.Gemma2Config(**gemma, rope_parameters=rope)
    return transformers.Gemma3TextConfig(**gemma, rope_parameters={
        "full_attention": rope,
        "sliding_attention": {"rope_type": "default", "rope_theta": m.local_rope_theta}})


def state_dict_of(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


@functools.cache
def reference(variant):
    """A random tiny transformers model (weights scaled for O(1) activations, norm weights random
    so every norm's key mapping matters) and our model loaded from it (LoRA rank 4, B = 0) the way
    users load published weights: ``save_pretrained`` to sharded ``*.safetensors`` with a
    ``model.safetensors.index.json``, read back with ``read_state_dict``."""
    config = decoder_lm.get_config(variant)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config(config)).eval()
    width = config.model.hidden_size
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim == 1:
                p.copy_((0.0 if config.model.norm_plus_one else 1.0) + 0.3 * torch.randn(p.shape))
            elif "embed_tokens" in name and config.model.scale_embeddings:
                # Tied and scaled by sqrt(width), O(1) embeddings would make every token predict
                # itself, and greedy decoding would only repeat the prompt's last token.
                p.copy_(torch.randn(p.shape) / width)
            else:
                p.copy_(torch.randn(p.shape) / math.sqrt(p.shape[1]))
    ours = decoder.DecoderLM(config.model, rngs=nnx.Rngs(0))
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder, max_shard_size="40KB")
        assert (Path(folder) / "model.safetensors.index.json").is_file()
        decoder.load(ours, read_state_dict(folder), source=folder)
    return config, hf, ours


@nnx.jit
def forward(model, tokens, positions, mask):
    return model(tokens=tokens, positions=positions, input_mask=mask)


@nnx.jit
def forward_embeddings(model, embeddings, positions, mask):
    return model(embeddings=embeddings, positions=positions, input_mask=mask)


@nnx.jit
def extend(model, tokens, positions, mask, cache):
    return model(tokens=tokens, positions=positions, input_mask=mask, cache=cache)


def inputs(vocab_size, lengths, length=LENGTH, seed=0):
    """Right-padded random tokens [B, length], positions (offset) and the valid mask."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, vocab_size, size=(len(lengths), length))
    mask = np.arange(length)[None] < np.asarray(lengths)[:, None]
    positions = np.broadcast_to(np.arange(length) + POSITION_OFFSET, tokens.shape).copy()
    return tokens, positions, mask


def hf_run(hf, **kwargs):
    with torch.no_grad():
        out = hf(**kwargs, use_cache=False, output_hidden_states=True)
    return out.logits.numpy(), out.hidden_states[-1].numpy(), out


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def check_parity(variant):
    config, hf, ours = reference(variant)
    tokens, positions, mask = inputs(config.model.vocab_size, lengths=(LENGTH, 7))
    hf_logits, hf_hidden, out = hf_run(hf, input_ids=torch.tensor(tokens),
                                       attention_mask=torch.tensor(mask, dtype=torch.long),
                                       position_ids=torch.tensor(positions))
    # hidden_states[-1] is taken after the final norm: the LM head maps it to the logits.
    raw_logits = hf.lm_head(out.hidden_states[-1]).detach().numpy()
    cap = config.model.final_logit_softcap
    np.testing.assert_allclose(np.tanh(raw_logits / cap) * cap if cap else raw_logits, hf_logits,
                               atol=1e-5)
    result = forward(ours, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
    assert result.logits.dtype == jnp.float32 and result.logits.shape == hf_logits.shape
    assert result.hidden.shape == hf_hidden.shape
    logits_diff, hidden_diff = max_diff(result.logits, hf_logits), max_diff(result.hidden, hf_hidden)
    print(f"{variant}: max |logits diff| {logits_diff:.2e}, max |hidden diff| {hidden_diff:.2e}, "
          f"max |logit| {np.abs(hf_logits).max():.2f}")
    assert logits_diff <= 1e-4 and hidden_diff <= 1e-4


def test_llama_parity_with_transformers():
    check_parity("tiny_llama")


def test_gemma_parity_with_transformers():
    check_parity("tiny_gemma")


def test_gemma2_parity_with_transformers():
    check_parity("tiny_gemma2")


def test_gemma3_parity_with_transformers():
    check_parity("tiny_gemma3")


@pytest.mark.parametrize("variant", TINY)
def test_input_embeddings_parity_with_transformers(variant):
    """A prefix of free embeddings (visual tokens, not rescaled) then token embeddings equals
    transformers' `inputs_embeds`."""
    config, hf, ours = reference(variant)
    tokens, positions, mask = inputs(config.model.vocab_size, lengths=(LENGTH, 9), seed=1)
    prefix = np.random.default_rng(2).normal(size=(2, 3, config.model.hidden_size)).astype(np.float32)
    with torch.no_grad():
        hf_token_embeddings = hf.get_input_embeddings()(torch.tensor(tokens[:, 3:])).numpy()
    ours_token_embeddings = np.asarray(ours.embed(jnp.asarray(tokens[:, 3:])))
    assert max_diff(ours_token_embeddings, hf_token_embeddings) <= 1e-6
    embeddings = np.concatenate([prefix, ours_token_embeddings], axis=1)
    hf_logits, hf_hidden, _ = hf_run(hf, inputs_embeds=torch.tensor(embeddings),
                                     attention_mask=torch.tensor(mask, dtype=torch.long),
                                     position_ids=torch.tensor(positions))
    result = forward_embeddings(ours, jnp.asarray(embeddings), jnp.asarray(positions), jnp.asarray(mask))
    assert max_diff(result.logits, hf_logits) <= 1e-4
    assert max_diff(result.hidden, hf_hidden) <= 1e-4


@pytest.mark.parametrize("variant", TINY)
def test_greedy_decoding_with_cache_matches_transformers_generate(variant):
    """Two prompts of different lengths, prefilled right-padded into one cache and extended one
    token per step, continue exactly as transformers' greedy `generate` on each prompt alone."""
    config, hf, ours = reference(variant)
    new_tokens, lengths = 8, (6, 3)
    tokens, _, mask = inputs(config.model.vocab_size, lengths=lengths, length=max(lengths), seed=3)
    hf.generation_config.eos_token_id = None
    expected = []
    for row, n in zip(tokens, lengths):
        with torch.no_grad():
            generated = hf.generate(torch.tensor(row[None, :n]),
                                    attention_mask=torch.ones(1, n, dtype=torch.long),
                                    max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        expected.append(generated[0, n:].numpy())

    cache = ours.init_cache(len(lengths), max(lengths) + new_tokens)
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    out = extend(ours, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask), cache)
    np.testing.assert_array_equal(out.cache["end_index"], lengths)
    last = np.asarray(out.logits)[np.arange(len(lengths)), np.asarray(lengths) - 1]
    generated = [last.argmax(-1)]
    cache = out.cache
    for _ in range(new_tokens - 1):
        next_positions = cache["end_index"][:, None]
        out = extend(ours, jnp.asarray(generated[-1])[:, None], next_positions,
                     jnp.ones((len(lengths), 1), bool), cache)
        cache = out.cache
        generated.append(np.asarray(out.logits)[:, 0].argmax(-1))
    np.testing.assert_array_equal(np.stack(generated, axis=1), np.stack(expected))


def test_rope_frequencies_match_transformers():
    """llama3 scaling at Llama 3.2 1B's values and Gemma 3's per-layer-type bases (the local
    base and the global base with linear scaling)."""
    config = decoder_lm.get_config("llama3_2_1b")
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config(config))
    model = decoder.as_config(config.model)
    ours = decoder.rope_inv_freq(model.head_dim, model.rope_theta, model.rope_scaling)
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6)
    # All three llama3 regimes occur: kept, smoothed and divided by the factor.
    plain = decoder.rope_inv_freq(model.head_dim, model.rope_theta, None)
    ratio = plain / ours
    assert np.any(ratio == 1) and np.any(np.isclose(ratio, 32)) and np.any((ratio > 1.01) & (ratio < 31))

    config, hf, _ = reference("tiny_gemma3")
    model = decoder.as_config(config.model)
    rotary = hf.model.rotary_emb
    np.testing.assert_allclose(
        decoder.rope_inv_freq(model.head_dim, model.rope_theta, model.rope_scaling),
        rotary.full_attention_inv_freq.numpy(), rtol=1e-6)
    np.testing.assert_allclose(decoder.rope_inv_freq(model.head_dim, model.local_rope_theta, None),
                               rotary.sliding_attention_inv_freq.numpy(), rtol=1e-6)


# The sizes the model cards state.
PUBLISHED_COUNTS = {"llama3_2_1b": 1_235_814_400, "gemma_2b": 2_506_172_416,
                    "gemma2_2b": 2_614_341_888, "gemma3_1b": 999_885_952}


@pytest.mark.parametrize("variant", FULL)
def test_full_size_parameter_counts_match_transformers(variant):
    """Base weights as many as transformers' model on the meta device (and the model card);
    LoRA rank r on q and v adds r * (in + out) per targeted projection."""
    config = decoder_lm.get_config(variant)
    r, m = 8, config.model
    m.lora.rank, m.lora.targets = r, ("q", "v")
    state = nnx.state(nnx.eval_shape(lambda: decoder.DecoderLM(m, rngs=nnx.Rngs(0))))
    base = sharding.param_count(nnx.filter_state(state, nnx.Not(nnx.LoRAParam)))
    extra = sharding.param_count(nnx.filter_state(state, nnx.LoRAParam))
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config(config))
    assert base == sum(p.numel() for p in hf.parameters()) == PUBLISHED_COUNTS[variant]
    assert extra == m.num_layers * r * ((m.hidden_size + m.num_heads * m.head_dim)
                                        + (m.hidden_size + m.num_kv_heads * m.head_dim))
    print(f"{variant}: {base:,} parameters (+{extra:,} with LoRA r={r} on q, v)")


def base_model(config, **overrides):
    """Our model of ``config`` as an abstract shape tree, for loading into."""
    return nnx.eval_shape(lambda: decoder.DecoderLM({**config.model.to_dict(), **overrides},
                                                    rngs=nnx.Rngs(0)))


def base_weights(model):
    return {"/".join(map(str, path)): np.asarray(v.get_value())
            for path, v in nnx.to_flat_state(nnx.state(model, lora.BASE_WEIGHTS))}


def test_loader_accepts_gemma3_multimodal_prefixes_and_skips_the_vision_tower():
    config, hf, _ = reference("tiny_gemma3")
    state = state_dict_of(hf)
    expected = base_weights(decoder.load(base_model(config), state, source="causal lm"))
    assert "lm_head" not in expected and expected["layers/0/attn/q_norm/scale"].shape == (32,)
    vision = {"vision_tower.vision_model.embeddings.patch_embedding.weight": np.zeros((8, 3, 2, 2)),
              "multi_modal_projector.mm_input_projection_weight": np.zeros((8, 64))}
    for text, other in (("model.language_model.", "model."), ("language_model.model.", "")):
        renamed = {text + k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        renamed.update({other + k: v for k, v in vision.items()})
        converted = base_weights(decoder.load(base_model(config), renamed, source=text))
        assert converted.keys() == expected.keys()
        for key, value in expected.items():
            np.testing.assert_array_equal(converted[key], value)
    # The vision tower is skipped only where a multimodal file keeps it.
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys: multi_modal_projector"):
        decoder.load(base_model(config), {**state, **vision}, source="causal lm")


def test_loader_transposes_and_casts():
    config, hf, _ = reference("tiny_llama")
    state = state_dict_of(hf)
    model = decoder.load(base_model(config, param_dtype="bfloat16"), state, source="tiny")
    q = state["model.layers.1.self_attn.q_proj.weight"]
    kernel = model.layers[1].attn.q.kernel.get_value()
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(kernel, q.T.astype(jnp.bfloat16))
    np.testing.assert_array_equal(model.lm_head.get_value(),
                                  state["lm_head.weight"].T.astype(jnp.bfloat16))
    # Llama's "post_attention_layernorm" is its pre-MLP norm.
    pre_mlp_norm = state["model.layers.0.post_attention_layernorm.weight"]
    np.testing.assert_array_equal(model.layers[0].pre_ffw_norm.scale.get_value(),
                                  pre_mlp_norm.astype(jnp.bfloat16))


def test_loader_names_missing_unexpected_and_misshaped_keys():
    config, hf, _ = reference("tiny_gemma2")
    state = state_dict_of(hf)
    del state["model.layers.1.pre_feedforward_layernorm.weight"]
    state["model.layers.0.self_attn.q_proj.bias"] = np.zeros(128, np.float32)
    state["model.layers.0.mlp.up_proj.weight"] = np.zeros((64, 128), np.float32)
    with pytest.raises(CheckpointMismatchError) as error:
        decoder.load(base_model(config), state, source="bad.safetensors")
    assert str(error.value).splitlines() == [
        "bad.safetensors: checkpoint does not match the model",
        "  1 missing keys: model.layers.1.pre_feedforward_layernorm.weight",
        "  1 unexpected keys: model.layers.0.self_attn.q_proj.bias",
        "  1 mis-shaped keys: model.layers.0.mlp.up_proj.weight (file (64, 128), after transpose "
        "(128, 64); model layers/0/mlp/up/kernel (64, 128))"]


def test_tied_model_rejects_a_different_lm_head_and_untied_model_hints_at_a_tied_file():
    config, hf, _ = reference("tiny_gemma")
    state = state_dict_of(hf)
    assert "lm_head.weight" in state  # torch lists the tied tensor under both names
    decoder.load(base_model(config), state, source="tiny")
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    with pytest.raises(CheckpointMismatchError, match=r"^tiny: .*\n  1 tied keys that differ: "
                       r"model\.embed_tokens\.weight and lm_head\.weight \(both give embedding\)$"):
        decoder.load(base_model(config), state, source="tiny")
    del state["lm_head.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"^tiny: .*; the file has no lm_head\.weight: "
                       r"this looks like a tied model \(tie_word_embeddings=True\)\n"
                       r"  1 missing keys: lm_head\.weight$"):
        decoder.load(base_model(config, tie_word_embeddings=False), state, source="tiny")


def test_loading_keeps_lora_factors_and_sets_base_weights():
    config, hf, _ = reference("tiny_gemma3")
    config.model.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")
    model = decoder.DecoderLM(config.model, rngs=nnx.Rngs(7))
    lora_before = {"/".join(map(str, p)): np.asarray(v.get_value())
                   for p, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    assert len(lora_before) == 2 * 7 * config.model.num_layers
    state = state_dict_of(hf)
    decoder.load(model, state, source="tiny")
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        np.testing.assert_array_equal(np.asarray(value.get_value()), lora_before["/".join(map(str, path))])
    np.testing.assert_array_equal(np.asarray(model.layers[1].mlp.down.kernel.get_value()),
                                  state["model.layers.1.mlp.down_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(model.layers[1].post_attn_norm.scale.get_value()),
                                  state["model.layers.1.post_attention_layernorm.weight"])
    del state["model.norm.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"missing .*model\.norm\.weight"):
        decoder.load(model, state, source="tiny")
