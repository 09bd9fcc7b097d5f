"""Generation on its own (random image features, no encoders): greedy decoding equals teacher
forcing on its own output, EOS stops and pads, ``max_new_tokens`` bounds the output; T5 and a
decoder LM."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixelllm.models.pixel_llm import generation
from pixelllm.models.pixel_llm.pixel_llm import ImageFeatures, SlotOutputs

# Module fixtures compile the tiny model: all of this module runs on one xdist worker
# (launch/test.sh uses --dist loadgroup), so they are built once.
pytestmark = pytest.mark.xdist_group("test_generation")

STEPS = 6
BOS, PAD = 0, 0


def _random_features(model, batch) -> ImageFeatures:
    """Features of the shapes the encoders would give, drawn at random (no encoder runs)."""
    graphdef, state = nnx.split(model)
    shapes = jax.eval_shape(lambda st, image, wh: nnx.merge(graphdef, st).encode_image(image, wh),
                            state, batch["image"], batch["valid_wh"])
    keys = jax.random.split(jax.random.key(11), 2)
    return ImageFeatures(*(jax.random.normal(key, shape.shape, shape.dtype)
                           for key, shape in zip(keys, shapes)))


def _truncate_at(tokens: np.ndarray, eos: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """What decoding with ``eos`` must give, from a run that never stopped: each row cut after
    its first ``eos`` and padded; lengths count the EOS."""
    out = np.full_like(tokens, pad)
    lengths = np.zeros(tokens.shape[:-1], np.int32)
    for index in np.ndindex(tokens.shape[:-1]):
        row = tokens[index]
        hits = np.flatnonzero(row == eos)
        length = hits[0] + 1 if hits.size else row.size
        out[index][:length] = row[:length]
        lengths[index] = length
    return out, lengths


# Model seeds whose random tiny LM, on these random features, does not repeat one token forever.
SEEDS = {"tiny_t5_config": 0, "tiny_decoder_config": 1}


class Decoded(NamedTuple):
    free: generation.Generation          # EOS outside the vocabulary: never stops
    stopped: generation.Generation       # EOS = a token the free run emits
    short: generation.Generation         # max_new_tokens = 3, never stops
    forced: SlotOutputs                  # teacher forcing on `stopped`'s text
    per_word: generation.Generation      # `stopped` with the official score normalisation
    official: generation.Generation      # the official defaults: repeat rule, score per word
    eos: int
    eos_length: int                      # slot (0, 0): tokens up to its EOS, EOS counted
    valid_wh: np.ndarray


@pytest.fixture(scope="module", params=list(SEEDS))
def decoded(request, make_batch, build_model) -> Decoded:
    config = request.getfixturevalue(request.param)
    model = build_model(config, seed=SEEDS[request.param])
    batch = make_batch(3)
    features = _random_features(model, batch)
    never = config.model.language_model.model.vocab_size + 7
    context = dict(prompt_boxes=batch["prompt_boxes"], context_tokens=batch["context_tokens"],
                   context_mask=batch["context_mask"])

    # The runs compared with teacher forcing decode without the repeat rule and score the mean
    # per generated token; `official` uses generate's defaults.
    plain = dict(suppress_repeat=False, score_normalization="tokens")

    def generate(model, eos_id, max_new_tokens, **options):
        return generation.generate(model, features, batch["valid_wh"], bos_id=BOS,
                                   eos_id=eos_id, pad_id=PAD, max_new_tokens=max_new_tokens,
                                   **context, **(options or plain))

    free = nnx.jit(generate, static_argnums=(1, 2))(model, never, STEPS)
    # EOS := the first token of slot (0, 0) after its first word that it has not emitted before,
    # so that slot stops after one or more words.
    row = [int(t) for t in free.tokens[0, 0]]
    position = next((p for p in range(1, STEPS) if row[p] not in row[:p]), None)
    assert position is not None, f"slot (0, 0) repeats one token: {row}"
    eos = row[position]

    @nnx.jit
    def stopped_and_teacher_forced(model):
        gen = generate(model, eos, STEPS)
        b, s, t = gen.tokens.shape
        text = jnp.concatenate([jnp.full((b, s, 1), BOS, jnp.int32), gen.tokens], axis=-1)
        text_mask = jnp.arange(t + 1) <= gen.lengths[..., None]          # BOS..EOS
        forced = model.run_slots(features, batch["valid_wh"], text_tokens=text,
                                 text_mask=text_mask, with_masks=False, **context)
        per_word = generate(model, eos, STEPS, suppress_repeat=False,
                            score_normalization="words")
        official = generation.generate(model, features, batch["valid_wh"], bos_id=BOS,
                                       eos_id=eos, pad_id=PAD, max_new_tokens=STEPS, **context)
        return gen, generate(model, never, 3), forced, per_word, official

    stopped, short, forced, per_word, official = stopped_and_teacher_forced(model)
    return Decoded(free=free, stopped=stopped, short=short, forced=forced, per_word=per_word,
                   official=official, eos=eos, eos_length=position + 1,
                   valid_wh=np.asarray(batch["valid_wh"]))


def _expected(decoded: Decoded):
    """Tokens, lengths and the slots that emitted EOS, from the free run."""
    tokens, lengths = _truncate_at(np.asarray(decoded.free.tokens), decoded.eos, PAD)
    ended = np.take_along_axis(tokens, lengths[..., None] - 1, -1)[..., 0] == decoded.eos
    return tokens, lengths, ended


def test_a_run_without_eos_fills_max_new_tokens(decoded):
    free = decoded.free
    assert free.tokens.shape == (2, 2, STEPS)
    np.testing.assert_array_equal(free.lengths, STEPS)
    np.testing.assert_array_equal(free.token_points_valid, True)
    assert free.token_points.shape == (2, 2, STEPS, 2, 2) and free.eos_boxes.shape == (2, 2, 4)
    # Points lie inside each image's valid area.
    points = np.asarray(free.token_points)
    assert (points >= 0).all() and (points <= decoded.valid_wh[:, None, None, None]).all()


def test_max_new_tokens_bounds_the_output_and_a_shorter_run_is_a_prefix(decoded):
    assert decoded.short.tokens.shape == (2, 2, 3)
    np.testing.assert_array_equal(decoded.short.tokens, np.asarray(decoded.free.tokens)[..., :3])
    np.testing.assert_array_equal(decoded.short.lengths, 3)


def test_eos_stops_and_pads(decoded):
    """The same greedy run with an EOS it emits: every slot keeps its tokens up to its first EOS
    (counted in the length), then pads; points are valid on the words only."""
    tokens, lengths, ended = _expected(decoded)
    np.testing.assert_array_equal(decoded.stopped.tokens, tokens)
    np.testing.assert_array_equal(decoded.stopped.lengths, lengths)
    assert lengths[0, 0] == decoded.eos_length and ended[0, 0]
    np.testing.assert_array_equal(decoded.stopped.token_points_valid,
                                  np.arange(STEPS) < (lengths - ended)[..., None])


def test_official_greedy_score_is_per_word_and_no_token_follows_itself(decoded):
    """The official normalisation divides the same summed log-probability (EOS included) by the
    number of words instead of the generated tokens; the official repeat rule (on by default)
    never lets a token follow itself (BOS counts as the first step's previous token)."""
    tokens, lengths, ended = _expected(decoded)
    words = np.maximum(lengths - ended, 1)
    np.testing.assert_allclose(np.asarray(decoded.per_word.log_prob) * words,
                               np.asarray(decoded.stopped.log_prob) * lengths, rtol=1e-5)
    np.testing.assert_array_equal(decoded.per_word.tokens, decoded.stopped.tokens)
    official = np.asarray(decoded.official.tokens)
    previous = np.concatenate([np.full(official.shape[:-1] + (1,), BOS), official[..., :-1]], -1)
    generated = np.arange(STEPS) < np.asarray(decoded.official.lengths)[..., None]
    assert not (generated & (official == previous)).any()
    with pytest.raises(ValueError, match="score_normalization 'mean'; choose from"):
        generation.generate(None, None, None, prompt_boxes=None, context_tokens=None,
                            context_mask=None, bos_id=BOS, eos_id=1, pad_id=PAD,
                            max_new_tokens=2, score_normalization="mean")


def test_greedy_generation_equals_teacher_forcing_on_its_own_output(decoded):
    tokens, lengths, ended = _expected(decoded)
    gen, forced = decoded.stopped, decoded.forced
    valid = np.arange(STEPS) < lengths[..., None]         # generated tokens, EOS included
    # Teacher forcing on the generated text predicts the same tokens...
    predicted = np.asarray(jnp.argmax(forced.logits[..., :-1, :], axis=-1))
    np.testing.assert_array_equal(np.where(valid, predicted, -1), np.where(valid, tokens, -1))
    # ...with the same mean log-probability per generated token...
    log_probs = np.asarray(jax.nn.log_softmax(forced.logits[..., :-1, :], axis=-1))
    chosen = np.take_along_axis(log_probs, tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(gen.log_prob, np.where(valid, chosen, 0).sum(-1) / lengths,
                               atol=1e-4)
    # ...the same points for every word (token t's state sits at t + 1 after BOS)...
    word = np.asarray(gen.token_points_valid)
    np.testing.assert_allclose(np.asarray(forced.token_points)[:, :, 1:][word],
                               np.asarray(gen.token_points)[word], atol=1e-3)
    # ...and, where EOS ended a non-empty text, the same box (read at the last word).
    with_words = ended & (lengths > 1)
    assert with_words.any()
    np.testing.assert_allclose(np.asarray(forced.eos_boxes)[with_words],
                               np.asarray(gen.eos_boxes)[with_words], atol=1e-3)


def test_eos_box_of_an_empty_generation_is_read_at_bos(request, make_batch, build_model):
    """EOS as the first token (empty text): the box comes from BOS's state, as teacher forcing
    reads it (``eos_positions``), for both LM kinds."""
    for name, seed in SEEDS.items():
        config = request.getfixturevalue(name)
        model = build_model(config, seed=seed)
        batch = make_batch(3)
        features = _random_features(model, batch)
        context = dict(prompt_boxes=batch["prompt_boxes"], context_tokens=batch["context_tokens"],
                       context_mask=batch["context_mask"])

        @nnx.jit
        def empty_and_teacher_forced(model):
            never = config.model.language_model.model.vocab_size + 7
            first = generation.generate(model, features, batch["valid_wh"], bos_id=BOS,
                                        eos_id=never, pad_id=PAD, max_new_tokens=1, **context)
            eos = first.tokens[0, 0, 0]          # slot (0, 0) emits it first: an empty text
            gen = generation.generate(model, features, batch["valid_wh"], bos_id=BOS, eos_id=eos,
                                      pad_id=PAD, max_new_tokens=2, **context)
            b, s, t = gen.tokens.shape
            text = jnp.concatenate([jnp.full((b, s, 1), BOS, jnp.int32), gen.tokens], axis=-1)
            text_mask = jnp.arange(t + 1) <= gen.lengths[..., None]
            forced = model.run_slots(features, batch["valid_wh"], text_tokens=text,
                                     text_mask=text_mask, with_masks=False, **context)
            return gen, forced

        gen, forced = empty_and_teacher_forced(model)
        assert int(gen.lengths[0, 0]) == 1 and not bool(gen.token_points_valid[0, 0].any())
        np.testing.assert_allclose(np.asarray(forced.eos_boxes)[0, 0],
                                   np.asarray(gen.eos_boxes)[0, 0], atol=1e-3, err_msg=name)
