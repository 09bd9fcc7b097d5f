"""PixelLLM: two image encoders, a prompt adapter, a frozen LoRA-adapted language model, a point
head per output token, an EOS box, a proposal head and SAM's mask path, in one module.

Data flow for a batch (keys of the batch contract, :mod:`pixelllm.models.pixel_llm.batch`)::

    image [B, H, W, 3] --SAM ViT (frozen)--> sam_map [B, Hs, Ws, 256] -----------------+
          \\-----------EVA02 (trainable)--> eva_map [B, He, We, Ce]                    |
    fused = concat(resize_bicubic(eva_map), resize_bicubic(sam_map)) [B, h, w, Ce+256] |
    prompt_boxes [B, S, 4] --SAM prompt encoder--> 2 tokens per slot                    |
    fused + prompt tokens --prompt adapter--> visual tokens [B, S, Q, D]                |
    [visual | context tokens] + text tokens --LM--> logits [B, S, L, V], hidden          |
    hidden --point head--> token_points [B, S, L, K, 2], eos_boxes [B, S, 4]            |
    eos box (stop-gradient) + mask adapter --SAM mask decoder (frozen)--> masks <-------+
    fused --proposal head--> heatmaps/ltrb; proposals become slots for dense captioning

Frozen parts (``frozen``, default SAM whole) are left out of :meth:`PixelLLM.trainable`: they get
no gradient and no optimizer state; the LM's pretrained weights are
:class:`~pixelllm.nn.lora.FrozenParam` and never trainable, its LoRA adapters are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from pixelllm import sharding
from pixelllm.encoders import eva02 as eva02_lib
from pixelllm.encoders.sam import sam as sam_lib
from pixelllm.language.decoder import DecoderLM
from pixelllm.language.t5 import T5
from pixelllm.models.pixel_llm import proposal_head as proposal_lib
from pixelllm.models.pixel_llm import text_model
from pixelllm.models.pixel_llm.mask_adapter import MaskAdapter
from pixelllm.models.pixel_llm.point_head import PointHead, to_canvas
from pixelllm.models.pixel_llm.prompt_adapter import PromptAdapter
from pixelllm.nn.resize import resize_2d

# OpenAI CLIP statistics in 0-255, EVA02's pretraining normalization.
CLIP_MEAN = tuple(255.0 * v for v in (0.48145466, 0.4578275, 0.40821073))
CLIP_STD = tuple(255.0 * v for v in (0.26862954, 0.26130258, 0.27577711))

LANGUAGE_MODELS = {"decoder": DecoderLM, "t5": T5}


def padding_mask(valid_wh: jax.Array, canvas_hw: tuple[int, int]) -> jax.Array:
    """``valid_wh [B, 2]`` -> bool ``[B, H, W]``, True on pixels inside the valid image area."""
    ys = jnp.arange(canvas_hw[0], dtype=jnp.float32)[None, :, None]
    xs = jnp.arange(canvas_hw[1], dtype=jnp.float32)[None, None, :]
    return (xs < valid_wh[:, 0, None, None]) & (ys < valid_wh[:, 1, None, None])


def normalize_clip(image: jax.Array, mask: jax.Array) -> jax.Array:
    """``image [B, H, W, 3]`` 0-255 -> CLIP-normalized, zero on padding (as SAM's convention)."""
    out = (image - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
    return jnp.where(mask[..., None], out, 0.0)


def fuse(maps: Sequence[jax.Array]) -> jax.Array:
    """Resizes every ``[B, h_i, w_i, C_i]`` map to the largest grid (torch bicubic) and
    concatenates the channels, as the official ``concat_visual_features``."""
    target = max((m.shape[1], m.shape[2]) for m in maps)
    return jnp.concatenate([resize_2d(m.astype(jnp.float32), target, mode="cubic") for m in maps],
                           axis=-1)


class ImageFeatures(NamedTuple):
    """``fused [B, h, w, C]`` (EVA02 then SAM channels) and ``sam [B, Hs, Ws, Cs]`` (SAM's image
    embedding, what its mask decoder reads)."""
    fused: jax.Array
    sam: jax.Array


class SlotOutputs(NamedTuple):
    """Per-slot outputs of a teacher-forced forward pass.

    ``logits [B, S, L, V]``, ``hidden [B, S, L, D]``, ``token_points [B, S, L, K, 2]`` and
    ``eos_boxes [B, S, 4]`` in canvas pixels; ``masks [B, S, 4Hs, 4Ws]`` logits and
    ``mask_iou [B, S]`` (None without the mask path); ``visual_tokens [B, S, Q, D]``.
    """
    logits: jax.Array
    hidden: jax.Array
    token_points: jax.Array
    eos_boxes: jax.Array
    masks: jax.Array | None
    mask_iou: jax.Array | None
    visual_tokens: jax.Array


class Outputs(NamedTuple):
    """Everything the losses need: the slots' outputs, the proposal head's raw outputs (a list
    of ``(heatmap_logits, ltrb)`` per level, or None) and the slot inputs actually used (the batch's,
    with dense-captioning images' slots replaced by caption-assigned proposals)."""
    slots: SlotOutputs
    proposals: list | None
    slot_inputs: dict[str, jax.Array]


def eos_positions(text_mask: jax.Array) -> jax.Array:
    """Index of the token that emits EOS (the last word; BOS for an empty text): ``[...]``."""
    return jnp.maximum(text_mask.sum(axis=-1, dtype=jnp.int32) - 2, 0)


class PixelLLM(nnx.Module):
    """The whole model; fields are ``configs/pixelllm.py``'s ``config.model``.

    Args:
      canvas_size: input canvas side (384).
      sam: ``configs/sam.py`` model dict (its ``img_size`` must equal ``canvas_size``).
      eva02: ``configs/eva02.py`` model dict (``img_size`` = ``canvas_size``).
      language_model: ``{"kind": "t5" | "decoder", "model": <configs/t5.py or decoder_lm.py model>}``.
      prompt_adapter, point_head, mask_adapter: keyword arguments of those modules (sizes that
        follow from the encoders and LM are filled in here).
      proposal_head: :class:`~pixelllm.models.pixel_llm.proposal_head.ProposalHead` arguments, or None.
      proposals: ``{"top_k", "iou_threshold", "num_text_proposals"}`` (dense captioning).
      frozen: top-level attribute names kept out of training (default ``("sam",)``).
      mesh, rules: activations of the encoders are constrained on this mesh (see
        :mod:`pixelllm.sharding`); None on one device.
    """

    def __init__(self, *, canvas_size: int, sam: Mapping[str, Any], eva02: Mapping[str, Any],
                 language_model: Mapping[str, Any], prompt_adapter: Mapping[str, Any],
                 point_head: Mapping[str, Any], mask_adapter: Mapping[str, Any] | None,
                 proposal_head: Mapping[str, Any] | None,
                 proposals: Mapping[str, Any] | None = None,
                 frozen: Sequence[str] = ("sam",), mesh: Mesh | None = None,
                 rules: sharding.Rules = sharding.DEFAULT_RULES, rngs: nnx.Rngs):
        sam, eva02 = dict(sam), dict(eva02)
        if sam["image_encoder"]["img_size"] != canvas_size or eva02["img_size"] != canvas_size:
            raise ValueError(f"SAM img_size {sam['image_encoder']['img_size']} and EVA02 img_size "
                             f"{eva02['img_size']} must equal canvas_size {canvas_size}")
        kind = language_model["kind"]
        if kind not in LANGUAGE_MODELS:
            raise ValueError(f"language_model.kind {kind!r}; choose from {sorted(LANGUAGE_MODELS)}")
        self.canvas_size = canvas_size
        self.frozen = tuple(frozen)
        self.proposal_settings = dict(proposals or {})
        self.sam = sam_lib.Sam(**sam, rngs=rngs)
        self.eva02 = eva02_lib.Eva02(**eva02, mesh=mesh, rules=rules, rngs=rngs)
        self.lm = LANGUAGE_MODELS[kind](language_model["model"], rngs=rngs)
        lm_width = text_model.width(self.lm)
        prompt_width = self.sam.prompt_encoder.embed_dim
        sam_channels = sam["image_encoder"]["out_chans"]
        fused_channels = eva02["embed_dim"] + sam_channels
        self.prompt_adapter = PromptAdapter(image_features=fused_channels,
                                            prompt_features=prompt_width,
                                            out_features=lm_width, **prompt_adapter, rngs=rngs)
        self.point_head = PointHead(in_features=lm_width, **point_head, mesh=mesh, rules=rules,
                                    rngs=rngs)
        self.mask_adapter = None if mask_adapter is None else MaskAdapter(
            visual_features=lm_width, text_features=lm_width, prompt_features=prompt_width,
            **mask_adapter, rngs=rngs)
        self.proposal_head = None if proposal_head is None else proposal_lib.ProposalHead(
            in_features=fused_channels, **proposal_head, rngs=rngs)

    @classmethod
    def from_config(cls, model_config, *, rngs: nnx.Rngs, **overrides) -> PixelLLM:
        """From ``configs/pixelllm.py``'s ``config.model``; ``overrides`` adds ``mesh=``/``rules=``."""
        return cls(**model_config.to_dict(), **overrides, rngs=rngs)

    def trainable(self) -> nnx.filterlib.Filter:
        """The filter of trained parameters: every ``nnx.Param`` (LoRA adapters included)
        outside the frozen modules; LM base weights are ``FrozenParam`` and never match."""
        return nnx.All(nnx.Param, nnx.Not(nnx.Any(*(nnx.PathContains(name)
                                                      for name in self.frozen))))

    # ------------------------------------------------------------------ image and prompts

    def encode_image(self, image: jax.Array, valid_wh: jax.Array) -> ImageFeatures:
        """``image [B, H, W, 3]`` (0-255 canvas), ``valid_wh [B, 2]`` -> :class:`ImageFeatures`."""
        mask = padding_mask(valid_wh, image.shape[1:3])
        sam_map = self.sam.image_encoder(sam_lib.normalize(image, mask))
        if "sam" in self.frozen:
            sam_map = jax.lax.stop_gradient(sam_map)
        eva_map = self.eva02(normalize_clip(image, mask))
        return ImageFeatures(fused=fuse([eva_map, sam_map]), sam=sam_map)

    def visual_tokens(self, features: ImageFeatures, prompt_boxes: jax.Array | None = None, *,
                      prompt_points: jax.Array | None = None) -> jax.Array:
        """Visual tokens ``[B, S, Q, D]`` for a location prompt per slot, canvas pixels:
        ``prompt_boxes [B, S, 4]`` (two corner tokens, what PixelLLM trains on), or
        ``prompt_points [B, S, P, 2]`` (positive points plus SAM's padding token, as SAM encodes
        points given without a box)."""
        if (prompt_boxes is None) == (prompt_points is None):
            raise ValueError("pass exactly one of prompt_boxes and prompt_points")
        encoder = self.sam.prompt_encoder
        if prompt_boxes is not None:
            batch, slots = prompt_boxes.shape[:2]
            tokens = encoder.embed_boxes(prompt_boxes.reshape(-1, 4).astype(jnp.float32))
        else:
            batch, slots, count = prompt_points.shape[:3]
            tokens = encoder.embed_points(prompt_points.reshape(-1, count, 2).astype(jnp.float32),
                                          jnp.ones((batch * slots, count), jnp.int32), pad=True)
        tokens = tokens.reshape(batch, slots, *tokens.shape[1:])
        image_pe = encoder.dense_pe(features.fused.shape[1:3])
        return self.prompt_adapter(features.fused, image_pe, tokens, encoder.no_mask_embed[...])

    def prefix(self, visual: jax.Array, context_tokens: jax.Array,
               context_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``[visual | context]`` embeddings ``[B*S, Q+Lc, D]`` and their mask."""
        n = visual.shape[0] * visual.shape[1]
        visual = visual.reshape(n, *visual.shape[2:])
        context = self.lm.embed(context_tokens.reshape(n, -1))
        embeddings = jnp.concatenate([visual.astype(context.dtype), context], axis=1)
        mask = jnp.concatenate([jnp.ones(visual.shape[:2], bool),
                                context_mask.reshape(n, -1).astype(bool)], axis=1)
        return embeddings, mask

    # ------------------------------------------------------------------ slots

    def run_slots(self, features: ImageFeatures, valid_wh: jax.Array, *, prompt_boxes: jax.Array,
                  context_tokens: jax.Array, context_mask: jax.Array, text_tokens: jax.Array,
                  text_mask: jax.Array, with_masks: bool,
                  rngs: nnx.Rngs | None = None) -> SlotOutputs:
        """Teacher-forced text, points, EOS boxes (and masks) for every slot; shapes in
        :class:`SlotOutputs`."""
        batch, slots, length = text_tokens.shape
        visual = self.visual_tokens(features, prompt_boxes)
        prefix, prefix_mask = self.prefix(visual, context_tokens, context_mask)
        out = text_model.teacher_forced(self.lm, prefix=prefix, prefix_mask=prefix_mask,
                                        tokens=text_tokens.reshape(batch * slots, length),
                                        token_mask=text_mask.reshape(batch * slots, length),
                                        rngs=rngs)
        logits = out.logits.reshape(batch, slots, length, -1)
        hidden = out.hidden.reshape(batch, slots, length, -1)
        head = self.point_head(hidden)
        wh = valid_wh[:, None, None, None, :]
        points = to_canvas(head.points, wh)
        eos = eos_positions(text_mask)[..., None, None]
        eos_boxes = to_canvas(jnp.take_along_axis(head.box, eos, axis=2)[:, :, 0],
                              valid_wh[:, None, :])
        masks = mask_iou = None
        if with_masks and self.mask_adapter is not None:
            masks, mask_iou = self.segment(features, jax.lax.stop_gradient(eos_boxes), visual,
                                           hidden, text_mask)
        return SlotOutputs(logits=logits, hidden=hidden, token_points=points, eos_boxes=eos_boxes,
                           masks=masks, mask_iou=mask_iou, visual_tokens=visual)

    def segment(self, features: ImageFeatures, boxes: jax.Array, visual: jax.Array,
                text_hidden: jax.Array, text_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """SAM masks for ``boxes [B, S, 4]`` (canvas pixels), with the mask adapter's language
        context. Returns logits ``[B, S, 4Hs, 4Ws]`` and predicted IoU ``[B, S]``."""
        batch, slots = boxes.shape[:2]
        n = batch * slots
        encoder = self.sam.prompt_encoder
        box_tokens = encoder.embed_boxes(boxes.reshape(n, 4))
        box_tokens = self.mask_adapter(box_tokens, visual.reshape(n, *visual.shape[2:]),
                                       text_hidden.reshape(n, *text_hidden.shape[2:]),
                                       text_mask.reshape(n, -1))
        image = jnp.repeat(features.sam, slots, axis=0)
        dense = jnp.broadcast_to(encoder.no_mask_embed[...].astype(image.dtype), image.shape)
        masks, iou = self.sam.mask_decoder(image, encoder.dense_pe(), box_tokens, dense,
                                           multimask_output=False)
        return (masks[:, 0].reshape(batch, slots, *masks.shape[2:]),
                iou[:, 0].reshape(batch, slots))

    # ------------------------------------------------------------------ proposals

    def propose(self, features: ImageFeatures, valid_wh: jax.Array, top_k: int
                ) -> tuple[list, jax.Array, jax.Array]:
        """Proposal head outputs, and the ``top_k`` boxes ``[B, k, 4]`` with scores ``[B, k]``."""
        levels = self.proposal_head(features.fused)
        strides = proposal_lib.level_strides(self.canvas_size,
                                             [heatmap.shape[1:3] for heatmap, _ in levels])
        boxes, scores = proposal_lib.decode(levels, strides=strides, top_k=top_k,
                                            valid_wh=valid_wh)
        return levels, boxes, scores

    def dense_caption_slots(self, batch: Mapping[str, jax.Array], proposals: jax.Array
                            ) -> dict[str, jax.Array]:
        """GRiT-style training slots for dense-captioning images (``task_proposals > 0``).

        Candidates are the ground-truth boxes followed by the proposals (as GRiT appends GT to
        its proposals, so captions train before proposals are good); each takes the caption of
        its best-IoU ground truth when IoU >= ``iou_threshold``; the first ``num_text_proposals``
        matched candidates become slots (prompt box = candidate, stop-gradient). Other images keep
        their slots.
        """
        settings = self.proposal_settings
        count = settings["num_text_proposals"]
        slots = batch["prompt_boxes"].shape[1]
        if count > slots:
            raise ValueError(f"num_text_proposals {count} exceeds the batch's {slots} slots")
        candidates = jnp.concatenate([batch["gt_boxes"], jax.lax.stop_gradient(proposals)], axis=1)
        candidate_valid = jnp.concatenate(
            [batch["gt_mask"].astype(bool), jnp.ones(proposals.shape[:2], bool)], axis=1)
        gt_index, matched = proposal_lib.assign_captions(
            candidates, batch["gt_boxes"], batch["gt_mask"],
            iou_threshold=settings["iou_threshold"])
        matched &= candidate_valid
        order = jnp.argsort(~matched, axis=1, stable=True)[:, :count]
        chosen_boxes = jnp.take_along_axis(candidates, order[..., None], axis=1)
        chosen_matched = jnp.take_along_axis(matched, order, axis=1)
        chosen_gt = jnp.take_along_axis(gt_index, order, axis=1)
        text_tokens = jnp.take_along_axis(batch["gt_text_tokens"], chosen_gt[..., None], axis=1)
        text_mask = (jnp.take_along_axis(batch["gt_text_mask"], chosen_gt[..., None], axis=1)
                     & chosen_matched[..., None])
        dense = batch["task_proposals"][:, None] > 0

        def fill(original, replacement):
            padded = original.at[:, :count].set(replacement.astype(original.dtype))
            shape = dense.shape + (1,) * (original.ndim - 2)
            return jnp.where(dense.reshape(shape), padded, original)

        return {
            "prompt_boxes": fill(batch["prompt_boxes"], chosen_boxes),
            "text_tokens": fill(batch["text_tokens"], text_tokens),
            "text_mask": fill(batch["text_mask"], text_mask),
            "slot_mask": fill(batch["slot_mask"], chosen_matched),
            "task_text": fill(batch["task_text"], chosen_matched),
        }

    # ------------------------------------------------------------------ training forward

    def __call__(self, batch: Mapping[str, jax.Array], *, rngs: nnx.Rngs | None = None) -> Outputs:
        """Teacher-forced forward pass over a batch (see :mod:`pixelllm.models.pixel_llm.batch`)."""
        features = self.encode_image(batch["image"], batch["valid_wh"])
        slot_inputs = {key: batch[key] for key in
                       ("prompt_boxes", "text_tokens", "text_mask", "slot_mask", "task_text")}
        levels = None
        if self.proposal_head is not None:
            levels, boxes, _ = self.propose(features, batch["valid_wh"],
                                            self.proposal_settings["top_k"])
            slot_inputs = self.dense_caption_slots(batch, boxes)
        slots = self.run_slots(features, batch["valid_wh"],
                               prompt_boxes=slot_inputs["prompt_boxes"],
                               context_tokens=batch["context_tokens"],
                               context_mask=batch["context_mask"],
                               text_tokens=slot_inputs["text_tokens"],
                               text_mask=slot_inputs["text_mask"],
                               with_masks=True, rngs=rngs)
        return Outputs(slots=slots, proposals=levels, slot_inputs=slot_inputs)
