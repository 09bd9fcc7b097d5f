"""The mask adapter on its own: language and visual context added to SAM's box tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixelllm.models.pixel_llm.mask_adapter import MaskAdapter

VISUAL, TEXT, PROMPT = 12, 10, 8     # visual-token width, LM hidden width, SAM prompt width
N, V, L = 3, 4, 5                    # slots, visual tokens per slot, text length


def _adapter(seed: int = 0) -> MaskAdapter:
    return MaskAdapter(visual_features=VISUAL, text_features=TEXT, prompt_features=PROMPT,
                       num_queries=2, depth=1, num_heads=2, mlp_dim=16, rngs=nnx.Rngs(seed))


def _inputs(seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 3)
    box_tokens = jax.random.normal(keys[0], (N, 2, PROMPT))
    visual = jax.random.normal(keys[1], (N, V, VISUAL))
    hidden = jax.random.normal(keys[2], (N, L, TEXT))
    # Slot 0 has 5 valid text tokens, slot 1 has 3, slot 2 has 1.
    text_mask = jnp.arange(L)[None, :] < jnp.asarray([5, 3, 1])[:, None]
    return box_tokens, visual, hidden, text_mask


@nnx.jit
def _apply(adapter, box_tokens, visual, hidden, text_mask):
    return adapter(box_tokens, visual, hidden, text_mask)


def _with_gate(alpha: float) -> MaskAdapter:
    adapter = _adapter()
    adapter.alpha.set_value(jnp.full(adapter.alpha.get_value().shape, alpha))
    return adapter


def test_untrained_gate_returns_the_box_tokens_exactly():
    adapter = _adapter()
    np.testing.assert_array_equal(adapter.alpha.get_value(), np.zeros((2, PROMPT)))
    box_tokens, visual, hidden, text_mask = _inputs()
    out = _apply(adapter, box_tokens, visual, hidden, text_mask)
    assert out.shape == (N, 2, PROMPT)
    np.testing.assert_array_equal(out, box_tokens)


@pytest.fixture(scope="module")
def gated():
    return _with_gate(0.5)


def test_open_gate_adds_context_scaled_by_tanh_alpha(gated):
    box_tokens, visual, hidden, text_mask = _inputs()
    delta = np.asarray(_apply(gated, box_tokens, visual, hidden, text_mask) - box_tokens)
    assert np.abs(delta).min() > 0                    # every channel of every token moves
    # The addition is the learned queries' output times tanh(alpha): another gate value scales
    # the same addition (the queries never read the box tokens).
    wider = np.asarray(_apply(_with_gate(1.5), box_tokens, visual, hidden, text_mask)
                       - box_tokens)
    np.testing.assert_allclose(wider, delta * np.tanh(1.5) / np.tanh(0.5), rtol=1e-4, atol=1e-6)
    other_boxes = jax.random.normal(jax.random.key(3), box_tokens.shape)
    np.testing.assert_allclose(
        _apply(gated, other_boxes, visual, hidden, text_mask) - other_boxes, delta, atol=1e-5)


def test_padded_text_tokens_do_not_affect_the_output(gated):
    box_tokens, visual, hidden, text_mask = _inputs()
    base = np.asarray(_apply(gated, box_tokens, visual, hidden, text_mask))
    noise = 100.0 * jax.random.normal(jax.random.key(4), hidden.shape)
    padded_changed = jnp.where(text_mask[..., None], hidden, noise)
    np.testing.assert_allclose(_apply(gated, box_tokens, visual, padded_changed, text_mask),
                               base, atol=1e-5)
    # ... while a valid text token, or a visual token, does (random changes: both inputs are
    # layer-normed, which would hide a constant shift).
    valid_changed = hidden.at[:, 0].add(jax.random.normal(jax.random.key(5), (N, TEXT)))
    visual_changed = visual + jax.random.normal(jax.random.key(6), visual.shape)
    assert (np.abs(np.asarray(_apply(gated, box_tokens, visual, valid_changed, text_mask))
                   - base).max(axis=(1, 2)) > 1e-4).all()
    assert (np.abs(np.asarray(_apply(gated, box_tokens, visual_changed, hidden, text_mask))
                   - base).max(axis=(1, 2)) > 1e-4).all()


def test_slots_are_independent(gated):
    box_tokens, visual, hidden, text_mask = _inputs()
    base = np.asarray(_apply(gated, box_tokens, visual, hidden, text_mask))
    changed = np.asarray(_apply(
        gated, box_tokens, visual.at[1].add(jax.random.normal(jax.random.key(7), (V, VISUAL))),
        hidden.at[1].add(jax.random.normal(jax.random.key(8), (L, TEXT))), text_mask))
    np.testing.assert_allclose(changed[[0, 2]], base[[0, 2]], atol=1e-6)
    assert np.abs(changed[1] - base[1]).max() > 1e-4


def test_gate_receives_a_gradient_at_init():
    """At alpha = 0 the gate is the only parameter with a gradient (tanh'(0) = 1): training
    can open it; everything behind it starts with a zero gradient."""
    adapter = _adapter()
    box_tokens, visual, hidden, text_mask = _inputs()
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(box_tokens, visual, hidden, text_mask) ** 2)))(
        adapter)
    flat = {"/".join(map(str, path)): np.asarray(value.get_value())
            for path, value in nnx.to_flat_state(grads)}
    assert np.abs(flat["alpha"]).max() > 0
    for name, value in flat.items():
        if name != "alpha":
            np.testing.assert_array_equal(value, 0.0, err_msg=name)
