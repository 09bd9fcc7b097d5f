"""Decoding loops against a toy language model whose next token depends on the whole prefix (so
cached stepping can be checked against recomputation from scratch and beam search against brute
force), then through a tiny DecoderLM, its KV cache against cache-free forwards."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import decoder_lm
from pixelllm.language import decoder, decoding

VOCAB, WIDTH, SLOTS = 7, 16, 24
EOS, PAD = 6, 0


def toy_params(seed: int, eos_slope: float = 1.0) -> dict:
    rng = np.random.default_rng(seed)
    return {"emb": jnp.asarray(rng.normal(size=(VOCAB, WIDTH)), jnp.float32),
            "pos_w": jnp.asarray(rng.normal(size=(SLOTS, WIDTH)), jnp.float32),
            "out": jnp.asarray(rng.normal(size=(WIDTH, VOCAB)) * 2.0, jnp.float32),
            "eos_bias": jnp.zeros((VOCAB,)).at[EOS].set(eos_slope)}


def readout(params, tokens, filled, last_position):
    """``hidden(prefix) = tanh(sum_i emb[tok_i] * pos_w[i])``; ``logits = hidden @ out`` plus an
    EOS bias growing with the position of the last token."""
    terms = params["emb"][tokens] * params["pos_w"][None] * filled[..., None]
    hidden = jnp.tanh(terms.sum(axis=1))
    logits = hidden @ params["out"] + params["eos_bias"] * (last_position[:, None] - 4.0)
    return logits, hidden


def toy_step(params, tokens, positions, cache):
    """The cached step: the cache is the explicit token history ``{"tokens": int32 [N, SLOTS],
    "filled": bool [N, SLOTS]}`` written at the given positions, so a wrong cache write or a
    wrong beam reorder changes the logits."""
    rows = jnp.arange(tokens.shape[0])
    cache = {"tokens": cache["tokens"].at[rows, positions].set(tokens, mode="drop"),
             "filled": cache["filled"].at[rows, positions].set(True, mode="drop")}
    logits, hidden = readout(params, cache["tokens"], cache["filled"],
                             positions.astype(jnp.float32))
    return logits, hidden, cache


_full_readout = jax.jit(readout)


class ToyLM:
    """A toy language model whose next token depends on the whole prefix."""

    def __init__(self, seed: int, eos_slope: float = 1.0):
        self.params = toy_params(seed, eos_slope)
        self.step = functools.partial(toy_step, self.params)
        self.memo = {}

    def full(self, sequences: list[list[int]]):
        """Recomputation from scratch: logits [N, V] and hidden [N, D] after each whole prefix."""
        tokens = np.zeros((len(sequences), SLOTS), np.int32)
        filled = np.zeros((len(sequences), SLOTS), bool)
        for n, seq in enumerate(sequences):
            tokens[n, :len(seq)], filled[n, :len(seq)] = seq, True
        last = jnp.asarray([len(s) - 1 for s in sequences], jnp.float32)
        return _full_readout(self.params, jnp.asarray(tokens), jnp.asarray(filled), last)

    def log_prob(self, prefix, token) -> float:
        key = tuple(prefix)
        if key not in self.memo:
            self.memo[key] = np.asarray(jax.nn.log_softmax(self.full([list(prefix)])[0][0]))
        return float(self.memo[key][token])

    def prefill(self, prompts: list[list[int]]):
        """First-step logits, next positions and the cache holding the prompts."""
        tokens = np.zeros((len(prompts), SLOTS), np.int32)
        filled = np.zeros((len(prompts), SLOTS), bool)
        for n, seq in enumerate(prompts):
            tokens[n, :len(seq)], filled[n, :len(seq)] = seq, True
        cache = {"tokens": jnp.asarray(tokens), "filled": jnp.asarray(filled)}
        logits, _ = self.full(prompts)
        return logits, jnp.asarray([len(p) for p in prompts], jnp.int32), cache


@functools.partial(jax.jit, static_argnames=("decoder", "options"))
def _decode(params, logits, positions, cache, arrays, *, decoder, options):
    # The toy weights are jit arguments, so every test with the same settings shares one compile.
    return getattr(decoding, decoder)(functools.partial(toy_step, params), logits=logits,
                                      positions=positions, cache=cache, **arrays, **dict(options))


def decode(decoder: str, model: ToyLM, prompts, steps: int, **kwargs):
    logits, positions, cache = model.prefill(prompts)
    arrays = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
    options = dict(max_new_tokens=steps, eos_id=EOS, pad_id=PAD)
    options.update((k, v) for k, v in kwargs.items() if k not in arrays)
    return _decode(model.params, logits, positions, cache, arrays, decoder=decoder,
                   options=tuple(sorted(options.items())))


def run_greedy(model, prompts, steps, **kwargs):
    return decode("greedy_decode", model, prompts, steps, **kwargs)


def run_sample(model, prompts, steps, rng, **kwargs):
    return decode("sample_decode", model, prompts, steps, rng=rng, **kwargs)


def run_beam(model, prompts, steps, beams, **kwargs):
    return decode("beam_search", model, prompts, steps, beam_size=beams, **kwargs)


PROMPTS = [[1, 2], [3, 1, 4, 2, 5], [2], [5, 5, 3]]


def greedy_by_recomputation(model, prompts, steps):
    """Token-by-token argmax, re-running the model over the whole prefix each step; also the
    hidden state of each generated word token (zero at EOS and padding)."""
    sequences = [list(p) for p in prompts]
    tokens = np.full((len(prompts), steps), PAD)
    hidden = np.zeros((len(prompts), steps, WIDTH), np.float32)
    for t in range(steps):
        logits, _ = model.full(sequences)
        for n, seq in enumerate(sequences):
            if seq[-1] != EOS:
                seq.append(int(jnp.argmax(logits[n])))
                tokens[n, t] = seq[-1]
                if seq[-1] != EOS:
                    hidden[n, t] = model.full([seq])[1][0]
    return tokens, hidden


def test_greedy_with_cache_equals_full_recomputation():
    model, steps = ToyLM(0), 12
    out = run_greedy(model, PROMPTS, steps, return_hidden=True)
    expected, expected_hidden = greedy_by_recomputation(model, PROMPTS, steps)
    lengths = [int(np.argmax(row == EOS)) + 1 if EOS in row else steps for row in expected]
    # The batch must exercise EOS at different steps and a sequence running to the limit.
    assert len(set(lengths)) >= 3 and min(lengths) < steps, lengths
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)
    np.testing.assert_array_equal(np.asarray(out.lengths), lengths)
    np.testing.assert_allclose(np.asarray(out.hidden), expected_hidden, atol=1e-5)
    # Scores: summed log-probabilities of the chosen tokens, EOS included.
    for n, prompt in enumerate(PROMPTS):
        total, seq = 0.0, list(prompt)
        for token in expected[n, :lengths[n]]:
            total += model.log_prob(seq, token)
            seq.append(int(token))
        assert abs(float(out.scores[n]) - total) < 1e-4


def test_greedy_stops_when_all_sequences_are_done():
    model, steps, calls = ToyLM(0), 20, []

    def counting_step(tokens, positions, cache):
        jax.debug.callback(lambda: calls.append(1))
        return model.step(tokens, positions, cache)

    logits, positions, cache = model.prefill(PROMPTS[:1])
    out = decoding.greedy_decode(counting_step, logits=logits, positions=positions, cache=cache,
                                 max_new_tokens=steps, eos_id=EOS, pad_id=PAD)
    jax.effects_barrier()
    length = int(out.lengths[0])
    assert length < steps and int(out.tokens[0, length - 1]) == EOS
    assert (np.asarray(out.tokens[0, length:]) == PAD).all()
    assert len(calls) == length  # one step per generated token, none after the EOS


def test_greedy_suppress_repeat_matches_official_rule():
    model, steps = ToyLM(3, eos_slope=0.0), 10
    plain = run_greedy(model, PROMPTS, steps)
    assert any((row[1:] == row[:-1]).any() for row in np.asarray(plain.tokens)), \
        "the toy model must repeat tokens for this test to mean anything"
    last = jnp.asarray([p[-1] for p in PROMPTS], jnp.int32)
    out = run_greedy(model, PROMPTS, steps, suppress_repeat=True, last_tokens=last)
    # Reference: argmax with the previous token's logit pushed to min(logit, -1e4).
    for n, prompt in enumerate(PROMPTS):
        seq = list(prompt)
        for t in range(steps):
            logits = np.array(model.full([seq])[0][0])
            logits[seq[-1]] = min(logits[seq[-1]], -1e4)
            seq.append(int(np.argmax(logits)))
            if seq[-1] == EOS:
                break
        generated = seq[len(prompt):]
        np.testing.assert_array_equal(np.asarray(out.tokens[n, :len(generated)]), generated)
        assert all(a != b for a, b in zip(seq[len(prompt) - 1:], seq[len(prompt):]))
    with pytest.raises(ValueError, match="last_tokens"):
        run_greedy(model, PROMPTS, steps, suppress_repeat=True)


def test_sampling_limits_equal_greedy():
    model, steps = ToyLM(0), 12
    greedy = run_greedy(model, PROMPTS, steps)
    key = jax.random.key(0)
    for kwargs in (dict(temperature=1e-4), dict(temperature=3.0, top_k=1), dict(top_p=1e-6)):
        out = run_sample(model, PROMPTS, steps, key, **kwargs)
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(greedy.tokens),
                                      err_msg=str(kwargs))
        np.testing.assert_allclose(np.asarray(out.scores), np.asarray(greedy.scores), atol=1e-5)


def test_sampling_keys():
    model, steps = ToyLM(0, eos_slope=0.0), 12
    a = run_sample(model, PROMPTS, steps, jax.random.key(1), temperature=2.0)
    b = run_sample(model, PROMPTS, steps, jax.random.key(1), temperature=2.0)
    c = run_sample(model, PROMPTS, steps, jax.random.key(2), temperature=2.0)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()


def test_filter_logits_keeps_exactly_top_k_and_nucleus():
    probs = np.array([0.05, 0.30, 0.10, 0.25, 0.20, 0.02, 0.08])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
    kept = lambda **kw: set(np.flatnonzero(np.isfinite(decoding.filter_logits(logits, **kw)[0])))
    assert kept(top_k=3) == {1, 3, 4}
    # Sorted: .30 (1), .25 (3), .20 (4), .10 (2), ...: cumulative .30, .55, .75, .85.
    assert kept(top_p=0.30) == {1}
    assert kept(top_p=0.31) == {1, 3}
    assert kept(top_p=0.75) == {1, 3, 4}
    assert kept(top_p=0.80) == {1, 3, 4, 2}
    assert kept(top_p=1.0) == set(range(7))
    # Combined: top-3 renormalises to .40/.33/.27, so p=0.5 needs the first two.
    assert kept(top_k=3, top_p=0.5) == {1, 3}
    assert kept(top_k=3, top_p=0.35) == {1}
    with pytest.raises(ValueError):
        decoding.filter_logits(logits, top_p=0.0)


def test_sampling_frequencies_follow_the_filtered_distribution():
    probs = np.array([0.05, 0.30, 0.10, 0.25, 0.20, 0.02, 0.08])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    count = 8000

    def constant_step(tokens, positions, cache):
        return jnp.broadcast_to(logits, (tokens.shape[0], VOCAB)), cache["h"], cache

    def frequencies(**kwargs):
        out = decoding.sample_decode(
            constant_step, logits=jnp.broadcast_to(logits, (count, VOCAB)),
            positions=jnp.zeros((count,), jnp.int32), cache={"h": jnp.zeros((count, 1))},
            rng=jax.random.key(7), max_new_tokens=1, eos_id=-1, **kwargs)
        return np.bincount(np.asarray(out.tokens[:, 0]), minlength=VOCAB) / count

    nucleus = np.where(np.isin(np.arange(VOCAB), [1, 3, 4]), probs, 0)
    np.testing.assert_allclose(frequencies(top_p=0.7), nucleus / nucleus.sum(), atol=0.02)
    # Temperature 0.5 squares the probabilities; top-3 of those renormalised: .47, .33, .21.
    hot = np.where(np.isin(np.arange(VOCAB), [1, 3, 4]), probs ** 2, 0)
    np.testing.assert_allclose(frequencies(temperature=0.5, top_k=3), hot / hot.sum(), atol=0.02)


def test_decoding_compiles_once_per_shape():
    model, steps = ToyLM(0), 8
    traces = []

    @jax.jit
    def decode(logits, positions, cache, rng):
        traces.append(1)
        return decoding.sample_decode(model.step, logits=logits, positions=positions,
                                      cache=cache, rng=rng, max_new_tokens=steps, eos_id=EOS,
                                      top_k=3, top_p=0.9)

    logits, positions, cache = model.prefill(PROMPTS)
    first = decode(logits, positions, cache, jax.random.key(0))
    for seed in range(1, 4):
        out = decode(logits, positions, cache, jax.random.key(seed))
    assert len(traces) == 1
    assert out.tokens.shape == first.tokens.shape == (len(PROMPTS), steps)


def brute_force(model, prompt, steps, alpha):
    """Every EOS-terminated continuation of up to ``steps`` tokens, with its penalised score."""
    hypotheses = []
    for length in range(1, steps + 1):
        for words in itertools.product([v for v in range(VOCAB) if v != EOS], repeat=length - 1):
            seq, total = list(prompt), 0.0
            for token in (*words, EOS):
                total += model.log_prob(seq, token)
                seq.append(token)
            hypotheses.append((total / float(decoding.brevity_penalty(length, alpha)),
                               (*words, EOS)))
    return sorted(hypotheses, key=lambda h: -h[0])


@pytest.mark.parametrize("alpha", [0.6, 0.0, 2.0])
def test_exhaustive_beam_search_finds_the_brute_force_optimum(alpha):
    model, steps, prompts = ToyLM(1, eos_slope=0.6), 3, PROMPTS[:2]
    beams = VOCAB ** steps  # every candidate of every step stays in reach
    out = run_beam(model, prompts, steps, beams, alpha=jnp.float32(alpha), return_all_beams=True)
    for n, prompt in enumerate(prompts):
        expected = brute_force(model, prompt, steps, alpha)
        assert len(expected) < beams  # all of them fit in the finished set
        found = [(float(s), tuple(np.asarray(out.tokens[n, k, :int(out.lengths[n, k])])))
                 for k, s in enumerate(out.scores[n]) if np.isfinite(s)]
        assert [h for _, h in found] == [h for _, h in expected]
        np.testing.assert_allclose([s for s, _ in found], [s for s, _ in expected], atol=1e-4)
        assert (np.asarray(out.lengths[n, len(found):]) == 0).all()
    if alpha == 0.6:
        best = run_beam(model, prompts, steps, beams, alpha=alpha)
        np.testing.assert_array_equal(np.asarray(best.tokens), np.asarray(out.tokens[:, 0]))
        np.testing.assert_allclose(np.asarray(best.scores), np.asarray(out.scores[:, 0]))
        # The optimum must differ from greedy somewhere, or the search proves nothing.
        greedy = run_greedy(model, prompts, steps)
        assert (np.asarray(greedy.tokens) != np.asarray(best.tokens)).any()


def test_beam_search_stops_once_no_alive_beam_can_win():
    # A long prompt makes EOS almost certain at once: [EOS] beats every alive beam's best
    # possible score, so the best-only search stops after one step; the all-beams search must
    # go on (its finished set is not full) and still list every hypothesis.
    model, steps, prompt = ToyLM(2, eos_slope=3.0), 3, [1, 2, 3, 4, 5, 1, 2, 3]
    results = {}
    for all_beams in (False, True):
        calls = []

        def counting_step(tokens, positions, cache):
            jax.debug.callback(lambda: calls.append(1))
            return model.step(tokens, positions, cache)

        logits, positions, cache = model.prefill([prompt])
        out = decoding.beam_search(counting_step, logits=logits, positions=positions, cache=cache,
                                   beam_size=VOCAB ** steps, max_new_tokens=steps, eos_id=EOS,
                                   return_all_beams=all_beams)
        jax.effects_barrier()
        results[all_beams] = out, len(calls)
    (best, best_calls), (every, every_calls) = results[False], results[True]
    assert (best_calls, every_calls) == (1, steps)
    expected = brute_force(model, prompt, steps, 0.6)
    assert expected[0][1] == (EOS,) and int(best.tokens[0, 0]) == EOS
    assert abs(float(best.scores[0]) - expected[0][0]) < 1e-5
    found = [tuple(np.asarray(every.tokens[0, k, :int(every.lengths[0, k])]))
             for k in range(len(expected))]
    assert found == [h for _, h in expected]


def test_beam_search_moderate_beam_matches_brute_force_best():
    model, steps = ToyLM(1, eos_slope=0.6), 4
    out = run_beam(model, PROMPTS, steps, 4)
    for n, prompt in enumerate(PROMPTS):
        score, best = brute_force(model, prompt, steps, 0.6)[0]
        # A beam of 4 is not exhaustive, but it can never claim more than the optimum.
        assert float(out.scores[n]) <= score + 1e-5
        length = int(out.lengths[n])
        assert int(out.tokens[n, length - 1]) == EOS
        assert (np.asarray(out.tokens[n, length:]) == PAD).all()


def test_beam_one_equals_greedy():
    # EOS is either the clear argmax or very unlikely, so no early EOS branch outscores the
    # greedy path and, with alpha 0, beam 1 must retrace greedy exactly.
    model, steps = ToyLM(0, eos_slope=3.0), 12
    greedy = run_greedy(model, PROMPTS, steps, return_hidden=True)
    beam = run_beam(model, PROMPTS, steps, 1, alpha=0.0, return_hidden=True)
    assert len(set(np.asarray(greedy.lengths).tolist())) >= 2
    np.testing.assert_array_equal(np.asarray(beam.tokens), np.asarray(greedy.tokens))
    np.testing.assert_array_equal(np.asarray(beam.lengths), np.asarray(greedy.lengths))
    np.testing.assert_allclose(np.asarray(beam.scores), np.asarray(greedy.scores), atol=1e-5)
    np.testing.assert_allclose(np.asarray(beam.hidden), np.asarray(greedy.hidden), atol=1e-6)


def test_beam_search_hidden_follows_the_chosen_beam():
    model, steps = ToyLM(1, eos_slope=0.6), 6
    out = run_beam(model, PROMPTS, steps, 3, return_hidden=True)
    for n, prompt in enumerate(PROMPTS):
        length = int(out.lengths[n])
        tokens = [int(t) for t in out.tokens[n, :length]]
        for t in range(length):
            expected = model.full([prompt + tokens[:t + 1]])[1][0]
            if tokens[t] == EOS:
                expected = np.zeros(WIDTH)
            np.testing.assert_allclose(np.asarray(out.hidden[n, t]), expected, atol=1e-5)
        assert not np.asarray(out.hidden[n, length:]).any()


def test_beam_search_without_eos_returns_truncated_best():
    # No EOS ever: the result is the alive beam, scored at L = max_new_tokens.
    model, steps = ToyLM(2, eos_slope=0.0), 3
    out = run_beam(model, PROMPTS[:1], steps, VOCAB ** 2, eos_id=-1)
    best = max((sum(model.log_prob(PROMPTS[0] + list(seq[:i]), tok) for i, tok in enumerate(seq)),
                seq)
               for seq in itertools.product(range(VOCAB), repeat=steps))
    np.testing.assert_array_equal(np.asarray(out.tokens[0]), best[1])
    assert int(out.lengths[0]) == steps
    assert abs(float(out.scores[0]) - best[0] / float(decoding.brevity_penalty(steps, 0.6))) < 1e-4


def test_invalid_arguments_are_rejected():
    model = ToyLM(0)
    logits, positions, cache = model.prefill(PROMPTS)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        decoding.greedy_decode(model.step, logits=logits, positions=positions, cache=cache,
                               max_new_tokens=0, eos_id=EOS)
    with pytest.raises(ValueError, match="needs an rng key"):
        decoding.sample_decode(model.step, logits=logits, positions=positions, cache=cache,
                               rng=None, max_new_tokens=4, eos_id=EOS)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        decoding.beam_search(model.step, logits=logits, positions=positions, cache=cache,
                             beam_size=2, max_new_tokens=4, eos_id=EOS, alpha=-1.0)
    cache["shared"] = jnp.zeros((3,))
    with pytest.raises(ValueError, match=r"\['shared'\] has shape \(3,\)"):
        decoding.beam_search(model.step, logits=logits, positions=positions, cache=cache,
                             beam_size=2, max_new_tokens=4, eos_id=EOS)


# ----------------------------------------------------------------------------------------------
# Through a real DecoderLM: its KV cache against re-running the model over the whole sequence.

def lm_prefill(model, prompts, steps):
    """Right-padded prompt batch through the model once; returns first logits, next positions
    and the cache (room for ``steps`` more tokens)."""
    batch, width = len(prompts), max(map(len, prompts))
    tokens = jnp.asarray([p + [0] * (width - len(p)) for p in prompts], jnp.int32)
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    mask = jnp.arange(width)[None] < lengths[:, None]
    positions = jnp.broadcast_to(jnp.arange(width), (batch, width))
    out = model(tokens=tokens, positions=positions, input_mask=mask,
                cache=model.init_cache(batch, width + steps))
    return out.logits[jnp.arange(batch), lengths - 1], lengths, out.cache


@functools.partial(nnx.jit, static_argnames=("steps", "eos_id"))
def lm_greedy(model, prompts, *, steps, eos_id):
    logits, positions, cache = lm_prefill(model, [list(p) for p in prompts], steps)
    return decoding.greedy_decode(decoding.cached_step(model), logits=logits, positions=positions, cache=cache,
                                  max_new_tokens=steps, eos_id=eos_id, return_hidden=True)


@nnx.jit
def lm_full(model, tokens, mask):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    out = model(tokens=tokens, positions=positions, input_mask=mask)
    return out.logits, out.hidden


def lm_greedy_by_recomputation(model, prompts, steps):
    """Argmax token by token without EOS, each step a cache-free forward over the whole grown
    sequence: tokens [B, T], the hidden state of each token [B, T, D] and its log-prob [B, T]."""
    width = max(map(len, prompts)) + steps
    sequences = [list(p) for p in prompts]
    tokens = np.zeros((len(prompts), steps), np.int32)
    hidden = np.zeros((len(prompts), steps, model.config.hidden_size), np.float32)
    log_probs = np.zeros((len(prompts), steps))
    for t in range(steps + 1):
        padded = jnp.asarray([s + [0] * (width - len(s)) for s in sequences], jnp.int32)
        mask = jnp.arange(width)[None] < jnp.asarray([len(s) for s in sequences])[:, None]
        logits, states = map(np.asarray, lm_full(model, padded, mask))
        for n, seq in enumerate(sequences):
            if t > 0:
                hidden[n, t - 1] = states[n, len(seq) - 1]  # the state of the token just added
            if t < steps:
                row = logits[n, len(seq) - 1].astype(np.float64)
                seq.append(int(np.argmax(row)))
                tokens[n, t] = seq[-1]
                log_probs[n, t] = row[seq[-1]] - row.max() - np.log(np.exp(row - row.max()).sum())
    return tokens, hidden, log_probs


LM_PROMPTS = ((5, 17, 3), (9, 1, 2, 44, 8, 7, 21), (100,))


def test_greedy_through_decoder_lm_cache_equals_recomputation():
    model = decoder.DecoderLM(decoder_lm.get_config("tiny_llama").model, rngs=nnx.Rngs(0))
    steps = 10
    tokens, hidden, log_probs = lm_greedy_by_recomputation(model, LM_PROMPTS, steps)
    # EOS = the token sequence 0 emits at its third step, so that one stops early; greedy with
    # EOS is greedy without it cut after the first EOS.
    eos_id = int(tokens[0, 2])
    lengths = [int(np.argmax(row == eos_id)) + 1 if eos_id in row else steps for row in tokens]
    assert min(lengths) <= 3 < max(lengths)
    after = np.arange(steps)[None] >= np.asarray(lengths)[:, None]
    words = ~after & (tokens != eos_id)
    out = lm_greedy(model, LM_PROMPTS, steps=steps, eos_id=eos_id)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.where(after, 0, tokens))
    np.testing.assert_array_equal(np.asarray(out.lengths), lengths)
    assert np.abs(np.asarray(out.hidden) - hidden * words[..., None]).max() <= 1e-4
    np.testing.assert_allclose(np.asarray(out.scores), (log_probs * ~after).sum(-1), atol=1e-4)


@functools.partial(nnx.jit, static_argnames=("steps", "cached"))
def lm_beam(model, prompts, *, steps, cached):
    prompts = [list(p) for p in prompts]
    logits, positions, cache = lm_prefill(model, prompts, steps)
    step = decoding.cached_step(model)
    if not cached:
        width = max(map(len, prompts)) + steps
        padded = jnp.asarray([p + [0] * (width - len(p)) for p in prompts], jnp.int32)
        cache = decoding.recompute_state(padded, positions, width)
        step = decoding.recompute_step(model, width)
    return decoding.beam_search(step, logits=logits, positions=positions, cache=cache,
                                beam_size=3, max_new_tokens=steps, eos_id=7, return_hidden=True,
                                return_all_beams=True)


def test_beam_search_through_decoder_lm_cache_equals_recomputation():
    # Beam search reorders the KV cache every step; recomputation has no cache to get wrong.
    # Gemma 2's tiny sliding window (4) is shorter than the sequences, soft-caps bend the logits.
    model = decoder.DecoderLM(decoder_lm.get_config("tiny_gemma2").model, rngs=nnx.Rngs(0))
    cached = lm_beam(model, LM_PROMPTS, steps=8, cached=True)
    recomputed = lm_beam(model, LM_PROMPTS, steps=8, cached=False)
    np.testing.assert_array_equal(np.asarray(cached.tokens), np.asarray(recomputed.tokens))
    np.testing.assert_array_equal(np.asarray(cached.lengths), np.asarray(recomputed.lengths))
    np.testing.assert_allclose(np.asarray(cached.scores), np.asarray(recomputed.scores), atol=1e-4)
    assert np.abs(np.asarray(cached.hidden) - np.asarray(recomputed.hidden)).max() <= 1e-4
    # The beams must actually diverge from one another for the reordering to be exercised.
    assert len({tuple(np.asarray(b)) for b in cached.tokens[1]}) == 3
