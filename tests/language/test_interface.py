"""One suite for every LanguageModel (tiny T5 and tiny decoder LMs): prefix + text forward, cached
decoding against teacher forcing, added token rows, attention probabilities, remat, bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import decoder_lm, t5 as t5_config
from pixelllm.language import decoding
from pixelllm.language.decoder import DecoderLM
from pixelllm.language.interface import LanguageModel
from pixelllm.language.t5 import T5
from pixelllm.nn import lora

# tiny_gemma2: tied head, sliding windows shorter than the sequence, soft-caps; tiny_llama: untied.
MODELS = ("t5", "tiny_gemma2")
BOS = {"t5": 0, "tiny_gemma2": 2, "tiny_llama": 2}
ATOL = 1e-4


def build(name: str, **overrides) -> LanguageModel:
    """A tiny model with rank-4 LoRA whose B factors are non-zero, so adapters take part."""
    if name == "t5":
        config = t5_config.get_config("tiny").model
        config.dropout_rate = 0.0
        cls = T5
    else:
        config = decoder_lm.get_config(name).model
        cls = DecoderLM
    config.update(overrides)
    model = cls(config, rngs=nnx.Rngs(0))
    for i, (path, variable) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))):
        if path[-1] == "lora_b":
            variable.set_value(0.2 * jax.random.normal(jax.random.key(i), variable.get_value().shape))
    return model


def inputs(model: LanguageModel, name: str, *, padded: bool = True):
    """prefix [2, 5, D] (second row with holes), its mask, text [2, 6] and its mask."""
    prefix = jax.random.normal(jax.random.key(7), (2, 5, model.width))
    prefix_mask = jnp.array([[1, 1, 1, 1, 1], [1, 0, 1, 1, 0]], bool)
    tokens = jax.random.randint(jax.random.key(8), (2, 6), 3, 100).at[:, 0].set(BOS[name])
    token_mask = jnp.ones((2, 6), bool)
    if padded:
        token_mask = token_mask.at[1, 4:].set(False)
    return prefix, prefix_mask, tokens, token_mask


@nnx.jit(static_argnames="attention_layers")
def forward(model, prefix, prefix_mask, tokens, token_mask, attention_layers=()):
    return model.forward(prefix=prefix, prefix_mask=prefix_mask, tokens=tokens,
                         token_mask=token_mask, attention_layers=attention_layers)


@pytest.mark.parametrize("name", MODELS)
def test_forward_reads_the_prefix_and_ignores_its_padding(name):
    model = build(name)
    prefix, prefix_mask, tokens, token_mask = inputs(model, name)
    out = forward(model, prefix, prefix_mask, tokens, token_mask)
    assert out.logits.shape == (2, 6, model.vocab_size) and out.logits.dtype == jnp.float32
    assert out.hidden.shape == (2, 6, model.width) and out.attention is None
    # Values under the prefix mask never matter ...
    junk = prefix.at[1, 1].set(100.0).at[1, 4].set(-50.0)
    same = forward(model, junk, prefix_mask, tokens, token_mask)
    np.testing.assert_allclose(same.logits[:, :4], out.logits[:, :4], atol=ATOL)
    if name != "t5":
        # ... nor, for a decoder (positions count valid inputs), where the holes are: the
        # compacted prefix gives the same text outputs. (T5's encoder position bias sees holes.)
        compact = jnp.concatenate([prefix[1:, jnp.array([0, 2, 3])],
                                   jnp.zeros((1, 2, model.width))], axis=1)
        alone = forward(model, compact, jnp.array([[1, 1, 1, 0, 0]], bool), tokens[1:],
                        token_mask[1:])
        np.testing.assert_allclose(alone.logits[0, :4], out.logits[1, :4], atol=ATOL)
    # Valid prefix entries do matter.
    moved = forward(model, prefix.at[1, 2].add(1.0), prefix_mask, tokens, token_mask)
    assert float(jnp.abs(moved.logits[1, :4] - out.logits[1, :4]).max()) > 1e-3


@pytest.mark.parametrize("name", MODELS)
def test_cached_decoding_equals_teacher_forcing_at_every_step(name):
    model = build(name)
    prefix, prefix_mask, tokens, _ = inputs(model, name)
    full = forward(model, prefix, prefix_mask, tokens, jnp.ones(tokens.shape, bool))
    start = nnx.jit(lambda m, p, pm: m.prefill(prefix=p, prefix_mask=pm, bos_id=BOS[name],
                                               max_new_tokens=5))(model, prefix, prefix_mask)
    np.testing.assert_allclose(start.logits, full.logits[:, 0], atol=ATOL)
    step = nnx.jit(lambda m, t, p, c: m.decode_step(t, p, c))
    cache = start.cache
    for t in range(1, tokens.shape[1]):
        logits, hidden, cache = step(model, tokens[:, t], start.positions + t - 1, cache)
        np.testing.assert_allclose(logits, full.logits[:, t], atol=ATOL, err_msg=f"step {t}")
        np.testing.assert_allclose(hidden, full.hidden[:, t], atol=ATOL, err_msg=f"step {t}")


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("beam_size", (1, 2))
def test_generate_a_fixed_number_of_tokens_from_a_prefix(name, beam_size):
    """eos_id=None: no EOS trick, every sequence gets exactly max_new_tokens tokens, and their
    hidden states are teacher forcing's on [BOS | generated]."""
    model = build(name)
    prefix, prefix_mask, _, _ = inputs(model, name)
    out = nnx.jit(lambda m, p, pm: decoding.generate(
        m, prefix=p, prefix_mask=pm, bos_id=BOS[name], max_new_tokens=4, eos_id=None,
        beam_size=beam_size, return_hidden=True))(model, prefix, prefix_mask)
    assert out.tokens.shape == (2, 4) and np.all(np.asarray(out.lengths) == 4)
    text = jnp.concatenate([jnp.full((2, 1), BOS[name]), out.tokens], axis=1)
    full = forward(model, prefix, prefix_mask, text, jnp.ones(text.shape, bool))
    np.testing.assert_allclose(out.hidden, full.hidden[:, 1:], atol=ATOL)
    if beam_size == 1:  # greedy: each token is the argmax of the previous position
        np.testing.assert_array_equal(out.tokens, jnp.argmax(full.logits[:, :-1], axis=-1))


def frozen_arrays(model):
    return {path: np.asarray(v.get_value())
            for path, v in nnx.to_flat_state(nnx.state(model, lora.FrozenParam))}


@pytest.mark.parametrize("name", MODELS + ("tiny_llama",))
def test_added_token_rows_train_while_the_vocabulary_stays_bit_identical(name):
    model = build(name)
    base_vocab = model.vocab_size
    first = model.add_token_rows(2)
    assert first == base_vocab and model.vocab_size == base_vocab + 2
    assert model.add_token_rows(1) == base_vocab + 2 and model.vocab_size == base_vocab + 3
    prefix, prefix_mask, tokens, token_mask = inputs(model, name)
    # The new tokens appear as inputs and as targets.
    tokens = tokens.at[:, 2].set(first).at[:, 3].set(first + 1)
    out = forward(model, prefix, prefix_mask, tokens, token_mask)
    assert out.logits.shape == (2, 6, base_vocab + 3)
    np.testing.assert_allclose(model.embed(jnp.array([[first]]))[0, 0],
                               model.embed(jnp.array([[first + 2]]))[0, 0])  # mean init

    before = frozen_arrays(model)
    added_before = np.asarray(model.added_tokens.embedding.get_value())
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer):
        def loss_fn(model):
            logits = model.forward(prefix=prefix, prefix_mask=prefix_mask, tokens=tokens,
                                   token_mask=token_mask).logits
            targets = tokens[:, 1:]
            losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets)
            return (losses * token_mask[:, 1:]).sum()
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param))(model)
        optimizer.update(model, grads)
        return loss

    train_step(model, optimizer)
    after = frozen_arrays(model)
    assert before.keys() == after.keys() and any("embedding" in str(k) for k in after)
    for path in before:
        np.testing.assert_array_equal(after[path], before[path], err_msg=str(path))
    added_after = np.asarray(model.added_tokens.embedding.get_value())
    assert np.abs(added_after[:2] - added_before[:2]).min() > 0  # both used rows moved
    if model.added_tokens.head is not None:
        assert isinstance(model.added_tokens.head, lora.AddedTokenParam)
    assert not nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam),
                                                          nnx.Not(lora.AddedTokenParam))))


@pytest.mark.parametrize("name", MODELS)
def test_attention_probabilities_sum_to_one_over_visible_keys(name):
    model = build(name)
    prefix, prefix_mask, tokens, token_mask = inputs(model, name)
    out = forward(model, prefix, prefix_mask, tokens, token_mask, attention_layers=(0, 1))
    keys = 5 if name == "t5" else 5 + 6
    heads = 4
    assert set(out.attention) == {0, 1}
    for probs in out.attention.values():
        assert probs.shape == (2, heads, 6, keys) and probs.dtype == jnp.float32
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
        # No attention on masked prefix entries (row 1 has holes at 1 and 4).
        assert float(probs[1, :, :, jnp.array([1, 4])].max()) == 0.0
        if name != "t5":  # causal over the text: token t sees text keys <= t only
            text_probs = probs[:, :, :, 5:]
            future = jnp.triu(jnp.ones((6, 6), bool), k=1)
            assert float(jnp.where(future, text_probs, 0).max()) == 0.0
    with pytest.raises(ValueError, match="attention_layers \\[7\\]"):
        model.forward(prefix=prefix, prefix_mask=prefix_mask, tokens=tokens,
                      token_mask=token_mask, attention_layers=(7,))


@pytest.mark.parametrize("name", MODELS)
def test_remat_changes_neither_outputs_nor_gradients(name):
    plain, remat = build(name), build(name, remat="full")
    prefix, prefix_mask, tokens, token_mask = inputs(plain, name)

    @nnx.jit
    def loss_and_grads(model):
        def loss_fn(model):
            out = model.forward(prefix=prefix, prefix_mask=prefix_mask, tokens=tokens,
                                token_mask=token_mask)
            return jnp.mean(out.logits ** 2) + jnp.mean(out.hidden ** 2)
        return nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)

    (loss_a, grads_a), (loss_b, grads_b) = loss_and_grads(plain), loss_and_grads(remat)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    # Recomputed activations are fused differently by XLA: float32 rounding, nothing more.
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_bfloat16_compute_is_within_tolerance_of_float32(name):
    """Parameters stay float32; with a bfloat16 compute dtype the logits stay within 5% of their
    float32 range (bfloat16 keeps 8 mantissa bits; two layers of rounding)."""
    f32, bf16 = build(name), build(name, dtype="bfloat16")
    assert {v.get_value().dtype for _, v in nnx.to_flat_state(nnx.state(bf16, lora.FrozenParam))} \
        == {jnp.dtype(jnp.float32)}
    prefix, prefix_mask, tokens, token_mask = inputs(f32, name)
    a = forward(f32, prefix, prefix_mask, tokens, token_mask)
    b = forward(bf16, prefix, prefix_mask, tokens, token_mask)
    assert b.logits.dtype == jnp.float32 and b.hidden.dtype == jnp.bfloat16
    scale = float(jnp.abs(a.logits).max())
    assert float(jnp.abs(b.logits - a.logits).max()) < 0.05 * scale
