"""Tests for pixelllm/evaluators/vqa_answers.py: the VQA answer normalisation, case by case as
the official vqaEval.py computes it, and the exact-match evaluator."""

import json

import pytest

from pixelllm.evaluators import vqa_answers as vqa


@pytest.mark.parametrize("answer, normalized", [
    ("Two", "2"),                      # number words -> digits
    ("none", "0"),
    ("Ten.", "10"),                    # a period before no digit is deleted
    ("3.5", "3.5"),                    # ... a decimal point is kept
    ("The dog", "dog"),                # articles dropped
    ("a an the", ""),
    ("dont", "don't"),                 # contractions get their apostrophes
    ("wouldnt've", "wouldn't've"),
    ("don't", "don't"),
    ("Im", "im"),                      # the official keys "Im", "Ive" never match: lower-cased
    ("2,000", "2000"),                 # a digit-comma-digit group: all punctuation deleted
    ("red, white", "red white"),       # a mark next to a space is deleted
    ("black/white", "black white"),    # ... elsewhere it becomes a space
    ("t-shirt", "t shirt"),
    ("yes!", "yes"),
    ("  Yes\n", "yes"),                # newlines, tabs and ends
    ("on\tthe\ttable", "on table"),
    ("it's", "it's"),                  # the apostrophe is no punctuation mark here
])
def test_normalization(answer, normalized):
    assert vqa.normalize_answer(answer) == normalized


def test_a_digit_comma_digit_group_deletes_every_mark_in_the_answer():
    # With "1,000" present, "/" is deleted too rather than becoming a space.
    assert vqa.normalize_answer("1,000 x/y") == "1000 xy"
    assert vqa.normalize_answer("1, 000 x/y") == "1 000 x y"


def test_at_most_32_periods_are_deleted_as_in_the_official_code():
    assert vqa.process_punctuation("." * 40) == "." * 8
    assert vqa.process_punctuation("a.b.c") == "abc"


@pytest.mark.parametrize("prediction, reference, match", [
    ("Two dogs.", "2 dogs", True),
    ("the red one", "Red one", True),
    ("dont know", "don't know", True),
    ("3.5", "35", False),
    ("a cat", "cats", False),
    ("yes", "no", False),
])
def test_exact_match(prediction, reference, match):
    assert vqa.exact_match(prediction, reference) is match


def test_evaluator_scores_skips_duplicates_and_writes_json(tmp_path):
    evaluator = vqa.VqaAnswerEvaluator(split="sharegpt4v/heldout")
    evaluator.add(item_ids=["1/0", "1/1", "2/0"], predictions=["Two", "A dog.", "blue"],
                  answers=["2", "dog", "red"])
    evaluator.add(item_ids=["2/0", "3/0"], predictions=["red", "t-shirt"],
                  answers=["red", "T shirt"])
    assert len(evaluator) == 4
    result = evaluator.result()
    assert result == {"exact_match": 0.75, "num_items": 4.0, "num_duplicates_skipped": 1.0}
    path = tmp_path / "out" / "vqa.json"
    evaluator.write_json(path)
    assert json.loads(path.read_text()) == {"split": "sharegpt4v/heldout", "metrics": result}


def test_evaluator_refuses_bad_input_naming_the_split():
    evaluator = vqa.VqaAnswerEvaluator(split="s")
    with pytest.raises(ValueError, match=r"VqaAnswerEvaluator\('s'\): no item"):
        evaluator.result()
    with pytest.raises(ValueError, match="2 item_ids, 1 predictions and 2 answers"):
        evaluator.add(item_ids=[1, 2], predictions=["a"], answers=["a", "b"])
    with pytest.raises(ValueError, match="item 7: prediction and answer must be strings"):
        evaluator.add(item_ids=[7], predictions=[None], answers=["a"])
