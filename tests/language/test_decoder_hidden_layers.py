"""DecoderLM's ``hidden_layers`` hook against transformers' ``output_hidden_states=True`` (tiny
Llama and Gemma 2, three layers, per-layer and scanned blocks): the chosen states only, the
embeddings at index 0 and the final norm's output at the last index, unchanged logits, and the
error for an index out of range."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from pixelllm.language import decoder, hf_config
from tests.language.test_scan_layers import LENGTH, abstract, hf_decoder_config, random_hf

# Embeddings, a middle block's output and the final norm's output (index 3 of a 3-layer model).
CHOSEN = (0, 2, 3)


@functools.cache
def models(family: str):
    """(transformers model, our per-layer model, our scanned model), the same random weights."""
    hf = transformers.AutoModelForCausalLM.from_config(hf_decoder_config(family)).eval()
    state = random_hf(hf)
    config = hf_config.language_model_config(hf.config.to_dict())["model"]
    per_layer = decoder.load(abstract(decoder.DecoderLM, config), state, source=family)
    scanned = decoder.load(abstract(decoder.DecoderLM, {**config, "scan_layers": True}), state,
                           source=f"{family} (scanned)")
    return hf, per_layer, scanned


@nnx.jit(static_argnames="hidden_layers")
def run(model, tokens, positions, mask, hidden_layers=()):
    return model(tokens=tokens, positions=positions, input_mask=mask, hidden_layers=hidden_layers)


def batch(vocab: int):
    """Two sequences, the second right-padded by 3."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (2, LENGTH))
    mask = np.arange(LENGTH)[None] < np.array([[LENGTH], [LENGTH - 3]])
    return tokens, mask


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("scan", [False, True], ids=["per_layer", "scan"])
def test_hidden_states_match_transformers_output_hidden_states(family, scan):
    hf, per_layer, scanned = models(family)
    model = scanned if scan else per_layer
    tokens, mask = batch(model.config.vocab_size)
    positions = decoder.valid_positions(jnp.asarray(mask))
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask).long(),
                      output_hidden_states=True, use_cache=False)
    assert len(expected.hidden_states) == model.config.num_layers + 1
    out = run(model, jnp.asarray(tokens), positions, jnp.asarray(mask), hidden_layers=CHOSEN)
    assert list(out.hidden_states) == list(CHOSEN)
    for index in CHOSEN:
        reference = expected.hidden_states[index].numpy()
        for row, length in enumerate(mask.sum(axis=1)):
            np.testing.assert_allclose(out.hidden_states[index][row, :length],
                                       reference[row, :length], atol=2e-5, rtol=1e-5,
                                       err_msg=f"hidden state {index}, sequence {row}")
    # The last index is the final norm's output, the state the logits are read from.
    np.testing.assert_array_equal(out.hidden_states[3], out.hidden)
    plain = run(model, jnp.asarray(tokens), positions, jnp.asarray(mask))
    assert plain.hidden_states is None
    np.testing.assert_array_equal(plain.logits, out.logits)


def test_each_block_output_alone_under_scan_equals_per_layer():
    # Every middle index on its own: the scanned buffer's rows are the right blocks'.
    _, per_layer, scanned = models("llama")
    tokens, mask = batch(per_layer.config.vocab_size)
    args = (jnp.asarray(tokens), decoder.valid_positions(jnp.asarray(mask)), jnp.asarray(mask))
    expected = run(per_layer, *args, hidden_layers=(1, 2)).hidden_states
    for index in (1, 2):
        got = run(scanned, *args, hidden_layers=(index,)).hidden_states
        assert list(got) == [index]
        np.testing.assert_allclose(got[index], expected[index], atol=2e-5, rtol=1e-5)


def test_forward_returns_the_text_positions_of_the_chosen_states():
    _, model, _ = models("llama")
    tokens, mask = batch(model.config.vocab_size)
    prefix = model.embed(jnp.asarray(tokens[:, :4]))
    full = run(model, jnp.asarray(tokens), decoder.valid_positions(jnp.asarray(mask)),
               jnp.asarray(mask), hidden_layers=(0, 2))
    out = model.forward(prefix=prefix, prefix_mask=jnp.ones((2, 4), bool),
                        tokens=jnp.asarray(tokens[:, 4:]), token_mask=jnp.asarray(mask[:, 4:]),
                        hidden_layers=(0, 2))
    for index in (0, 2):
        np.testing.assert_allclose(out.hidden_states[index], full.hidden_states[index][:, 4:],
                                   atol=1e-6)
    assert model.forward(prefix=prefix, prefix_mask=jnp.ones((2, 4), bool),
                         tokens=jnp.asarray(tokens[:, 4:]),
                         token_mask=jnp.asarray(mask[:, 4:])).hidden_states is None


@pytest.mark.parametrize("field, value, valid", [("hidden_layers", (1, 4), "0..3"),
                                                 ("hidden_layers", (-1,), "0..3"),
                                                 ("attention_layers", (3,), "0..2")])
def test_an_index_out_of_range_names_the_field_and_the_valid_range(field, value, valid):
    _, model, _ = models("llama")
    tokens, mask = batch(model.config.vocab_size)
    with pytest.raises(ValueError, match=rf"{field} \[-?\d\] out of range: valid indices are "
                                         rf"{valid} for 3 layers"):
        model(tokens=jnp.asarray(tokens), positions=decoder.valid_positions(jnp.asarray(mask)),
              input_mask=jnp.asarray(mask), **{field: value})
