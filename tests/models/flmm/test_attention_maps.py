"""F-LMM's attention maps and text states: a hand-built attention tensor with known values, then
one tiny LLaVA forward against F-LMM's formula computed with torch on transformers' attentions
and hidden states (tests/models/flmm/test_llava.py's reference model)."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from pixelllm.models.flmm import attention_maps as maps_lib
from tests.models.flmm import test_llava as reference

HEADS, ROWS = 2, 4
BEFORE, GRID, AFTER = 2, (2, 3), 1          # key columns: 2 prompt | 6 image | 1 prompt | 4 text
KEYS = BEFORE + GRID[0] * GRID[1] + AFTER + ROWS


def fake_attention(layer):
    """``[1, H, ROWS, KEYS]`` with value ``100 layer + 10 head + row + key / 100``."""
    head, row, key = np.meshgrid(np.arange(HEADS), np.arange(ROWS), np.arange(KEYS), indexing="ij")
    return jnp.asarray((100 * layer + 10 * head + row + key / 100)[None], jnp.float32)


def test_phrase_weights_average_each_valid_span():
    spans = jnp.asarray([[[1, 3], [0, 1], [2, 2], [0, 4]]])
    weights = maps_lib.phrase_weights(spans, jnp.asarray([[True, True, True, False]]), 5)
    np.testing.assert_allclose(weights[0], [[0, .5, .5, 0, 0], [1, 0, 0, 0, 0], [0] * 5, [0] * 5])


def test_hand_built_attention_gives_the_expected_maps():
    attention = {layer: fake_attention(layer) for layer in (1, 0)}   # order comes from the keys
    spans = jnp.asarray([[[1, 3], [3, 4], [0, 4]]])
    valid = jnp.asarray([[True, True, False]])
    maps = maps_lib.phrase_attention_maps(
        attention, maps_lib.phrase_weights(spans, valid, ROWS),
        image_columns=(BEFORE, BEFORE + GRID[0] * GRID[1]), grid=GRID)
    assert maps.shape == (1, 3, 2 * HEADS, *GRID)
    for channel in range(2 * HEADS):
        layer, head = divmod(channel, HEADS)
        # Grid cell (r, c) is image key BEFORE + 3 r + c.
        key = BEFORE + np.arange(6).reshape(GRID)
        base = 100 * layer + 10 * head + key / 100
        np.testing.assert_allclose(maps[0, 0, channel], base + 1.5, rtol=1e-6)   # rows 1, 2
        np.testing.assert_allclose(maps[0, 1, channel], base + 3, rtol=1e-6)     # row 3
    assert np.all(np.asarray(maps[0, 2]) == 0)


def flmm_reference(ref, caption_spans, layer_logits):
    """F-LMM's ``_forward`` on transformers' outputs for one image: maps ``[M, layers*H, h, w]``
    and, per phrase, the mixed states of its tokens ``[tokens, D]``."""
    image = torch.zeros(ref.attentions[0].shape[-1], dtype=torch.bool)
    split = reference.PROMPT.index(reference.IMAGE)
    image[split:split + reference.GRID ** 2] = True     # image_to_overwrite
    prompt = len(reference.PROMPT) - 1 + reference.GRID ** 2
    attentions = [a[0][..., image].reshape(*a.shape[1:3], reference.GRID, reference.GRID)
                  for a in ref.attentions]
    layers = len(ref.attentions)
    hidden = torch.stack([h[0] for h in ref.hidden_states[-layers:]])
    hidden = (hidden * torch.softmax(layer_logits, 0).view(-1, 1, 1)).sum(0)
    maps, states = [], []
    for start, end in caption_spans:
        matched = torch.zeros(hidden.shape[0], dtype=torch.bool)
        matched[prompt + start:prompt + end] = True      # mask_ids == mask_id
        maps.append(torch.cat([a[:, matched].mean(1) for a in attentions]))
        states.append(hidden[matched])
    return torch.stack(maps).numpy(), [s.numpy() for s in states]


def test_llava_maps_and_text_states_match_flmm_on_transformers():
    hf, _, ours, pixels = reference.tiny_reference()
    inputs = reference.our_inputs(pixels)
    # Image 0: phrases over caption tokens [0, 2) and [3, 6); image 1: [1, 4) and a padding slot.
    spans = jnp.asarray([[[0, 2], [3, 6]], [[1, 4], [0, 0]]])
    valid = jnp.asarray([[True, True], [True, False]])
    grounding = jax.jit(lambda m, x: maps_lib.llava_grounding(
        m, x, caption_spans=spans, valid=valid, max_tokens=3))(ours, inputs)
    maps = grounding.maps
    layers, heads = hf.config.text_config.num_hidden_layers, 4
    assert maps.shape == (2, 2, layers * heads, reference.GRID, reference.GRID)
    layer_logits = torch.tensor([0.3, -0.8])
    for i in range(2):
        ref = reference.hf_forward(hf, pixels, i)
        count = int(valid[i].sum())
        expected_maps, expected_states = flmm_reference(
            ref, np.asarray(spans[i, :count]), layer_logits)
        np.testing.assert_allclose(maps[i, :count], expected_maps, atol=1e-6)
        assert np.all(np.asarray(maps[i, count:]) == 0)
        # The refiner's text input from the same forward, mixed over layers as FlmmHead mixes
        # it, against F-LMM's mixed states of each phrase's tokens.
        weights = torch.softmax(layer_logits, 0).numpy()
        mixed = np.einsum("y,msyd->msd", weights, np.asarray(grounding.text_hidden[i]))
        for phrase, states in enumerate(expected_states):
            np.testing.assert_allclose(mixed[phrase, :len(states)], states, atol=1e-5, rtol=1e-5)
            np.testing.assert_array_equal(grounding.text_valid[i, phrase],
                                          np.arange(3) < len(states))
        assert not np.any(np.asarray(grounding.text_valid[i, count:]))
