"""One inference entry per PixelLLM task. All take a canvas batch (``image [B, H, W, 3]`` 0-255,
``valid_wh [B, 2]``, see :mod:`pixelllm.models.pixel_llm.batch`) and tokenized task prompts; coordinates in
and out are canvas pixels. Each function is traceable under ``nnx.jit`` with the sizes static.

=============================  ============================  ===================================
task                           input                         output
=============================  ============================  ===================================
pixel-aligned captioning       context (caption prompt)      caption + points per word
captioning / VQA               context (prompt / question)   text
location-conditioned caption   boxes [B, S, 4] (or points)   caption per box
referring localization         expression (context + text)   box per expression
referring segmentation         expression                    box + mask per expression
dense object captioning        context ("an object of ")     proposals, their captions, scores
=============================  ============================  ===================================

Referring tasks read the box where the expression's EOS is emitted, with the expression as the
text (teacher forcing), as the official RefCOCO evaluation does.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pixelllm.models.pixel_llm.generation import Generation, generate
from pixelllm.models.pixel_llm.pixel_llm import PixelLLM, padding_mask
from pixelllm.nn.resize import resize_2d


class DecodeSettings(NamedTuple):
    """Token ids and search settings shared by the generating tasks."""
    bos_id: int
    eos_id: int
    pad_id: int
    max_new_tokens: int
    beam_size: int = 1
    brevity_alpha: float = 0.6
    suppress_repeat: bool = False


def whole_image_boxes(valid_wh: jax.Array, slots: int) -> jax.Array:
    """``[B, S, 4]`` boxes covering each valid image area (the global tasks' location prompt)."""
    boxes = jnp.concatenate([jnp.zeros_like(valid_wh), valid_wh], axis=-1)
    return jnp.broadcast_to(boxes[:, None], (valid_wh.shape[0], slots, 4))


def _generate(model, image, valid_wh, boxes, context_tokens, context_mask, settings):
    features = model.encode_image(image, valid_wh)
    return generate(model, features, valid_wh, prompt_boxes=boxes, context_tokens=context_tokens,
                    context_mask=context_mask, **settings._asdict())


def caption_with_traces(model: PixelLLM, image: jax.Array, valid_wh: jax.Array, *,
                        context_tokens: jax.Array, context_mask: jax.Array,
                        settings: DecodeSettings) -> Generation:
    """Pixel-aligned captioning: ``context_* [B, S, Lc]`` (S prompts per image, usually 1) ->
    captions with ``token_points`` for every word (whole-image location prompt)."""
    boxes = whole_image_boxes(valid_wh, context_tokens.shape[1])
    return _generate(model, image, valid_wh, boxes, context_tokens, context_mask, settings)


def caption(model: PixelLLM, image: jax.Array, valid_wh: jax.Array, *,
            context_tokens: jax.Array, context_mask: jax.Array,
            settings: DecodeSettings) -> Generation:
    """Plain captioning and VQA-style prompts ("Question: ... Answer: "); the text is the
    output (points are computed but carry no training signal unless the model learned traces)."""
    return caption_with_traces(model, image, valid_wh, context_tokens=context_tokens,
                               context_mask=context_mask, settings=settings)


def location_caption(model: PixelLLM, image: jax.Array, valid_wh: jax.Array, *,
                     context_tokens: jax.Array, context_mask: jax.Array,
                     settings: DecodeSettings, boxes: jax.Array | None = None,
                     points: jax.Array | None = None) -> Generation:
    """Location-conditioned captioning: a caption for each of ``boxes [B, S, 4]``, or for each
    set of ``points [B, S, P, 2]`` (PixelLLM trains on boxes; points use SAM's point prompt)."""
    features = model.encode_image(image, valid_wh)
    return generate(model, features, valid_wh, prompt_boxes=boxes, prompt_points=points,
                    context_tokens=context_tokens, context_mask=context_mask,
                    **settings._asdict())


class Referring(NamedTuple):
    """``boxes [B, S, 4]`` canvas pixels; ``masks [B, S, H, W]`` bool on the canvas (False on
    padding) and ``mask_scores [B, S]`` SAM's predicted IoU, or None for localization only."""
    boxes: jax.Array
    masks: jax.Array | None
    mask_scores: jax.Array | None


def refer(model: PixelLLM, image: jax.Array, valid_wh: jax.Array, *,
          context_tokens: jax.Array, context_mask: jax.Array, text_tokens: jax.Array,
          text_mask: jax.Array, segment: bool) -> Referring:
    """Referring localization (and segmentation with ``segment``).

    ``context_*``: "where is <expression>" tokens; ``text_*``: BOS + expression + EOS.
    """
    features = model.encode_image(image, valid_wh)
    slots = model.run_slots(features, valid_wh,
                            prompt_boxes=whole_image_boxes(valid_wh, text_tokens.shape[1]),
                            context_tokens=context_tokens, context_mask=context_mask,
                            text_tokens=text_tokens, text_mask=text_mask, with_masks=segment)
    if not segment:
        return Referring(boxes=slots.eos_boxes, masks=None, mask_scores=None)
    height, width = image.shape[1:3]
    logits = resize_2d(slots.masks[..., None], (height, width), mode="linear")[..., 0]
    masks = (logits > 0) & padding_mask(valid_wh, (height, width))[:, None]
    return Referring(boxes=slots.eos_boxes, masks=masks, mask_scores=slots.mask_iou)


class DenseCaptions(NamedTuple):
    """``boxes [B, k, 4]`` canvas pixels, ``scores [B, k]`` = sqrt(proposal score x exp(mean
    log-probability of the caption)) as the official rescoring, ``proposal_scores [B, k]``, and
    the captions (:class:`Generation` over the k proposals)."""
    boxes: jax.Array
    scores: jax.Array
    proposal_scores: jax.Array
    captions: Generation


def dense_caption(model: PixelLLM, image: jax.Array, valid_wh: jax.Array, *,
                  context_tokens: jax.Array, context_mask: jax.Array, top_k: int,
                  settings: DecodeSettings) -> DenseCaptions:
    """Dense object captioning: the proposal head's ``top_k`` boxes become location prompts.

    ``context_* [B, Lc]``: the dense-captioning prompt ("an object of "), shared by the boxes.
    """
    if model.proposal_head is None:
        raise ValueError("this model has no proposal head (config.model.proposal_head is None)")
    features = model.encode_image(image, valid_wh)
    _, boxes, proposal_scores = model.propose(features, valid_wh, top_k)
    context = jnp.repeat(context_tokens[:, None], top_k, axis=1)
    mask = jnp.repeat(context_mask[:, None], top_k, axis=1)
    captions = generate(model, features, valid_wh, prompt_boxes=boxes, context_tokens=context,
                        context_mask=mask, **settings._asdict())
    scores = jnp.sqrt(proposal_scores * jnp.exp(captions.log_prob))
    return DenseCaptions(boxes=boxes, scores=scores, proposal_scores=proposal_scores,
                         captions=captions)
