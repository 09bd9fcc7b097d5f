"""Tests for data_pipelines/ops/tokenize.py with a tiny T5-style SentencePiece model trained
here: token layout (BOS/EOS/padding/truncation) and per-token trace targets in canvas pixels."""

import io

import numpy as np
import pytest
import sentencepiece as spm

from data_pipelines import alignment
from data_pipelines.ops import fields
from data_pipelines.ops.horizontal_flip import flip
from data_pipelines.ops.slot import GT_TEXT, SLOT_CONTEXT, SLOT_TEXT, SLOT_TRACE
from data_pipelines.ops.tokenize import tokenize
from pixelllm.language.tokenizer import load_tokenizer

CORPUS = ["a dog on the grass near a tree", "where is the man on the left",
          "an object of a red car", "A long image caption: a cat and a dog",
          "the woman on the right holds an umbrella"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 20), model_writer=model,
                                   minloglevel=2, num_threads=1, character_coverage=1.0,
                                   model_type="unigram", vocab_size=40, pad_id=0, eos_id=1,
                                   unk_id=2, bos_id=-1)
    path = tmp_path_factory.mktemp("spm") / "spiece.model"
    path.write_bytes(model.getvalue())
    return str(path)


def _narrative(caption, utterances, boxes, *, valid=None, visible=None, width=8, height=6):
    """A narrative whose utterance boxes are given in canvas pixels of a ``width x height``
    valid area, stored (normalized) identically."""
    boxes = np.asarray(boxes, np.float32)
    count = len(utterances)
    valid = np.ones(count, bool) if valid is None else np.asarray(valid)
    scale = np.asarray([width, height, width, height], np.float32)
    corners = boxes.reshape(-1, 2, 2)
    points = np.linspace(corners[:, 0], corners[:, 1], 16, axis=1)
    # The raw trace is the samples themselves, utterance u's at times u + k / 30 in its window
    # [u, u + 0.5].
    times = (np.arange(count)[:, None] + np.linspace(0.0, 0.5, 16)[None]).reshape(-1)
    return {
        fields.CAPTION: caption, fields.UTTERANCE_TEXTS: list(utterances),
        fields.UTTERANCE_BOXES: boxes, fields.UTTERANCE_POINTS: points,
        fields.UTTERANCE_VALID: valid,
        fields.UTTERANCE_VISIBLE: np.ones(count, bool) if visible is None else np.asarray(visible),
        fields.TRACE_POINTS: points.reshape(-1, 2),
        fields.ALIGNMENT_TRACES: alignment.NarrativeTraces(
            caption=caption, utterances=tuple(utterances), boxes=boxes / scale,
            points=points / scale[:2], valid=valid,
            start_times=np.arange(count, dtype=np.float64),
            end_times=np.arange(count, dtype=np.float64) + 0.5,
            trace_xy=points.reshape(-1, 2) / scale[:2], trace_t=times),
    }


def _slotted(contexts, texts, traces=None, gt_texts=(), slots=3):
    used = np.zeros(slots, bool)
    used[:len(texts)] = True
    return {
        "valid_wh": np.asarray([8, 6], np.float32), "slot_mask": used,
        "gt_mask": np.asarray([True] * len(gt_texts) + [False]),
        SLOT_CONTEXT: list(contexts) + [""] * (slots - len(contexts)),
        SLOT_TEXT: list(texts) + [""] * (slots - len(texts)),
        SLOT_TRACE: list(traces or [None] * len(texts)) + [None] * (slots - len(texts)),
        GT_TEXT: list(gt_texts) + [""],
    }


def test_token_layout_bos_eos_padding_and_masks(model_path):
    tok = load_tokenizer(model_path)
    op = tokenize(tokenizer=model_path, context_length=12, text_length=10)
    out = op(_slotted(["where is a dog"], ["a dog"], gt_texts=["a red car"]),
             np.random.default_rng(0))
    for key in (SLOT_CONTEXT, SLOT_TEXT, SLOT_TRACE, GT_TEXT):
        assert key not in out
    context = tok.encode("where is a dog") + [1]
    text = [0] + tok.encode("a dog") + [1]  # T5: BOS = decoder start = pad 0, EOS 1
    np.testing.assert_array_equal(out["context_tokens"][0, :len(context)], context)
    np.testing.assert_array_equal(out["context_mask"][0], np.arange(12) < len(context))
    np.testing.assert_array_equal(out["text_tokens"][0, :len(text)], text)
    np.testing.assert_array_equal(out["text_mask"][0], np.arange(10) < len(text))
    assert (out["text_tokens"][0, len(text):] == tok.pad_id).all()
    assert not out["context_mask"][1:].any() and not out["text_mask"][1:].any()
    assert (out["context_tokens"][1:] == tok.pad_id).all()
    gt = [0] + tok.encode("a red car") + [1]
    np.testing.assert_array_equal(out["gt_text_tokens"][0, :len(gt)], gt)
    np.testing.assert_array_equal(out["gt_text_mask"][0], np.arange(10) < len(gt))
    assert not out["gt_text_mask"][1].any()
    assert not out["token_points_mask"].any() and not out["token_points"].any()
    assert out["text_tokens"].dtype == np.int32 and out["token_points"].shape == (3, 10, 2, 2)


def test_truncation_keeps_eos_and_decoder_start_can_be_set(model_path):
    tok = load_tokenizer(model_path)
    long_text = "the woman on the right holds an umbrella near a tree"
    op = tokenize(tokenizer=model_path, context_length=4, text_length=5, decoder_start_id=7)
    out = op(_slotted([long_text], [long_text]), np.random.default_rng(0))
    np.testing.assert_array_equal(out["context_tokens"][0], tok.encode(long_text)[:3] + [1])
    np.testing.assert_array_equal(out["text_tokens"][0], [7] + tok.encode(long_text)[:3] + [1])
    assert out["text_mask"][0].all() and out["context_mask"][0].all()


def test_a_truncated_trace_caption_still_ends_with_eos(model_path):
    """The official wrapper cuts after padding and loses EOS on long texts (a fixed defect): a
    cut trace caption ends with EOS here, and the EOS has no point target."""
    tok = load_tokenizer(model_path)
    caption = "a dog on the grass near a tree by the river"
    narrative = _narrative(caption, ["a dog", "on the grass near a tree by the river"],
                           [[1, 1, 3, 2], [0, 3, 8, 6]])
    op = tokenize(tokenizer=model_path, context_length=8, text_length=6)
    out = op(_slotted(["A long image caption: "], [caption], [narrative]),
             np.random.default_rng(0))
    assert len(tok.encode(caption)) > 4
    np.testing.assert_array_equal(out["text_tokens"][0], [0] + tok.encode(caption)[:4] + [1])
    assert out["text_mask"][0].all() and not out["token_points_mask"][0, -1]


def test_exact_alignment_gives_each_word_its_utterance_box_corners(model_path):
    tok = load_tokenizer(model_path)
    caption = "a dog on the grass"
    narrative = _narrative(caption, ["a dog", "on the grass"], [[1, 1, 3, 2], [0, 3, 8, 6]])
    op = tokenize(tokenizer=model_path, context_length=8, text_length=16, alignment="exact")
    out = op(_slotted(["A long image caption: "], [caption], [narrative]),
             np.random.default_rng(0))
    ids, words = tok.encode_with_alignment(caption)
    mask = out["token_points_mask"][0]
    # BOS at 0, the caption's tokens at 1..len(ids), EOS after: only word tokens have targets.
    np.testing.assert_array_equal(mask, [False] + [w >= 0 for w in words]
                                  + [False] * (16 - 1 - len(ids)))
    for position, word in enumerate(words, start=1):
        expected = [[1, 1], [3, 2]] if word <= 1 else [[0, 3], [8, 6]]
        np.testing.assert_allclose(out["token_points"][0, position], expected, atol=1e-5)
    assert not out["token_points"][0, len(ids) + 1:].any()


def test_official_alignment_spreads_tokens_evenly_over_utterances(model_path):
    tok = load_tokenizer(model_path)
    # A one-word utterance then a long one: the rank rule gives the first utterance the first
    # half of the tokens, whatever the words.
    caption = "dog on the grass near a tree"
    narrative = _narrative(caption, ["dog", "on the grass near a tree"],
                           [[1, 1, 2, 2], [4, 0, 8, 6]])
    op = tokenize(tokenizer=model_path, context_length=8, text_length=32)
    out = op(_slotted(["A long image caption: "], [caption], [narrative]),
             np.random.default_rng(0))
    ids, _ = tok.encode_with_alignment(caption)
    count = len(ids)
    for j in range(1, count + 1):
        # Ranks: utterances 1/2 and 1; token j: 1/2 + (j / J) / 2; ties go to the first.
        expected = [[1, 1], [2, 2]] if j / count <= 0.5 else [[4, 0], [8, 6]]
        np.testing.assert_allclose(out["token_points"][0, j], expected, atol=1e-5)
    np.testing.assert_array_equal(out["token_points_mask"][0],
                                  (np.arange(32) >= 1) & (np.arange(32) <= count))


def test_utterances_invalid_or_cropped_away_give_no_targets(model_path):
    tok = load_tokenizer(model_path)
    caption = "a dog on the grass"
    narrative = _narrative(caption, ["a dog", "on the grass"], [[1, 1, 3, 2], [0, 3, 8, 6]],
                           visible=[False, True])
    op = tokenize(tokenizer=model_path, context_length=8, text_length=16, alignment="exact")
    out = op(_slotted(["x"], [caption], [narrative]), np.random.default_rng(0))
    _, words = tok.encode_with_alignment(caption)
    expected = [False] + [w >= 2 for w in words]
    np.testing.assert_array_equal(out["token_points_mask"][0, :len(expected)], expected)
    assert not out["token_points"][0, 1:][~out["token_points_mask"][0, 1:]].any()


def test_a_flip_mirrors_the_targets_but_not_the_alignment(model_path):
    caption = "the man on the left"
    narrative = _narrative(caption, ["the man", "on the left"], [[0, 0, 2, 6], [5, 1, 8, 2]])
    example = {fields.IMAGE: np.zeros((6, 8, 3), np.uint8),
               fields.VALID_WH: np.asarray([8, 6], np.float32), fields.NARRATIVES: [narrative]}
    flipped = flip(example, swap_text=True)[fields.NARRATIVES][0]
    assert flipped[fields.CAPTION] == "the man on the right"
    op = tokenize(tokenizer=model_path, context_length=8, text_length=24, alignment="exact")
    plain = op(_slotted(["x"], [caption], [narrative]), np.random.default_rng(0))
    mirrored = op(_slotted(["x"], [flipped[fields.CAPTION]], [flipped]),
                  np.random.default_rng(0))
    tok = load_tokenizer(model_path)
    _, words = tok.encode_with_alignment(flipped[fields.CAPTION])
    for position, word in enumerate(words, start=1):
        expected = [[6, 0], [8, 6]] if word <= 1 else [[0, 1], [3, 2]]
        np.testing.assert_allclose(mirrored["token_points"][0, position], expected, atol=1e-5)
    _, plain_words = tok.encode_with_alignment(caption)
    assert plain["token_points_mask"][0, 1:len(plain_words) + 1].all()
    np.testing.assert_allclose(plain["token_points"][0, 1], [[0, 0], [2, 6]], atol=1e-5)
    np.testing.assert_allclose(plain["token_points"][0, len(plain_words)], [[5, 1], [8, 2]],
                               atol=1e-5)


def test_bad_arguments(model_path):
    with pytest.raises(ValueError, match="needs alignment='exact'"):
        tokenize(tokenizer=model_path, context_length=4, text_length=8, points_per_token=4)
    with pytest.raises(ValueError, match="unknown alignment"):
        tokenize(tokenizer=model_path, context_length=4, text_length=8, alignment="fuzzy")
    with pytest.raises(ValueError, match="text_length >= 2"):
        tokenize(tokenizer=model_path, context_length=4, text_length=1)


def test_exact_alignment_with_more_points_reads_along_the_trace(model_path):
    caption = "a dog"
    narrative = _narrative(caption, ["a dog"], [[0, 0, 8, 6]])
    op = tokenize(tokenizer=model_path, context_length=4, text_length=8, points_per_token=3,
                  alignment="exact")
    out = op(_slotted(["x"], [caption], [narrative]), np.random.default_rng(0))
    # The trace runs straight from (0, 0) to (8, 6): start, middle, end.
    np.testing.assert_allclose(out["token_points"][0, 1], [[0, 0], [4, 3], [8, 6]], atol=1e-5)
