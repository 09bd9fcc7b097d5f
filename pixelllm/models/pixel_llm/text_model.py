"""One interface to PixelLLM's two kinds of language model: decoder-only (Llama/Gemma,
:class:`~pixelllm.language.decoder.DecoderLM`) and encoder-decoder (Flan-T5, :class:`~pixelllm.language.t5.T5`).

The *prefix* is what conditions the text: the slot's visual tokens followed by its context tokens
(the task prompt), ``[N, P, D]`` embeddings with a mask ``[N, P]``. A decoder-only model reads
``[prefix | text]`` as one sequence; positions count valid inputs only (``cumsum(mask) - 1``), so
padding inside the prefix leaves no gap and the KV-cached decoder sees the same positions as teacher
forcing. T5 encodes the prefix and decodes the text.

Text tokens are ``[BOS, w_1, ..., w_n, EOS, pad...]`` (T5's BOS is its decoder start id). At
position ``t`` the model's input is token ``t``: ``logits[:, t]`` predict token ``t + 1`` and
``hidden[:, t]`` is the state *of* token ``t`` (its trace points are read there, as the official
point head).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pixelllm.language import decoding
from pixelllm.language.decoder import DecoderLM
from pixelllm.language.t5 import T5

LanguageModel = DecoderLM | T5


class TextOutput(NamedTuple):
    """``logits: float32 [N, L, V]``, ``hidden: [N, L, D]`` (after the final norm)."""
    logits: jax.Array
    hidden: jax.Array


def width(lm: LanguageModel) -> int:
    """The residual width D the visual tokens must have."""
    return lm.config.d_model if isinstance(lm, T5) else lm.config.hidden_size


def _positions(mask: jax.Array) -> jax.Array:
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def teacher_forced(lm: LanguageModel, *, prefix: jax.Array, prefix_mask: jax.Array,
                   tokens: jax.Array, token_mask: jax.Array,
                   rngs: nnx.Rngs | None = None) -> TextOutput:
    """Runs the text ``tokens [N, L]`` (``token_mask [N, L]``) after ``prefix [N, P, D]``.

    ``rngs`` enables dropout where the model has it (T5); decoder-only models have none.
    """
    prefix_mask = prefix_mask.astype(bool)
    token_mask = token_mask.astype(bool)
    if isinstance(lm, T5):
        encoded = lm.encode(embeddings=prefix, input_mask=prefix_mask, rngs=rngs)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        out = lm.decode(tokens=tokens, positions=positions, encoded=encoded,
                        encoder_mask=prefix_mask, rngs=rngs)
        return TextOutput(out.logits, out.hidden)
    text = lm.embed(tokens)
    sequence = jnp.concatenate([prefix.astype(text.dtype), text], axis=1)
    mask = jnp.concatenate([prefix_mask, token_mask], axis=1)
    out = lm(embeddings=sequence, positions=_positions(mask), input_mask=mask)
    start = prefix.shape[1]
    return TextOutput(out.logits[:, start:], out.hidden[:, start:])


class DecodeStart(NamedTuple):
    """What the decoding loops of :mod:`pixelllm.language.decoding` start from: the cache after
    the prefix and BOS, the logits for the first text token ``[N, V]``, and its position ``[N]``."""
    cache: dict
    logits: jax.Array
    positions: jax.Array


def start_decoding(lm: LanguageModel, *, prefix: jax.Array, prefix_mask: jax.Array,
                   bos_id: int, max_new_tokens: int) -> DecodeStart:
    """Prefills the cache with ``prefix [N, P, D]`` (``prefix_mask [N, P]``) and BOS.

    A decoder-only cache holds ``P + 1 + max_new_tokens`` slots. The prefix is compacted first
    (valid inputs moved to the front, order kept) because the cache takes right-padded inputs.
    """
    n = prefix.shape[0]
    prefix_mask = prefix_mask.astype(bool)
    bos = jnp.full((n, 1), bos_id, jnp.int32)
    if isinstance(lm, T5):
        encoded = lm.encode(embeddings=prefix, input_mask=prefix_mask)
        cache = lm.init_cache(encoded, prefix_mask, max_new_tokens + 1)
        out = lm.decode(tokens=bos, positions=jnp.zeros((n, 1), jnp.int32), cache=cache)
        return DecodeStart(out.cache, out.logits[:, 0], jnp.ones((n,), jnp.int32))
    order = jnp.argsort(~prefix_mask, axis=1, stable=True)
    compact = jnp.take_along_axis(prefix, order[..., None], axis=1)
    compact_mask = jnp.take_along_axis(prefix_mask, order, axis=1)
    lengths = compact_mask.sum(axis=1, dtype=jnp.int32)
    cache = lm.init_cache(n, prefix.shape[1] + 1 + max_new_tokens)
    out = lm(embeddings=compact, positions=_positions(compact_mask), input_mask=compact_mask,
             cache=cache)
    out = lm(tokens=bos, positions=lengths[:, None], input_mask=jnp.ones((n, 1), bool),
             cache=out.cache)
    return DecodeStart(out.cache, out.logits[:, 0], lengths + 1)


def step_function(lm: LanguageModel) -> decoding.StepFn:
    """One token per sequence through the cache (see :mod:`pixelllm.language.decoding`)."""
    if isinstance(lm, T5):
        def step(tokens, positions, cache):
            out = lm.decode(tokens=tokens[:, None], positions=positions[:, None], cache=cache)
            return out.logits[:, 0], out.hidden[:, 0], out.cache
        return step
    return decoding.cached_step(lm)
