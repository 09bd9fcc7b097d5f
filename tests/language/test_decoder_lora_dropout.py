"""LoRA dropout in the decoder LM (LISA trains with PEFT's ``lora_dropout`` 0.05): ``rngs``
enables it, every layer draws its own masks in the layer loop and under ``scan_layers``, and
without ``rngs`` (or at rate 0) the model is exactly the deterministic one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixelllm.language import decoder, t5
from pixelllm.nn import lora
from pixelllm.nn import stacked as stacked_lib

LENGTH = 6


def tiny_config(*, dropout: float, **overrides) -> decoder.DecoderConfig:
    return decoder.DecoderConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=3, num_heads=2,
        num_kv_heads=1, head_dim=8,
        lora=lora.LoRASettings(rank=2, alpha=4.0, targets=("q", "v"), dropout=dropout),
        **overrides)


def per_layer_model(*, dropout: float) -> decoder.DecoderLM:
    """Nonzero B factors (zero at init), so the adapters, and their dropout, change the output."""
    model = decoder.DecoderLM(tiny_config(dropout=dropout), rngs=nnx.Rngs(0))
    for i, layer in enumerate(model.layers):
        for projection in (layer.attn.q, layer.attn.v):
            b = projection.lora_b.get_value()
            projection.lora_b.set_value(jax.random.normal(jax.random.key(10 + i), b.shape))
    return model


def scanned_twin(model: decoder.DecoderLM, **overrides) -> decoder.DecoderLM:
    """The same weights with ``scan_layers`` (blocks stacked)."""
    config = tiny_config(dropout=model.config.lora.dropout, scan_layers=True, **overrides)
    twin = decoder.DecoderLM(config, rngs=nnx.Rngs(0))
    twin.layers = stacked_lib.stack_modules(list(model.layers))
    return twin


def tokens() -> jax.Array:
    return jax.random.randint(jax.random.key(1), (2, LENGTH), 0, 32)


def call(model, rngs=None) -> np.ndarray:
    t = tokens()
    positions = jnp.broadcast_to(jnp.arange(LENGTH), t.shape)
    return np.asarray(model(tokens=t, positions=positions, input_mask=jnp.ones(t.shape, bool),
                            rngs=rngs).logits)


def reference(model: decoder.DecoderLM, layer_rngs) -> np.ndarray:
    """The per-layer blocks run by hand, layer ``i`` given ``layer_rngs[i]``."""
    c = model.config
    t = tokens()
    positions = jnp.broadcast_to(jnp.arange(LENGTH), t.shape)
    mask = decoder.attention_mask(positions, positions, None)
    inv_freq = jnp.asarray(decoder.rope_inv_freq(c.head_dim, c.rope_theta, None))
    x = model.embed(t)
    for layer, rngs in zip(model.layers, layer_rngs):
        x, _, _ = layer(x, positions=positions, inv_freq=inv_freq, mask=mask, slots=None,
                        layer_cache=None, rngs=rngs)
    return np.asarray(model.logits(model.final_norm(x)))


@pytest.mark.parametrize("scan", [False, True])
def test_without_rngs_or_at_rate_zero_the_model_is_deterministic(scan):
    with_dropout, without = per_layer_model(dropout=0.5), per_layer_model(dropout=0.0)
    if scan:
        with_dropout, without = scanned_twin(with_dropout), scanned_twin(without)
    expected = call(without)
    np.testing.assert_array_equal(call(with_dropout), expected)
    np.testing.assert_array_equal(call(without, nnx.Rngs(dropout=3)), expected)
    # forward (teacher forcing over [prefix | text]) threads rngs too.
    prefix = jax.random.normal(jax.random.key(2), (2, 3, 16))
    kwargs = dict(prefix=prefix, prefix_mask=jnp.ones((2, 3), bool), tokens=tokens(),
                  token_mask=jnp.ones((2, LENGTH), bool))
    deterministic = np.asarray(with_dropout.forward(**kwargs).logits)
    np.testing.assert_array_equal(deterministic, np.asarray(without.forward(**kwargs).logits))
    dropped = np.asarray(with_dropout.forward(**kwargs, rngs=nnx.Rngs(dropout=3)).logits)
    assert np.abs(dropped - deterministic).max() > 1e-3


def test_layer_loop_layers_draw_in_turn_from_one_rngs():
    model = per_layer_model(dropout=0.5)
    rngs = nnx.Rngs(dropout=7)
    first = call(model, rngs)
    shared = nnx.Rngs(dropout=7)
    np.testing.assert_allclose(first, reference(model, [shared] * 3), atol=1e-6)
    # Not the same masks in every layer, and fresh masks on the next call.
    same_masks = reference(model, [nnx.Rngs(dropout=7) for _ in range(3)])
    assert np.abs(first - same_masks).max() > 1e-3
    assert np.abs(call(model, rngs) - first).max() > 1e-3


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_layers_draw_one_key_each(remat):
    per_layer = per_layer_model(dropout=0.5)
    model = scanned_twin(per_layer, remat=remat)
    rngs = nnx.Rngs(dropout=7)
    first = call(model, rngs)
    keys = jax.random.split(nnx.Rngs(dropout=7).dropout(), 3)
    np.testing.assert_allclose(first, reference(per_layer, [nnx.Rngs(dropout=k) for k in keys]),
                               atol=1e-5)
    same_masks = reference(per_layer, [nnx.Rngs(dropout=keys[0]) for _ in range(3)])
    assert np.abs(first - same_masks).max() > 1e-3
    # Under jit (a train step) the Rngs counter advances across calls: fresh masks each step.
    step = nnx.jit(lambda m, r: m(tokens=tokens(), positions=jnp.broadcast_to(
        jnp.arange(LENGTH), (2, LENGTH)), input_mask=jnp.ones((2, LENGTH), bool), rngs=r).logits)
    a, b = np.asarray(step(model, rngs)), np.asarray(step(model, rngs))
    assert np.abs(a - b).max() > 1e-3


def test_t5_refuses_lora_dropout_rather_than_ignoring_it():
    sizes = dict(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                 num_heads=2)
    t5.T5Config(**sizes, lora=lora.LoRASettings(rank=2))
    with pytest.raises(ValueError, match="lora.dropout is not supported by T5"):
        t5.T5Config(**sizes, lora=lora.LoRASettings(rank=2, dropout=0.05))
