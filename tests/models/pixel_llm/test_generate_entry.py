"""The decoding entry from an image and a prompt (``inference.generate``) jitted over the split
state (``inference.compile_entry``): its fixed-length mode returns exactly ``max_new_tokens``
tokens whose prefix up to EOS is the early-stopping caption, token for token; one compilation
serves other images of the same shape."""

import jax
import numpy as np
import pytest
from flax import nnx

from pixelllm.models.pixel_llm import inference

# Module fixtures compile the tiny model: all of this module runs on one xdist worker
# (launch/test.sh uses --dist loadgroup), so they are built once.
pytestmark = pytest.mark.xdist_group("test_generate_entry")

STEPS = 6
FIXED = inference.DecodeSettings(bos_id=0, eos_id=1, pad_id=0, max_new_tokens=STEPS,
                                 fixed_length=True)


def _inputs(batch):
    return {key: batch[key] for key in ("image", "valid_wh", "context_tokens", "context_mask")}


@pytest.fixture(scope="module")
def runs(tiny_t5_config, make_batch, build_model):
    graphdef, state = nnx.split(build_model(tiny_t5_config, seed=0))
    fixed = inference.compile_entry(inference.generate, graphdef, settings=FIXED)
    first, second = make_batch(3), make_batch(4)
    free = jax.device_get(fixed(state, _inputs(first)))
    other = jax.device_get(fixed(state, _inputs(second)))
    # EOS := the first token of slot (0, 0) after its first word that it has not emitted before,
    # so that the early-stopping caption of that slot ends after one or more words.
    row = [int(t) for t in free.tokens[0, 0]]
    position = next((p for p in range(1, STEPS) if row[p] not in row[:p]), None)
    assert position is not None, f"slot (0, 0) repeats one token: {row}"
    eos = row[position]
    through_eos = jax.device_get(inference.compile_entry(
        inference.generate, graphdef, settings=FIXED._replace(eos_id=eos))(state, _inputs(first)))
    stopping = FIXED._replace(eos_id=eos, fixed_length=False)
    stopped = jax.device_get(inference.compile_entry(
        inference.caption_with_traces, graphdef, settings=stopping)(state, _inputs(first)))
    return dict(fixed=fixed, free=free, other=other, through_eos=through_eos, stopped=stopped,
                eos=eos,
                eos_length=position + 1, images=(first["image"], second["image"]))


def test_fixed_length_returns_every_token(runs):
    free = runs["free"]
    assert free.tokens.shape == (2, 2, STEPS)
    assert free.token_points.shape == (2, 2, STEPS, 2, 2)
    np.testing.assert_array_equal(free.lengths, STEPS)
    assert np.asarray(free.token_points_valid).all()
    assert np.isfinite(free.log_prob).all() and np.isfinite(free.eos_boxes).all()
    # An emitted EOS ends nothing: the same tokens, points and scores as with another EOS id.
    through_eos = runs["through_eos"]
    assert (np.asarray(through_eos.tokens[0, 0]) == runs["eos"]).any()
    np.testing.assert_array_equal(through_eos.tokens, free.tokens)
    np.testing.assert_array_equal(through_eos.lengths, STEPS)
    assert np.asarray(through_eos.token_points_valid).all()
    np.testing.assert_allclose(through_eos.token_points, free.token_points, atol=1e-5)
    np.testing.assert_allclose(through_eos.log_prob, free.log_prob, rtol=1e-6)


def test_the_prefix_up_to_eos_is_the_early_stopping_caption(runs):
    free, stopped, eos = runs["free"], runs["stopped"], runs["eos"]
    assert int(stopped.lengths[0, 0]) == runs["eos_length"] < STEPS
    tokens = np.asarray(free.tokens)
    for index in np.ndindex(tokens.shape[:2]):
        hits = np.flatnonzero(tokens[index] == eos)
        length = hits[0] + 1 if hits.size else STEPS
        assert stopped.lengths[index] == length, index
        np.testing.assert_array_equal(stopped.tokens[index][:length], tokens[index][:length])
        # The early-stopping decode pads after EOS; the fixed-length one kept decoding.
        assert (stopped.tokens[index][length:] == FIXED.pad_id).all(), index
        words = length - bool(hits.size)
        np.testing.assert_array_equal(np.flatnonzero(stopped.token_points_valid[index]),
                                      np.arange(words))
        np.testing.assert_allclose(stopped.token_points[index][:words],
                                   free.token_points[index][:words], atol=1e-4)


def test_one_compilation_serves_other_images_of_the_same_shape(runs):
    first, second = runs["images"]
    assert not np.array_equal(first, second)
    assert not np.array_equal(runs["free"].token_points, runs["other"].token_points)
    assert runs["fixed"]._cache_size() == 1


def test_location_caption_needs_exactly_one_location_prompt(tiny_t5_config, build_model,
                                                            make_batch):
    batch = make_batch(3)
    with pytest.raises(ValueError, match="exactly one of boxes and points"):
        inference.location_caption(build_model(tiny_t5_config), **_inputs(batch), settings=FIXED)
