"""``scan_layers`` of the language models: stacked blocks under ``nnx.scan`` compute what the
per-layer blocks compute (logits, hidden, attention, KV-cached decoding, gradients), load the same
Hugging Face files, and keep the frozen / LoRA / added-token split of the parameters."""

import dataclasses

import jax
import jax.numpy as jnp
import math

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from pixelllm import sharding
from pixelllm.checkpoints.assign import CheckpointMismatchError
from pixelllm.checkpoints.key_map import per_layer_shapes, stack_layers
from pixelllm.language import decoder, hf_config, t5
from pixelllm.nn import lora

ATOL = 2e-5
LENGTH = 11  # longer than the tiny sliding windows (4)


# Three layers, so the scan runs more than one step per layer type; every projection adapted.
_DECODER_SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      max_position_embeddings=64, attn_implementation="eager")
_SLIDING = dict(sliding_window=4, query_pre_attn_scalar=8,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"])
_LORA = dict(rank=2, alpha=4.0, targets=("q", "v", "o"))


def hf_decoder_config(family: str) -> transformers.PretrainedConfig:
    if family == "llama":
        return transformers.LlamaConfig(**_DECODER_SIZES, tie_word_embeddings=False)
    if family == "gemma2":
        return transformers.Gemma2Config(**_DECODER_SIZES, **_SLIDING, attn_logit_softcapping=2.0,
                                         final_logit_softcapping=3.0)
    return transformers.Gemma3TextConfig(**_DECODER_SIZES, **_SLIDING, rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})


def random_hf(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Random O(1)-activation weights, norm scales too (so every key matters); the state dict."""
    torch.manual_seed(0)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(0.5 + 0.3 * torch.randn(p.shape) if p.ndim == 1
                    else torch.randn(p.shape) / math.sqrt(p.shape[-1]))
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def hf_decoder(family: str) -> tuple[dict, dict[str, np.ndarray]]:
    """Our model config (read from the transformers config) and the tiny model's state dict."""
    config = hf_decoder_config(family)
    state = random_hf(transformers.AutoModelForCausalLM.from_config(config))
    model = hf_config.language_model_config(config.to_dict())["model"]
    return {**model, "lora": _LORA}, state


def hf_t5() -> tuple[dict, dict[str, np.ndarray]]:
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=3,
                                   num_decoder_layers=2, num_heads=4, dropout_rate=0.0,
                                   feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    state = random_hf(transformers.T5ForConditionalGeneration(config))
    model = hf_config.language_model_config(config.to_dict())["model"]
    return {**model, "lora": dict(_LORA, targets=("q", "v", "wo"))}, state


def abstract(model_class, config):
    """A model of shapes only (no random initialisation to run), to be filled by loading: every
    parameter then comes from the file or the adapters given, none from the initialiser."""
    return nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(0)))


def flat(state) -> dict[str, np.ndarray]:
    return {"/".join(map(str, path)): np.asarray(v.get_value() if hasattr(v, "get_value") else v)
            for path, v in nnx.to_flat_state(state)}


def copy_adapters(source: nnx.Module, target: nnx.Module, stacked: tuple[str, ...]) -> None:
    """The per-layer model's LoRA factors, stacked, into the scanned model."""
    arrays = flat(nnx.state(source, nnx.LoRAParam))
    lora.load_lora_arrays(target, stack_layers(arrays, stacked), source="per-layer adapters")


def randomize_adapters(model: nnx.Module, seed: int) -> None:
    """LoRA factors random (B nonzero), so the adapters change every output."""
    rng = np.random.default_rng(seed)
    arrays = {"/".join(map(str, path)): 0.2 * rng.normal(size=v.get_value().shape)
              for path, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    lora.load_lora_arrays(model, arrays, source="random adapters")


def assert_close(actual, expected, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=atol, rtol=1e-5)


# ------------------------------------------------------------------------------ key map helpers


def test_per_layer_shapes_and_stack_layers_are_inverse():
    stacked = {"layers/attn/kernel": np.arange(24.0).reshape(3, 2, 4), "embedding": np.ones(5)}
    shapes = per_layer_shapes({k: v.shape for k, v in stacked.items()}, ("layers",))
    assert shapes == {"layers/0/attn/kernel": (2, 4), "layers/1/attn/kernel": (2, 4),
                      "layers/2/attn/kernel": (2, 4), "embedding": (5,)}
    per_layer = {f"layers/{i}/attn/kernel": stacked["layers/attn/kernel"][i] for i in range(3)}
    back = stack_layers({**per_layer, "embedding": stacked["embedding"]}, ("layers",))
    assert back.keys() == stacked.keys()
    np.testing.assert_array_equal(back["layers/attn/kernel"], stacked["layers/attn/kernel"])
    # Another stack's prefix is not confused with this one.
    assert stack_layers({"encoder/layers/0/w": np.ones(2)}, ("layers",)).keys() == {
        "encoder/layers/0/w"}
    with pytest.raises(ValueError, match=r"layers/attn/kernel: layers \[0, 2\]"):
        stack_layers({"layers/0/attn/kernel": np.ones(2), "layers/2/attn/kernel": np.ones(2)},
                     ("layers",))


# ------------------------------------------------------------------------------ decoder-only LMs


def decoder_pair(variant: str, **scanned_overrides):
    """(per-layer, scanned) DecoderLMs of a tiny family, both loaded from the same HF file, with
    the same random LoRA factors."""
    model_config, state = hf_decoder(variant)
    per_layer = decoder.load(abstract(decoder.DecoderLM, model_config), state,
                             source=f"{variant} (per layer)")
    randomize_adapters(per_layer, seed=1)
    scanned = abstract(decoder.DecoderLM,
                       {**model_config, "scan_layers": True, **scanned_overrides})
    decoder.load(scanned, state, source=f"{variant} (scanned)")
    copy_adapters(per_layer, scanned, ("layers",))
    return per_layer, scanned


def decoder_inputs(vocab: int, batch: int = 2):
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, vocab, (batch, LENGTH)), jnp.int32)
    mask = jnp.asarray(np.arange(LENGTH)[None] < np.array([[LENGTH], [LENGTH - 3]]))
    return tokens, decoder.valid_positions(mask), mask


@nnx.jit(static_argnames="attention_layers")
def decoder_forward(model, tokens, positions, mask, attention_layers=()):
    return model(tokens=tokens, positions=positions, input_mask=mask,
                 attention_layers=attention_layers)


@pytest.mark.parametrize("variant", ["llama", "gemma2", "gemma3"])
def test_decoder_scanned_equals_per_layer(variant):
    """Llama (all full), Gemma 2 (sliding + full, soft-caps) and Gemma 3 (sliding layers with
    their own RoPE base): one scanned block serves every layer type."""
    per_layer, scanned = decoder_pair(variant)
    assert scanned.layers.attn.q.kernel.get_value().shape[0] == per_layer.config.num_layers
    tokens, positions, mask = decoder_inputs(per_layer.config.vocab_size)
    expected = decoder_forward(per_layer, tokens, positions, mask, attention_layers=(0, 1))
    actual = decoder_forward(scanned, tokens, positions, mask, attention_layers=(0, 1))
    assert_close(actual.logits, expected.logits)
    assert_close(actual.hidden, expected.hidden)
    for layer in (0, 1):
        assert_close(actual.attention[layer], expected.attention[layer])
    # Layers differ (sliding / full, RoPE base): the two layers' probabilities are not the same.
    assert not np.allclose(actual.attention[0], actual.attention[1], atol=1e-3)


def test_decoder_scanned_cached_decoding_equals_full_forward():
    per_layer, scanned = decoder_pair("gemma3")
    vocab = per_layer.config.vocab_size
    tokens, positions, mask = decoder_inputs(vocab)
    prompt = 6
    full = decoder_forward(scanned, tokens, positions, mask)
    cache = scanned.init_cache(2, LENGTH + 2)
    c = per_layer.config
    assert cache["layers"]["k"].shape == (2, c.num_layers, LENGTH + 2, c.num_kv_heads, c.head_dim)
    stacked_axes = ("batch", None, "length", "heads", "kv")
    assert decoder.DecoderLM.cache_logical_axes(cache)["layers"] == {"k": stacked_axes,
                                                                      "v": stacked_axes}
    step = nnx.jit(lambda m, t, p, k, c: m(tokens=t, positions=p, input_mask=k, cache=c))
    out = step(scanned, tokens[:, :prompt], positions[:, :prompt], mask[:, :prompt], cache)
    assert_close(out.logits, full.logits[:, :prompt])
    for t in range(prompt, LENGTH - 3):  # every step valid for both sequences
        out = step(scanned, tokens[:, t:t + 1], positions[:, t:t + 1], mask[:, t:t + 1], out.cache)
        assert_close(out.logits[:, 0], full.logits[:, t])
        assert_close(out.hidden[:, 0], full.hidden[:, t])
    # The decode_step of the LanguageModel interface, against the per-layer model's.
    prefix = scanned.embed(tokens[:, :4])
    prefill = nnx.jit(lambda m, p, k: m.prefill(prefix=p, prefix_mask=k, bos_id=2,
                                                max_new_tokens=3))
    starts = [prefill(m, prefix, mask[:, :4]) for m in (per_layer, scanned)]
    assert_close(starts[1].logits, starts[0].logits)
    next_token = jnp.argmax(starts[0].logits, axis=-1)
    decode_step = nnx.jit(lambda m, t, p, c: m.decode_step(t, p, c))
    steps = [decode_step(m, next_token, s.positions, s.cache)
             for m, s in zip((per_layer, scanned), starts)]
    assert_close(steps[1][0], steps[0][0])
    assert_close(steps[1][1], steps[0][1])


def trainable_grads(model, loss_fn):
    trainable = nnx.Any(nnx.LoRAParam, lora.AddedTokenParam)
    diff = nnx.DiffState(0, trainable)
    return flat(nnx.jit(nnx.grad(loss_fn, argnums=diff))(model))


def test_decoder_scanned_gradients_equal_and_parameter_split_survives():
    """With full remat on the scanned model too: gradients of the adapters and the added token
    rows equal the per-layer model's, stacked."""
    per_layer, scanned = decoder_pair("gemma2", remat="full")
    for model in (per_layer, scanned):
        model.add_token_rows(3)
    num_layers = per_layer.config.num_layers
    types = {k: type(v) for k, v in nnx.to_flat_state(nnx.state(scanned))}
    per_layer_types = {k: type(v) for k, v in nnx.to_flat_state(nnx.state(per_layer))}
    stacked_paths = {("layers", *k[2:]) if k[0] == "layers" else k for k in per_layer_types}
    assert set(types) == stacked_paths
    assert types[("layers", "attn", "q", "kernel")] is lora.FrozenParam
    assert types[("layers", "attn", "q", "lora_a")] is nnx.LoRAParam
    assert types[("layers", "mlp", "up", "kernel")] is lora.FrozenParam
    q = scanned.layers.attn.q
    assert q.lora_a.get_metadata()["logical_axes"][0] is None
    assert q.lora_a.get_value().shape[0] == num_layers

    tokens, positions, mask = decoder_inputs(per_layer.vocab_size)
    tokens = tokens.at[0, 3].set(per_layer.vocab_size - 1)  # an added token
    weights = jax.random.normal(jax.random.key(3), (2, LENGTH, per_layer.vocab_size))

    def loss(model):
        out = model(tokens=tokens, positions=positions, input_mask=mask)
        return jnp.sum(out.logits * weights)

    expected = stack_layers(trainable_grads(per_layer, loss), ("layers",))
    actual = trainable_grads(scanned, loss)
    assert actual.keys() == expected.keys()
    assert any(k.startswith("added_tokens") for k in actual)
    for key in expected:
        scale = np.abs(expected[key]).max()
        assert scale > 0, key
        # Sums over many float32 terms: compare relative to the gradient's magnitude.
        assert_close(actual[key], expected[key], atol=1e-5 * scale)


def test_decoder_scanned_load_reports_per_layer_keys():
    model_config, state = hf_decoder("llama")
    scanned = abstract(decoder.DecoderLM, {**model_config, "scan_layers": True})
    del state["model.layers.1.mlp.up_proj.weight"]
    # Errors name the file's per-layer keys, not the stacked parameters.
    with pytest.raises(CheckpointMismatchError,
                       match=r"1 missing keys: model\.layers\.1\.mlp\.up_proj"):
        decoder.load(scanned, state, source="tiny llama")


# ------------------------------------------------------------------------------ T5


@pytest.fixture(scope="module")
def t5_pair():
    """(per-layer, scanned) tiny T5 loaded from one HF file, same random LoRA factors."""
    model_config, state = hf_t5()
    per_layer = t5.load(abstract(t5.T5, model_config), state, source="tiny t5 (per layer)")
    randomize_adapters(per_layer, seed=2)
    scanned = t5.load(abstract(t5.T5, {**model_config, "scan_layers": True}), state,
                      source="tiny t5 (scanned)")
    copy_adapters(per_layer, scanned, ("encoder/layers", "decoder/layers"))
    return per_layer, scanned


def t5_inputs(vocab: int):
    rng = np.random.default_rng(1)
    prefix_mask = jnp.asarray(np.arange(9)[None] < np.array([[9], [6]]))
    tokens = jnp.asarray(rng.integers(0, vocab, (2, 9)), jnp.int32)
    text = jnp.asarray(rng.integers(0, vocab, (2, 5)), jnp.int32)
    return tokens, prefix_mask, text


@nnx.jit
def t5_forward(model, tokens, prefix_mask, text):
    return model.forward(prefix=model.embed(tokens), prefix_mask=prefix_mask, tokens=text,
                         token_mask=jnp.ones(text.shape, bool), attention_layers=(0, 1))


def test_t5_scanned_equals_per_layer(t5_pair):
    per_layer, scanned = t5_pair
    assert scanned.encoder.layers.self_attention.q.kernel.get_value().shape[0] == 3
    tokens, prefix_mask, text = t5_inputs(per_layer.vocab_size)
    expected = t5_forward(per_layer, tokens, prefix_mask, text)
    actual = t5_forward(scanned, tokens, prefix_mask, text)
    assert_close(actual.logits, expected.logits, atol=1e-4)
    assert_close(actual.hidden, expected.hidden)
    for layer in (0, 1):
        assert_close(actual.attention[layer], expected.attention[layer])


def test_t5_scanned_cached_decoding_equals_full_forward(t5_pair):
    per_layer, scanned = t5_pair
    tokens, prefix_mask, text = t5_inputs(per_layer.vocab_size)
    full = t5_forward(scanned, tokens, prefix_mask, text)
    encoded = scanned.encode(tokens=tokens, input_mask=prefix_mask)
    cache = scanned.init_cache(encoded, prefix_mask, 6)
    expected_cache = per_layer.init_cache(encoded, prefix_mask, 6)
    for name in ("cross_k", "cross_v"):
        assert cache["layers"][name].shape == (2, 2, 9, 4, 8)
        for i in range(2):
            assert_close(cache["layers"][name][:, i], expected_cache["layers"][i][name])
    axes = t5.T5.cache_logical_axes(cache)["layers"]
    assert axes["cross_k"] == ("batch", None, "length", "heads", "kv")
    positions = jnp.zeros((2, 1), jnp.int32)
    step = nnx.jit(lambda m, t, p, c: m.decode(tokens=t, positions=p, cache=c))
    for t in range(text.shape[1]):
        out = step(scanned, text[:, t:t + 1], positions + t, cache)
        cache = out.cache
        assert_close(out.logits[:, 0], full.logits[:, t], atol=1e-4)
        assert_close(out.hidden[:, 0], full.hidden[:, t])


def test_t5_scanned_gradients_equal(t5_pair):
    per_layer, scanned = t5_pair
    tokens, prefix_mask, text = t5_inputs(per_layer.vocab_size)
    weights = jax.random.normal(jax.random.key(4), (*text.shape, per_layer.vocab_size))

    def loss(model):
        out = model.forward(prefix=model.embed(tokens), prefix_mask=prefix_mask, tokens=text,
                            token_mask=jnp.ones(text.shape, bool))
        return jnp.sum(out.logits * weights)

    expected = stack_layers(trainable_grads(per_layer, loss), ("encoder/layers", "decoder/layers"))
    actual = trainable_grads(scanned, loss)
    assert actual.keys() == expected.keys() and expected
    for key in expected:
        scale = np.abs(expected[key]).max()
        assert scale > 0, key
        # Sums over many float32 terms: compare relative to the gradient's magnitude.
        assert_close(actual[key], expected[key], atol=1e-5 * scale)


def test_t5_scanned_dropout_runs_with_per_layer_keys(t5_pair):
    _, scanned = t5_pair
    tokens, prefix_mask, _ = t5_inputs(scanned.vocab_size)
    dropout = abstract(t5.T5, dataclasses.replace(scanned.config, dropout_rate=0.5))
    nnx.update(dropout, nnx.state(scanned))
    encode = nnx.jit(lambda m, key: m.encode(tokens=tokens, input_mask=prefix_mask,
                                             rngs=nnx.Rngs(dropout=key)))
    plain = scanned.encode(tokens=tokens, input_mask=prefix_mask)
    noisy = [encode(dropout, jax.random.key(seed)) for seed in (0, 1)]
    assert noisy[0].shape == plain.shape
    assert not np.allclose(noisy[0], plain) and not np.allclose(noisy[0], noisy[1])


def test_decoder_scanned_sharded_model_and_cache_match_per_layer():
    """Mesh (2, 2, 2): the stacked weights and the stacked cache, sharded by their logical axes
    (the layer axis unsharded), give the per-layer model's prefill and next-token logits."""
    per_layer, scanned = decoder_pair("gemma2")
    mesh = sharding.make_mesh((2, 2, 2))
    scanned = sharding.shard_model(scanned, mesh, sharding.DEFAULT_RULES)
    batch, prompt = 4, 6
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (batch, prompt + 1)), jnp.int32)
    step = nnx.jit(lambda m, t, p, c: m(tokens=t, positions=p,
                                        input_mask=jnp.ones(t.shape, bool), cache=c))

    def decode(model, cache):
        out = step(model, tokens[:, :prompt], jnp.broadcast_to(jnp.arange(prompt), (batch, prompt)),
                   cache)
        last = step(model, tokens[:, prompt:], jnp.full((batch, 1), prompt), out.cache)
        return out.logits, last.logits, last.cache

    cache = scanned.init_cache(batch, 8)
    cache = jax.device_put(cache, sharding.array_shardings(
        cache, scanned.cache_logical_axes(cache), mesh, sharding.DEFAULT_RULES))
    *got, cache = decode(scanned, cache)
    *expected, _ = decode(per_layer, per_layer.init_cache(batch, 8))
    for actual, wanted in zip(got, expected):
        assert_close(actual, wanted)
    assert cache["layers"]["k"].sharding.spec[:2] == (("data", "fsdp"), None)
