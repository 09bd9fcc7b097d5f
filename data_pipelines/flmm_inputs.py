"""F-LMM's RefCOCO/+/g samples from built ``refer_coco`` examples (numpy, on the host).

F-LMM trains and evaluates on RefCOCO *per image*: every object referred to in the image is one
phrase of a single caption, the phrases joined by ``'.'`` tokens, and each phrase has the mask of
its object. The records come from mmdetection 3.3's ``RefCocoDataset`` (``load_data_list``) and
F-LMM's ``RefCOCO2PNG`` transform (``flmm/datasets/transforms.py``, ``transform_concat``); this
module rebuilds both views from :class:`~data_pipelines.builders.refcoco.ReferCoco` examples,
which already hold one image of one split with its refs sorted by ``ref_id``:

* **Objects**, in ``RefCocoDataset``'s order, one per COCO annotation: refs of the split that
  point to the same annotation are one object (its dict keyed by ``ann_id``), placed where the
  first of them is and holding the sentences of the *last* one (``ann.update(ref)`` overwrites
  the annotation shared by all of them). mmdetection walks the refs in the pickle's order; this
  module in ``ref_id`` order, the builder's, which is the same for files listed by ``ref_id``.
* **Phrase text**: a sentence's ``raw`` typing, lower-cased (``x['raw'].lower()``), neither
  stripped nor cleaned (the builder's ``sent`` is not what F-LMM reads).
* **Which sentence**: for training (F-LMM's config leaves ``text_mode`` at mmdetection's
  ``'random'``) one sentence per object drawn uniformly *once*, when the dataset is loaded, and
  kept for every epoch: :func:`refcoco_train_sample` draws it from ``(seed, annotation id)`` so it
  is fixed for a run. For evaluation (``scripts/multiprocess_eval_refcoco.py``:
  ``text_mode='select_first'``, run with ``--concat`` as F-LMM's README does) the first sentence.
  All objects of the image are phrases; F-LMM caps neither their number nor the caption's length.
  (The script without ``--concat`` runs one forward per object instead, its caption that phrase
  alone: :func:`caption_tokens` of one phrase; the scores are per object either way.)
* **Caption tokens** (``transform_concat``): each phrase tokenized on its own without special
  tokens, followed by the last id of the tokenized ``'.'``; the phrase's tokens are its span
  (F-LMM's ``mask_ids``; the ``'.'`` belongs to no phrase). The caption follows F-LMM's prompt
  (:data:`pixelllm.models.flmm.llava.PROMPT`; :func:`~pixelllm.models.flmm.llava.pack_inputs`
  takes ``caption_tokens`` and :func:`~pixelllm.models.flmm.attention_maps.llava_grounding` the
  spans). Tokenizing phrases one by one is not tokenizing the joined text, so spans come from the
  token lists, not from character offsets.
* **Masks**: the object's segmentation at the original image size (``LoadAnnotations`` with
  ``poly2mask``, the builder's ``annToMask`` rendering), 0/1.

Where the builder's records differ from mmdetection's: a ref the builder skipped (no usable
box or segmentation, or only sentences whose ``sent`` is empty) is absent here, where
mmdetection would keep it (an unreadable segmentation as an empty mask); a sentence with an empty
``sent`` is absent, so "first" is the first kept one.

Sample fields (``N`` phrases, ``L`` caption tokens, image ``H x W``)::

    image           uint8 [H, W, 3]
    image_id        str
    phrases         tuple[str, ...]  [N] the lower-cased sentences, in object order
    caption         str              the caption tokens decoded (for display and logs)
    caption_tokens  int32 [L]        phrase tokens and '.' ids, no BOS (the text after the prompt)
    phrase_spans    int32 [N, 2]     [start, end) of each phrase in caption_tokens
    masks           uint8 [N, H, W]  0/1, original size
    mask_ids        tuple[str, ...]  [N] "<image id>/<COCO annotation id>"
    sentence_ids    int64 [N]        the refer sent_id of each phrase
    original_hw     int32 [2]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data_pipelines import example_fields
from pixelllm.language.tokenizer import Tokenizer

SEPARATOR = "."  # RefCOCO2PNG's split token: the last id of tokenizer.encode('.')


@dataclasses.dataclass(frozen=True)
class ReferredObject:
    """One object of an image in ``RefCocoDataset``'s view: its annotation id, its sentences
    (``raw``, in the ref's order, with their ``sent_id``) and its 0/1 mask ``[H, W]``."""

    ann_id: int
    raws: tuple[str, ...]
    sentence_ids: tuple[int, ...]
    mask: np.ndarray


def referred_objects(example: Mapping[str, Any]) -> list[ReferredObject]:
    """The image's objects as ``RefCocoDataset`` lists them (module docstring): refs of one
    annotation merged at the first one's place with the last one's sentences.

    Raises:
      ValueError: a field is missing, an expression names no object, or an object has no
        sentence (names the example).
    """
    image_id = example_fields.image_id(example)
    image = np.asarray(example_fields.field(example, "image", image_id))
    objects = example_fields.field(example, "objects", image_id)
    expressions = example_fields.field(example, "expressions", image_id)
    ann_ids = np.asarray(objects["id"]).reshape(-1)
    masks = np.asarray(objects["mask"])
    if masks.ndim == 4:
        masks = masks[..., 0]
    if masks.shape != (len(ann_ids), *image.shape[:2]):
        raise ValueError(f"example {image_id}: field 'objects/mask' is {list(masks.shape)}, "
                         f"expected [{len(ann_ids)}, {image.shape[0]}, {image.shape[1]}]")
    owners = np.asarray(expressions["object"]).reshape(-1)
    raws = example_fields.texts(expressions["raw"])
    sentence_ids = np.asarray(expressions["id"]).reshape(-1)
    sentences: list[list[tuple[str, int]]] = [[] for _ in ann_ids]
    for owner, raw, sentence_id in zip(owners, raws, sentence_ids):
        if not 0 <= owner < len(ann_ids):
            raise ValueError(f"example {image_id}: field 'expressions/object' {owner} is not "
                             f"one of its {len(ann_ids)} objects")
        sentences[owner].append((raw, int(sentence_id)))
    # ann id -> index of the ref placing it (the first) and of the ref giving its sentences (the
    # last): the builder stores refs by ref_id, mmdetection's final_anno keeps insertion order.
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for index, ann_id in enumerate(int(a) for a in ann_ids):
        first.setdefault(ann_id, index)
        last[ann_id] = index
    out = []
    for ann_id, place in first.items():
        kept = sentences[last[ann_id]]
        if not kept:
            raise ValueError(f"example {image_id}: object {last[ann_id]} (annotation {ann_id}) "
                             "has no expression")
        out.append(ReferredObject(ann_id=ann_id, raws=tuple(r for r, _ in kept),
                                  sentence_ids=tuple(s for _, s in kept),
                                  mask=(masks[place] > 0).astype(np.uint8)))
    if not out:
        raise ValueError(f"example {image_id}: field 'objects' is empty")
    return out


def caption_tokens(phrases: Sequence[str], tokenizer: Tokenizer
                   ) -> tuple[np.ndarray, np.ndarray]:
    """F-LMM's ``transform_concat`` caption: ``(tokens int32 [L], spans int32 [N, 2])``.

    Each phrase is tokenized alone (no BOS) and followed by the separator id, the last id of
    ``tokenizer.encode('.')``; ``spans[i] = [start, end)`` of phrase ``i``'s tokens.

    Raises:
      ValueError: a phrase gives no token (F-LMM asserts every phrase has one).
    """
    separator = tokenizer.encode(SEPARATOR)[-1]
    tokens: list[int] = []
    spans = np.zeros((len(phrases), 2), np.int32)
    for index, phrase in enumerate(phrases):
        ids = tokenizer.encode(phrase)
        if not ids:
            raise ValueError(f"phrase {index} {phrase!r} gives no token")
        spans[index] = (len(tokens), len(tokens) + len(ids))
        tokens.extend(ids)
        tokens.append(separator)
    return np.asarray(tokens, np.int32), spans


def _sample(example: Mapping[str, Any], *, tokenizer: Tokenizer, choose) -> dict[str, Any]:
    image_id = example_fields.image_id(example)
    image = example_fields.image(example, image_id)
    objects = referred_objects(example)
    picks = [choose(obj) for obj in objects]
    phrases = tuple(obj.raws[k].lower() for obj, k in zip(objects, picks))
    try:
        tokens, spans = caption_tokens(phrases, tokenizer)
    except ValueError as error:
        raise ValueError(f"example {image_id}: {error}") from None
    return {
        "image": image,
        "image_id": image_id,
        "phrases": phrases,
        "caption": tokenizer.decode(tokens.tolist()),
        "caption_tokens": tokens,
        "phrase_spans": spans,
        "masks": np.stack([obj.mask for obj in objects]),
        "mask_ids": tuple(f"{image_id}/{obj.ann_id}" for obj in objects),
        "sentence_ids": np.asarray([obj.sentence_ids[k] for obj, k in zip(objects, picks)],
                                   np.int64),
        "original_hw": np.asarray(image.shape[:2], np.int32),
    }


def refcoco_train_sample(example: Mapping[str, Any], *, tokenizer: Tokenizer,
                         seed: int) -> dict[str, Any]:
    """F-LMM's training sample of a ``refer_coco`` training example: every object, one sentence
    each drawn uniformly from ``(seed, annotation id)``, the same for every epoch of a run as
    mmdetection's draw at load time (module docstring)."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return _sample(example, tokenizer=tokenizer,
                   choose=lambda obj: int(np.random.default_rng((seed, obj.ann_id))
                                          .integers(len(obj.raws))))


def refcoco_eval_sample(example: Mapping[str, Any], *, tokenizer: Tokenizer) -> dict[str, Any]:
    """F-LMM's evaluation sample of a ``refer_coco`` example (``--concat``, ``select_first``):
    every object with its first sentence, one forward for the whole image."""
    return _sample(example, tokenizer=tokenizer, choose=lambda obj: 0)
