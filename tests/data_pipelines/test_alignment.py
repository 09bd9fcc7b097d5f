"""Tests for data_pipelines/alignment.py on hand-made narratives with hand-computed answers."""

import io
import json

import numpy as np
import pytest
import sentencepiece as spm

from data_pipelines.alignment import (NarrativeTraces, align, disagreement, exact_assignment,
                                      exact_utterance_targets, match_words, official_assignment,
                                      official_utterance_targets, token_targets)
from data_pipelines.builders import localized_narratives as ln
from pixelllm.language.tokenizer import load_tokenizer
from pixelllm.tools import alignment_report


def _traces(caption, utterances, boxes, valid=None):
    """Samples run linearly from each box's top-left to its bottom-right corner; the raw trace
    is the samples, utterance u's at times in its window [u, u + 0.5]."""
    boxes = np.asarray(boxes, np.float32)
    ramp = np.linspace(0.0, 1.0, 16)[None, :, None]
    points = (boxes[:, None, :2] + ramp * (boxes[:, None, 2:] - boxes[:, None, :2])).astype(
        np.float32)
    count = len(utterances)
    valid = np.ones(count, bool) if valid is None else np.asarray(valid)
    starts = np.arange(count, dtype=np.float64)
    times = (starts[:, None] + np.linspace(0.0, 0.5, 16)[None]).reshape(-1)
    return NarrativeTraces(caption=caption, utterances=tuple(utterances), boxes=boxes,
                           points=points, valid=valid, start_times=starts,
                           end_times=starts + 0.5, trace_xy=points.reshape(-1, 2),
                           trace_t=times)


def _raw(caption, utterances, windows, trace):
    """A narrative from raw ``(x, y, t)`` trace points and ``(start, end)`` windows, its official
    samples and boxes made by the builder's code."""
    trace = np.asarray(trace, np.float64)
    start, end = (np.asarray(w, np.float64) for w in zip(*windows))
    points, boxes, overlaps = ln.sample_utterance_traces(trace=trace, start_times=start,
                                                         end_times=end)
    order = np.argsort(trace[:, 2], kind="stable")
    return NarrativeTraces(caption=caption, utterances=tuple(utterances), boxes=boxes,
                           points=points, valid=overlaps & (start <= end), start_times=start,
                           end_times=end, trace_xy=trace[order, :2].astype(np.float32),
                           trace_t=trace[order, 2])


# Utterances of 2, 10 and 1 words; 13 words, one token each, between BOS and EOS.
UNEVEN = _traces(
    "a man standing on the left side of the big red car smiles",
    ["a man", "standing on the left side of the big red car", "smiles"],
    [[0.1, 0.1, 0.2, 0.2], [0.4, 0.4, 0.6, 0.6], [0.8, 0.8, 0.9, 0.9]])
UNEVEN_WORDS = np.array([-1, *range(13), -1])


def test_official_rule_by_hand():
    # K = 3 ranks 1/3, 2/3, 1; token j of 13 has rank 1/3 + (j/13)(2/3): j <= 3 nearest 1/3,
    # 4 <= j <= 9 nearest 2/3, j >= 10 nearest 1.
    expected = [-1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, -1]
    assert official_assignment(UNEVEN, word_index=UNEVEN_WORDS).tolist() == expected
    points, mask = align(UNEVEN, word_index=UNEVEN_WORDS, method="official")
    assert points.shape == (15, 2, 2) and points.dtype == np.float32
    assert mask.tolist() == [False] + [True] * 13 + [False]
    np.testing.assert_allclose(points[3], [[0.1, 0.1], [0.2, 0.2]])   # "standing" gets "a man"
    np.testing.assert_allclose(points[10], [[0.8, 0.8], [0.9, 0.9]])  # "big" gets "smiles"
    np.testing.assert_array_equal(points[[0, 14]], 0.0)


def test_exact_rule_picks_the_utterance_of_each_word():
    expected = [-1, 0, 0] + [1] * 10 + [2, -1]
    assert exact_assignment(UNEVEN, word_index=UNEVEN_WORDS).tolist() == expected
    points, mask = align(UNEVEN, word_index=UNEVEN_WORDS, method="exact")
    assert mask.tolist() == [False] + [True] * 13 + [False]
    np.testing.assert_allclose(points[3], [[0.4, 0.4], [0.6, 0.6]])
    np.testing.assert_allclose(points[10], [[0.4, 0.4], [0.6, 0.6]])
    np.testing.assert_allclose(points[13], [[0.8, 0.8], [0.9, 0.9]])


def test_disagreement_by_hand():
    # Tokens 3 ("standing": 0 vs 1) and 10-12 ("big red car": 2 vs 1) differ.
    assert disagreement(UNEVEN, word_index=UNEVEN_WORDS) == (4, 13)


def test_official_midpoint_ties_take_the_earlier_utterance():
    traces = _traces("a b c d", ["a b", "c d"], [[0, 0, 0.1, 0.1], [0.5, 0.5, 0.6, 0.6]])
    # Ranks 0.5, 1; tokens 0.625, 0.75 (tie), 0.875, 1.
    assert official_assignment(traces, word_index=np.arange(4)).tolist() == [0, 0, 1, 1]


def test_official_drops_utterances_at_the_left_edge_and_invalid_ones():
    # "c" has its trace on x = 0 (centre x = 0 <= 1e-5); "f" is invalid.
    traces = _traces("a b c d e f", ["a b", "c", "d e", "f"],
                     [[0.2, 0.2, 0.3, 0.3], [0.0, 0.4, 0.0, 0.5], [0.6, 0.6, 0.7, 0.7],
                      [0.9, 0.9, 1.0, 1.0]], valid=[True, True, True, False])
    words = np.arange(6)
    # Usable 0 and 2, ranks 0.5, 1; tokens 0.5 + (j/6)/2 = .583 .667 .75(tie) .833 .917 1.
    assert official_assignment(traces, word_index=words).tolist() == [0, 0, 0, 2, 2, 2]
    assert exact_assignment(traces, word_index=words).tolist() == [0, 0, 1, 2, 2, 3]
    points, mask = align(traces, word_index=words, method="exact")
    assert mask.tolist() == [True] * 5 + [False]       # "f" has no trace
    np.testing.assert_allclose(points[2], [[0.0, 0.4], [0.0, 0.5]])
    # Compared: tokens 0-4; token 2 ("c": 0 vs 1) differs.
    assert disagreement(traces, word_index=words) == (1, 5)


def test_no_usable_utterance_gives_no_targets():
    traces = _traces("a b", ["a", "b"], [[0, 0, 1, 1]] * 2, valid=[False, False])
    points, mask = align(traces, word_index=np.array([-1, 0, 1, -1]))
    assert not mask.any() and not points.any()
    assert disagreement(traces, word_index=np.array([0, 1])) == (0, 0)


def test_match_words_ignores_case_and_punctuation():
    assert match_words("A dog, running.", ["a", "Dog", "running"]).tolist() == [0, 1, 2]
    assert match_words("A dog - running", ["a dog -", "running"]).tolist() == [0, 0, 0, 1]


def test_match_words_handles_merged_and_missing_words():
    # "blackand" is "black and" without the space.
    assert match_words("black and white cat", ["blackand white", "cat"]).tolist() == [0, 0, 0, 1]
    # "big" and "loudly" were never said: no utterance covers them.
    assert match_words("the big dog barks loudly", ["the dog", "barks"]).tolist() == [
        0, -1, 0, 1, -1]
    assert match_words("", ["a"]).tolist() == []
    assert match_words("a b", []).tolist() == [-1, -1]


def test_tokens_of_one_word_share_its_targets():
    traces = _traces("a bc", ["a", "bc"], [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    word_index = np.array([-1, 0, 0, 1, 1, 1, -1])
    points, mask = align(traces, word_index=word_index, method="exact")
    assert mask.tolist() == [False, True, True, True, True, True, False]
    np.testing.assert_allclose(points[1], points[2])
    np.testing.assert_allclose(points[3:6], np.tile([[[0.5, 0.6], [0.7, 0.8]]], (3, 1, 1)))


def test_exact_reads_more_points_along_the_raw_trace_in_the_window():
    # Window [1, 2]; the points at t = 0.5 and 2.5 lie outside it. Inside: x = (t - 1)^2 at
    # t = 1, 1.2, ..., 2, with two points at t = 1.6 (averaged).
    t = np.round(np.linspace(1.0, 2.0, 6), 10)
    inside = [(float(ti - 1) ** 2, 1 - float(ti - 1) ** 2, ti) for ti in t]
    trace = [(0.9, 0.9, 0.5), *inside, (0.5, 0.5, 1.6), (0.9, 0.1, 2.5)]
    traces = _raw("a", ["a"], [(1.0, 2.0)], trace)
    points, mask = align(traces, word_index=np.array([0]), method="exact", num_points=3)
    assert mask.tolist() == [True]
    # Read at t = 1, 1.5, 2: 1.5 lies halfway between 1.4 (x .16) and 1.6 (x (.36 + .5) / 2).
    middle = (0.16 + (0.36 + 0.5) / 2) / 2
    np.testing.assert_allclose(points[0], [[0, 1], [middle, (0.84 + (0.64 + 0.5) / 2) / 2],
                                           [1, 0]], atol=1e-6)


def test_exact_box_uses_only_points_in_the_window_both_ends_inclusive():
    # Official samples interpolate between t = 0 (x .1) and t = 3 (x .9); the exact box of
    # window [1, 2] reads the points at t = 1 and t = 2 only (both ends count).
    trace = [(0.1, 0.1, 0.0), (0.3, 0.4, 1.0), (0.5, 0.2, 1.5), (0.6, 0.3, 2.0), (0.9, 0.9, 3.0)]
    traces = _raw("a b", ["a", "b"], [(1.0, 2.0), (2.0, 2.0)], trace)
    targets, located = exact_utterance_targets(traces)
    np.testing.assert_allclose(targets[0], [[0.3, 0.2], [0.6, 0.4]], atol=1e-7)
    np.testing.assert_allclose(targets[1], [[0.6, 0.3], [0.6, 0.3]], atol=1e-7)
    assert located.tolist() == [True, True]
    # The official box of the same window is the min/max of its 16 samples at t = 1 + k / 15,
    # which step over the point at t = 1.5: its lowest y is read at t = 1.5 + 1/30.
    np.testing.assert_allclose(official_utterance_targets(traces)[0],
                               [[0.3, 0.2 + 0.1 / 15], [0.6, 0.4]], atol=1e-6)
    traces = _raw("a b", ["a", "b"], [(1.0, 2.0), (2.5, 2.6)], trace)
    # Window [2.5, 2.6] holds no point: no exact target, though the official samples exist.
    _, located = exact_utterance_targets(traces)
    assert located.tolist() == [True, False] and traces.valid.tolist() == [True, True]
    points, mask = align(traces, word_index=np.array([0, 1]), method="exact")
    assert mask.tolist() == [True, False] and not points[1].any()


def test_window_boundaries_are_compared_in_the_files_precision():
    # 0.1 + 0.2 != 0.3 in float64, and float32 rounds both to the same number: a point at
    # t = 0.30000000000000004 lies after a window ending at 0.3 in the file's precision.
    t_point = 0.1 + 0.2
    assert np.float32(t_point) == np.float32(0.3) and t_point > 0.3
    trace = [(0.2, 0.2, 0.0), (0.8, 0.8, t_point), (0.5, 0.5, 1.0)]
    traces = _raw("a b", ["a", "b"], [(0.0, 0.3), (0.3 + 1e-17, 1.0)], trace)
    targets, located = exact_utterance_targets(traces)
    assert located.tolist() == [True, True]
    np.testing.assert_allclose(targets[0], [[0.2, 0.2], [0.2, 0.2]])
    np.testing.assert_allclose(targets[1], [[0.5, 0.5], [0.8, 0.8]])


def test_exact_needs_a_window_point_inside_the_image():
    trace = [(1.2, 0.5, 0.0), (1.1, 0.6, 1.0), (0.5, 0.5, 2.0), (0.6, 0.5, 3.0)]
    traces = _raw("a b", ["a", "b"], [(0.0, 1.0), (1.0, 3.0)], trace)
    targets, located = exact_utterance_targets(traces)
    assert located.tolist() == [False, True]
    # The window's points outside the image still count for the box, which is then clipped.
    points, mask = align(traces, word_index=np.array([0, 1]), method="exact")
    assert mask.tolist() == [False, True]
    np.testing.assert_allclose(points[1], [[0.5, 0.5], [1.0, 0.6]], atol=1e-7)


def test_targets_are_clipped():
    per_utterance = np.array([[[-0.2, 0.5], [0.5, 1.3]]], np.float32)
    points, _ = token_targets(per_utterance, assignment=np.array([0]),
                              usable=np.array([True]))
    np.testing.assert_allclose(points[0], [[0.0, 0.5], [0.5, 1.0]])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="num_points=4 needs method='exact'"):
        align(UNEVEN, word_index=UNEVEN_WORDS, num_points=4)
    with pytest.raises(ValueError, match="unknown alignment method"):
        align(UNEVEN, word_index=UNEVEN_WORDS, method="nearest")
    with pytest.raises(ValueError, match="past the caption's 13 words"):
        exact_assignment(UNEVEN, word_index=np.array([0, 13]))


def test_from_example_selects_one_narrative():
    # As as_data_source decodes a localized_narratives example: lists, text as bytes.
    example = {
        "image/id": b"1",
        "narratives": {"caption": [b"x y", b"a b"], "annotator_id": [1, 2]},
        "utterances": {
            "narrative": [0, 1, 1], "text": [b"x y", b"a", b"b"],
            "box": [np.full(4, i, np.float32) for i in range(3)],
            "points": [np.full((16, 2), i, np.float32) for i in range(3)],
            "valid": [True, False, True],
            "start_time": [0.0, 0.0, 0.1 + 0.2], "end_time": [1.0, 0.1 + 0.2, 1.0]},
        "trace": {"narrative": [0, 1, 1, 1], "t": [0.0, 0.0, 0.1 + 0.2, 0.5],
                  "xy": [np.full(2, i / 4, np.float32) for i in range(4)]},
    }
    traces = NarrativeTraces.from_example(example, narrative=1)
    assert traces.caption == "a b" and traces.utterances == ("a", "b")
    np.testing.assert_array_equal(traces.boxes[:, 0], [1, 2])
    assert traces.points.shape == (2, 16, 2) and traces.valid.tolist() == [False, True]
    np.testing.assert_array_equal(traces.trace_xy[:, 0], [0.25, 0.5, 0.75])
    # float64 kept: the point at 0.1 + 0.2 is in both windows, which share that end.
    assert traces.trace_t.dtype == np.float64 and traces.end_times[0] == 0.1 + 0.2
    first, stop = traces.windows()
    assert first.tolist() == [0, 1] and stop.tolist() == [2, 3]
    with pytest.raises(ValueError, match="image 1: narrative 2 has no utterances"):
        NarrativeTraces.from_example(example, narrative=2)


def test_centres_are_trapezoid_time_averages():
    traces = _traces("a", ["a"], [[0.2, 0.4, 0.6, 0.8]])
    np.testing.assert_allclose(traces.centres(), [[0.4, 0.6]], atol=1e-6)


def _raw_uneven_narrative():
    """UNEVEN as a jsonl record: 1 s per utterance, the trace moving right through them."""
    timed = [{"utterance": u, "start_time": float(i), "end_time": float(i + 1)}
             for i, u in enumerate(UNEVEN.utterances)]
    trace = [{"x": 0.1 + 0.2 * t, "y": 0.5, "t": float(t)} for t in range(4)]
    return {"dataset_id": "mscoco_val2017", "image_id": "1", "annotator_id": 1,
            "caption": UNEVEN.caption, "timed_caption": timed, "traces": [trace],
            "voice_recording": ""}


def test_cli_prints_the_disagreement_rate(tmp_path, capsys):
    path = tmp_path / "ln.jsonl"
    path.write_text("\n".join([json.dumps(_raw_uneven_narrative()), "{broken",
                               json.dumps(_raw_uneven_narrative())]) + "\n")
    alignment_report.main(["--jsonl", str(path)])
    out = capsys.readouterr().out
    assert "narratives: 2" in out
    assert "disagreement: 8/26 = 0.3077" in out
    assert "malformed json line" in out
    alignment_report.main(["--jsonl", str(path), "--limit", "1"])
    assert "disagreement: 4/13 = 0.3077" in capsys.readouterr().out


CORPUS = ["a man standing on the left side of the big red car smiles",
          "the sky is blue and the grass is green", "two dogs play with a ball"]


def test_with_a_sentencepiece_tokenizer(tmp_path, capsys):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 20), model_writer=model,
                                   minloglevel=2, num_threads=1, model_type="unigram",
                                   vocab_size=30, character_coverage=1.0)
    (tmp_path / "spiece.model").write_bytes(model.getvalue())
    tokenizer = load_tokenizer(tmp_path / "spiece.model")
    ids, word_index = tokenizer.encode_with_alignment(UNEVEN.caption, add_eos=True)
    word_index = np.asarray(word_index)
    assert len(ids) > 14  # several words take more than one token
    points, mask = align(UNEVEN, word_index=word_index, method="exact")
    word_utterance = np.array([0, 0] + [1] * 10 + [2])
    np.testing.assert_array_equal(mask, word_index >= 0)
    for token in np.flatnonzero(mask):
        box = UNEVEN.boxes[word_utterance[word_index[token]]]
        np.testing.assert_allclose(points[token].reshape(-1), box)
    official = official_assignment(UNEVEN, word_index=word_index)[word_index >= 0]
    assert np.all(np.diff(official) >= 0) and official[0] == 0 and official[-1] == 2
    differing, compared = disagreement(UNEVEN, word_index=word_index)
    assert compared == int((word_index >= 0).sum()) and 0 < differing < compared

    path = tmp_path / "ln.jsonl"
    path.write_text(json.dumps(_raw_uneven_narrative()) + "\n")
    alignment_report.main(["--jsonl", str(path), "--tokenizer", str(tmp_path / "spiece.model")])
    assert f"disagreement: {differing}/{compared} " in capsys.readouterr().out
