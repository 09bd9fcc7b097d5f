"""LLaVA-style visual instruction data as a TFDS builder: question -> answer turns about an image.

The instruction-tuning mixtures of LLaVA 1.5 (``llava_v1_5_mix665k.json``) and ShareGPT4V
(``sharegpt4v_mix665k_cap23k_coco-ap9k_lcs3k_sam9k_div2k.json``, the one the official
multi-task PixelLLM trains on) are one JSON list of conversations::

    [{"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                        {"from": "gpt", "value": "The bus is white and red."}, ...]}, ...]

``image`` is a path relative to the image root (``manual_dir``), in the folders the mixture
names: ``coco/train2017``, ``gqa/images``, ``ocr_vqa/images``, ``textvqa/train_images``,
``vg/VG_100K``, ``vg/VG_100K_2`` (ShareGPT4V adds ``sam/images``, ``share_textvqa/images``,
``web-celebrity/images``, ``web-landmark/images``, ``wikiart/images``,
``llava/llava_pretrain/images``). Whatever folder it names is read; a path leaving
``manual_dir`` (absolute, or through ``..``) is refused as a bad field.

Example layout (one example per entry with an image, as the official ``build_llava_tfrecord.py``
writes one record per entry; an image two entries name is in two examples)::

    image            uint8 [H, W, 3]   RGB in the stored frame (see data_pipelines.images)
    image/id         text              the entry's ``id``
    image/filename   text              the entry's ``image`` path
    image/height, image/width   int32
    turns            sequence [T], in conversation order, of {question: text, answer: text}

Each human turn and the gpt turn answering it is one ``(question, answer)`` pair; the pipeline
trains each pair as its own slot (context ``"Question: " + question + "Answer: "``, the task
``question_answer`` of :mod:`pixelllm.tasks`), up to the slot count (16 officially) per image.
The ``<image>`` marker is removed wherever it is in a turn (the official removes only
``"<image>\\n"`` and ``"\\n<image>"``), and the whitespace it leaves is tidied: the text is
stripped, and a marker between two pieces of text leaves one newline if a newline touched it,
else one space.

Splits: the mixtures have only training data, so one image in :attr:`LlavaInstructionsConfig.
held_out_every` (100 by default) is held out for evaluation, as split ``held_out``, and every
other image is in ``train``. The choice is by the image, not the entry: an image several entries
name (the public ``id`` repeats, and one image may carry several conversations) is wholly in one
split, so no held-out question is about an image the model trained on. An image is held out when
the 64-bit BLAKE2b hash of its ``image`` path (``/``-separated, as written in the json) is 0
modulo ``held_out_every`` (:func:`is_held_out`): stable across runs, machines and versions of
the json, unlike Python's ``hash``. A held-out entry of more than :data:`HELD_OUT_TURNS`
pairs becomes several examples of at most that many, in conversation order (keys
``"<position>/<part>"``), since evaluation scores every pair of an example in its own slot and
has 16 slots, the official multi-task count; the pairs themselves are the same as in training.

Bad records go through :class:`~data_pipelines.skips.SkipCounter` (``skip_policy``; reasons in
:data:`SKIP_REASONS`), in the counts of the split their image is in (an entry without a usable
``image`` path in ``train``'s): an entry without ``image`` is counted
as :data:`TEXT_ONLY` (the mixtures hold ShareGPT text conversations, which have no image to
ground), one whose image file is missing or corrupt as :data:`MISSING_IMAGE` /
:data:`~data_pipelines.builders.common.CORRUPT_IMAGE`; a human turn with no gpt turn after it
(a conversation of odd length ends with one) as :data:`UNANSWERED`, a gpt turn with no
question before it as :data:`UNASKED`, a pair whose question or answer is empty (after marker
removal) as :data:`EMPTY_TURN`; an entry left without pairs as :data:`NO_TURNS`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import tensorflow_datasets as tfds

from data_pipelines.builders.common import (CORRUPT_IMAGE, SkipPolicyBuilder,
                                            UnusableRecordError, image_fields, is_int)
from data_pipelines.images import ImageError, encode_for_storage
from data_pipelines.skips import SkipCounter

# Reasons an entry or turn is skipped (the SkipCounter categories).
BAD_FIELD = "missing or invalid field"
TEXT_ONLY = "text-only entry (no image)"
MISSING_IMAGE = "missing image"
UNANSWERED = "question without answer"
UNASKED = "answer without question"
EMPTY_TURN = "empty question or answer"
NO_TURNS = "entry without usable turns"
SKIP_REASONS = (BAD_FIELD, TEXT_ONLY, MISSING_IMAGE, CORRUPT_IMAGE, UNANSWERED, UNASKED,
                EMPTY_TURN, NO_TURNS)

HUMAN = "human"
GPT = "gpt"
IMAGE_MARKER = "<image>"
# Pairs per held-out example: the slots of the multi-task evaluation (configs/data.py).
HELD_OUT_TURNS = 16
TRAIN = "train"
HELD_OUT = "held_out"
_MARKER_WITH_SPACE = re.compile(r"\s*" + re.escape(IMAGE_MARKER) + r"\s*")


class BadEntryError(UnusableRecordError):
    """An entry that cannot be used; ``reason`` is one of :data:`SKIP_REASONS`."""


def remove_image_markers(text: str) -> str:
    """``text`` without ``<image>`` markers, whitespace tidied (see the module docstring)."""

    def replace(match: re.Match) -> str:
        at_edge = match.start() == 0 or match.end() == len(text)
        return "" if at_edge else ("\n" if "\n" in match.group() else " ")

    return _MARKER_WITH_SPACE.sub(replace, text).strip()


def parse_turns(conversations: Any, *, skips: SkipCounter, file: str,
                record: str) -> list[tuple[str, str]]:
    """The ``(question, answer)`` pairs of a ``conversations`` list; unpaired and empty turns
    are reported to ``skips``.

    Raises:
      BadEntryError: ``conversations`` is not a list of ``{from: human|gpt, value: str}``.
    """
    if not isinstance(conversations, list):
        raise BadEntryError(BAD_FIELD, "field 'conversations' is not a list")
    turns = []
    for index, turn in enumerate(conversations):
        speaker = turn.get("from") if isinstance(turn, Mapping) else None
        value = turn.get("value") if isinstance(turn, Mapping) else None
        if speaker not in (HUMAN, GPT) or not isinstance(value, str):
            raise BadEntryError(BAD_FIELD, f"conversations[{index}] is not {{from: human|gpt, "
                                "value: string}")
        turns.append((speaker, remove_image_markers(value)))
    pairs = []
    question = None
    for index, (speaker, text) in enumerate(turns):
        where = f"{record} turn {index}"
        if speaker == HUMAN:
            if question is not None:
                skips.bad(UNANSWERED, file=file, record=where,
                          detail="a human turn follows an unanswered one")
            question = text
            continue
        if question is None:
            skips.bad(UNASKED, file=file, record=where, detail="a gpt turn answers no question")
        elif not question or not text:
            skips.bad(EMPTY_TURN, file=file, record=where,
                      detail=f"question {question[:40]!r} or answer {text[:40]!r} is empty")
        else:
            pairs.append((question, text))
        question = None
    if question is not None:
        skips.bad(UNANSWERED, file=file, record=f"{record} turn {len(turns) - 1}",
                  detail="the conversation ends with a human turn")
    return pairs


def image_path(manual_dir: str, image: Any) -> str:
    """The file of an entry's ``image`` under ``manual_dir``.

    Raises:
      BadEntryError: ``image`` is not a relative path inside ``manual_dir``.
    """
    if not isinstance(image, str) or not image:
        raise BadEntryError(BAD_FIELD, f"field 'image' is {image!r}, not a path")
    parts = image.replace("\\", "/").split("/")
    if os.path.isabs(image) or ".." in parts:
        raise BadEntryError(BAD_FIELD, f"image {image!r} is not a path inside the image root")
    return os.path.join(manual_dir, image)


def is_held_out(image: str, *, every: int) -> bool:
    """Whether the image at path ``image`` (an entry's ``image`` field) is in split
    ``held_out``: one image in ``every``, by a stable hash of the path (module docstring)."""
    digest = hashlib.blake2b(image.replace("\\", "/").encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % every == 0


@dataclasses.dataclass(eq=False)
class LlavaInstructionsConfig(tfds.core.BuilderConfig):
    """Which mixture's json to read (a file name in ``manual_dir``), and how many images hold
    one out (``held_out_every``: one in that many goes to split ``held_out``)."""

    json_file: str = ""
    held_out_every: int = 100

    def __post_init__(self):
        if self.held_out_every < 2:
            raise ValueError(f"LlavaInstructionsConfig {self.name!r}: held_out_every must be "
                             f">= 2 (one image in that many is held out), got "
                             f"{self.held_out_every}")


class LlavaInstructions(SkipPolicyBuilder):
    """LLaVA-style instruction data, one example per entry with an image (module docstring).

    Takes :class:`~data_pipelines.builders.common.SkipPolicyBuilder`'s ``skip_policy`` and
    keeps its ``skip_counts`` (per split, ``train`` and ``held_out``).
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "1.1.0": "Split held_out: one image in 100, out of train."}
    BUILDER_CONFIGS = [
        LlavaInstructionsConfig(name="llava_v1_5_mix665k", json_file="llava_v1_5_mix665k.json",
                                description="LLaVA 1.5's instruction mixture."),
        LlavaInstructionsConfig(
            name="sharegpt4v_mix665k",
            json_file="sharegpt4v_mix665k_cap23k_coco-ap9k_lcs3k_sam9k_div2k.json",
            description="ShareGPT4V's mixture (the official multi-task PixelLLM's)."),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    The json of the mixture (LLaVA: huggingface.co/datasets/liuhaotian/LLaVA-Instruct-150K;
    ShareGPT4V: huggingface.co/datasets/Lin-Chen/ShareGPT4V) and the image folders it names,
    as LLaVA's README lays them out (github.com/haotian-liu/LLaVA, "Visual Instruction Tuning"):

      manual_dir/
        llava_v1_5_mix665k.json
        coco/train2017/  gqa/images/  ocr_vqa/images/  textvqa/train_images/
        vg/VG_100K/  vg/VG_100K_2/
        (ShareGPT4V also: sam/images/ share_textvqa/images/ web-celebrity/images/
         web-landmark/images/ wikiart/images/ llava/llava_pretrain/images/)

    Symbolic links to existing folders work.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self._dataset_info(
            features={
                "turns": tfds.features.Sequence({
                    "question": tfds.features.Text(),
                    "answer": tfds.features.Text(),
                }),
            },
            homepage="https://llava-vl.github.io",
            citation=_CITATION,
        )

    def _example_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        path = os.path.join(manual_dir, self.builder_config.json_file)
        present = [TRAIN, HELD_OUT] if os.path.exists(path) else []
        self._choose_splits(present, {} if present else {TRAIN: path, HELD_OUT: path})
        entries = _load_entries(path)
        return {split: self._generate_examples(split, entries=entries, path=path,
                                               manual_dir=manual_dir)
                for split in (TRAIN, HELD_OUT)}

    def _generate_examples(self, split: str, *, entries: list, path: str,
                           manual_dir: str) -> Iterator[tuple[str, dict]]:
        skips = self._skip_counter()
        every = self.builder_config.held_out_every
        num_examples = 0
        for index, entry in enumerate(entries):
            image = entry.get("image") if isinstance(entry, Mapping) else None
            # An entry without a usable path is counted once, in train's counts.
            held_out = isinstance(image, str) and bool(image) and is_held_out(image,
                                                                              every=every)
            if held_out != (split == HELD_OUT):
                continue
            example = _example(entry, index=index, path=path, manual_dir=manual_dir,
                               skips=skips)
            if example is None:
                continue
            # The position: ids repeat in the public mixtures, keys must not.
            if split == TRAIN:
                num_examples += 1
                yield str(index), example
                continue
            turns = example["turns"]
            for part, start in enumerate(range(0, len(turns), HELD_OUT_TURNS)):
                num_examples += 1
                yield f"{index}/{part}", {**example,
                                          "turns": turns[start:start + HELD_OUT_TURNS]}
        self._keep_skip_counts(split, skips)
        self._refuse_empty_split(
            split, num_examples=num_examples, skips=skips,
            detail=f"none of the {len(entries)} entries gave an example of this split (images "
                   f"in {manual_dir}? one image in {every} is held out)")


def _load_entries(path: str) -> list:
    with open(path, "rb") as f:
        try:
            entries = json.load(f)
        except ValueError as error:
            raise ValueError(f"{path}: not valid JSON: {error}") from error
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of conversations at the top level")
    return entries


def _example(entry: Any, *, index: int, path: str, manual_dir: str,
             skips: SkipCounter) -> dict | None:
    entry_id = entry.get("id") if isinstance(entry, Mapping) else None
    record = f"entry {index} (id {entry_id!r})"
    try:
        if not (isinstance(entry_id, str) and entry_id) and not is_int(entry_id):
            raise BadEntryError(BAD_FIELD, f"field 'id' is {entry_id!r}, not a string or "
                                "integer")
        if "image" not in entry:
            raise BadEntryError(TEXT_ONLY, "the entry names no image")
        file = image_path(manual_dir, entry["image"])
        pairs = parse_turns(entry.get("conversations"), skips=skips, file=path, record=record)
    except BadEntryError as error:
        skips.bad(error.reason, file=path, record=record, detail=str(error))
        return None
    if not pairs:
        skips.bad(NO_TURNS, file=path, record=record, detail="no (question, answer) pair")
        return None
    if not os.path.exists(file):
        skips.bad(MISSING_IMAGE, file=file, record=record, detail="image file not found")
        return None
    try:
        encoded, height, width = encode_for_storage(file, name=file)
    except ImageError as error:
        skips.bad(CORRUPT_IMAGE, file=file, record=record, detail=str(error))
        return None
    return {
        **image_fields(encoded=encoded, image_id=str(entry_id), filename=entry["image"],
                       height=height, width=width),
        "turns": [{"question": question, "answer": answer} for question, answer in pairs],
    }


_CITATION = """\
@inproceedings{liu2023visual,
  title     = {Visual Instruction Tuning},
  author    = {Haotian Liu and Chunyuan Li and Qingyang Wu and Yong Jae Lee},
  booktitle = {NeurIPS},
  year      = {2023}
}
@article{chen2023sharegpt4v,
  title   = {ShareGPT4V: Improving Large Multi-Modal Models with Better Captions},
  author  = {Lin Chen and Jinsong Li and Xiaoyi Dong and Pan Zhang and Conghui He and
             Jiaqi Wang and Feng Zhao and Dahua Lin},
  journal = {arXiv preprint arXiv:2311.12793},
  year    = {2023}
}
"""
