"""The prompt adapter on its own: fused features + a location prompt per slot -> visual tokens.

The module-level fixture is the official style (the default); the style tests below pin what
separates it from our lighter ``shared_output`` style."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixelllm.encoders.sam.prompt_encoder import SamPromptEncoder
from pixelllm.models.pixel_llm.prompt_adapter import PromptAdapter

IMAGE, PROMPT, OUT, QUERIES = 6, 8, 12, 3      # channels of the fused map, prompt width, LM width
GRID = (4, 4)                                  # the fused map's cells
CANVAS = 32


def _adapter(style="official", seed=0):
    return PromptAdapter(image_features=IMAGE, prompt_features=PROMPT, out_features=OUT, dim=16,
                         depth=1, num_heads=2, mlp_dim=32, num_queries=QUERIES,
                         visual_features=16, style=style, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def adapter():
    return _adapter()


@pytest.fixture(scope="module")
def run(adapter):
    return nnx.jit(lambda image, prompt_tokens, dense: adapter(image, _pe(), prompt_tokens,
                                                               dense))


@pytest.fixture(scope="module")
def encoder():
    return SamPromptEncoder(embed_dim=PROMPT, image_embedding_size=GRID,
                            input_image_size=(CANVAS, CANVAS), mask_in_chans=4,
                            rngs=nnx.Rngs(1))


def _pe():
    return jax.random.normal(jax.random.key(10), (*GRID, PROMPT))


def _inputs(batch=2, slots=3, prompt_tokens=2, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (batch, *GRID, IMAGE)),
            jax.random.normal(keys[1], (batch, slots, prompt_tokens, PROMPT)),
            jax.random.normal(keys[2], (PROMPT,)))


def test_output_shape_and_final_layer_norm(run):
    image, tokens, dense = _inputs()
    out = np.asarray(run(image, tokens, dense))
    assert out.shape == (2, 3, QUERIES, OUT)
    # The last layer is a LayerNorm at its initial scale 1 / bias 0: every token has mean 0 and
    # (biased) variance v / (v + eps) over the LM width, v the small variance the N(0, 0.02)
    # projection before it gives.
    np.testing.assert_allclose(out.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.var(-1), 1.0, atol=1e-2)
    assert (out.var(-1) <= 1.0).all()


def test_slots_and_examples_are_independent(run):
    image, tokens, dense = _inputs()
    base = np.asarray(run(image, tokens, dense))
    # Another prompt in slot 1 of example 0 changes exactly that slot's tokens.
    other = tokens.at[0, 1].set(jax.random.normal(jax.random.key(5), tokens.shape[2:]))
    changed = np.asarray(run(image, other, dense))
    np.testing.assert_allclose(np.delete(changed[0], 1, axis=0), np.delete(base[0], 1, axis=0),
                               atol=1e-6)
    np.testing.assert_allclose(changed[1], base[1], atol=1e-6)
    assert np.abs(changed[0, 1] - base[0, 1]).max() > 1e-3
    # Another image for example 1 leaves example 0 alone.
    other_image = image.at[1].set(jax.random.normal(jax.random.key(6), image.shape[1:]))
    changed = np.asarray(run(other_image, tokens, dense))
    np.testing.assert_allclose(changed[0], base[0], atol=1e-6)
    assert np.abs(changed[1] - base[1]).max() > 1e-3
    # The same prompt in two slots gives the same tokens (the learned queries are shared).
    same = tokens.at[:, 2].set(tokens[:, 0])
    out = np.asarray(run(image, same, dense))
    np.testing.assert_allclose(out[:, 2], out[:, 0], atol=1e-6)


def test_tokens_depend_on_the_image_and_the_dense_prompt(run):
    image, tokens, dense = _inputs()
    base = np.asarray(run(image, tokens, dense))
    assert np.abs(np.asarray(run(image + 1.0, tokens, dense)) - base).max() > 1e-3
    assert np.abs(np.asarray(run(image, tokens, dense + 1.0)) - base).max() > 1e-3


def test_box_prompts_through_sam_prompt_encoder(adapter, encoder):
    """Box prompts (two corner tokens each, canvas pixels): another box gives other tokens; the
    whole-image box of a global task is a prompt like any other."""
    image, _, _ = _inputs(batch=1, slots=3)
    boxes = jnp.asarray([[[0.0, 0.0, 32.0, 32.0], [4.0, 4.0, 12.0, 20.0],
                          [4.0, 4.0, 12.0, 20.0]]])                        # [B=1, S=3, 4]

    @nnx.jit
    def visual(adapter, encoder, boxes):
        tokens = encoder.embed_boxes(boxes.reshape(-1, 4)).reshape(*boxes.shape[:2], 2, PROMPT)
        return adapter(image, encoder.dense_pe(GRID), tokens, encoder.no_mask_embed[...])

    out = np.asarray(visual(adapter, encoder, boxes))
    assert out.shape == (1, 3, QUERIES, OUT)
    np.testing.assert_allclose(out[0, 1], out[0, 2], atol=1e-6)
    assert np.abs(out[0, 0] - out[0, 1]).max() > 1e-3
    moved = np.asarray(visual(adapter, encoder, boxes.at[0, 2].set(jnp.asarray([5.0, 4, 12, 20]))))
    assert np.abs(moved[0, 2] - out[0, 2]).max() > 1e-4              # one pixel moved
    np.testing.assert_allclose(moved[0, :2], out[0, :2], atol=1e-6)


def test_point_prompts_with_sams_padding_token(adapter, encoder):
    """Point prompts carry SAM's "not a point" token (``pad=True``): P points -> P + 1 prompt
    tokens; the number of prompt tokens does not change the number of visual tokens."""
    image, _, _ = _inputs(batch=1, slots=2)
    points = jnp.asarray([[[[8.0, 8.0], [20.0, 12.0]], [[8.0, 8.0], [20.0, 30.0]]]])  # [1,2,P,2]

    @nnx.jit
    def visual(adapter, encoder, points):
        batch, slots, count = points.shape[:3]
        tokens = encoder.embed_points(points.reshape(-1, count, 2),
                                      jnp.ones((batch * slots, count), jnp.int32), pad=True)
        tokens = tokens.reshape(batch, slots, *tokens.shape[1:])
        return tokens, adapter(image, encoder.dense_pe(GRID), tokens, encoder.no_mask_embed[...])

    tokens, out = visual(adapter, encoder, points)
    assert tokens.shape == (1, 2, 3, PROMPT)
    # The padding token is the same learned embedding wherever the points are.
    np.testing.assert_array_equal(tokens[0, 0, 2], encoder.not_a_point_embed.get_value())
    np.testing.assert_array_equal(tokens[0, 1, 2], encoder.not_a_point_embed.get_value())
    assert out.shape == (1, 2, QUERIES, OUT)
    assert np.abs(np.asarray(out[0, 0] - out[0, 1])).max() > 1e-4


def _count(module):
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_official_style_has_one_output_layer_per_query(adapter):
    """Query q's visual token is its own Dense (kernel q, bias q) of the transformer output: the
    official ``output_hypernetworks_mlps.{q}``."""
    assert adapter.visual_proj.kernel.shape == (QUERIES, 16, 16)
    x = jax.random.normal(jax.random.key(3), (5, QUERIES, 16))
    out = np.asarray(adapter.visual_proj(x))
    kernel = np.asarray(adapter.visual_proj.kernel[...])
    bias = np.asarray(adapter.visual_proj.bias[...])
    for q in range(QUERIES):
        np.testing.assert_allclose(out[:, q], np.asarray(x[:, q]) @ kernel[q] + bias[q],
                                   rtol=1e-5, atol=1e-5)
    # Different queries get different layers, each initialised with its own fan-in (16).
    assert np.abs(kernel[0] - kernel[1]).max() > 1e-3
    assert 0.5 / 4 < kernel.std() < 2.0 / 4


def test_styles_differ_as_the_official_code():
    official, shared = _adapter("official"), _adapter("shared_output")
    # Queries N(0, 1) officially, N(0, 0.02) in ours; 32x512 draws at full size, 3x16 here.
    assert 0.6 < float(np.std(official.queries[...])) < 1.6
    assert float(np.std(shared.queries[...])) < 0.05
    # One prompt projection for sparse and dense prompts (no separate dense projection).
    assert official.dense_prompt_proj is None and shared.dense_prompt_proj is not None
    # Parameters: (Q - 1) more output layers, one prompt projection fewer.
    per_query_extra = (QUERIES - 1) * (16 * 16 + 16)
    dense_prompt_proj = PROMPT * 16 + 16
    assert _count(official) - _count(shared) == per_query_extra - dense_prompt_proj


def test_official_dense_prompt_goes_through_the_sparse_prompt_projection():
    """Zeroing the shared prompt projection's kernel removes both the sparse and the dense
    prompt: the tokens then no longer depend on either."""
    model = _adapter()
    model.prompt_proj.kernel[...] = jnp.zeros_like(model.prompt_proj.kernel[...])
    image, tokens, dense = _inputs()
    call = nnx.jit(lambda m, t, d: m(image, _pe(), t, d))
    base = np.asarray(call(model, tokens, dense))
    np.testing.assert_allclose(np.asarray(call(model, tokens + 1.0, dense + 1.0)), base,
                               atol=1e-6)


def test_box_prompt_padding_with_no_mask_embed(adapter, encoder):
    """A box prompt is its 2 corner tokens then ``box_pad_tokens`` (3) copies of
    ``no_mask_embed``: the 5 tokens of the official box prompt."""
    boxes = jnp.asarray([[0.0, 0.0, 32.0, 32.0], [4.0, 4.0, 12.0, 20.0]])
    corners = encoder.embed_boxes(boxes)
    tokens = np.asarray(adapter.pad_box_tokens(corners, encoder.no_mask_embed[...]))
    assert tokens.shape == (2, 5, PROMPT)
    np.testing.assert_array_equal(tokens[:, :2], np.asarray(corners))
    np.testing.assert_array_equal(tokens[:, 2:],
                                  np.broadcast_to(np.asarray(encoder.no_mask_embed[...]),
                                                  (2, 3, PROMPT)))


def test_unknown_style_names_the_field():
    with pytest.raises(ValueError, match="prompt_adapter.style"):
        _adapter("dense")
