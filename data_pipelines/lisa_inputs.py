"""LISA's samples from built examples: ReasonSeg and RefCOCO -> the arrays of
:class:`~pixelllm.models.lisa.lisa.LisaInputs`, padded to static shapes (numpy, on the host).

One *sample* is one image with up to ``C`` conversations (LISA's ``offset`` groups them), each
``(question, answer)`` written in the ``llava_v1`` template and tokenized by
:func:`pixelllm.models.lisa.conversation.tokenize`, and one ground-truth mask per ``[SEG]`` in
the answers, in (conversation, position) order as the model fills its mask slots.

**Training** (LISA's ``ReasonSegDataset`` / ``ReferSegDataset``): up to ``num_classes_per_sample``
(LISA: 3) of the image's queries, drawn without replacement (all of them, in order, when there
are fewer); a question from ``LONG_QUESTION_LIST`` (``{sent}``, ReasonSeg's ``is_sentence``
queries) or ``SHORT_QUESTION_LIST`` (``{class_name}`` = the query lower-cased), an answer from
``ANSWER_LIST``. Every ReasonSeg query of an image names the same region, so each conversation's
mask is the image's ``mask == 1``: LISA trains the 255 ("ignore") pixels as background. A
RefCOCO query's mask is its object's (``mask > 0``; LISA strips and lower-cases the ``sent``).

ReasonSeg's **explanatory** mode (LISA's ``explanatory=0.1``), for images with an explanation
(LISA keeps the explanatory file's last entry per image, and so does this module): per image,
with probability ``explanatory`` every conversation is ``<image>\\n{query}`` answered by the
explanation alone, without ``[SEG]`` and without masks; otherwise one of two modes with equal
chance, LISA's plain ``[SEG]`` answers, or ``<image>\\n{query} {explanatory question}`` answered
by ``{ANSWER_LIST choice} {explanation}``.

**Validation** (LISA's ``ValDataset``, teacher-forced with the answer ``[SEG].``): ReasonSeg
scores the image's first query only, with the question ``<image>\\n {query} Please output
segmentation mask.`` for sentences and ``<image>\\n What is {query} in this image? Please output
segmentation mask.`` for phrases (LISA's leading spaces kept), the mask with its 255 pixels kept
for the metric. RefCOCO scores every sentence of the image (stripped, lower-cased, phrase form);
:func:`refcoco_val_samples` splits them into samples of at most ``C`` conversations.

Left out: LISA's truncation of over-long conversations to ``model_max_length - 255`` tokens (a
conversation longer than the static sizes is an error naming the example; the answer's tail
past ``tokens`` is cut only after its last ``[SEG]``), its semantic-segmentation and VQA sources,
and the generalized RefCOCO (gRefCOCO) multi-object and no-object targets.

Sample arrays (``C`` conversations, ``M = max_masks``, ``H x W = mask_hw``)::

    clip_pixels   float32 [Hc, Wc, 3]   CLIPImageProcessor: shortest side to Hc (PIL bicubic on
                                        uint8), centre crop, /255, CLIP mean/std
    sam_pixels    float32 [S, S, 3]     longest side to S (PIL bilinear, SAM's ResizeLongestSide
                                        rounding), SAM mean/std, zero padding bottom/right
    prompt_before int32 [C, Pb]  prompt_before_mask bool [C, Pb]
    prompt_after  int32 [C, Pa]  prompt_after_mask  bool [C, Pa]
    tokens        int32 [C, L]   token_mask bool [C, L]   label_mask bool [C, L] (LISA's targets)
    resized_hw    int32 [2]      the image's size on the SAM canvas
    original_hw   int32 [2]      the image's size (the masks' resolution)
    masks         uint8 [M, H, W]   training: 0/1 targets; validation: 0, 1, 255 (ignored);
                                    zero past the image and in invalid slots
    mask_valid    bool [M]
    pixel_valid   bool [H, W]       True on the image's ``original_hw`` extent
    image_id      str
    mask_ids      tuple[str, ...]   one per valid mask: "<image id>/<query index>" (RefCOCO:
                                    "<image id>/<expression id>")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from data_pipelines import example_fields
from pixelllm.encoders import clip as clip_lib
from pixelllm.encoders.sam import sam as sam_lib
from pixelllm.language.tokenizer import Tokenizer
from pixelllm.models.lisa import conversation
from pixelllm.models.lisa.lisa import LisaInputs

SEG_TOKEN = "[SEG]"
VAL_ANSWER = "[SEG]."
# ValDataset's questions (their leading space after the newline is LISA's).
VAL_SENTENCE_QUESTION = conversation.DEFAULT_IMAGE_TOKEN + "\n {} Please output segmentation mask."
VAL_PHRASE_QUESTION = (conversation.DEFAULT_IMAGE_TOKEN
                       + "\n What is {} in this image? Please output segmentation mask.")

# ReasonSegDataset's explanatory `choice`, drawn once per image that has an explanation.
_SEG_ANSWER, _SEG_AND_EXPLANATION, _EXPLANATION_ONLY = 0, 1, 2

# Fields of a sample that LisaInputs holds, and the others collate() stacks.
_INPUT_FIELDS = LisaInputs._fields
_ARRAY_FIELDS = _INPUT_FIELDS + ("label_mask", "masks", "mask_valid", "pixel_valid")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LisaSizes:
    """The static shapes of a sample.

    Attributes:
      conversations: ``C``, conversations per image (LISA trains with 3).
      prompt_before, prompt_after: ``Pb``, ``Pa``, token slots of the prompt pieces around the
        image (``<s>`` ... ``<im_start>``; ``<im_end>`` ... ``ASSISTANT``).
      tokens: ``L``, the prompt's last token, the answer and ``</s>``.
      max_masks: ``M``, ``[SEG]`` slots per image (the model's ``max_masks``).
      mask_hw: ``(H, W)``, at least every image's size (the model's ``mask_hw``).
      clip_image_size: the vision tower's input side (224).
      sam_image_size: SAM's canvas side (1024).
    """
    conversations: int
    prompt_before: int
    prompt_after: int
    tokens: int
    max_masks: int
    mask_hw: tuple[int, int]
    clip_image_size: int = 224
    sam_image_size: int = 1024


# ---------------------------------------------------------------------------------- pixels


def clip_pixels(image: np.ndarray, *, size: int) -> np.ndarray:
    """``CLIPImageProcessor``'s input of a uint8 ``[H, W, 3]`` image -> float32
    ``[size, size, 3]``: the shortest side resized to ``size`` (PIL bicubic on uint8, the other
    side ``int(size * long / short)``), the centre ``size x size`` crop, ``/ 255`` and the CLIP
    mean and std."""
    height, width = image.shape[:2]
    short, long = min(height, width), max(height, width)
    resized_long = int(size * long / short)
    out_h, out_w = (size, resized_long) if height <= width else (resized_long, size)
    resized = np.asarray(Image.fromarray(image).resize((out_w, out_h),
                                                       Image.Resampling.BICUBIC))
    top, left = (out_h - size) // 2, (out_w - size) // 2
    crop = resized[top:top + size, left:left + size].astype(np.float32) / np.float32(255.0)
    return ((crop - np.asarray(clip_lib.PIXEL_MEAN, np.float32))
            / np.asarray(clip_lib.PIXEL_STD, np.float32))


def sam_resized_hw(height: int, width: int, *, size: int) -> tuple[int, int]:
    """SAM's ``ResizeLongestSide.get_preprocess_shape``: the longest side ``size``, each side
    rounded half up."""
    scale = size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def sam_pixels(image: np.ndarray, *, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """``(pixels float32 [size, size, 3], resized_hw)``: ``ResizeLongestSide.apply_image`` (PIL
    bilinear on uint8), SAM's mean and std, zero padding at the bottom and right (LISA's
    ``preprocess``)."""
    resized_hw = sam_resized_hw(*image.shape[:2], size=size)
    resized = np.asarray(Image.fromarray(image).resize(resized_hw[::-1],
                                                       Image.Resampling.BILINEAR))
    out = np.zeros((size, size, 3), np.float32)
    out[:resized_hw[0], :resized_hw[1]] = (
        (resized.astype(np.float32) - np.asarray(sam_lib.PIXEL_MEAN, np.float32))
        / np.asarray(sam_lib.PIXEL_STD, np.float32))
    return out, resized_hw


# ---------------------------------------------------------------------------------- sample


def _pad_rows(rows: Sequence[Sequence[int]], *, count: int, length: int, pad_id: int,
              what: str) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((count, length), pad_id, np.int32)
    mask = np.zeros((count, length), bool)
    for index, row in enumerate(rows):
        if len(row) > length:
            raise ValueError(f"{what}: conversation {index} has {len(row)} tokens, more than "
                             f"the {length} slots")
        ids[index, :len(row)] = row
        mask[index, :len(row)] = True
    return ids, mask


def _answer_rows(pieces: Sequence[conversation.ConversationTokens], *, length: int,
                 seg_id: int, what: str) -> tuple[list[list[int]], list[list[bool]]]:
    """Each conversation's ``tokens`` and ``label_mask``, the answer's tail past ``length`` cut
    when no ``[SEG]`` is in it (LISA truncates over-long conversations at the end)."""
    tokens, labels = [], []
    for index, piece in enumerate(pieces):
        if seg_id in piece.tokens[length:]:
            raise ValueError(f"{what}: conversation {index} has {len(piece.tokens)} tokens and a "
                             f"{SEG_TOKEN} past the {length} slots")
        tokens.append(piece.tokens[:length])
        labels.append(piece.label_mask[:length])
    return tokens, labels


def build_sample(*, image_id: str, image: np.ndarray,
                 conversations: Sequence[tuple[str, str]], masks: Sequence[np.ndarray],
                 mask_ids: Sequence[str], tokenizer: Tokenizer, seg_token_id: int,
                 sizes: LisaSizes) -> dict[str, Any]:
    """One image's sample (module docstring): ``conversations`` are ``(question, answer)``
    pairs, ``masks`` uint8 ``[H0, W0]`` one per ``[SEG]`` of the answers in order, ``mask_ids``
    one per mask. Raises ``ValueError`` naming ``image_id`` and the field that does not fit."""
    what = f"example {image_id}"
    height, width = image.shape[:2]
    if len(conversations) > sizes.conversations:
        raise ValueError(f"{what}: {len(conversations)} conversations, more than "
                         f"sizes.conversations={sizes.conversations}")
    if len(masks) > sizes.max_masks:
        raise ValueError(f"{what}: {len(masks)} masks, more than sizes.max_masks="
                         f"{sizes.max_masks}")
    if height > sizes.mask_hw[0] or width > sizes.mask_hw[1]:
        raise ValueError(f"{what}: field 'image' is {height}x{width}, larger than "
                         f"sizes.mask_hw={tuple(sizes.mask_hw)}")
    pieces = [conversation.tokenize(question, answer, tokenizer)
              for question, answer in conversations]
    seg_count = sum(piece.tokens.count(seg_token_id) for piece in pieces)
    if seg_count != len(masks) or len(mask_ids) != len(masks):
        raise ValueError(f"{what}: the answers hold {seg_count} {SEG_TOKEN} tokens for "
                         f"{len(masks)} masks and {len(mask_ids)} mask ids")
    count, pad = sizes.conversations, tokenizer.pad_id
    before, before_mask = _pad_rows([p.prompt_before for p in pieces], count=count,
                                    length=sizes.prompt_before, pad_id=pad,
                                    what=f"{what} field 'prompt_before'")
    after, after_mask = _pad_rows([p.prompt_after for p in pieces], count=count,
                                  length=sizes.prompt_after, pad_id=pad,
                                  what=f"{what} field 'prompt_after'")
    token_rows, label_rows = _answer_rows(pieces, length=sizes.tokens, seg_id=seg_token_id,
                                          what=f"{what} field 'tokens'")
    tokens, token_mask = _pad_rows(token_rows, count=count, length=sizes.tokens, pad_id=pad,
                                   what=f"{what} field 'tokens'")
    label_mask = np.zeros((count, sizes.tokens), bool)
    for index, row in enumerate(label_rows):
        label_mask[index, :len(row)] = row
    mask_array = np.zeros((sizes.max_masks, *sizes.mask_hw), np.uint8)
    for index, mask in enumerate(masks):
        if mask.shape != (height, width):
            raise ValueError(f"{what}: mask {index} is {list(mask.shape)}, the image "
                             f"{height}x{width}")
        mask_array[index, :height, :width] = mask
    pixel_valid = np.zeros(sizes.mask_hw, bool)
    pixel_valid[:height, :width] = True
    sam, resized_hw = sam_pixels(image, size=sizes.sam_image_size)
    return {
        "clip_pixels": clip_pixels(image, size=sizes.clip_image_size),
        "sam_pixels": sam,
        "prompt_before": before, "prompt_before_mask": before_mask,
        "prompt_after": after, "prompt_after_mask": after_mask,
        "tokens": tokens, "token_mask": token_mask, "label_mask": label_mask,
        "resized_hw": np.asarray(resized_hw, np.int32),
        "original_hw": np.asarray([height, width], np.int32),
        "masks": mask_array,
        "mask_valid": np.arange(sizes.max_masks) < len(masks),
        "pixel_valid": pixel_valid,
        "image_id": image_id,
        "mask_ids": tuple(mask_ids),
    }


def _sample_indices(count: int, limit: int, rng: np.random.Generator) -> list[int]:
    """LISA's query sampling: ``limit`` distinct indices at random, or all in order if fewer."""
    if count >= limit:
        return [int(i) for i in rng.choice(count, size=limit, replace=False)]
    return list(range(count))


def _question(query: str, *, is_sentence: bool, rng: np.random.Generator) -> str:
    if is_sentence:
        return str(rng.choice(conversation.LONG_QUESTION_LIST)).format(sent=query)
    return str(rng.choice(conversation.SHORT_QUESTION_LIST)).format(class_name=query.lower())


def _answer(rng: np.random.Generator) -> str:
    return str(rng.choice(conversation.ANSWER_LIST))


def _reason_seg_fields(example: Mapping[str, Any], image_id: str
                       ) -> tuple[np.ndarray, list[str], bool, np.ndarray]:
    image = example_fields.image(example, image_id)
    queries = example_fields.texts(example_fields.field(example, "queries", image_id))
    if not queries:
        raise ValueError(f"example {image_id}: field 'queries' is empty")
    mask = np.asarray(example_fields.field(example, "mask", image_id))
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.shape != image.shape[:2]:
        raise ValueError(f"example {image_id}: field 'mask' is {list(mask.shape)}, the image "
                         f"{list(image.shape[:2])}")
    return image, queries, bool(example_fields.field(example, "is_sentence", image_id)), mask


def _explanation(example: Mapping[str, Any]) -> str | None:
    """The image's explanation (the builder's ``explanations/outputs``): the last entry, as
    LISA's image -> explanation dict keeps; None without one."""
    explanations = example.get("explanations")
    outputs = example_fields.texts(explanations["outputs"]) if explanations is not None else []
    return outputs[-1] if outputs else None


def reason_seg_train_sample(example: Mapping[str, Any], *, tokenizer: Tokenizer,
                            seg_token_id: int, sizes: LisaSizes, rng: np.random.Generator,
                            num_classes_per_sample: int = 3,
                            explanatory: float = 0.1) -> dict[str, Any]:
    """LISA's ``ReasonSegDataset`` sample of a ReasonSeg example (module docstring);
    ``explanatory < 0`` turns the explanatory mode off (LISA's ``-1``)."""
    image_id = example_fields.image_id(example)
    image, queries, is_sentence, mask = _reason_seg_fields(example, image_id)
    chosen = _sample_indices(len(queries), num_classes_per_sample, rng)
    explanation = _explanation(example) if explanatory >= 0 else None
    mode = _SEG_ANSWER
    if explanation is not None:
        mode = (_EXPLANATION_ONLY if rng.random() < explanatory
                else (_SEG_ANSWER, _SEG_AND_EXPLANATION)[int(rng.integers(0, 2))])
    conversations = []
    for index in chosen:
        query = queries[index]
        question = _question(query, is_sentence=is_sentence, rng=rng)
        if mode == _SEG_ANSWER:
            conversations.append((question, _answer(rng)))
        elif mode == _SEG_AND_EXPLANATION:
            extra = str(rng.choice(conversation.EXPLANATORY_QUESTION_LIST))
            conversations.append((f"{conversation.DEFAULT_IMAGE_TOKEN}\n{query} {extra}",
                                  f"{_answer(rng)} {explanation}"))
        else:
            conversations.append((f"{conversation.DEFAULT_IMAGE_TOKEN}\n{query}", explanation))
    with_masks = mode != _EXPLANATION_ONLY
    target = (mask == 1).astype(np.uint8)
    return build_sample(
        image_id=image_id, image=image, conversations=conversations,
        masks=[target] * len(chosen) if with_masks else [],
        mask_ids=[f"{image_id}/{i}" for i in chosen] if with_masks else [],
        tokenizer=tokenizer, seg_token_id=seg_token_id, sizes=sizes)


def reason_seg_val_sample(example: Mapping[str, Any], *, tokenizer: Tokenizer,
                          seg_token_id: int, sizes: LisaSizes) -> dict[str, Any]:
    """LISA's ``ValDataset`` sample of a ReasonSeg example: the first query answered
    ``[SEG].``, the mask with its 255 pixels kept."""
    image_id = example_fields.image_id(example)
    image, queries, is_sentence, mask = _reason_seg_fields(example, image_id)
    template = VAL_SENTENCE_QUESTION if is_sentence else VAL_PHRASE_QUESTION
    return build_sample(image_id=image_id, image=image,
                        conversations=[(template.format(queries[0].strip()), VAL_ANSWER)],
                        masks=[mask.astype(np.uint8)], mask_ids=[f"{image_id}/0"],
                        tokenizer=tokenizer, seg_token_id=seg_token_id, sizes=sizes)


def _refcoco_expressions(example: Mapping[str, Any], image_id: str
                         ) -> tuple[np.ndarray, list[tuple[str, np.ndarray, str]]]:
    """``(image, [(sentence, mask 0/1 [H, W], expression id)])`` of a ``refer_coco`` example."""
    image = example_fields.image(example, image_id)
    objects = example_fields.field(example, "objects", image_id)
    expressions = example_fields.field(example, "expressions", image_id)
    object_masks = np.asarray(objects["mask"])
    if object_masks.ndim == 4:
        object_masks = object_masks[..., 0]
    texts = example_fields.texts(expressions["text"])
    owners = np.asarray(expressions["object"]).reshape(-1)
    ids = np.asarray(expressions["id"]).reshape(-1)
    out = []
    for text, owner, expression_id in zip(texts, owners, ids):
        if not 0 <= owner < len(object_masks):
            raise ValueError(f"example {image_id}: field 'expressions/object' {owner} is not "
                             f"one of its {len(object_masks)} objects")
        out.append((text, (object_masks[owner] > 0).astype(np.uint8), str(int(expression_id))))
    if not out:
        raise ValueError(f"example {image_id}: field 'expressions' is empty")
    return image, out


def refcoco_train_sample(example: Mapping[str, Any], *, tokenizer: Tokenizer,
                         seg_token_id: int, sizes: LisaSizes, rng: np.random.Generator,
                         num_classes_per_sample: int = 3) -> dict[str, Any]:
    """LISA's ``ReferSegDataset`` sample of a ``refer_coco`` example: up to
    ``num_classes_per_sample`` sentences of the image, short questions, one mask each."""
    image_id = example_fields.image_id(example)
    image, expressions = _refcoco_expressions(example, image_id)
    chosen = [expressions[i] for i in _sample_indices(len(expressions), num_classes_per_sample,
                                                      rng)]
    conversations = [(_question(text.strip(), is_sentence=False, rng=rng), _answer(rng))
                     for text, _, _ in chosen]
    return build_sample(image_id=image_id, image=image, conversations=conversations,
                        masks=[mask for _, mask, _ in chosen],
                        mask_ids=[f"{image_id}/{eid}" for _, _, eid in chosen],
                        tokenizer=tokenizer, seg_token_id=seg_token_id, sizes=sizes)


def refcoco_val_samples(example: Mapping[str, Any], *, tokenizer: Tokenizer,
                        seg_token_id: int, sizes: LisaSizes) -> list[dict[str, Any]]:
    """LISA's ``ValDataset`` of a ``refer_coco`` example: every sentence (stripped,
    lower-cased) answered ``[SEG].``, in samples of ``min(C, M)`` conversations."""
    image_id = example_fields.image_id(example)
    image, expressions = _refcoco_expressions(example, image_id)
    per_sample = min(sizes.conversations, sizes.max_masks)
    samples = []
    for start in range(0, len(expressions), per_sample):
        chunk = expressions[start:start + per_sample]
        samples.append(build_sample(
            image_id=image_id, image=image,
            conversations=[(VAL_PHRASE_QUESTION.format(text.strip().lower()), VAL_ANSWER)
                           for text, _, _ in chunk],
            masks=[mask for _, mask, _ in chunk],
            mask_ids=[f"{image_id}/{eid}" for _, _, eid in chunk],
            tokenizer=tokenizer, seg_token_id=seg_token_id, sizes=sizes))
    return samples


# ---------------------------------------------------------------------------------- batch


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Samples of the same :class:`LisaSizes` -> a batch: every array field stacked on a new
    leading axis ``B``; ``image_id`` and ``mask_ids`` as lists."""
    if not samples:
        raise ValueError("collate: no samples")
    batch: dict[str, Any] = {}
    for key in _ARRAY_FIELDS:
        shapes = {np.shape(sample[key]) for sample in samples}
        if len(shapes) != 1:
            ids = [sample["image_id"] for sample in samples]
            raise ValueError(f"collate: field {key!r} has shapes {sorted(shapes)} across "
                             f"examples {ids}; build them with the same LisaSizes")
        batch[key] = np.stack([sample[key] for sample in samples])
    batch["image_id"] = [sample["image_id"] for sample in samples]
    batch["mask_ids"] = [list(sample["mask_ids"]) for sample in samples]
    return batch


def lisa_inputs(batch: Mapping[str, Any]) -> LisaInputs:
    """The model's inputs of a :func:`collate` batch (numpy arrays)."""
    return LisaInputs(**{key: batch[key] for key in _INPUT_FIELDS})
