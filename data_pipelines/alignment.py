"""Which mouse-trace points each caption token of a Localized Narrative regresses.

A narrative's caption is cut into utterances (consecutive pieces of the caption, one or more
words each), each with a time window; the builder
(:mod:`data_pipelines.builders.localized_narratives`) stores per utterance the official trace box
and :data:`~.localized_narratives.NUM_SAMPLES` samples interpolated in its window, and per
narrative the raw trace points with their times.
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

Targets: the official rule gives the utterance's official trace-box corners ``(x0, y0),
(x1, y1)`` (:func:`official_utterance_targets`: min/max of the 16 samples interpolated over the
window). The exact rule (:func:`exact_utterance_targets`) reads only the raw trace points whose
time ``t`` lies in the window, ``start_time <= t <= end_time`` (both ends inclusive, compared in
float64 as the file gives them): ``K = 2`` gives the corners of their bounding box, ``K > 2``
gives ``K`` points read at times uniform from the first to the last of them along the polyline
through them (points of equal time averaged). An utterance with no point in its window, or
none inside the image, gives no target. Points are normalized (x, y) of the stored image,
clipped to [0, 1] (:func:`token_targets`); the pipeline turns them into canvas pixels. Special
tokens (BOS, EOS, padding: ``word_index == -1``) never get a target.

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
    """One narrative's caption, per-utterance traces and raw trace.

    Attributes:
      caption: the whole caption.
      utterances: ``[U]`` utterance texts.
      boxes: ``[U, 4]`` normalized official trace boxes ``(x0, y0, x1, y1)``.
      points: ``[U, S, 2]`` normalized (x, y) trace samples, uniform in time over the window.
      valid: ``[U]`` whether the utterance has text and a trace (the builder's ``valid``).
      start_times, end_times: ``[U]`` float64 utterance windows, seconds.
      trace_xy: ``[P, 2]`` normalized (x, y) raw trace points, in time order.
      trace_t: ``[P]`` float64 non-decreasing times of ``trace_xy``.
    """

    caption: str
    utterances: tuple[str, ...]
    boxes: np.ndarray
    points: np.ndarray
    valid: np.ndarray
    start_times: np.ndarray
    end_times: np.ndarray
    trace_xy: np.ndarray
    trace_t: np.ndarray

    @classmethod
    def from_example(cls, example: Mapping, *, narrative: int) -> NarrativeTraces:
        """Narrative ``narrative`` of a ``localized_narratives`` example (as decoded by
        ``as_data_source``, text as bytes or str)."""
        utterances = example["utterances"]
        rows = np.flatnonzero(np.asarray(utterances["narrative"]) == narrative)
        if len(rows) == 0:
            raise ValueError(f"image {_text(example['image/id'])}: narrative {narrative} has "
                             "no utterances")
        trace = example["trace"]
        points = np.flatnonzero(np.asarray(trace["narrative"]) == narrative)
        return cls(
            caption=_text(example["narratives"]["caption"][narrative]),
            utterances=tuple(_text(utterances["text"][row]) for row in rows),
            boxes=np.asarray(utterances["box"], np.float32)[rows],
            points=np.asarray(utterances["points"], np.float32)[rows],
            valid=np.asarray(utterances["valid"], bool)[rows],
            start_times=np.asarray(utterances["start_time"], np.float64)[rows],
            end_times=np.asarray(utterances["end_time"], np.float64)[rows],
            trace_xy=np.asarray(trace["xy"], np.float32).reshape(-1, 2)[points],
            trace_t=np.asarray(trace["t"], np.float64)[points])

    def centres(self) -> np.ndarray:
        """``[U, 2]`` time-averaged trace positions (trapezoid rule over the samples, as the
        official centre, here of the clamped and clipped samples)."""
        if self.points.shape[1] == 1:
            return self.points[:, 0]
        return np.trapezoid(self.points, axis=1) / (self.points.shape[1] - 1)

    def windows(self) -> tuple[np.ndarray, np.ndarray]:
        """``(first [U], stop [U])``: utterance ``u``'s window holds the trace points
        ``first[u]:stop[u]``, those with ``start_time <= t <= end_time``, compared in float64
        (empty when the window ends before it starts)."""
        times = np.asarray(self.trace_t, np.float64)
        first = np.searchsorted(times, np.asarray(self.start_times, np.float64), side="left")
        stop = np.searchsorted(times, np.asarray(self.end_times, np.float64), side="right")
        return first, np.maximum(stop, first)


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
    no target), so their words cannot be given to a neighbour."""
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


def official_utterance_targets(traces: NarrativeTraces) -> np.ndarray:
    """``[U, 2, 2]`` the official targets: each utterance's trace-box corners."""
    return np.asarray(traces.boxes, np.float32).reshape(-1, 2, 2)


def exact_utterance_targets(traces: NarrativeTraces, *, num_points: int = 2
                            ) -> tuple[np.ndarray, np.ndarray]:
    """The exact targets of each utterance from the raw trace points in its window (module
    docstring).

    Returns:
      ``(points [U, K, 2] float32, located [U] bool)``: ``located`` says that the window holds
      a trace point inside the image ([0, 1] in both coordinates); ``points`` is zero where it
      does not.
    """
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2 (box corners or trace points), got "
                         f"{num_points}")
    first, stop = traces.windows()
    xy = np.asarray(traces.trace_xy, np.float32).reshape(-1, 2)
    inside = np.all((xy >= 0.0) & (xy <= 1.0), axis=-1)
    targets = np.zeros((len(first), num_points, 2), np.float32)
    located = np.zeros(len(first), bool)
    for u, (lo, hi) in enumerate(zip(first, stop)):
        if not inside[lo:hi].any():
            continue
        located[u] = True
        window = xy[lo:hi]
        if num_points == 2:
            targets[u] = [window.min(axis=0), window.max(axis=0)]
        else:
            targets[u] = _read_along(window, traces.trace_t[lo:hi], num_points)
    return targets, located


def _read_along(xy: np.ndarray, times: np.ndarray, num_points: int) -> np.ndarray:
    """``[num_points, 2]``: the polyline through ``xy`` (points of equal time averaged) read at
    ``num_points`` times uniform from the first to the last of ``times`` (non-decreasing)."""
    unique, inverse = np.unique(times, return_inverse=True)
    counts = np.bincount(inverse)
    mean = np.stack([np.bincount(inverse, weights=xy[:, axis]) / counts for axis in (0, 1)],
                    axis=-1)
    read_at = np.linspace(unique[0], unique[-1], num_points)
    return np.stack([np.interp(read_at, unique, mean[:, axis]) for axis in (0, 1)], axis=-1)


def token_targets(per_utterance: np.ndarray, *, assignment: np.ndarray,
                  usable: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Target points of each token from its utterance.

    Args:
      per_utterance: ``[U, K, 2]`` each utterance's target points, normalized.
      assignment: ``[T]`` utterance per token, ``-1`` for none.
      usable: ``[U]`` utterances that may give targets.

    Returns:
      ``(points [T, K, 2] float32, mask [T] bool)``; points (x, y) normalized, clipped to
      [0, 1], zero where ``mask`` is False.
    """
    assignment = np.asarray(assignment)
    mask = assignment >= 0
    mask[mask] = np.asarray(usable, bool)[assignment[mask]]
    points = np.zeros((len(assignment), *per_utterance.shape[1:]), np.float32)
    points[mask] = np.clip(per_utterance[assignment[mask]], 0.0, 1.0)
    return points, mask


def align(traces: NarrativeTraces, *, word_index: np.ndarray, method: str = "official",
          num_points: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``(points [T, K, 2], mask [T])`` target points of each token by ``method``.

    ``"official"`` gives the official box corners only (``num_points == 2``), from the
    utterances it deems usable; ``"exact"`` gives the box corners or ``num_points > 2`` points
    of the raw trace points in each window.
    """
    if method == "official":
        if num_points != 2:
            raise ValueError("the official alignment regresses the 2 trace-box corners; "
                             f"num_points={num_points} needs method='exact'")
        assignment = official_assignment(traces, word_index=word_index)
        # Every assigned utterance is usable by construction of the official rule.
        return token_targets(official_utterance_targets(traces), assignment=assignment,
                             usable=np.ones(len(traces.utterances), bool))
    if method == "exact":
        assignment = exact_assignment(traces, word_index=word_index)
        targets, located = exact_utterance_targets(traces, num_points=num_points)
        return token_targets(targets, assignment=assignment, usable=traces.valid & located)
    raise ValueError(f"unknown alignment method {method!r}; expected one of {METHODS}")


def disagreement(traces: NarrativeTraces, *, word_index: np.ndarray) -> tuple[int, int]:
    """``(differing, compared)``: among word tokens that both rules give a target, how many
    take a different utterance under the official rule than under the exact one."""
    official = official_assignment(traces, word_index=word_index)
    exact = exact_assignment(traces, word_index=word_index)
    _, located = exact_utterance_targets(traces)
    exact_targets = exact >= 0
    exact_targets[exact_targets] = (traces.valid & located)[exact[exact_targets]]
    compared = (official >= 0) & exact_targets
    return int((official[compared] != exact[compared]).sum()), int(compared.sum())
