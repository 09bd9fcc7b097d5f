"""F-LMM's grounding signal from one teacher-forced forward of the frozen multimodal model.

**Attention maps** (F-LMM's ``FrozenLlavaSAM._forward``). For every layer and head, the
post-softmax attention of the caption's query tokens over the image's key columns (the
probabilities as the model computed them over all keys, not renormalised over the image), reshaped
to the image grid; per phrase the mean over its tokens; layers x heads concatenated layer-major
(channel ``layer * H + head``) -> ``[M, layers * H, h, w]`` per image (1024 channels, 24 x 24 for
LLaVA-1.5-7B).

*Memory*: the language model returns, per requested layer, its text rows over all keys
(``[N, H, L, K]``). :func:`phrase_attention_maps` cuts each layer to its ``T`` image columns and
reduces the rows to the phrases (``[N, M, H, T]``) before touching the next layer, so what it
keeps is ``layers x N x M x H x T``; no ``[L, K]`` matrix is needed past its own layer, and under
``jit`` XLA frees each once its layer is reduced. The decoder itself still forms each layer's full
probabilities (its softmax needs them) and, with ``scan_layers``, stacks all layers' rows over
the whole sequence before they are cut; bounding that too needs the decoder to slice per layer.

**Phrases** are token spans ``[start, end)`` over the text positions, ``[N, M, 2]`` with a
validity mask ``[N, M]`` (``M`` static): for :class:`~pixelllm.models.flmm.llava.Llava` caption
token ``i`` is text position ``CAPTION_START + i`` (:func:`llava_grounding` shifts caption spans).
An invalid or empty phrase gets all-zero maps.

**Text states for the refiner.** F-LMM mixes ``hidden_states[-layers:]`` of transformers 4.39's
Llama (the residual stream after blocks ``0 .. layers-2`` and, last, the final norm's output)
with ``softmax(text_layer_weights)`` (one learned scalar per layer, initialised to ones) and
projects every token of a phrase to SAM's width (the mix and projection are
:class:`~pixelllm.models.flmm.flmm.FlmmHead`'s; :func:`phrase_tokens` gathers the tokens).
The decoder returns exactly those states (``hidden_layers=Llava.flmm_hidden_layers``), so
:func:`llava_grounding` takes the maps and every phrase token's per-layer states, the
refiner's ``text_hidden [N, M, S, layers, D]`` (mixed there), from one forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pixelllm.models.flmm.llava import CAPTION_START, Llava, LlavaInputs, stack_hidden_states

_HIGHEST = jax.lax.Precision.HIGHEST


def phrase_weights(spans: jax.Array, valid: jax.Array, length: int) -> jax.Array:
    """``spans [N, M, 2]`` (``[start, end)`` text positions), ``valid [N, M]`` -> float32
    ``[N, M, length]``: ``1 / count`` on each valid phrase's positions, 0 elsewhere (so a
    contraction with it is the mean over the phrase's tokens)."""
    positions = jnp.arange(length)
    inside = ((positions >= spans[..., :1]) & (positions < spans[..., 1:])
              & valid.astype(bool)[..., None])
    count = inside.sum(axis=-1, keepdims=True)
    return inside.astype(jnp.float32) / jnp.maximum(count, 1).astype(jnp.float32)


def phrase_attention_maps(attention: Mapping[int, jax.Array], weights: jax.Array, *,
                          image_columns: tuple[int, int], grid: tuple[int, int]) -> jax.Array:
    """Per phrase, every layer's and head's attention over the image grid.

    Args:
      attention: ``{layer: [N, H, L, K]}`` post-softmax probabilities of the text rows over all
        keys (:class:`~pixelllm.language.interface.TextOutput`); layers are taken in
        increasing order.
      weights: ``[N, M, L]`` from :func:`phrase_weights`.
      image_columns: ``(start, stop)`` of the ``h * w`` image keys, row-major over the grid.
      grid: ``(h, w)``.

    Returns:
      float32 ``[N, M, layers * H, h, w]``, channel ``layer_index * H + head``.
    """
    start, stop = image_columns
    if stop - start != grid[0] * grid[1]:
        raise ValueError(f"image columns {image_columns} do not cover a {grid} grid")
    maps = []
    for layer in sorted(attention):
        image = attention[layer][..., start:stop].astype(jnp.float32)  # [N, H, L, T]
        maps.append(jnp.einsum("nml,nhlt->nmht", weights, image, precision=_HIGHEST))
    stacked = jnp.concatenate(maps, axis=2)
    return stacked.reshape(*stacked.shape[:3], *grid)


class PhraseTokens(NamedTuple):
    """``states [N, M, S, ...]``: the phrase's tokens in order, ``mask [N, M, S]`` which are
    real."""
    states: jax.Array
    mask: jax.Array


def phrase_tokens(hidden: jax.Array, spans: jax.Array, valid: jax.Array, *,
                  max_tokens: int) -> PhraseTokens:
    """Every token state of each phrase (F-LMM's ``hidden_states[matched]``, which become SAM's
    text prompt tokens), in ``max_tokens`` static slots. ``hidden [N, L, ...]`` (e.g. ``[N, L,
    D]``, or ``[N, L, layers, D]`` from :func:`~pixelllm.models.flmm.llava.stack_hidden_states`),
    ``spans [N, M, 2]`` text positions, ``valid [N, M]``; a phrase longer than ``max_tokens`` is
    cut."""
    index = spans[..., :1] + jnp.arange(max_tokens)  # [N, M, S]
    mask = (index < spans[..., 1:]) & valid.astype(bool)[..., None]
    index = jnp.where(mask, index, 0)
    batch, slots = index.shape[:2]
    states = jax.vmap(lambda h, i: h[i])(hidden, index.reshape(batch, -1))
    states = states.reshape(batch, slots, max_tokens, *hidden.shape[2:])
    keep = mask.reshape(*mask.shape, *(1,) * (hidden.ndim - 2))
    return PhraseTokens(states=jnp.where(keep, states, 0).astype(hidden.dtype), mask=mask)


class LlavaGrounding(NamedTuple):
    """What F-LMM's head reads from one LLaVA forward, per phrase: ``maps [N, M, layers * H, h,
    w]`` (:func:`phrase_attention_maps`), ``text_hidden [N, M, S, layers, D]`` every phrase
    token's states of the layers F-LMM mixes and ``text_valid [N, M, S]`` which tokens are real
    (:class:`~pixelllm.models.flmm.flmm.FlmmHeadInputs`' ``text_hidden`` / ``text_valid``)."""
    maps: jax.Array
    text_hidden: jax.Array
    text_valid: jax.Array


def llava_grounding(model: Llava, inputs: LlavaInputs, *, caption_spans: jax.Array,
                    valid: jax.Array, max_tokens: int) -> LlavaGrounding:
    """F-LMM's attention maps of one teacher-forced LLaVA forward over every layer, and the
    phrase tokens' hidden states (``hidden_states[-layers:]``, :attr:`Llava.flmm_hidden_layers`)
    from the same forward, without gradient (the LMM is frozen and F-LMM runs it under
    ``no_grad``). ``caption_spans [N, M, 2]`` in caption tokens, ``valid [N, M]``; ``max_tokens``
    (static) token slots per phrase."""
    out = model(inputs, attention_layers=range(model.language_model.config.num_layers),
                hidden_layers=model.flmm_hidden_layers)
    spans = caption_spans + CAPTION_START
    maps = phrase_attention_maps(out.attention,
                                 phrase_weights(spans, valid, inputs.tokens.shape[1]),
                                 image_columns=model.image_columns(inputs), grid=model.grid)
    tokens = phrase_tokens(stack_hidden_states(out.hidden_states), spans, valid,
                           max_tokens=max_tokens)
    return jax.lax.stop_gradient(LlavaGrounding(maps=maps, text_hidden=tokens.states,
                                                text_valid=tokens.mask))
