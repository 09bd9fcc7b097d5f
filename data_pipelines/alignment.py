"""Which mouse-trace points each caption token of a Localized Narrative regresses.

A narrative's caption is cut into utterances (consecutive pieces of the caption, one or more
words each), and every utterance has a trace box and :data:`~.localized_narratives.NUM_SAMPLES`
trace samples in its time window (see :mod:`data_pipelines.builders.localized_narratives`).
Training PixelLLM on traces needs, per caption token, ``K`` target points. Two rules:

**Official** (:func:`official_assignment`, the default; the rule of the official PixelLLM
``DecodeLocalizedNarrativesAnnotations``). It never looks at the words. The ``K'`` usable
utterances (valid, text non-empty, time-averaged trace centre ``> 1e-5`` in both x and y) get
ranks ``k / K'`` (``k = 1..K'``); the ``j``-th of the ``J`` non-special tokens (``j = 1..J``)
gets rank ``first + (j / J) * (last - first)``, with ``first = 1 / K'`` and ``last = 1``, and
takes the utterance of nearest rank (ties: the earlier one). So tokens are spread evenly over
utterances whatever their word counts: a one-word utterance next to a ten-word one receives
tokens that belong to its neighbour.

**Exact** (:func:`exact_assignment`). Every caption word is matched to the utterance that holds
it (:func:`match_words`), and every token of the word takes that utterance. Words no utterance
covers get no target.

Targets (:func:`token_targets`): ``K = 2`` gives the utterance's trace-box corners
``(x0, y0), (x1, y1)`` (the official targets); ``K > 2`` (exact only) gives ``K`` points
resampled uniformly in time along the utterance's trace samples. Points are normalized (x, y) in
[0, 1] of the stored image; the pipeline turns them into canvas pixels. Special tokens (BOS, EOS,
padding: ``word_index == -1``) never get a target.

Tokens and words come from :meth:`pixelllm.language.tokenizer.Tokenizer.encode_with_alignment`
on the caption itself (``word_index`` indexes ``caption.split()``); truncate the token sequence
before aligning, as the official code does, so that ``J`` counts the tokens that are trained.

``python -m pixelllm.tools.alignment_report --jsonl FILE [--limit N] [--tokenizer PATH]`` (from the
repository root) prints how often the two rules disagree over a file's narratives
(:func:`disagreement`).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence

import numpy as np

# The official code's test for "this utterance has a trace": its time-averaged centre.
CENTRE_EPSILON = 1e-5
METHODS = ("official", "exact")


@dataclasses.dataclass(frozen=True)
class NarrativeTraces:
    """One narrative's caption and per-utterance traces.

    Attributes:
      caption: the whole caption.
      utterances: ``[U]`` utterance texts.
      boxes: ``[U, 4]`` normalized trace boxes ``(x0, y0, x1, y1)``.
      points: ``[U, S, 2]`` normalized (x, y) trace samples, uniform in time over the window.
      valid: ``[U]`` whether the utterance has text and a trace (the builder's ``valid``).
    """

    caption: str
    utterances: tuple[str, ...]
    boxes: np.ndarray
    points: np.ndarray
    valid: np.ndarray

    @classmethod
    def from_example(cls, example: Mapping, *, narrative: int) -> NarrativeTraces:
        """Narrative ``narrative`` of a ``localized_narratives`` example (as decoded by
        ``as_data_source``, text as bytes or str)."""
        utterances = example["utterances"]
        rows = np.flatnonzero(np.asarray(utterances["narrative"]) == narrative)
        if len(rows) == 0:
            raise ValueError(f"image {_text(example['image/id'])}: narrative {narrative} has "
                             "no utterances")
        return cls(
            caption=_text(example["narratives"]["caption"][narrative]),
            utterances=tuple(_text(utterances["text"][row]) for row in rows),
            boxes=np.asarray(utterances["box"], np.float32)[rows],
            points=np.asarray(utterances["points"], np.float32)[rows],
            valid=np.asarray(utterances["valid"], bool)[rows])

    def centres(self) -> np.ndarray:
        """``[U, 2]`` time-averaged trace positions (trapezoid rule over the samples, as the
        official centre, here of the clamped and clipped samples)."""
        if self.points.shape[1] == 1:
            return self.points[:, 0]
        return np.trapezoid(self.points, axis=1) / (self.points.shape[1] - 1)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def official_assignment(traces: NarrativeTraces, *, word_index: np.ndarray) -> np.ndarray:
    """``[T]`` utterance of each token by the official rank rule (module docstring), ``-1`` for
    special tokens and when no utterance is usable.

    Args:
      traces: the narrative.
      word_index: ``[T]`` word of each token, ``-1`` for special tokens.
    """
    word_index = np.asarray(word_index)
    is_word = word_index >= 0
    usable = np.flatnonzero(
        traces.valid & np.all(traces.centres() > CENTRE_EPSILON, axis=-1))
    assignment = np.full(word_index.shape, -1, np.int32)
    num_tokens = int(is_word.sum())
    if len(usable) == 0 or num_tokens == 0:
        return assignment
    # Float64 throughout, as the official int32 / int32 divisions; the same operation order,
    # so that midpoint ties break the same way.
    utterance_rank = np.arange(1, len(usable) + 1) / len(usable)
    first, last = utterance_rank[0], utterance_rank[-1]
    token_rank = first + (np.cumsum(is_word) / num_tokens) * (last - first)
    distance = (token_rank[:, None] - utterance_rank[None, :]) ** 2
    nearest = usable[np.argmin(distance, axis=-1)]
    assignment[is_word] = nearest[is_word]
    return assignment


def exact_assignment(traces: NarrativeTraces, *, word_index: np.ndarray) -> np.ndarray:
    """``[T]`` utterance holding each token's word (:func:`match_words`), ``-1`` for special
    tokens and uncovered words. Utterances without a trace are still returned (their tokens get
    no target in :func:`token_targets`), so their words cannot be given to a neighbour."""
    word_index = np.asarray(word_index)
    word_utterance = match_words(traces.caption, traces.utterances)
    if not (word_index >= 0).any():
        return np.full(word_index.shape, -1, np.int32)
    if word_index.size and word_index.max() >= len(word_utterance):
        raise ValueError(f"token word index {int(word_index.max())} is past the caption's "
                         f"{len(word_utterance)} words; tokenize the caption itself")
    return np.where(word_index >= 0, word_utterance[np.maximum(word_index, 0)],
                    -1).astype(np.int32)


def _word_key(word: str) -> str:
    """What must agree for two spellings of a word to match: letters and digits, case-folded;
    a word of punctuation only keeps its characters."""
    folded = word.casefold()
    return "".join(ch for ch in folded if ch.isalnum()) or folded


def match_words(caption: str, utterances: Sequence[str]) -> np.ndarray:
    """``[W]`` index of the utterance holding each word of ``caption.split()``, ``-1`` if none.

    Words are compared by :func:`_word_key`, so case and punctuation do not matter. When the
    utterances' words are the caption's words (the usual case), word ``i`` takes the utterance
    of the ``i``-th utterance word. Otherwise (words merged, split or missing) the characters of
    the keys are aligned (``difflib``, longest matching blocks, order kept), and a word takes
    the utterance holding most of its matched characters, provided that more than half of its
    characters matched.
    """
    caption_keys = [_word_key(word) for word in caption.split()]
    utterance_keys, owners = [], []
    for index, text in enumerate(utterances):
        for word in text.split():
            utterance_keys.append(_word_key(word))
            owners.append(index)
    if caption_keys == utterance_keys:
        return np.asarray(owners, np.int32).reshape(-1)
    result = np.full(len(caption_keys), -1, np.int32)
    if not caption_keys or not utterance_keys:
        return result
    caption_lengths = np.array([len(key) for key in caption_keys])
    char_word = np.repeat(np.arange(len(caption_keys)), caption_lengths)
    char_utterance = np.repeat(owners, [len(key) for key in utterance_keys])
    votes = np.zeros((len(caption_keys), len(utterances)), np.int64)
    matcher = difflib.SequenceMatcher(None, "".join(caption_keys), "".join(utterance_keys),
                                      autojunk=False)
    for a, b, size in matcher.get_matching_blocks():
        np.add.at(votes, (char_word[a:a + size], char_utterance[b:b + size]), 1)
    # argmax takes the earliest utterance among equal votes.
    best = votes.argmax(axis=1)
    matched = 2 * votes.max(axis=1) > caption_lengths
    result[matched] = best[matched]
    return result


def token_targets(traces: NarrativeTraces, *, assignment: np.ndarray, num_points: int = 2,
                  usable: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Target points of each token from its utterance.

    Args:
      traces: the narrative.
      assignment: ``[T]`` utterance per token, ``-1`` for none.
      num_points: ``K``; 2 gives the box corners, more gives points resampled along the trace.
      usable: ``[U]`` utterances that may give targets; default ``traces.valid``.

    Returns:
      ``(points [T, K, 2] float32, mask [T] bool)``; points (x, y) normalized, clipped to
      [0, 1], zero where ``mask`` is False.
    """
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2 (box corners or trace points), got "
                         f"{num_points}")
    assignment = np.asarray(assignment)
    usable = traces.valid if usable is None else usable
    mask = assignment >= 0
    mask[mask] = usable[assignment[mask]]
    if num_points == 2:
        per_utterance = traces.boxes.reshape(-1, 2, 2)
    else:
        per_utterance = _resample(traces.points, num_points)
    points = np.zeros((len(assignment), num_points, 2), np.float32)
    points[mask] = np.clip(per_utterance[assignment[mask]], 0.0, 1.0)
    return points, mask


def _resample(points: np.ndarray, num_points: int) -> np.ndarray:
    """``[U, S, 2] -> [U, num_points, 2]``: the piecewise-linear trace through the samples,
    read at ``num_points`` times uniform over the window (samples are uniform in time)."""
    num_samples = points.shape[1]
    position = np.linspace(0.0, num_samples - 1, num_points)
    lower = np.minimum(np.floor(position).astype(int), num_samples - 2)
    fraction = (position - lower)[None, :, None]
    return points[:, lower] * (1.0 - fraction) + points[:, lower + 1] * fraction


def align(traces: NarrativeTraces, *, word_index: np.ndarray, method: str = "official",
          num_points: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``(points [T, K, 2], mask [T])`` target points of each token by ``method``.

    ``"official"`` gives box corners only (``num_points == 2``), from the utterances it deems
    usable; ``"exact"`` gives box corners or ``num_points > 2`` resampled trace points.
    """
    if method == "official":
        if num_points != 2:
            raise ValueError("the official alignment regresses the 2 trace-box corners; "
                             f"num_points={num_points} needs method='exact'")
        assignment = official_assignment(traces, word_index=word_index)
        # Every assigned utterance is usable by construction of the official rule.
        return token_targets(traces, assignment=assignment, num_points=2,
                             usable=np.ones(len(traces.utterances), bool))
    if method == "exact":
        assignment = exact_assignment(traces, word_index=word_index)
        return token_targets(traces, assignment=assignment, num_points=num_points)
    raise ValueError(f"unknown alignment method {method!r}; expected one of {METHODS}")


def disagreement(traces: NarrativeTraces, *, word_index: np.ndarray) -> tuple[int, int]:
    """``(differing, compared)``: among word tokens that both rules give a target, how many
    take a different utterance under the official rule than under the exact one."""
    official = official_assignment(traces, word_index=word_index)
    exact = exact_assignment(traces, word_index=word_index)
    exact_targets = exact >= 0
    exact_targets[exact_targets] = traces.valid[exact[exact_targets]]
    compared = (official >= 0) & exact_targets
    return int((official[compared] != exact[compared]).sum()), int(compared.sum())
