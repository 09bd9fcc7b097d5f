"""Slot texts -> tokens, and per-token trace targets; the last op of every chain.

Reads the texts :mod:`slot` leaves (``slots/context``, ``slots/text``, ``slots/trace``,
``gt/text``) and writes the token keys of the batch contract, so the example is then exactly the
contract:

* ``context_tokens [S, Lc]``: the prompt, then EOS ("following BLIP2"); a prompt longer than
  ``Lc - 1`` tokens is cut, the EOS kept. Used slots, and unused ones that carry a prompt (the
  dense-captioning slots the model fills from proposals), get one.
* ``text_tokens [S, L]`` (and ``gt_text_tokens [G, L]``): BOS, the text, EOS; cut to ``L - 2``
  text tokens, EOS kept, so the box of a referring slot is always read at an EOS and a cut
  caption still teaches the model to stop (the official tokenizer wrapper pads to the length and
  then cuts, dropping the EOS of any text that does not fit: a defect fixed here). BOS is the
  tokenizer's, or for families without one (T5) the decoder start id, the pad id (T5: 0),
  unless ``decoder_start_id`` says otherwise.
* Padding is the tokenizer's pad id; the ``*_mask`` keys are True on real tokens only.
* ``token_points [S, L, K, 2]`` / ``token_points_mask [S, L]`` for trace slots: each text token
  takes an utterance of the narrative by :mod:`data_pipelines.alignment` (``"official"`` rank
  rule, the default, or ``"exact"`` word matching), computed on the truncated tokens and on the
  narrative as stored (before augmentation, so a flip cannot change it); its targets are that
  utterance's trace box corners (K = 2) or K trace points, in canvas pixels after every
  geometric op (the exact rule reads the raw trace points in each utterance's window, moved
  by the same ops). Tokens of utterances that are invalid or left the image in a crop (under
  the exact rule also: with no trace point in their window inside the image), BOS, EOS and
  padding get none.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from data_pipelines import alignment as trace_alignment
from data_pipelines.ops import fields, registry, slot
from pixelllm.language.tokenizer import Tokenizer, load_tokenizer


@dataclasses.dataclass(frozen=True)
class Encoder:
    """Text -> padded token rows, with the ids the contract needs.

    Attributes:
      tokenizer: the language model's tokenizer.
      bos_id: the first token of every text (BOS or decoder start).
    """

    tokenizer: Tokenizer
    bos_id: int

    def context(self, text: str, *, length: int) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens [length], mask [length])``: ``text`` then EOS, padded."""
        ids = self.tokenizer.encode(text)[:length - 1] + [self.tokenizer.eos_id]
        return self._pad(ids, length)

    def text(self, text: str, *, length: int) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens [length], mask [length])``: BOS, ``text``, EOS, padded."""
        ids = [self.bos_id] + self.tokenizer.encode(text)[:length - 2] + [self.tokenizer.eos_id]
        return self._pad(ids, length)

    def text_with_words(self, text: str, *, length: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As :meth:`text`, plus ``word_index [length]``: the word of ``text.split()`` each
        token came from, -1 on BOS, EOS and padding."""
        ids, words = self.tokenizer.encode_with_alignment(text)
        ids = [self.bos_id] + ids[:length - 2] + [self.tokenizer.eos_id]
        words = [-1] + words[:length - 2] + [-1]
        tokens, mask = self._pad(ids, length)
        return tokens, mask, np.asarray(words + [-1] * (length - len(words)), np.int32)

    def _pad(self, ids: list[int], length: int) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.full((length,), self.tokenizer.pad_id, np.int32)
        tokens[:len(ids)] = ids
        return tokens, np.arange(length) < len(ids)


def trace_targets(narrative: fields.Example, *, word_index: np.ndarray, valid_wh: np.ndarray,
                  method: str, num_points: int) -> tuple[np.ndarray, np.ndarray]:
    """``(points [T, K, 2], mask [T])`` in canvas pixels for the tokens of ``narrative``'s
    caption (see the module docstring)."""
    stored = narrative[fields.ALIGNMENT_TRACES]
    # The transformed traces, normalized to the valid area.
    scale = np.maximum(np.asarray(valid_wh, np.float32), 1e-6)
    moved = dataclasses.replace(stored,
                                boxes=narrative[fields.UTTERANCE_BOXES] / np.tile(scale, 2),
                                trace_xy=narrative[fields.TRACE_POINTS] / scale)
    usable = narrative[fields.UTTERANCE_VALID] & narrative[fields.UTTERANCE_VISIBLE]
    if method == "official":
        if num_points != 2:
            raise ValueError("the official alignment regresses the 2 trace-box corners; "
                             f"points_per_token={num_points} needs alignment='exact'")
        assignment = trace_alignment.official_assignment(stored, word_index=word_index)
        per_utterance = trace_alignment.official_utterance_targets(moved)
    elif method == "exact":
        assignment = trace_alignment.exact_assignment(stored, word_index=word_index)
        per_utterance, located = trace_alignment.exact_utterance_targets(moved,
                                                                         num_points=num_points)
        usable = usable & located
    else:
        raise ValueError(f"unknown alignment {method!r}; expected one of "
                         f"{trace_alignment.METHODS}")
    points, mask = trace_alignment.token_targets(per_utterance, assignment=assignment,
                                                 usable=usable)
    return (points * scale).astype(np.float32), mask


@registry.register("tokenize")
def tokenize(*, tokenizer: str | os.PathLike, context_length: int, text_length: int,
             points_per_token: int = 2, alignment: str = "official",
             decoder_start_id: int | None = None) -> registry.Op:
    """Tokenizes the slot texts (see the module docstring).

    Args:
      tokenizer: a tokenizer file or folder (:func:`pixelllm.language.tokenizer.load_tokenizer`).
      context_length: Lc.
      text_length: L.
      points_per_token: K.
      alignment: ``"official"`` or ``"exact"`` (:mod:`data_pipelines.alignment`).
      decoder_start_id: the first token of every text; default the tokenizer's BOS, or for
        families without one (T5) its pad id, the decoder start.
    """
    if context_length < 1 or text_length < 2:
        raise ValueError(f"tokenize: need context_length >= 1 and text_length >= 2, got "
                         f"{context_length}, {text_length}")
    if alignment not in trace_alignment.METHODS:
        raise ValueError(f"tokenize: unknown alignment {alignment!r}; expected one of "
                         f"{trace_alignment.METHODS}")
    if alignment == "official" and points_per_token != 2:
        raise ValueError("tokenize: the official alignment regresses the 2 trace-box corners; "
                         f"points_per_token={points_per_token} needs alignment='exact'")
    loaded = load_tokenizer(tokenizer)
    if decoder_start_id is None:
        decoder_start_id = loaded.bos_id if loaded.bos_id is not None else loaded.pad_id
    encoder = Encoder(tokenizer=loaded, bos_id=decoder_start_id)

    def op(example: fields.Example, rng: np.random.Generator) -> fields.Example:
        del rng  # deterministic
        out = {key: value for key, value in example.items()
               if key not in (slot.SLOT_CONTEXT, slot.SLOT_TEXT, slot.SLOT_TRACE, slot.GT_TEXT)}
        contexts, texts = example[slot.SLOT_CONTEXT], example[slot.SLOT_TEXT]
        num_slots, num_objects = len(texts), len(example[slot.GT_TEXT])
        used = example["slot_mask"]
        out["context_tokens"] = np.full((num_slots, context_length), loaded.pad_id, np.int32)
        out["context_mask"] = np.zeros((num_slots, context_length), bool)
        out["text_tokens"] = np.full((num_slots, text_length), loaded.pad_id, np.int32)
        out["text_mask"] = np.zeros((num_slots, text_length), bool)
        out["token_points"] = np.zeros((num_slots, text_length, points_per_token, 2),
                                       np.float32)
        out["token_points_mask"] = np.zeros((num_slots, text_length), bool)
        for s, context in enumerate(contexts):
            # Unused slots with a prompt are the dense-captioning ones the model fills.
            if used[s] or context:
                out["context_tokens"][s], out["context_mask"][s] = encoder.context(
                    context, length=context_length)
        for s in np.flatnonzero(used):
            narrative = example[slot.SLOT_TRACE][s]
            if narrative is None:
                out["text_tokens"][s], out["text_mask"][s] = encoder.text(
                    texts[s], length=text_length)
                continue
            tokens, mask, words = encoder.text_with_words(texts[s], length=text_length)
            out["text_tokens"][s], out["text_mask"][s] = tokens, mask
            out["token_points"][s], out["token_points_mask"][s] = trace_targets(
                narrative, word_index=words, valid_wh=example[fields.VALID_WH], method=alignment,
                num_points=points_per_token)
        out["gt_text_tokens"] = np.full((num_objects, text_length), loaded.pad_id, np.int32)
        out["gt_text_mask"] = np.zeros((num_objects, text_length), bool)
        for g in np.flatnonzero(example["gt_mask"]):
            out["gt_text_tokens"][g], out["gt_text_mask"][g] = encoder.text(
                example[slot.GT_TEXT][g], length=text_length)
        return out

    return op

