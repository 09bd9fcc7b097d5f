"""LISA (Lai et al., CVPR 2024, "Reasoning Segmentation via Large Language Model"): a LLaVA whose
``[SEG]`` token prompts SAM's mask decoder, on this project's parts.

Data flow, one image with C conversations (LISA's ``offset``: conversations of the same image)::

    clip_pixels [B, Hc, Wc, 3] --vision tower (frozen, no gradient)--> [B, T, Cv]
        --mm_projector (frozen Linear Cv -> D)--> image tokens [B, T, D]
    prefix [B*C, Pb + T + Pa] = embed(prompt_before) | image tokens | embed(prompt_after)
    tokens [B*C, L] = [last prompt token, answer...] --language model--> logits, hidden [B*C, L, D]
    hidden at each position whose NEXT token is [SEG] --text_hidden_fcs--> [B, M, 256]
    sam_pixels [B, S, S, 3] --SAM image encoder (frozen, stop_gradient)--> [B, h, w, 256]
    each [SEG] embedding = one sparse prompt token, dense = no_mask_embed --mask decoder
        (single mask)--> low-res logits [B, M, 4h, 4w] --postprocess_masks--> [B, M, H0, W0]

**Splicing.** LLaVA v1 writes the user turn as ``<im_start><image><im_end>\\n{question}`` and
replaces ``<image>`` by the T projected CLIP features (LISA: ``mm_use_im_start_end``, 256
features of CLIP ViT-L/14 at 224, second-to-last layer, CLS dropped). LLaMA's BOS ``<s>`` opens
the prompt, so it belongs to ``prompt_before`` (``<s>`` system text ``USER: <im_start>``);
``prompt_after`` is ``<im_end>\\n{question} ASSISTANT`` *without* its last token (``:``), which
becomes text token 0. Then text position ``t`` sees exactly the inputs LISA's position does, its
logits predict text token ``t + 1`` (LISA's shifted labels) and its hidden state is LISA's hidden
state at the same place: the teacher-forced answer lines up token for token.

**The [SEG] embedding** is the last layer's hidden state after the final norm at the position
that *predicts* ``[SEG]`` (LISA: ``seg_token_mask = input_ids[:, 1:] == seg_token_idx``), passed
through ``text_hidden_fcs`` = Linear(D, D) -> ReLU -> Linear(D, 256). LISA collects them in
order over (conversation, position) and splits them per image; here they fill ``max_masks``
static slots per image in the same order, with a validity mask (the data side caps the number
of [SEG] per image at ``max_masks``; more would be dropped).

**What trains** (LISA's ``train_ds.py``): LoRA on the LLM's q and v, every row of the input
embeddings and of the output head (``embed_tokens``/``lm_head`` set trainable after
``resize_token_embeddings``), ``text_hidden_fcs`` and SAM's mask decoder. Frozen: the vision
tower, the projector, SAM's image encoder and prompt encoder, the LLM's base weights
(:meth:`Lisa.trainable`). LISA runs the vision tower and SAM's image encoder under
``torch.no_grad``; here both are ``stop_gradient``.

Inference (LISA's ``evaluate()``: greedy answer, a mask per generated ``[SEG]``) is
:mod:`pixelllm.models.lisa.inference`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pixelllm.encoders.sam.sam import Sam, postprocess_masks
from pixelllm.language.interface import LanguageModel
from pixelllm.nn import layers
from pixelllm.nn import lora

# The language model's token tables, trained whole in LISA (paths under `language_model`).
TOKEN_TABLES = ("embedding", "lm_head")


class LisaInputs(NamedTuple):
    """One batch of B images with C conversations each (padding conversations are all-masked).

    ``clip_pixels [B, Hc, Wc, 3]``: the vision tower's input (CLIP-preprocessed).
    ``sam_pixels [B, S, S, 3]``: SAM-normalized, resized to longest side S, zero-padded
    (:func:`pixelllm.encoders.sam.sam.normalize`).
    ``prompt_before [B, C, Pb]`` / ``prompt_before_mask``: ``<s>`` ... ``<im_start>``.
    ``prompt_after [B, C, Pa]`` / ``prompt_after_mask``: ``<im_end>`` ... up to, not including,
    the prompt's last token.
    ``tokens [B, C, L]`` / ``token_mask``: the prompt's last token, then the answer (right-padded).
    ``resized_hw [B, 2]``: the image's size inside the SAM canvas, before padding.
    ``original_hw [B, 2]``: the original image size (the masks' resolution).
    """
    clip_pixels: jax.Array
    sam_pixels: jax.Array
    prompt_before: jax.Array
    prompt_before_mask: jax.Array
    prompt_after: jax.Array
    prompt_after_mask: jax.Array
    tokens: jax.Array
    token_mask: jax.Array
    resized_hw: jax.Array
    original_hw: jax.Array


class LisaOutput(NamedTuple):
    """``logits [B, C, L, V]`` float32 (text position t predicts token t + 1);
    ``seg_embeddings [B, M, 256]`` (after ``text_hidden_fcs``); ``mask_valid [B, M]`` bool;
    ``low_res_masks [B, M, 4h, 4w]`` and ``masks [B, M, H, W]`` float32 logits, the latter at
    the original resolution, valid on ``[:original_h, :original_w]`` (zero elsewhere)."""
    logits: jax.Array
    seg_embeddings: jax.Array
    mask_valid: jax.Array
    low_res_masks: jax.Array
    masks: jax.Array


class TextHiddenFcs(nnx.Module):
    """LISA's ``text_hidden_fcs[0]``: Linear(D, D) -> ReLU -> Linear(D, out) (its Dropout(0.0) is
    the identity). ``[..., D] -> [..., out]``."""

    def __init__(self, *, width: int, out_features: int, rngs: nnx.Rngs):
        self.fc1 = layers.linear(width, width, axes=("embed", "mlp"), rngs=rngs)
        self.fc2 = layers.linear(width, out_features, axes=("mlp", None), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.relu(self.fc1(x)))


def seg_slots(tokens: jax.Array, token_mask: jax.Array, *, seg_token_id: int,
              max_masks: int) -> tuple[jax.Array, jax.Array]:
    """Where each image's [SEG] embeddings are read, in LISA's order (conversation, then position).

    ``tokens, token_mask: [B, C, L]`` -> ``(index [B, M], valid [B, M])``: ``index`` into the
    flattened ``C * L`` text positions of the position *before* each valid [SEG] (its hidden state
    predicts [SEG]); slots past the image's [SEG] count are invalid (index 0).
    """
    is_seg = (tokens == seg_token_id) & token_mask.astype(bool)
    predicts_seg = jnp.pad(is_seg[..., 1:], ((0, 0), (0, 0), (0, 1)))
    flat = predicts_seg.reshape(predicts_seg.shape[0], -1)
    index = jax.vmap(lambda row: jnp.nonzero(row, size=max_masks, fill_value=0)[0])(flat)
    valid = jnp.arange(max_masks)[None] < flat.sum(axis=-1, keepdims=True)
    return index.astype(jnp.int32), valid


class Lisa(nnx.Module):
    """LISA-7B-v1's model: see the module docstring.

    Args:
      vision_tower: any module with ``patch_features(pixels [N, H, W, 3]) -> [N, T, Cv]`` (LLaVA:
        CLIP ViT-L/14, second-to-last layer, CLS dropped).
      vision_width: ``Cv``.
      language_model: a :class:`~pixelllm.language.interface.LanguageModel` (LISA: LLaMA-7B /
        Vicuna with LoRA r8, alpha 16 on q and v), its vocabulary already holding ``[SEG]``.
      sam: SAM's image encoder, prompt encoder and mask decoder (LISA: ViT-H).
      seg_token_id: the id of ``[SEG]`` (32003 in LISA's vocabulary).
    """

    def __init__(self, *, vision_tower: nnx.Module, vision_width: int,
                 language_model: LanguageModel, sam: Sam, seg_token_id: int, rngs: nnx.Rngs):
        width = language_model.width
        if not 0 <= seg_token_id < language_model.vocab_size:
            raise ValueError(f"seg_token_id {seg_token_id} is outside the language model's "
                             f"vocabulary of {language_model.vocab_size} tokens")
        self.vision_tower = vision_tower
        self.mm_projector = layers.linear(vision_width, width, axes=(None, "embed"), rngs=rngs)
        self.language_model = language_model
        self.sam = sam
        self.text_hidden_fcs = TextHiddenFcs(width=width, out_features=sam.prompt_encoder.embed_dim,
                                             rngs=rngs)
        self.seg_token_id = seg_token_id

    def trainable(self) -> nnx.filterlib.Filter:
        """LISA's trained set: LoRA factors, added token rows, the language model's token tables
        (every row, although they are ``FrozenParam`` for other families), ``text_hidden_fcs``
        and SAM's mask decoder."""
        def token_table(path: tuple, _) -> bool:
            return len(path) == 2 and path[0] == "language_model" and path[1] in TOKEN_TABLES

        return nnx.Any(nnx.LoRAParam, lora.AddedTokenParam, token_table,
                       nnx.All(nnx.Param, nnx.Any(nnx.PathContains("text_hidden_fcs"),
                                                  nnx.PathContains("mask_decoder"))))

    # ------------------------------------------------------------------ parts

    def image_tokens(self, clip_pixels: jax.Array) -> jax.Array:
        """``[B, Hc, Wc, 3]`` -> projected image tokens ``[B, T, D]`` (LLaVA's ``encode_images``;
        the tower runs without gradient as LLaVA's ``@torch.no_grad`` forward)."""
        features = jax.lax.stop_gradient(self.vision_tower.patch_features(clip_pixels))
        return self.mm_projector(features)

    def image_embeddings(self, sam_pixels: jax.Array) -> jax.Array:
        """SAM's frozen image encoder ``[B, S, S, 3] -> [B, h, w, 256]``; no gradient is traced
        through it (LISA's ``get_visual_embs`` runs under ``torch.no_grad``)."""
        return jax.lax.stop_gradient(self.sam.image_encoder(sam_pixels))

    def prefix(self, inputs: LisaInputs, image_tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(prefix [B*C, Pb + T + Pa, D], mask [B*C, Pb + T + Pa])``: each conversation's prompt
        with its image's tokens spliced in place of ``<image>``."""
        batch, convs = inputs.tokens.shape[:2]
        flat = lambda x: x.reshape(batch * convs, *x.shape[2:])
        return self.splice(prompt_before=flat(inputs.prompt_before),
                           prompt_before_mask=flat(inputs.prompt_before_mask),
                           image_tokens=jnp.repeat(image_tokens, convs, axis=0),
                           prompt_after=flat(inputs.prompt_after),
                           prompt_after_mask=flat(inputs.prompt_after_mask))

    def splice(self, *, prompt_before: jax.Array, prompt_before_mask: jax.Array,
               image_tokens: jax.Array, prompt_after: jax.Array,
               prompt_after_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One prompt per row: ``prompt_before [N, Pb]``, ``image_tokens [N, T, D]``,
        ``prompt_after [N, Pa]`` (with their masks) -> ``(prefix [N, Pb + T + Pa, D], mask)``."""
        before = self.language_model.embed(prompt_before)
        after = self.language_model.embed(prompt_after)
        image = image_tokens.astype(before.dtype)
        prefix = jnp.concatenate([before, image, after], axis=1)
        mask = jnp.concatenate([prompt_before_mask.astype(bool),
                                jnp.ones(image.shape[:2], bool),
                                prompt_after_mask.astype(bool)], axis=1)
        return prefix, mask

    def segment(self, image_embeddings: jax.Array, seg_embeddings: jax.Array) -> jax.Array:
        """One sparse prompt token per [SEG] (``points=boxes=masks=None, text_embeds``: sparse is
        the text embedding alone, dense ``no_mask_embed``), single-mask output.
        ``image_embeddings [B, h, w, C]``, ``seg_embeddings [B, M, C]`` -> ``[B, M, 4h, 4w]``."""
        batch, slots, channels = seg_embeddings.shape
        encoder = self.sam.prompt_encoder
        image = jnp.repeat(image_embeddings, slots, axis=0)
        sparse = seg_embeddings.reshape(batch * slots, 1, channels)
        dense = jnp.broadcast_to(encoder.no_mask_embed[...].astype(image.dtype), image.shape)
        masks, _ = self.sam.mask_decoder(image, encoder.dense_pe(), sparse, dense,
                                         multimask_output=False)
        return masks[:, 0].reshape(batch, slots, *masks.shape[-2:])

    # ------------------------------------------------------------------ forward

    def __call__(self, inputs: LisaInputs, *, max_masks: int, mask_hw: tuple[int, int],
                 rngs: nnx.Rngs | None = None) -> LisaOutput:
        """Teacher-forced LISA (``model_forward``). ``max_masks`` (static): [SEG] slots per image;
        ``mask_hw`` (static): the padded original resolution of the output masks. ``rngs``
        (training; LISA's ``model.train()``) enables the language model's LoRA dropout, the
        only dropout LISA trains with; None (evaluation) is deterministic."""
        batch, convs, length = inputs.tokens.shape
        prefix, prefix_mask = self.prefix(inputs, self.image_tokens(inputs.clip_pixels))
        text = self.language_model.forward(
            prefix=prefix, prefix_mask=prefix_mask,
            tokens=inputs.tokens.reshape(batch * convs, length),
            token_mask=inputs.token_mask.reshape(batch * convs, length), rngs=rngs)
        index, valid = seg_slots(inputs.tokens, inputs.token_mask,
                                 seg_token_id=self.seg_token_id, max_masks=max_masks)
        hidden = text.hidden.reshape(batch, convs * length, -1)
        seg_hidden = jnp.take_along_axis(hidden, index[..., None], axis=1)
        seg_embeddings = self.text_hidden_fcs(seg_hidden)
        low_res = self.segment(self.image_embeddings(inputs.sam_pixels), seg_embeddings)
        masks = postprocess_masks(low_res, input_size=self.sam.prompt_encoder.input_image_size[0],
                                  resized_hw=inputs.resized_hw, original_hw=inputs.original_hw,
                                  out_hw=mask_hw)
        return LisaOutput(logits=text.logits.reshape(batch, convs, length, -1),
                          seg_embeddings=seg_embeddings, mask_valid=valid,
                          low_res_masks=low_res, masks=masks)
