"""LISA's inference (``model/LISA.py`` ``evaluate()``, driven by ``chat.py``): greedy generation
of the answer, then one mask per generated ``[SEG]``.

Data flow, B images with one question each::

    chat prompt  {SYSTEM} USER: <im_start><image><im_end>\\n{question} ASSISTANT:
        prefix [B, Pb + T + Pa, D] = embed(prompt_before) | image tokens | embed(prompt_after)
        --greedy decoding with a KV cache (start: the prompt's last token ``:``)--> tokens [B, G]
    hidden state that *emits* each generated token [B, G, D] (``:``'s for token 0, token
        g - 1's for token g) at the first K generated [SEG] --text_hidden_fcs--> [B, K, 256]
        --SAM mask decoder, postprocess_masks--> masks [B, K, H, W]

**Generation** is LISA's ``self.generate(num_beams=1, max_new_tokens=...)``: greedy (no sampling
argument is passed; the released checkpoints' ``generation_config`` is not read here), stopping
at ``</s>``; ``chat.py`` and ``app.py`` pass ``max_new_tokens=512``, ``evaluate()``'s default is
32. The prompt is ``chat.py``'s: ``"<image>\\n" + question`` as the user turn, written with
``<im_start>``/``<im_end>``, and an empty assistant turn, so it ends with ``ASSISTANT:``
(:func:`chat_prompt`).

**Which hidden state.** ``evaluate()`` takes ``outputs.hidden_states[-1]``, the last decoding
step's entry: LISA's LLaVA returns the last layer's (normed) output as ``hidden_states`` in eval
mode. Its boolean index ``seg_token_mask`` (``output_ids[:, 1:] == seg_token_idx``, shifted by the
255 extra image positions) spans the whole sequence but its last token, so that entry must too:
the generation runs without a KV cache (``use_cache`` false in LISA's config), each step
re-running the sequence. The mask's shift selects the position *before* each ``[SEG]``: the
hidden state that predicts ``[SEG]``, as in training (:func:`~pixelllm.models.lisa.lisa.seg_slots`).
The cached loop here returns the state *of* each generated token (the one predicting the next)
and the start token's (``:``), which emits token 0; causal attention makes them equal to the
uncached ones.

**K cap.** The masks fill ``max_masks`` (K, static) slots with the *first* K generated ``[SEG]``
in generation order; later ones get no mask (LISA has no cap). Invalid slots (fewer ``[SEG]``,
or none) have ``mask_valid`` False and all-zero masks. Only generated tokens count: the chat
prompt holds no ``[SEG]`` (LISA's mask would also look at the prompt's ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import lisa_inputs
from pixelllm.encoders.sam.sam import postprocess_masks
from pixelllm.language import decoding
from pixelllm.language.tokenizer import Tokenizer
from pixelllm.models.lisa import conversation
from pixelllm.models.lisa.lisa import Lisa

# LISA's chat.py / app.py generation length.
CHAT_MAX_NEW_TOKENS = 512


class ChatPrompt(NamedTuple):
    """One question's prompt around the image (lists of ids): ``prompt_before`` = BOS ...
    ``<im_start>``; ``prompt_after`` = ``<im_end>`` ... up to, not including, the last token;
    ``start_token``: the prompt's last token (``:`` of ``ASSISTANT:``), fed first when decoding."""
    prompt_before: list[int]
    prompt_after: list[int]
    start_token: int


class LisaPrompt(NamedTuple):
    """B images with one chat prompt each (right-padded, masks mark the ids).

    ``clip_pixels [B, Hc, Wc, 3]``, ``sam_pixels [B, S, S, 3]``, ``resized_hw [B, 2]``,
    ``original_hw [B, 2]``: as in :class:`~pixelllm.models.lisa.lisa.LisaInputs`.
    ``prompt_before [B, Pb]`` / ``prompt_before_mask``, ``prompt_after [B, Pa]`` /
    ``prompt_after_mask``: :class:`ChatPrompt`'s pieces.
    """
    clip_pixels: jax.Array
    sam_pixels: jax.Array
    prompt_before: jax.Array
    prompt_before_mask: jax.Array
    prompt_after: jax.Array
    prompt_after_mask: jax.Array
    resized_hw: jax.Array
    original_hw: jax.Array


class LisaGeneration(NamedTuple):
    """``tokens [B, G]`` int32, the generated answer, ``</s>`` included, ``pad_id`` after it;
    ``lengths [B]`` tokens generated (``</s>`` counted); ``seg_embeddings [B, K, 256]``;
    ``mask_valid [B, K]`` bool; ``low_res_masks [B, K, 4h, 4w]`` and ``masks [B, K, H, W]``
    float32 logits, the latter at the original resolution on ``[:original_h, :original_w]``,
    zero elsewhere and in invalid slots."""
    tokens: jax.Array
    lengths: jax.Array
    seg_embeddings: jax.Array
    mask_valid: jax.Array
    low_res_masks: jax.Array
    masks: jax.Array


def chat_prompt(question: str, tokenizer: Tokenizer) -> ChatPrompt:
    """``chat.py``'s prompt for ``question`` (the user's text, without ``<image>``), tokenized as
    LLaVA's ``tokenizer_image_token`` does, split around the image."""
    if conversation.DEFAULT_IMAGE_TOKEN in question:
        raise ValueError(f"the question must not hold {conversation.DEFAULT_IMAGE_TOKEN}; "
                         f"chat_prompt puts the image first: {question!r}")
    user = (conversation.DEFAULT_IM_START_TOKEN + conversation.DEFAULT_IMAGE_TOKEN
            + conversation.DEFAULT_IM_END_TOKEN + "\n" + question)
    # llava_v1 with an empty assistant message: "ROLE:" and no separator after it.
    text = (f"{conversation.SYSTEM}{conversation.SEP}{conversation.ROLES[0]}: {user}"
            f"{conversation.SEP}{conversation.ROLES[1]}:")
    before, after = conversation.image_split(text, tokenizer)
    return ChatPrompt(prompt_before=before, prompt_after=after[:-1], start_token=after[-1])


def prompt_arrays(prompts: Sequence[ChatPrompt], *, before_length: int, after_length: int,
                  pad_id: int) -> tuple[dict[str, np.ndarray], int]:
    """Right-pads ``prompts`` into the id fields of :class:`LisaPrompt` (``[B, Pb]``, ``[B, Pa]``
    and masks) and returns them with the shared start token.

    Raises ``ValueError`` where a prompt is longer than its slots, or the prompts end in different
    tokens (decoding starts every row from one static token)."""
    starts = {p.start_token for p in prompts}
    if len(starts) != 1:
        raise ValueError(f"the prompts end in different tokens {sorted(starts)}; generate them "
                         "in separate batches")
    arrays = {}
    for name, length in (("prompt_before", before_length), ("prompt_after", after_length)):
        rows = [getattr(p, name) for p in prompts]
        if max(map(len, rows)) > length:
            raise ValueError(f"{name}: a prompt has {max(map(len, rows))} ids, over the "
                             f"{length} slots")
        ids = np.full((len(rows), length), pad_id, np.int32)
        mask = np.zeros((len(rows), length), bool)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
            mask[i, :len(row)] = True
        arrays[name], arrays[name + "_mask"] = ids, mask
    return arrays, starts.pop()


def chat_inputs(images: Sequence[np.ndarray], questions: Sequence[str], *, tokenizer: Tokenizer,
                clip_image_size: int, sam_image_size: int, before_length: int,
                after_length: int) -> tuple[LisaPrompt, int]:
    """``chat.py``'s preprocessing of uint8 ``[H, W, 3]`` images, one question each: the
    :class:`LisaPrompt` and the start token for :func:`generate` (its ``mask_hw`` must cover every
    image's ``(H, W)``)."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    arrays, start = prompt_arrays([chat_prompt(q, tokenizer) for q in questions],
                                  before_length=before_length, after_length=after_length,
                                  pad_id=tokenizer.pad_id)
    sam = [lisa_inputs.sam_pixels(image, size=sam_image_size) for image in images]
    prompt = LisaPrompt(
        clip_pixels=jnp.asarray(np.stack([lisa_inputs.clip_pixels(image, size=clip_image_size)
                                          for image in images])),
        sam_pixels=jnp.asarray(np.stack([pixels for pixels, _ in sam])),
        resized_hw=jnp.asarray([hw for _, hw in sam], jnp.int32),
        original_hw=jnp.asarray([image.shape[:2] for image in images], jnp.int32),
        **{name: jnp.asarray(value) for name, value in arrays.items()})
    return prompt, start


def generated_seg_slots(tokens: jax.Array, lengths: jax.Array, *, seg_token_id: int,
                        max_masks: int) -> tuple[jax.Array, jax.Array]:
    """The first ``max_masks`` generated ``[SEG]`` per row: ``tokens [B, G]``, ``lengths [B]`` ->
    ``(index [B, K] into the G generated tokens, valid [B, K])``; invalid slots index 0."""
    is_seg = (tokens == seg_token_id) & (jnp.arange(tokens.shape[1])[None] < lengths[:, None])
    index = jax.vmap(lambda row: jnp.nonzero(row, size=max_masks, fill_value=0)[0])(is_seg)
    valid = jnp.arange(max_masks)[None] < is_seg.sum(axis=-1, keepdims=True)
    return index.astype(jnp.int32), valid


def generate(model: Lisa, prompt: LisaPrompt, *, start_token: int, eos_id: int,
             max_new_tokens: int, max_masks: int, mask_hw: tuple[int, int],
             pad_id: int = 0) -> LisaGeneration:
    """LISA's ``evaluate()``: greedy answer and a mask per generated ``[SEG]`` (module docstring).

    ``start_token`` (static): the prompts' last token (:func:`prompt_arrays`); ``eos_id``: ``</s>``;
    ``max_new_tokens``, ``max_masks`` (K) and ``mask_hw`` (the padded original resolution) are
    static. Traceable under ``nnx.jit``.
    """
    prefix, prefix_mask = model.splice(
        prompt_before=prompt.prompt_before, prompt_before_mask=prompt.prompt_before_mask,
        image_tokens=model.image_tokens(prompt.clip_pixels), prompt_after=prompt.prompt_after,
        prompt_after_mask=prompt.prompt_after_mask)
    out = decoding.generate(model.language_model, prefix=prefix, prefix_mask=prefix_mask,
                            bos_id=start_token, max_new_tokens=max_new_tokens, eos_id=eos_id,
                            pad_id=pad_id, return_hidden=True)
    # Token g is emitted by the state of token g - 1 (token 0 by the start token's).
    emitters = jnp.concatenate([out.start_hidden[:, None], out.hidden[:, :-1]], axis=1)
    index, valid = generated_seg_slots(out.tokens, out.lengths, seg_token_id=model.seg_token_id,
                                       max_masks=max_masks)
    seg_embeddings = model.text_hidden_fcs(jnp.take_along_axis(emitters, index[..., None], axis=1))
    low_res = model.segment(model.image_embeddings(prompt.sam_pixels), seg_embeddings)
    masks = postprocess_masks(low_res, input_size=model.sam.prompt_encoder.input_image_size[0],
                              resized_hw=prompt.resized_hw, original_hw=prompt.original_hw,
                              out_hw=mask_hw)
    return LisaGeneration(tokens=out.tokens, lengths=out.lengths, seg_embeddings=seg_embeddings,
                          mask_valid=valid, low_res_masks=low_res,
                          masks=jnp.where(valid[..., None, None], masks, 0.0))
