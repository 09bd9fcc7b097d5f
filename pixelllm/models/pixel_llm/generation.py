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
from pixelllm.models.pixel_llm import text_model
from pixelllm.models.pixel_llm.pixel_llm import ImageFeatures, PixelLLM
from pixelllm.models.pixel_llm.point_head import to_canvas


class Generation(NamedTuple):
    """Generated text per slot, with its grounding.

    ``tokens [B, S, T]`` (EOS included, then ``pad_id``), ``lengths [B, S]`` (EOS counted),
    ``log_prob [B, S]`` the mean log-probability per generated token (greedy) or the
    length-penalised beam score, ``token_points [B, S, T, K, 2]`` canvas pixels,
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
             brevity_alpha: float = 0.6, suppress_repeat: bool = False,
             prompt_points: jax.Array | None = None) -> Generation:
    """Generates text for every slot (``prompt_boxes [B, S, 4]`` or ``prompt_points
    [B, S, P, 2]``, see :meth:`PixelLLM.visual_tokens`; ``context_* [B, S, Lc]``).

    ``beam_size == 1`` decodes greedily (``suppress_repeat`` is the official rule against an
    immediately repeated token); otherwise beam search with the official brevity penalty.
    """
    batch, slots = context_tokens.shape[:2]
    visual = model.visual_tokens(features, prompt_boxes, prompt_points=prompt_points)
    prefix, prefix_mask = model.prefix(visual, context_tokens, context_mask)
    start = text_model.start_decoding(model.lm, prefix=prefix, prefix_mask=prefix_mask,
                                      bos_id=bos_id, max_new_tokens=max_new_tokens)
    step = text_model.step_function(model.lm)
    common = dict(logits=start.logits, positions=start.positions, cache=start.cache,
                  max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                  return_hidden=True)
    if beam_size == 1:
        out = decoding.greedy_decode(step, suppress_repeat=suppress_repeat,
                                     last_tokens=jnp.full((batch * slots,), bos_id, jnp.int32),
                                     **common)
        log_prob = out.scores / jnp.maximum(out.lengths, 1)
    else:
        out = decoding.beam_search(step, beam_size=beam_size, alpha=brevity_alpha, **common)
        log_prob = out.scores

    head = model.point_head(out.hidden)
    steps = out.tokens.shape[1]
    wh = jnp.repeat(valid_wh, slots, axis=0)
    points = to_canvas(head.points, wh[:, None, None, :])
    ends_with_eos = jnp.take_along_axis(out.tokens, jnp.maximum(out.lengths - 1, 0)[:, None],
                                        axis=1)[:, 0] == eos_id
    words = out.lengths - ends_with_eos.astype(jnp.int32)
    valid = jnp.arange(steps)[None] < words[:, None]
    last_word = jnp.maximum(words - 1, 0)[:, None, None]
    boxes = to_canvas(jnp.take_along_axis(head.box, last_word, axis=1)[:, 0], wh)

    def per_slot(x):
        return x.reshape(batch, slots, *x.shape[1:])

    return Generation(tokens=per_slot(out.tokens), lengths=per_slot(out.lengths),
                      log_prob=per_slot(log_prob), token_points=per_slot(points),
                      token_points_valid=per_slot(valid), eos_boxes=per_slot(boxes))
