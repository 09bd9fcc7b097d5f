"""DecoderLM on its own: the KV cache against full forwards, masks, LoRA and config checks.
(Parity with transformers: test_decoder_parity.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import decoder_lm
from pixelllm import sharding
from pixelllm.language import decoder
from pixelllm.nn import lora

TINY = ("tiny_llama", "tiny_gemma", "tiny_gemma2", "tiny_gemma3")


@nnx.jit
def run(model, tokens, positions, mask, cache):
    return model(tokens=tokens, positions=positions, input_mask=mask, cache=cache)


def flat_paths(state):
    return {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(state)}


@pytest.mark.parametrize("variant", TINY)
def test_cached_decoding_equals_full_forward(variant):
    """Three sequences of different prompt lengths: a right-padded prefill, a padded chunk (whose
    padding runs past the cache end and is dropped), then one token per step through the cache
    give the full forward's logits and hidden states at every valid position (the sequences
    outgrow the tiny sliding windows)."""
    model = decoder.DecoderLM(decoder_lm.get_config(variant).model, rngs=nnx.Rngs(0))
    total = 15
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(3, total))
    positions = np.broadcast_to(np.arange(total), tokens.shape)
    # Tokens each call consumes per sequence: prefill, a padded chunk of the same width (one
    # compiled shape for both), single steps.
    schedule = [(5, 9, 2), (3, 1, 2)] + [(1, 1, 1)] * 4
    widths = [9, 9] + [1] * 4
    used = np.sum(schedule, axis=0)
    full_mask = np.arange(total)[None] < used[:, None]
    full = run(model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(full_mask), None)
    full_logits, full_hidden = np.asarray(full.logits), np.asarray(full.hidden)

    cache = model.init_cache(3, 16)
    done = np.zeros(3, int)
    for counts, length in zip(schedule, widths):
        counts = np.asarray(counts)
        index = np.minimum(done[:, None] + np.arange(length)[None], total - 1)
        mask = np.arange(length)[None] < counts[:, None]
        np.testing.assert_array_equal(cache["end_index"], done)
        out = run(model, jnp.asarray(np.take_along_axis(tokens, index, 1)), jnp.asarray(index),
                  jnp.asarray(mask), cache)
        logits, hidden = np.asarray(out.logits), np.asarray(out.hidden)
        for b in range(3):
            valid = index[b, :counts[b]]
            np.testing.assert_allclose(logits[b, :counts[b]], full_logits[b, valid], atol=1e-5)
            np.testing.assert_allclose(hidden[b, :counts[b]], full_hidden[b, valid], atol=1e-5)
        cache, done = out.cache, done + counts
    np.testing.assert_array_equal(cache["positions"][0, :used[0]], np.arange(used[0]))
    assert np.all(np.asarray(cache["positions"])[0, used[0]:] == -1)


def test_cache_layout_is_batch_major():
    model = decoder.DecoderLM(decoder_lm.get_config("tiny_gemma3").model, rngs=nnx.Rngs(0))
    cache = model.init_cache(5, 12, jnp.bfloat16)
    assert set(cache) == {"end_index", "positions", "layer_0", "layer_1"}
    for leaf in jax.tree.leaves(cache):
        assert leaf.shape[0] == 5
    assert cache["layer_1"]["k"].shape == (5, 12, 2, 32) and cache["layer_1"]["v"].dtype == jnp.bfloat16
    assert cache["positions"].shape == (5, 12) and np.all(np.asarray(cache["positions"]) == -1)


def test_attention_mask_is_causal_by_position_with_a_strict_window():
    query = jnp.array([[4, 5]])
    keys = jnp.array([[0, 1, 2, 3, 4, 5, -1]])
    full = decoder.attention_mask(query, keys, None)
    sliding = decoder.attention_mask(query, keys, 3)
    np.testing.assert_array_equal(full[0], [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0]])
    # transformers: a query at position p sees keys with p - k < window.
    np.testing.assert_array_equal(sliding[0], [[0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 0]])


def test_lora_with_zero_b_is_the_base_model_and_only_adapters_train():
    config = decoder_lm.get_config("tiny_gemma2")
    config.model.lora.rank = 0
    base = decoder.DecoderLM(config.model, rngs=nnx.Rngs(0))
    config.model.lora.update(rank=4, alpha=8.0, targets=decoder.LORA_TARGETS)
    adapted = decoder.DecoderLM(config.model, rngs=nnx.Rngs(1))
    nnx.update(adapted, nnx.state(base))
    assert adapted.layers[0].attn.q.scale == 2.0  # alpha / rank

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, size=(2, 6)))
    positions, mask = jnp.broadcast_to(jnp.arange(6), (2, 6)), jnp.ones((2, 6), bool)
    expected = run(base, tokens, positions, mask, None)
    out = run(adapted, tokens, positions, mask, None)
    # Adding a zero update may still reorder float sums inside XLA's fusions.
    np.testing.assert_allclose(out.logits, expected.logits, atol=1e-5)
    np.testing.assert_allclose(out.hidden, expected.hidden, atol=1e-5)

    trainable = flat_paths(nnx.state(adapted, nnx.Param))
    assert trainable == {f"layers/{i}/{module}/{name}/{factor}"
                         for i in range(2)
                         for module, names in (("attn", "qkvo"), ("mlp", ("gate", "up", "down")))
                         for name in names for factor in ("lora_a", "lora_b")}
    assert "embedding" in flat_paths(nnx.state(adapted, decoder.lora.FrozenParam))

    layer = adapted.layers[1].mlp.up
    layer.lora_b.set_value(jax.random.normal(jax.random.key(2), layer.lora_b.get_value().shape))
    changed = run(adapted, tokens, positions, mask, None)
    assert np.abs(np.asarray(changed.logits - expected.logits)).max() > 1e-3


def test_unfrozen_base_weights_are_params():
    config = decoder_lm.get_config("tiny_llama")
    config.model.frozen = False
    model = decoder.DecoderLM(config.model, rngs=nnx.Rngs(0))
    params = flat_paths(nnx.state(model, nnx.Param))
    assert {"embedding", "lm_head", "final_norm/scale", "layers/0/attn/q/kernel",
            "layers/0/attn/q/lora_a"} <= params
    assert not flat_paths(nnx.state(model, decoder.lora.FrozenParam))


def test_bfloat16_compute_stays_close_to_float32():
    config = decoder_lm.get_config("tiny_gemma3")
    reference = decoder.DecoderLM(config.model, rngs=nnx.Rngs(0))
    config.model.dtype = "bfloat16"
    model = decoder.DecoderLM(config.model, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 128, size=(1, 9)))
    positions, mask = jnp.arange(9)[None], jnp.ones((1, 9), bool)
    out = run(model, tokens, positions, mask, None)
    expected = run(reference, tokens, positions, mask, None)
    assert out.logits.dtype == jnp.float32 and out.hidden.dtype == jnp.bfloat16
    assert np.abs(np.asarray(out.logits - expected.logits)).max() < 0.05


def test_config_errors_name_the_problem():
    model = decoder_lm.get_config("tiny_gemma2").model.to_dict()
    with pytest.raises(ValueError, match="unknown LoRA targets \\['qkv'\\]"):
        decoder.DecoderConfig.from_mapping({**model, "lora": {"rank": 2, "targets": ["qkv"]}})
    with pytest.raises(ValueError, match="num_kv_heads 3"):
        decoder.DecoderConfig.from_mapping({**model, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="need a sliding_window"):
        decoder.DecoderConfig.from_mapping({**model, "sliding_window": None})
    with pytest.raises(ValueError, match="3 layer_types for 2 layers"):
        decoder.DecoderConfig.from_mapping({**model, "layer_types": ["full_attention"] * 3})
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        decoder.DecoderConfig.from_mapping({**model, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(TypeError, match="hidden_act"):
        decoder.DecoderConfig.from_mapping({**model, "hidden_act": "silu"})
    with pytest.raises(ValueError, match="exactly one of tokens and embeddings"):
        decoder.DecoderLM(model, rngs=nnx.Rngs(0))(positions=jnp.zeros((1, 1), int),
                                                    input_mask=jnp.ones((1, 1), bool))


@pytest.mark.parametrize("variant", ("llama3_2_1b", "gemma_2b", "gemma2_2b", "gemma3_1b") + TINY)
def test_every_config_builds_a_valid_decoder_config(variant):
    config = decoder_lm.get_config(variant)
    parsed = decoder.as_config(config.model)
    assert parsed.lora.targets == ("q", "v") and parsed.frozen
    assert config.family in ("llama", "gemma", "gemma2", "gemma3")
    if parsed.sliding_window:
        assert decoder.SLIDING_ATTENTION in parsed.types and decoder.FULL_ATTENTION in parsed.types


def test_gemma3_1b_has_one_global_layer_in_six():
    types = decoder.as_config(decoder_lm.get_config("gemma3_1b").model).types
    assert [i for i, t in enumerate(types) if t == decoder.FULL_ATTENTION] == [5, 11, 17, 23]
    with pytest.raises(ValueError, match="unknown decoder LM variant 'gemma3_4b'"):
        decoder_lm.get_config("gemma3_4b")


def test_lora_training_leaves_frozen_weights_bit_identical():
    """A few AdamW steps of next-token loss: only the adapters move, and the optimizer keeps state
    (two moments) for the adapters alone."""
    model = decoder.DecoderLM(decoder_lm.get_config("tiny_llama").model, rngs=nnx.Rngs(0))
    frozen = {path: np.asarray(v.get_value())
              for path, v in nnx.to_flat_state(nnx.state(model, lora.FrozenParam))}
    adapters = {path: np.asarray(v.get_value())
                for path, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    optimizer = nnx.Optimizer(model, optax.adamw(3e-2), wrt=nnx.Param)
    moments = [leaf.size for leaf in jax.tree.leaves(nnx.state(optimizer.opt_state))
               if getattr(leaf, "ndim", 0) > 0]
    assert sum(moments) == 2 * sum(a.size for a in adapters.values())

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (4, 12)))
    positions = jnp.broadcast_to(jnp.arange(12), tokens.shape)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            logits = model(tokens=tokens, positions=positions, input_mask=jnp.ones_like(tokens, bool)).logits
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(8)]
    assert losses[-1] < losses[0] - 0.1
    for path, v in nnx.to_flat_state(nnx.state(model, lora.FrozenParam)):
        np.testing.assert_array_equal(np.asarray(v.get_value()), frozen[path])
    moved = [not np.array_equal(np.asarray(v.get_value()), adapters[path])
             for path, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))]
    assert all(moved)


def test_sharded_model_and_cache_match_single_device():
    """Mesh (2, 2, 2): sharded weights and a cache sharded by its logical axes give the unsharded
    prefill and one-token steps."""
    config = decoder_lm.get_config("tiny_gemma2").model
    batch, prompt, steps = 4, 6, 3
    tokens = np.random.default_rng(1).integers(0, 100, (batch, prompt + steps))

    def decode(model, shard):
        cache = model.init_cache(batch, 16)
        if shard:
            cache = jax.device_put(cache, sharding.array_shardings(
                cache, model.cache_logical_axes(cache), mesh, sharding.DEFAULT_RULES))
        out = run(model, jnp.asarray(tokens[:, :prompt]),
                  jnp.broadcast_to(jnp.arange(prompt), (batch, prompt)),
                  jnp.ones((batch, prompt), bool), cache)
        logits = [out.logits[:, -1]]
        for i in range(prompt, prompt + steps):
            out = run(model, jnp.asarray(tokens[:, i:i + 1]), jnp.full((batch, 1), i),
                      jnp.ones((batch, 1), bool), out.cache)
            logits.append(out.logits[:, 0])
        return np.stack([np.asarray(l) for l in logits]), out.cache

    mesh = sharding.make_mesh((2, 2, 2))
    expected, _ = decode(decoder.DecoderLM(config, rngs=nnx.Rngs(0)), shard=False)
    model = sharding.shard_model(decoder.DecoderLM(config, rngs=nnx.Rngs(0)), mesh,
                                 sharding.DEFAULT_RULES)
    got, cache = decode(model, shard=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert model.embedding.get_value().sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert cache["layer_0"]["k"].sharding.spec[0] == ("data", "fsdp")
