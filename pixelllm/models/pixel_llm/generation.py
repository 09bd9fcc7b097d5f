"""Text generation for caption slots, with each generated word's points and the EOS box.

Decoding uses the KV cache (:mod:`pixelllm.language.decoding`): the official implementation
re-ran the whole language model for every new token. Greedy decoding or beam search returns the
hidden state of each generated token, which is exactly what teacher forcing on the generated text
would give, so the point head reads it directly (the official code re-ran the decoder once more).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pixelllm.language import decoding
from pixelllm.models.pixel_llm.pixel_llm import ImageFeatures, PixelLLM
from pixelllm.models.pixel_llm.point_head import to_canvas

# What the greedy score's summed log-probability is divided by (see generate).
SCORE_NORMALIZATIONS = ("words", "tokens")


class Generation(NamedTuple):
    """Generated text per slot, with its grounding.

    ``tokens [B, S, T]`` (EOS included, then ``pad_id``; with ``fixed_length`` every generated
    token), ``lengths [B, S]`` (EOS counted),
    ``log_prob [B, S]`` the greedy score (the summed log-probability of the generated tokens, EOS
    included, over the count that ``score_normalization`` names) or the length-penalised beam
    score, ``token_points [B, S, T, K, 2]`` canvas pixels,
    ``token_points_valid [B, S, T]`` (word tokens: before EOS), ``eos_boxes [B, S, 4]`` canvas
    pixels, read at the token that emits EOS.
    """
    tokens: jax.Array
    lengths: jax.Array
    log_prob: jax.Array
    token_points: jax.Array
    token_points_valid: jax.Array
    eos_boxes: jax.Array


def generate(model: PixelLLM, features: ImageFeatures, valid_wh: jax.Array, *,
             prompt_boxes: jax.Array | None, context_tokens: jax.Array, context_mask: jax.Array,
             bos_id: int, eos_id: int, pad_id: int, max_new_tokens: int, beam_size: int = 1,
             brevity_alpha: float = 0.6, suppress_repeat: bool = True,
             score_normalization: str = "words", fixed_length: bool = False,
             prompt_points: jax.Array | None = None) -> Generation:
    """Generates text for every slot (``prompt_boxes [B, S, 4]`` or ``prompt_points
    [B, S, P, 2]``, see :meth:`PixelLLM.visual_tokens`; ``context_* [B, S, Lc]``).

    ``beam_size == 1`` decodes greedily (``suppress_repeat`` is the official rule against an
    immediately repeated token, always on in the official decoder); otherwise beam search with
    the official brevity penalty. The greedy score divides the summed log-probability (EOS
    included) by the number of words, ``"words"`` (official, scenic
    ``auto_regressive_decode.greedy_decode``), or of generated tokens EOS included,
    ``"tokens"`` (a true mean, an extension).

    ``fixed_length`` decodes exactly ``max_new_tokens`` tokens per slot with nothing ending a
    text: the loop carries no stopping test, ``eos_id`` is an ordinary token, ``lengths`` are
    ``max_new_tokens``, every token's points are valid, the box is read at the last token and
    the greedy score counts every token. The caller cuts each text at its first ``eos_id``
    (greedy: up to there the tokens are those of the early-stopping decode). Timings then
    measure a known amount of work, as the official harness's fixed-length greedy decoding does.
    """
    if score_normalization not in SCORE_NORMALIZATIONS:
        raise ValueError(f"score_normalization {score_normalization!r}; choose from "
                         f"{SCORE_NORMALIZATIONS}")
    batch, slots = context_tokens.shape[:2]
    visual = model.visual_tokens(features, prompt_boxes, prompt_points=prompt_points)
    prefix, prefix_mask = model.prefix(visual, context_tokens, context_mask)
    out = decoding.generate(model.lm, prefix=prefix, prefix_mask=prefix_mask, bos_id=bos_id,
                            max_new_tokens=max_new_tokens,
                            eos_id=None if fixed_length else eos_id, pad_id=pad_id,
                            beam_size=beam_size, alpha=brevity_alpha,
                            suppress_repeat=suppress_repeat, return_hidden=True)
    # BOS's state first: it emits EOS when the text is empty (as eos_positions in training).
    head = model.point_head(jnp.concatenate([out.start_hidden[:, None], out.hidden], axis=1))
    steps = out.tokens.shape[1]
    wh = jnp.repeat(valid_wh, slots, axis=0)
    points = to_canvas(head.points[:, 1:], wh[:, None, None, :])
    if fixed_length:
        words = out.lengths
    else:
        ends_with_eos = jnp.take_along_axis(
            out.tokens, jnp.maximum(out.lengths - 1, 0)[:, None], axis=1)[:, 0] == eos_id
        words = out.lengths - ends_with_eos.astype(jnp.int32)
    count = words if score_normalization == "words" else out.lengths
    log_prob = out.scores if beam_size > 1 else out.scores / jnp.maximum(count, 1)
    valid = jnp.arange(steps)[None] < words[:, None]
    # Index into [BOS | generated]: the last word, or BOS for an empty text.
    emitter = words[:, None, None]
    boxes = to_canvas(jnp.take_along_axis(head.box, emitter, axis=1)[:, 0], wh)

    def per_slot(x):
        return x.reshape(batch, slots, *x.shape[1:])

    return Generation(tokens=per_slot(out.tokens), lengths=per_slot(out.lengths),
                      log_prob=per_slot(log_prob), token_points=per_slot(points),
                      token_points_valid=per_slot(valid), eos_boxes=per_slot(boxes))
