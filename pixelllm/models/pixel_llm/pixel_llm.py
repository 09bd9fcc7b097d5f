"""PixelLLM: two image encoders, a prompt adapter, a frozen LoRA-adapted language model, a point
head per output token, an EOS box, a proposal head and SAM's mask path, in one module.

Data flow for a batch (keys of the batch contract, :mod:`pixelllm.batch`)::

    image [B, H, W, 3] --SAM ViT (frozen)--> sam_map [B, Hs, Ws, 256] -----------------+
          \\-----------EVA02 (trainable)--> eva_map [B, He, We, Ce]                    |
    fused = concat(resize_bicubic(eva_map), resize_bicubic(sam_map)) [B, h, w, Ce+256] |
    prompt_boxes [B, S, 4] --SAM prompt encoder--> 2 tokens per slot                    |
    fused + prompt tokens --prompt adapter--> visual tokens [B, S, Q, D]                |
    [visual | context tokens] + text tokens --LM--> logits [B, S, L, V], hidden          |
    hidden --point head--> token_points [B, S, L, K, 2], eos_boxes [B, S, 4]            |
    eos box (stop-gradient) + mask adapter --SAM mask decoder (frozen)--> masks <-------+
    fused --detector (CenterNet2 or light)--> losses; its caption candidates become the slots
          of dense-captioning images

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

from pixelllm import batch as batch_lib
from pixelllm import sharding
from pixelllm.encoders import eva02 as eva02_lib
from pixelllm.encoders.sam import sam as sam_lib
from pixelllm.language.decoder import DecoderLM
from pixelllm.language.interface import LanguageModel
from pixelllm.language.t5 import T5
from pixelllm.models.pixel_llm.centernet2 import CenterNet2
from pixelllm.models.pixel_llm.dense_captioning import assign_dense_caption_slots
from pixelllm.models.pixel_llm.detector import Detector
from pixelllm.models.pixel_llm.mask_adapter import MaskAdapter
from pixelllm.models.pixel_llm.point_head import PointHead, to_canvas
from pixelllm.models.pixel_llm.prompt_adapter import PromptAdapter
from pixelllm.models.pixel_llm.proposal_head import ProposalHead
from pixelllm.nn import losses
from pixelllm.nn import remat as remat_lib
from pixelllm.nn.resize import resize_2d

# OpenAI CLIP statistics in 0-255, EVA02's pretraining normalization.
CLIP_MEAN = tuple(255.0 * v for v in (0.48145466, 0.4578275, 0.40821073))
CLIP_STD = tuple(255.0 * v for v in (0.26862954, 0.26130258, 0.27577711))

# language_model.kind -> the LanguageModel implementation built from language_model.model.
LANGUAGE_MODELS: dict[str, type[LanguageModel]] = {"decoder": DecoderLM, "t5": T5}
# proposal_head.kind -> the Detector implementation built from proposal_head[kind].
DETECTORS: dict[str, type[Detector]] = {"centernet2": CenterNet2, "light": ProposalHead}


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
    """Everything the losses need: the slots' outputs, the detector's loss terms (None without a
    proposal head; names as the detector gives them, gated to images with ``task_proposals``)
    and the slot inputs actually used: every per-slot key of the batch
    (:data:`pixelllm.batch.SLOT_KEYS`), dense-captioning images' slots rebuilt from the
    detector's caption candidates; the objective reads every per-slot weight here."""
    slots: SlotOutputs
    proposal_terms: Mapping[str, losses.LossValue] | None
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
      proposal_head: ``{"kind": "centernet2" | "light", "centernet2": {...}, "light": {...}}``:
        the detector (:data:`DETECTORS`) and each kind's arguments, or None (no dense captioning).
      dense_captioning: ``{"num_text_proposals", "mult_caption_score"}``: caption slots per
        dense-captioning image in training; whether inference rescores detections by their
        captions (official False).
      frozen: top-level attribute names kept out of training (default ``("sam",)``).
      dtype: compute dtype of every part ("bfloat16" on accelerators; parameters stay float32,
        and LayerNorm statistics, softmax, the point head's outputs and mask logits float32).
      remat: rematerialization policy of every tower's blocks (:mod:`pixelllm.nn.remat`).
      mesh, rules: activations of the encoders are constrained on this mesh (see
        :mod:`pixelllm.sharding`); None on one device.
    """

    def __init__(self, *, canvas_size: int, sam: Mapping[str, Any], eva02: Mapping[str, Any],
                 language_model: Mapping[str, Any], prompt_adapter: Mapping[str, Any],
                 point_head: Mapping[str, Any], mask_adapter: Mapping[str, Any] | None,
                 proposal_head: Mapping[str, Any] | None,
                 dense_captioning: Mapping[str, Any] | None = None,
                 frozen: Sequence[str] = ("sam",), dtype: str = "float32", remat: str = "none",
                 mesh: Mesh | None = None, rules: sharding.Rules = sharding.DEFAULT_RULES,
                 rngs: nnx.Rngs):
        sam, eva02 = dict(sam), dict(eva02)
        if sam["image_encoder"]["img_size"] != canvas_size or eva02["img_size"] != canvas_size:
            raise ValueError(f"SAM img_size {sam['image_encoder']['img_size']} and EVA02 img_size "
                             f"{eva02['img_size']} must equal canvas_size {canvas_size}")
        kind = language_model["kind"]
        if kind not in LANGUAGE_MODELS:
            raise ValueError(f"language_model.kind {kind!r}; choose from {sorted(LANGUAGE_MODELS)}")
        self.canvas_size = canvas_size
        self.frozen = tuple(frozen)
        self.dense_captioning = dict(dense_captioning or {})
        self.dtype = jnp.dtype(dtype)
        remat_lib.check_remat(remat, field="model.remat")
        # The model-level compute dtype and remat policy apply to every part; parameters stay
        # in each part's param_dtype (float32).
        compute = dict(dtype=self.dtype)
        sam["image_encoder"] = dict(sam["image_encoder"], remat=remat)
        self.sam = sam_lib.Sam(**sam, **compute, rngs=rngs)
        self.eva02 = eva02_lib.Eva02(**(eva02 | dict(remat=remat, **compute)), mesh=mesh,
                                     rules=rules, rngs=rngs)
        self.lm = LANGUAGE_MODELS[kind]({**language_model["model"], "dtype": dtype,
                                         "remat": remat}, rngs=rngs)
        lm_width = self.lm.width
        prompt_width = self.sam.prompt_encoder.embed_dim
        sam_channels = sam["image_encoder"]["out_chans"]
        fused_channels = eva02["embed_dim"] + sam_channels
        self.prompt_adapter = PromptAdapter(image_features=fused_channels,
                                            prompt_features=prompt_width,
                                            out_features=lm_width, **prompt_adapter,
                                            remat=remat, **compute, rngs=rngs)
        self.point_head = PointHead(in_features=lm_width, **point_head, **compute, mesh=mesh,
                                    rules=rules, rngs=rngs)
        self.mask_adapter = None if mask_adapter is None else MaskAdapter(
            visual_features=lm_width, text_features=lm_width, prompt_features=prompt_width,
            **mask_adapter, remat=remat, **compute, rngs=rngs)
        self.proposal_head = None if proposal_head is None else self._detector(
            proposal_head, in_features=fused_channels, **compute, rngs=rngs)

    def _detector(self, settings: Mapping[str, Any], **common) -> Detector:
        """The proposal head of ``settings["kind"]``, built from ``settings[kind]``."""
        kind = settings["kind"]
        if kind not in DETECTORS:
            raise ValueError(f"model.proposal_head.kind {kind!r}; choose from {sorted(DETECTORS)}")
        return DETECTORS[kind](canvas_size=self.canvas_size, **settings[kind], **common)

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

    def sam_features(self, image: jax.Array, valid_wh: jax.Array, *,
                     rngs: nnx.Rngs | None = None) -> jax.Array:
        """SAM's image embedding ``[B, F, F, C]`` of ``image [B, H, W, 3]`` (0-255 canvas);
        ``rngs`` enables its drop path. Without ``rngs`` this is what the SAM feature cache
        stores (``pixelllm.tools.sam_cache``)."""
        mask = padding_mask(valid_wh, image.shape[1:3])
        return self.sam.image_encoder(sam_lib.normalize(image, mask), rngs=rngs)

    def encode_image(self, image: jax.Array, valid_wh: jax.Array, *,
                     sam_features: jax.Array | None = None,
                     rngs: nnx.Rngs | None = None) -> ImageFeatures:
        """``image [B, H, W, 3]`` (0-255 canvas), ``valid_wh [B, 2]`` -> :class:`ImageFeatures`.
        ``rngs`` (training) enables SAM's drop path: the official runs its frozen SAM in
        training mode. ``sam_features [B, F, F, C]`` (the batch's cached SAM embedding,
        :data:`pixelllm.batch.SAM_FEATURES`) replaces running SAM's image encoder; only a
        frozen SAM can be cached."""
        if sam_features is None:
            sam_map = self.sam_features(image, valid_wh, rngs=rngs)
        else:
            encoder = self.sam.image_encoder
            grid = image.shape[1] // encoder.patch_size
            expected = (image.shape[0], grid, grid, encoder.out_chans)
            if tuple(sam_features.shape) != expected:
                raise ValueError(f"cached SAM features {batch_lib.SAM_FEATURES!r} have shape "
                                 f"{tuple(sam_features.shape)}; this model's SAM gives "
                                 f"{expected} for images {tuple(image.shape)}")
            if "sam" not in self.frozen:
                raise ValueError("cached SAM features need a frozen SAM (model.frozen has no "
                                 f"'sam': {self.frozen}); turn config.data.sam_feature_cache "
                                 "off to train SAM")
            sam_map = sam_features.astype(self.dtype)
        if "sam" in self.frozen:
            sam_map = jax.lax.stop_gradient(sam_map)
        mask = padding_mask(valid_wh, image.shape[1:3])
        eva_map = self.eva02(normalize_clip(image, mask))
        # Resized in float32 (bicubic overshoot), then back to the compute dtype.
        fused = fuse([eva_map, sam_map]).astype(self.dtype)
        return ImageFeatures(fused=fused, sam=sam_map)

    def visual_tokens(self, features: ImageFeatures, prompt_boxes: jax.Array | None = None, *,
                      prompt_points: jax.Array | None = None) -> jax.Array:
        """Visual tokens ``[B, S, Q, D]`` for a location prompt per slot, canvas pixels:
        ``prompt_boxes [B, S, 4]`` (two corner tokens, then the prompt adapter's
        ``box_pad_tokens`` copies of ``no_mask_embed``, as the official; what PixelLLM trains
        on), or ``prompt_points [B, S, P, 2]`` (positive points plus SAM's padding token, as SAM
        encodes points given without a box)."""
        if (prompt_boxes is None) == (prompt_points is None):
            raise ValueError("pass exactly one of prompt_boxes and prompt_points")
        encoder = self.sam.prompt_encoder
        if prompt_boxes is not None:
            batch, slots = prompt_boxes.shape[:2]
            tokens = self.prompt_adapter.pad_box_tokens(
                encoder.embed_boxes(prompt_boxes.reshape(-1, 4).astype(jnp.float32)),
                encoder.no_mask_embed[...])
        else:
            batch, slots, count = prompt_points.shape[:3]
            tokens = encoder.embed_points(prompt_points.reshape(-1, count, 2).astype(jnp.float32),
                                          jnp.ones((batch * slots, count), jnp.int32), pad=True)
        tokens = tokens.reshape(batch, slots, *tokens.shape[1:])
        image_pe = encoder.dense_pe(features.fused.shape[1:3])
        return self.prompt_adapter(features.fused, image_pe, tokens, encoder.no_mask_embed[...])

    def prefix(self, visual: jax.Array, context_tokens: jax.Array, context_mask: jax.Array, *,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
        """``[visual | context]`` embeddings ``[B*S, Q+Lc, D]`` and their mask. With ``rngs``
        (training) the LM's input dropout applies to the context embeddings only, as the
        official T5 encoder: the visual tokens enter undropped."""
        n = visual.shape[0] * visual.shape[1]
        visual = visual.reshape(n, *visual.shape[2:])
        context = self.lm.embed(context_tokens.reshape(n, -1), rngs=rngs)
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
        :class:`SlotOutputs`. The EOS box is the point head's box at the token that emits EOS
        (the last word, as the official ``point_output_ignore='^end-1'``): by default the
        min/max of that token's points (``point_head.box_source``)."""
        batch, slots, length = text_tokens.shape
        visual = self.visual_tokens(features, prompt_boxes)
        prefix, prefix_mask = self.prefix(visual, context_tokens, context_mask, rngs=rngs)
        out = self.lm.forward(prefix=prefix, prefix_mask=prefix_mask,
                              tokens=text_tokens.reshape(batch * slots, length),
                              token_mask=text_mask.reshape(batch * slots, length), rngs=rngs)
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

    # ------------------------------------------------------------------ training forward

    def __call__(self, batch: Mapping[str, jax.Array], *, rngs: nnx.Rngs | None = None) -> Outputs:
        """Teacher-forced forward pass over a batch of the contract (:mod:`pixelllm.batch`).

        The batch is validated first (shapes and dtypes: under ``jit`` this runs once, while
        tracing); dense-captioning images get their slots from the detector's caption
        candidates (:func:`~pixelllm.models.pixel_llm.dense_captioning.assign_dense_caption_slots`).
        """
        batch_lib.validate(batch)
        features = self.encode_image(batch[batch_lib.IMAGE], batch[batch_lib.VALID_WH],
                                     sam_features=batch.get(batch_lib.SAM_FEATURES), rngs=rngs)
        slot_inputs = {key: batch[key] for key in batch_lib.SLOT_KEYS}
        proposal_terms = None
        if self.proposal_head is not None:
            # The training samples of the detector draw from the dropout stream; a forward
            # pass without rngs (evaluation) samples deterministically.
            key = jax.random.key(0) if rngs is None else rngs.dropout()
            detector = self.proposal_head.forward_train(
                features.fused, gt_boxes=batch[batch_lib.GT_BOXES],
                gt_mask=batch[batch_lib.GT_MASK], image_weight=batch[batch_lib.TASK_PROPOSALS],
                valid_wh=batch[batch_lib.VALID_WH], key=key)
            proposal_terms = detector.terms
            slot_inputs = assign_dense_caption_slots(
                batch, detector.candidates,
                num_text_proposals=self.dense_captioning["num_text_proposals"])
        slots = self.run_slots(features, batch[batch_lib.VALID_WH],
                               prompt_boxes=slot_inputs[batch_lib.PROMPT_BOXES],
                               context_tokens=slot_inputs[batch_lib.CONTEXT_TOKENS],
                               context_mask=slot_inputs[batch_lib.CONTEXT_MASK],
                               text_tokens=slot_inputs[batch_lib.TEXT_TOKENS],
                               text_mask=slot_inputs[batch_lib.TEXT_MASK],
                               with_masks=True, rngs=rngs)
        return Outputs(slots=slots, proposal_terms=proposal_terms, slot_inputs=slot_inputs)
