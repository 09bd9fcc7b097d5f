"""Batched autoregressive decoding with a KV cache: greedy, sampling and beam search.

Every decoder here runs as one ``jax.lax.while_loop`` and is traceable under ``jax.jit`` /
``nnx.jit`` with the sizes (``max_new_tokens``, ``beam_size``, ``top_k``) and the sampling
switches (``temperature``, ``top_p``) as static Python values. The loops are model-agnostic: they
drive a *step function*

    step_fn(tokens: int32 [N], positions: int32 [N], cache) -> (logits [N, V], hidden [N, D], cache)

that feeds one token per sequence at the given position and returns the next-token logits, the
last hidden state of that token (PixelLLM's point head reads it) and the updated cache. Every
cache leaf has the sequences on axis 0 (``N = B`` for greedy and sampling, ``N = B * beam_size``,
beam-minor, for beam search, which tiles and reorders the cache with ``jnp.take(leaf, i, axis=0)``);
anything per-sequence the step needs (a T5 encoder output and its mask, say) must live in the cache
so that it follows the beams.

The caller prefills: it runs the prompt through the model once and hands over the cache, the
logits for the first new token ``[B, V]`` and the position of the first new token ``[B]``;
:func:`generate` does that for any :class:`~pixelllm.language.interface.LanguageModel`, starting
from prefix embeddings (its ``prefill`` and ``decode_step``). Each
loop iteration picks token ``t`` for every sequence, then feeds it (so the cache ends holding every
generated token and ``hidden[:, t]`` is the state *of* token ``t``, the one that predicts
``t + 1``): the cache needs room for ``prompt + max_new_tokens`` tokens.

A sequence that emits ``eos_id`` is done: its later tokens are ``pad_id`` and what the model does
with it no longer matters; the loop stops once every sequence is done. With ``eos_id=None``
nothing ends a sequence: every loop runs exactly ``max_new_tokens`` steps. Outputs
(:class:`DecodeOutput`): ``tokens`` include the EOS, ``lengths`` count it, ``hidden`` is zero at
EOS and padding (PixelLLM reads points from word tokens only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from pixelllm.language.interface import LanguageModel

PyTree = Any
StepFn = Callable[[jax.Array, jax.Array, PyTree], tuple[jax.Array, jax.Array, PyTree]]

# The official greedy decoder's logit for an immediately repeated token.
_REPEAT_LOGIT = -1e4


class DecodeOutput(NamedTuple):
    """``tokens``: int32 [B, T] generated tokens, EOS included, ``pad_id`` after it;
    ``lengths``: int32 [B] tokens generated, EOS included; ``scores``: float32 [B] (greedy and
    sampling: summed log-probability, see :func:`sample_decode`; beam search: the length-penalised
    score); ``hidden``: [B, T, D] hidden state of each generated token (zero at EOS and padding),
    or None. :func:`beam_search` with ``return_all_beams`` adds a beam axis after B.
    ``start_hidden``: [B, D] the hidden state of BOS, which emits the first token (set by
    :func:`generate` with ``return_hidden``; None otherwise)."""
    tokens: jax.Array
    lengths: jax.Array
    scores: jax.Array
    hidden: jax.Array | None
    start_hidden: jax.Array | None = None


class _SampleState(NamedTuple):
    """The loop state of :func:`sample_decode`: step ``t``; ``tokens [B, T]`` and ``hidden
    [B, T, D]`` (or None) so far; ``done``, ``lengths``, ``scores`` per sequence ``[B]``; the
    ``previous`` token [B] (for the repeat rule); the ``logits [B, V]`` of the next token; cache."""
    t: jax.Array
    tokens: jax.Array
    hidden: jax.Array | None
    done: jax.Array
    lengths: jax.Array
    scores: jax.Array
    previous: jax.Array
    logits: jax.Array
    cache: PyTree


class _BeamState(NamedTuple):
    """The loop state of :func:`beam_search`, per batch element and beam ``[B, beams, ...]``: the
    alive hypotheses (tokens, hidden states or None, summed log-probabilities), the finished ones
    (tokens, hidden, length-penalised scores, lengths), the alive beams' next-token ``logits
    [B * beams, V]`` and their cache."""
    t: jax.Array
    alive_tokens: jax.Array
    alive_hidden: jax.Array | None
    alive_log_probs: jax.Array
    fin_tokens: jax.Array
    fin_hidden: jax.Array | None
    fin_scores: jax.Array
    fin_lengths: jax.Array
    logits: jax.Array
    cache: PyTree


def _is_eos(token: jax.Array, eos_id: int | None) -> jax.Array:
    """Where ``token`` ends its sequence; nowhere when decoding a fixed number of tokens."""
    return jnp.zeros(token.shape, bool) if eos_id is None else token == eos_id


def cached_step(model: Callable[..., Any]) -> StepFn:
    """The step function of a decoder-only model with a KV cache (``DecoderLM``'s call signature):
    one token per sequence through ``model(..., cache=cache)``."""

    def step(tokens, positions, cache):
        out = model(tokens=tokens[:, None], positions=positions[:, None],
                    input_mask=jnp.ones((tokens.shape[0], 1), bool), cache=cache)
        return out.logits[:, 0], out.hidden[:, 0], out.cache

    return step


def encoder_decoder_step(model: Any) -> StepFn:
    """The step function of an encoder-decoder model with a KV cache (``T5.decode``'s signature;
    the encoder output's cross-attention keys and values live in the cache): one token per
    sequence through ``model.decode(..., cache=cache)``."""

    def step(tokens, positions, cache):
        out = model.decode(tokens=tokens[:, None], positions=positions[:, None], cache=cache)
        return out.logits[:, 0], out.hidden[:, 0], out.cache

    return step


def recompute_step(model: Callable[..., Any], width: int) -> StepFn:
    """The official implementation's scheme, as a baseline for tests and benchmarks: no KV cache;
    every step re-runs the model over all ``width`` slots. Its "cache" is the token history,
    ``{"tokens": int32 [N, width], "valid": bool [N, width]}`` (see :func:`recompute_state`)."""

    def step(tokens, positions, cache):
        rows = jnp.arange(tokens.shape[0])
        history = cache["tokens"].at[rows, positions].set(tokens)
        valid = cache["valid"].at[rows, positions].set(True)
        out = model(tokens=history, positions=jnp.broadcast_to(jnp.arange(width), history.shape),
                    input_mask=valid)
        return (out.logits[rows, positions], out.hidden[rows, positions],
                {"tokens": history, "valid": valid})

    return step


def recompute_state(prompts: jax.Array, lengths: jax.Array, width: int) -> dict[str, jax.Array]:
    """The initial history for :func:`recompute_step`: right-padded ``prompts [N, P]`` with
    ``lengths [N]`` placed in ``width`` slots."""
    tokens = jnp.zeros((prompts.shape[0], width), jnp.int32).at[:, :prompts.shape[1]].set(prompts)
    return {"tokens": tokens, "valid": jnp.arange(width)[None] < lengths[:, None]}


def brevity_penalty(length: jax.Array | int, alpha: float) -> jax.Array:
    """GNMT's length normalizer ``((5 + L) / 6) ** alpha`` (Wu et al., 2016), as the official
    PixelLLM beam search; ``L`` counts the generated tokens including EOS."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Sets to ``-inf`` the logits outside the top-``k`` and outside the nucleus.

    ``logits: [..., V]``. ``top_k = 0`` keeps all; otherwise ties with the ``k``-th logit are kept.
    The nucleus (applied after top-k, on the renormalised distribution) is the smallest set of
    most likely tokens whose probability reaches ``top_p``; ``top_p = 1`` keeps all.
    """
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got {top_k} and {top_p}")
    if top_k:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(logits, axis=-1, descending=True)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # A token is in the nucleus when the tokens ranked above it hold less than top_p.
        keep_sorted = jnp.cumsum(probs, axis=-1) - probs < top_p
        keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def greedy_decode(step_fn: StepFn, *, logits: jax.Array, positions: jax.Array, cache: PyTree,
                  max_new_tokens: int, eos_id: int | None, pad_id: int = 0,
                  return_hidden: bool = False, suppress_repeat: bool = False,
                  last_tokens: jax.Array | None = None) -> DecodeOutput:
    """Greedy decoding: :func:`sample_decode` at temperature 0 (see there for the arguments)."""
    return sample_decode(step_fn, logits=logits, positions=positions, cache=cache, rng=None,
                         max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                         temperature=0.0, return_hidden=return_hidden,
                         suppress_repeat=suppress_repeat, last_tokens=last_tokens)


def sample_decode(step_fn: StepFn, *, logits: jax.Array, positions: jax.Array, cache: PyTree,
                  rng: jax.Array | None, max_new_tokens: int, eos_id: int | None, pad_id: int = 0,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  return_hidden: bool = False, suppress_repeat: bool = False,
                  last_tokens: jax.Array | None = None) -> DecodeOutput:
    """Samples up to ``max_new_tokens`` tokens per sequence.

    Args:
      step_fn: see the module docstring.
      logits: float [B, V] logits for the first new token (from the prefill).
      positions: int [B] position of the first new token of each sequence.
      cache: the prefilled cache, every leaf with B on axis 0.
      rng: a PRNG key (step ``t`` uses ``fold_in(rng, t)``); unused at temperature 0.
      temperature: logits are divided by it; 0 takes the argmax (greedy).
      top_k, top_p: restrict sampling to the top-k tokens and then to the nucleus
        (:func:`filter_logits`); both apply together when both are set.
      return_hidden: also return the [B, T, D] hidden states of the generated tokens.
      suppress_repeat: the official greedy's rule, pushing the logit of the previous token down to
        -1e4 so no token follows itself; ``last_tokens`` (int [B], the last prompt token) is then
        required for the first step.

    Returns:
      :class:`DecodeOutput`; ``scores`` sum ``log_softmax(logits)`` of the chosen tokens (EOS
      included) with the repeat rule applied but neither temperature nor filtering, i.e. the
      model's log-probability. The official greedy score is the mean over the word tokens:
      ``scores / max(number of non-EOS tokens, 1)``.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling at temperature > 0 needs an rng key")
    if suppress_repeat and last_tokens is None:
        raise ValueError("suppress_repeat needs last_tokens, the last prompt token per sequence")
    batch, vocab = logits.shape
    _check_batch(cache, positions, batch)
    hidden_spec = _hidden_spec(step_fn, positions, cache) if return_hidden else None
    positions = positions.astype(jnp.int32)
    steps = max_new_tokens

    def choose(logits, t):
        if temperature == 0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        filtered = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
        return jax.random.categorical(jax.random.fold_in(rng, t), filtered).astype(jnp.int32)

    def body(s: _SampleState) -> _SampleState:
        logits = s.logits
        if suppress_repeat:
            is_previous = jnp.arange(vocab)[None] == s.previous[:, None]
            logits = jnp.where(is_previous, jnp.minimum(logits, _REPEAT_LOGIT), logits)
        token = jnp.where(s.done, pad_id, choose(logits, s.t))
        log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
        word = ~s.done & ~_is_eos(token, eos_id)
        next_logits, hidden, cache = step_fn(token, positions + s.t, s.cache)
        hidden_buf = s.hidden
        if hidden_buf is not None:
            hidden_buf = hidden_buf.at[:, s.t].set(jnp.where(word[:, None], hidden, 0))
        return _SampleState(
            t=s.t + 1, tokens=s.tokens.at[:, s.t].set(token), hidden=hidden_buf,
            done=s.done | _is_eos(token, eos_id),
            lengths=s.lengths + (~s.done).astype(jnp.int32),
            scores=s.scores + jnp.where(s.done, 0.0, log_prob), previous=token,
            logits=next_logits.astype(jnp.float32), cache=cache)

    def cond(s: _SampleState) -> jax.Array:
        return (s.t < steps) & ~jnp.all(s.done)

    init = _SampleState(
        t=jnp.int32(0),
        tokens=jnp.full((batch, steps), pad_id, jnp.int32),
        hidden=None if hidden_spec is None else jnp.zeros(
            (batch, steps) + hidden_spec.shape[1:], hidden_spec.dtype),
        done=jnp.zeros((batch,), bool),
        lengths=jnp.zeros((batch,), jnp.int32),
        scores=jnp.zeros((batch,), jnp.float32),
        previous=(jnp.zeros((batch,), jnp.int32) if last_tokens is None
                  else last_tokens.astype(jnp.int32)),
        logits=logits.astype(jnp.float32),
        cache=cache)
    final = jax.lax.while_loop(cond, body, init)
    return DecodeOutput(tokens=final.tokens, lengths=final.lengths, scores=final.scores,
                        hidden=final.hidden)


def beam_search(step_fn: StepFn, *, logits: jax.Array, positions: jax.Array, cache: PyTree,
                beam_size: int, max_new_tokens: int, eos_id: int | None, pad_id: int = 0,
                alpha: float | jax.Array = 0.6, return_hidden: bool = False,
                return_all_beams: bool = False) -> DecodeOutput:
    """Beam search with the official PixelLLM / T5X scoring.

    A finished hypothesis of ``L`` tokens (EOS included) with summed log-probability ``s`` scores
    ``s / brevity_penalty(L, alpha)``. Each step expands the ``beam_size`` alive beams to their
    ``2 * beam_size`` best continuations by log-probability; the ones ending in EOS join the
    finished set (its best ``beam_size`` are kept), the best ``beam_size`` others stay alive. A
    batch element is done when no alive beam can still beat its best finished hypothesis (its
    worst, with ``return_all_beams``): with ``alpha >= 0`` an alive beam can at best score its
    current log-probability over ``brevity_penalty(max_new_tokens)``. As in the official code,
    beams cut off at ``max_new_tokens`` only count when nothing finished (they are scored with
    ``L = max_new_tokens``).

    Args:
      step_fn, positions, cache, max_new_tokens, eos_id, pad_id, return_hidden: as in
        :func:`sample_decode`; ``cache`` and ``logits`` ([B, V]) come from a prefill at batch B and
        are tiled over the beams here.
      beam_size: beams per batch element.
      alpha: brevity-penalty exponent (official: 0.6), >= 0; may be a traced scalar.
      return_all_beams: return every kept hypothesis, best first (outputs [B, beam_size, ...]);
        empty slots have score -inf, length 0 and pad tokens. Otherwise the best one ([B, ...]).
    """
    if max_new_tokens < 1 or beam_size < 1:
        raise ValueError(f"max_new_tokens and beam_size must be >= 1, got {max_new_tokens} and "
                         f"{beam_size}")
    if isinstance(alpha, (int, float)) and alpha < 0:
        raise ValueError(f"alpha must be >= 0 for the stopping rule to be exact, got {alpha}")
    batch, vocab = logits.shape
    _check_batch(cache, positions, batch)
    hidden_spec = _hidden_spec(step_fn, positions, cache) if return_hidden else None
    beams, steps = beam_size, max_new_tokens
    candidates = min(2 * beams, beams * vocab)
    positions = jnp.repeat(positions.astype(jnp.int32), beams, axis=0)
    cache = jax.tree.map(lambda leaf: jnp.repeat(leaf, beams, axis=0), cache)
    best_possible_penalty = brevity_penalty(steps, alpha)
    rows = jnp.arange(batch)[:, None]

    def gather(x, index):
        """``x: [B, M, ...]``, ``index: [B, M']`` -> ``[B, M', ...]``."""
        return None if x is None else x[rows, index]

    def body(s: _BeamState) -> _BeamState:
        t = s.t
        log_probs = jax.nn.log_softmax(s.logits).reshape(batch, beams, vocab)
        log_probs = (log_probs + s.alive_log_probs[..., None]).reshape(batch, beams * vocab)
        cand_log_probs, flat_index = jax.lax.top_k(log_probs, candidates)
        parent, token = flat_index // vocab, (flat_index % vocab).astype(jnp.int32)
        cand_tokens = gather(s.alive_tokens, parent).at[:, :, t].set(token)
        is_eos = _is_eos(token, eos_id)

        finished = is_eos & (cand_log_probs > -jnp.inf)
        cand_scores = jnp.where(finished, cand_log_probs / brevity_penalty(t + 1, alpha), -jnp.inf)
        fin_scores, keep = jax.lax.top_k(jnp.concatenate([s.fin_scores, cand_scores], axis=1),
                                         beams)
        fin_tokens = gather(jnp.concatenate([s.fin_tokens, cand_tokens], axis=1), keep)
        fin_lengths = gather(jnp.concatenate(
            [s.fin_lengths, jnp.full((batch, candidates), t + 1, jnp.int32)], axis=1), keep)
        fin_hidden = s.fin_hidden
        if fin_hidden is not None:
            # The EOS was not fed, so its slot in the parent's history is still zero.
            fin_hidden = gather(jnp.concatenate([fin_hidden, gather(s.alive_hidden, parent)],
                                                axis=1), keep)

        alive_log_probs, survivors = jax.lax.top_k(
            jnp.where(is_eos, -jnp.inf, cand_log_probs), beams)
        alive_parent = gather(parent, survivors)
        alive_tokens = gather(cand_tokens, survivors)
        flat_parent = (rows * beams + alive_parent).reshape(-1)
        cache = jax.tree.map(lambda leaf: jnp.take(leaf, flat_parent, axis=0), s.cache)
        logits, hidden, cache = step_fn(alive_tokens[:, :, t].reshape(-1), positions + t, cache)
        alive_hidden = s.alive_hidden
        if alive_hidden is not None:
            alive_hidden = gather(alive_hidden, alive_parent).at[:, :, t].set(
                hidden.reshape((batch, beams) + hidden.shape[1:]))
        return _BeamState(t=t + 1, alive_tokens=alive_tokens, alive_hidden=alive_hidden,
                          alive_log_probs=alive_log_probs, fin_tokens=fin_tokens,
                          fin_hidden=fin_hidden, fin_scores=fin_scores, fin_lengths=fin_lengths,
                          logits=logits.astype(jnp.float32), cache=cache)

    def cond(s: _BeamState) -> jax.Array:
        best_alive = s.alive_log_probs[:, 0] / best_possible_penalty
        reference = s.fin_scores[:, -1] if return_all_beams else s.fin_scores[:, 0]
        done = (s.alive_log_probs[:, 0] == -jnp.inf) | (reference >= best_alive)
        return (s.t < steps) & ~jnp.all(done)

    empty_hidden = None if hidden_spec is None else jnp.zeros(
        (batch, beams, steps) + hidden_spec.shape[1:], hidden_spec.dtype)
    init = _BeamState(
        t=jnp.int32(0),
        alive_tokens=jnp.full((batch, beams, steps), pad_id, jnp.int32),
        alive_hidden=empty_hidden,
        alive_log_probs=jnp.tile(jnp.array([0.0] + [-jnp.inf] * (beams - 1), jnp.float32),
                                 (batch, 1)),
        fin_tokens=jnp.full((batch, beams, steps), pad_id, jnp.int32),
        fin_hidden=empty_hidden,
        fin_scores=jnp.full((batch, beams), -jnp.inf, jnp.float32),
        fin_lengths=jnp.zeros((batch, beams), jnp.int32),
        logits=jnp.repeat(logits.astype(jnp.float32), beams, axis=0),
        cache=cache)
    final = jax.lax.while_loop(cond, body, init)
    t, alive_tokens, alive_hidden = final.t, final.alive_tokens, final.alive_hidden
    alive_log_probs, fin_tokens, fin_hidden = final.alive_log_probs, final.fin_tokens, final.fin_hidden
    fin_scores, fin_lengths = final.fin_scores, final.fin_lengths

    # Nothing finished (every beam ran to max_new_tokens): fall back to the alive beams.
    none_finished = (fin_scores[:, 0] == -jnp.inf)[:, None]
    alive_valid = alive_log_probs > -jnp.inf
    scores = jnp.where(none_finished, alive_log_probs / brevity_penalty(t, alpha), fin_scores)
    lengths = jnp.where(none_finished, jnp.where(alive_valid, t, 0), fin_lengths)
    valid = (scores > -jnp.inf)[..., None]
    tokens = jnp.where(valid, jnp.where(none_finished[..., None], alive_tokens, fin_tokens), pad_id)
    hidden = None
    if fin_hidden is not None:
        hidden = jnp.where(valid[..., None],
                           jnp.where(none_finished[..., None, None], alive_hidden, fin_hidden), 0)
    if not return_all_beams:
        tokens, lengths, scores = tokens[:, 0], lengths[:, 0], scores[:, 0]
        hidden = None if hidden is None else hidden[:, 0]
    return DecodeOutput(tokens=tokens, lengths=lengths, scores=scores, hidden=hidden)


def generate(lm: LanguageModel, *, prefix: jax.Array, prefix_mask: jax.Array, bos_id: int,
             max_new_tokens: int, eos_id: int | None, pad_id: int = 0, beam_size: int = 1,
             alpha: float | jax.Array = 0.6, temperature: float = 0.0,
             rng: jax.Array | None = None, top_k: int = 0, top_p: float = 1.0,
             return_hidden: bool = False, suppress_repeat: bool = False) -> DecodeOutput:
    """Generates text after ``prefix [N, P, D]`` (``prefix_mask [N, P]``) with any language model:
    prefills it and BOS (``lm.prefill``), then steps with ``lm.decode_step``.

    ``beam_size > 1`` runs :func:`beam_search` (brevity exponent ``alpha``); otherwise
    :func:`sample_decode` (``temperature`` 0: greedy; ``suppress_repeat`` treats BOS as the
    previous token of the first step). ``eos_id=None`` generates exactly ``max_new_tokens``.
    """
    start = lm.prefill(prefix=prefix, prefix_mask=prefix_mask, bos_id=bos_id,
                       max_new_tokens=max_new_tokens)
    common = dict(logits=start.logits, positions=start.positions, cache=start.cache,
                  max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                  return_hidden=return_hidden)
    if beam_size > 1:
        out = beam_search(lm.decode_step, beam_size=beam_size, alpha=alpha, **common)
    else:
        out = sample_decode(lm.decode_step, rng=rng, temperature=temperature, top_k=top_k,
                            top_p=top_p, suppress_repeat=suppress_repeat,
                            last_tokens=jnp.full(start.positions.shape, bos_id, jnp.int32),
                            **common)
    return out._replace(start_hidden=start.hidden) if return_hidden else out


def _check_batch(cache: PyTree, positions: jax.Array, batch: int) -> None:
    if positions.shape != (batch,):
        raise ValueError(f"positions must be [{batch}], got {positions.shape}")
    for path, leaf in jax.tree_util.tree_leaves_with_path(cache):
        if leaf.ndim == 0 or leaf.shape[0] != batch:
            raise ValueError(f"cache leaf {jax.tree_util.keystr(path)} has shape {leaf.shape}; "
                             f"every leaf needs the batch ({batch}) on axis 0")


def _hidden_spec(step_fn: StepFn, positions: jax.Array, cache: PyTree) -> jax.ShapeDtypeStruct:
    """Shape and dtype of ``step_fn``'s hidden output, from an abstract (free) trace."""
    tokens = jax.ShapeDtypeStruct(positions.shape, jnp.int32)
    return jax.eval_shape(step_fn, tokens, positions.astype(jnp.int32), cache)[1]
