"""The inference entry of every task of the task table (:mod:`pixelllm.tasks`, whose rows name
these functions; :func:`for_task` looks one up). All take a canvas batch (``image [B, H, W, 3]``
0-255, ``valid_wh [B, 2]``, see :mod:`pixelllm.batch`) and tokenized task prompts; coordinates in
and out are canvas pixels. Each function is traceable under ``nnx.jit`` with the sizes static.

=============================  ============================  ===================================
entry                          input                         output
=============================  ============================  ===================================
caption_with_traces            context (caption prompt)      caption + points per word
caption                        context (prompt / question)   text
location_caption               boxes [B, S, 4] (or points)   caption per box
refer                          expression (context + text)   box per expression
refer_segment                  expression                    box + mask per expression
dense_caption                  context ("an object of ")     detections, captions, scores
=============================  ============================  ===================================

Referring tasks read the box where the expression's EOS is emitted, with the expression as the
text (teacher forcing), as the official RefCOCO evaluation does.

:func:`generate` is the one decoding entry under the generating tasks: image and prompt in, the
encoders, the language model's prefill and the decoding loop inside one traceable function
(``DecodeSettings.fixed_length``: exactly ``max_new_tokens`` tokens, no stopping test).
:func:`compile_entry` jits any entry over the model's split state (``nnx.split``), so a call
costs one ``jax.jit`` dispatch and no NNX graph traversal.

Two entries need a module a model may lack (``config.model.<module>`` None, as in the training
stages whose official counterpart does not build it, ``configs/stages.py``): ``refer_segment`` the
mask adapter, ``dense_caption`` the proposal head (:data:`NEEDED_MODULES`). They refuse such a
model with a ``ValueError`` naming the config field (:func:`check_modules`), before any
computation; :func:`missing_modules` tells a caller beforehand, from a model or its config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pixelllm import tasks
from pixelllm.models.pixel_llm import generation
from pixelllm.models.pixel_llm.generation import Generation
from pixelllm.models.pixel_llm.pixel_llm import PixelLLM


# The optional modules of PixelLLM (config.model.<module>: None builds none) each entry needs.
NEEDED_MODULES = {"refer_segment": ("mask_adapter",), "dense_caption": ("proposal_head",)}


def missing_modules(model: Any, task: str) -> tuple[str, ...]:
    """The modules task ``task``'s inference entry needs that ``model`` lacks: ``model`` is a
    PixelLLM or its config (``config.model``); a module is missing where it is None."""
    needed = NEEDED_MODULES.get(tasks.get(task).inference, ())
    return tuple(module for module in needed if getattr(model, module, None) is None)


def missing_message(task: str, missing: tuple[str, ...]) -> str:
    """Why task ``task`` cannot run on a model lacking the ``missing`` modules."""
    fields = " and ".join(f"config.model.{module}" for module in missing)
    return (f"task {task!r} cannot run on this model: {fields} is None (the module is not "
            "built; configs/stages.py leaves out what the official stage does not build)")


def check_modules(model: Any, task: str) -> None:
    """Raises ``ValueError`` naming ``config.model.<module>`` when ``model`` (a PixelLLM or its
    config) lacks a module task ``task`` needs."""
    missing = missing_modules(model, task)
    if missing:
        raise ValueError(missing_message(task, missing))


class DecodeSettings(NamedTuple):
    """Token ids and search settings shared by the generating tasks (the arguments of
    :func:`~pixelllm.models.pixel_llm.generation.generate`). The defaults are the official
    decoder's: greedy with the previous token suppressed, scores over the number of words,
    stopping at EOS (``fixed_length``: exactly ``max_new_tokens`` tokens, cut by the caller)."""
    bos_id: int
    eos_id: int
    pad_id: int
    max_new_tokens: int
    beam_size: int = 1
    brevity_alpha: float = 0.6
    suppress_repeat: bool = True
    score_normalization: str = "words"
    fixed_length: bool = False


def whole_image_boxes(valid_wh: jax.Array, slots: int) -> jax.Array:
    """``[B, S, 4]`` boxes covering each valid image area (the global tasks' location prompt)."""
    boxes = jnp.concatenate([jnp.zeros_like(valid_wh), valid_wh], axis=-1)
    return jnp.broadcast_to(boxes[:, None], (valid_wh.shape[0], slots, 4))


def generate(model: PixelLLM, image: jax.Array, valid_wh: jax.Array, *,
             context_tokens: jax.Array, context_mask: jax.Array, settings: DecodeSettings,
             boxes: jax.Array | None = None, points: jax.Array | None = None) -> Generation:
    """Text from an image and a prompt: encodes ``image [B, H, W, 3]`` (0-255, ``valid_wh
    [B, 2]``), builds each slot's prefix from its location prompt and ``context_* [B, S, Lc]``,
    prefills the language model and decodes (``generation.generate``, the ``settings``). The
    location prompt is ``boxes [B, S, 4]``, or ``points [B, S, P, 2]``, or (neither given) the
    whole valid image."""
    if boxes is None and points is None:
        boxes = whole_image_boxes(valid_wh, context_tokens.shape[1])
    features = model.encode_image(image, valid_wh)
    return generation.generate(model, features, valid_wh, prompt_boxes=boxes,
                               prompt_points=points, context_tokens=context_tokens,
                               context_mask=context_mask, **settings._asdict())


def caption_with_traces(model: PixelLLM, image: jax.Array, valid_wh: jax.Array, *,
                        context_tokens: jax.Array, context_mask: jax.Array,
                        settings: DecodeSettings) -> Generation:
    """Pixel-aligned captioning: ``context_* [B, S, Lc]`` (S prompts per image, usually 1) ->
    captions with ``token_points`` for every word (whole-image location prompt)."""
    return generate(model, image, valid_wh, context_tokens=context_tokens,
                    context_mask=context_mask, settings=settings)


def caption(model: PixelLLM, image: jax.Array, valid_wh: jax.Array, *,
            context_tokens: jax.Array, context_mask: jax.Array,
            settings: DecodeSettings) -> Generation:
    """Plain captioning and VQA-style prompts (:func:`pixelllm.tasks.question_prompt`); the text is the
    output (points are computed but carry no training signal unless the model learned traces)."""
    return generate(model, image, valid_wh, context_tokens=context_tokens,
                    context_mask=context_mask, settings=settings)


def location_caption(model: PixelLLM, image: jax.Array, valid_wh: jax.Array, *,
                     context_tokens: jax.Array, context_mask: jax.Array,
                     settings: DecodeSettings, boxes: jax.Array | None = None,
                     points: jax.Array | None = None) -> Generation:
    """Location-conditioned captioning: a caption for each of ``boxes [B, S, 4]``, or for each
    set of ``points [B, S, P, 2]`` (PixelLLM trains on boxes; points use SAM's point prompt)."""
    if (boxes is None) == (points is None):
        raise ValueError("location_caption: pass exactly one of boxes and points")
    return generate(model, image, valid_wh, context_tokens=context_tokens,
                    context_mask=context_mask, settings=settings, boxes=boxes, points=points)


class Referring(NamedTuple):
    """``boxes [B, S, 4]`` canvas pixels; with segmentation, ``mask_logits [B, S, h, w]``
    SAM's low-resolution logits over the whole canvas (4x its embedding grid: H/4 at patch 16) (masks are made from them at the original size, as the
    official evaluator does: :func:`pixelllm.evaluators.refcoco.mask_logits_to_original`) and
    ``mask_scores [B, S]`` SAM's predicted IoU; both None for localization only."""
    boxes: jax.Array
    mask_logits: jax.Array | None
    mask_scores: jax.Array | None


def _refer(model: PixelLLM, image: jax.Array, valid_wh: jax.Array, *,
           context_tokens: jax.Array, context_mask: jax.Array, text_tokens: jax.Array,
           text_mask: jax.Array, segment: bool) -> Referring:
    features = model.encode_image(image, valid_wh)
    slots = model.run_slots(features, valid_wh,
                            prompt_boxes=whole_image_boxes(valid_wh, text_tokens.shape[1]),
                            context_tokens=context_tokens, context_mask=context_mask,
                            text_tokens=text_tokens, text_mask=text_mask, with_masks=segment)
    if not segment:
        return Referring(boxes=slots.eos_boxes, mask_logits=None, mask_scores=None)
    return Referring(boxes=slots.eos_boxes, mask_logits=slots.masks, mask_scores=slots.mask_iou)


def refer(model: PixelLLM, image: jax.Array, valid_wh: jax.Array, *,
          context_tokens: jax.Array, context_mask: jax.Array, text_tokens: jax.Array,
          text_mask: jax.Array) -> Referring:
    """Referring localization: a box per expression (``masks`` None).

    ``context_*``: "where is <expression>" tokens; ``text_*``: BOS + expression + EOS.
    """
    return _refer(model, image, valid_wh, context_tokens=context_tokens,
                  context_mask=context_mask, text_tokens=text_tokens, text_mask=text_mask,
                  segment=False)


def refer_segment(model: PixelLLM, image: jax.Array, valid_wh: jax.Array, *,
                  context_tokens: jax.Array, context_mask: jax.Array, text_tokens: jax.Array,
                  text_mask: jax.Array) -> Referring:
    """Referring segmentation: as :func:`refer`, plus SAM's mask of the EOS box with the mask
    adapter's language context (``ValueError`` for a model without a mask adapter)."""
    check_modules(model, "refseg")
    return _refer(model, image, valid_wh, context_tokens=context_tokens,
                  context_mask=context_mask, text_tokens=text_tokens, text_mask=text_mask,
                  segment=True)


class DenseCaptions(NamedTuple):
    """``boxes [B, N, 4]`` canvas pixels (the detector's ``N`` detections), ``scores [B, N]``,
    ``detector_scores [B, N]``, ``valid [B, N]`` (False: padding, fewer detections survived)
    and the captions (:class:`Generation` over the ``N`` boxes). ``scores`` are the detector's
    (official), or ``sqrt(detector score x exp(caption score))`` with
    ``config.model.dense_captioning.mult_caption_score`` (the official ``rescore_detections``;
    boxes keep their order)."""
    boxes: jax.Array
    scores: jax.Array
    detector_scores: jax.Array
    valid: jax.Array
    captions: Generation


def rescore_by_caption(detector_scores: jax.Array, caption_log_prob: jax.Array) -> jax.Array:
    """The official ``rescore_detections`` (greedy): ``sqrt(max(score, 0) x exp(caption
    score))``, shapes ``[B, N]``."""
    return jnp.sqrt(jnp.maximum(detector_scores, 0.0) * jnp.exp(caption_log_prob))


def dense_caption(model: PixelLLM, image: jax.Array, valid_wh: jax.Array, *,
                  context_tokens: jax.Array, context_mask: jax.Array,
                  settings: DecodeSettings) -> DenseCaptions:
    """Dense object captioning: the detector's boxes become location prompts.

    ``context_* [B, Lc]``: the dense-captioning prompt ("an object of "), shared by the boxes.
    ``ValueError`` for a model without a proposal head.
    """
    check_modules(model, "densecap")
    features = model.encode_image(image, valid_wh)
    detections = model.proposal_head.detect(features.fused, valid_wh=valid_wh)
    count = detections.boxes.shape[1]
    context = jnp.repeat(context_tokens[:, None], count, axis=1)
    mask = jnp.repeat(context_mask[:, None], count, axis=1)
    captions = generation.generate(model, features, valid_wh, prompt_boxes=detections.boxes,
                                   context_tokens=context, context_mask=mask,
                                   **settings._asdict())
    scores = detections.scores
    if model.dense_captioning.get("mult_caption_score", False):
        scores = rescore_by_caption(scores, captions.log_prob)
    return DenseCaptions(boxes=detections.boxes, scores=scores,
                         detector_scores=detections.scores, valid=detections.valid,
                         captions=captions)


def compile_entry(entry: Callable[..., Any], graphdef: nnx.GraphDef, **static: Any
                  ) -> Callable[[nnx.State, dict[str, jax.Array]], Any]:
    """``entry`` (a function of this module, or one with its signature) as one ``jax.jit``
    over the model's split state: ``graphdef, state = nnx.split(model)``, then
    ``compiled(state, inputs)`` runs ``entry(model, **inputs, **static)``. ``inputs``: the
    entry's array arguments (``image``, ``valid_wh``, ``context_tokens``, ...); ``static``: the
    others (``settings``), fixed in the compiled function. ``nnx.jit`` would walk the module
    graph on every call; here a call is a plain ``jax.jit`` dispatch, which keeps Python out of
    the decoding time (greedy decoding of the tiny model ran 1.5-2.5x faster this way). It
    compiles once per input shape; ``compiled._cache_size()`` counts the compilations."""

    def run(state: nnx.State, inputs: dict[str, jax.Array]) -> Any:
        return entry(nnx.merge(graphdef, state), **inputs, **static)

    return jax.jit(run)


def for_task(name: str) -> Callable[..., object]:
    """The inference entry named by task ``name``'s row of :data:`pixelllm.tasks.TASKS`."""
    entry = tasks.get(name).inference
    function = globals().get(entry)
    if not callable(function) or getattr(function, "__module__", None) != __name__:
        raise ValueError(f"task {name!r} names inference entry {entry!r}, which {__name__} "
                         "does not define")
    return function
