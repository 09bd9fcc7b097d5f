"""Tests for pixelllm/tasks.py: the official prompt lists, each row's prompts, losses, slot filler
and inference entry, and the row checks."""

import numpy as np
import pytest

from pixelllm import batch, tasks


def test_official_prompt_lists_and_evaluation_prompts():
    assert len(tasks.LONG_CAPTION_PROMPTS) == len(set(tasks.LONG_CAPTION_PROMPTS)) == 11
    assert len(tasks.SHORT_CAPTION_PROMPTS) == len(set(tasks.SHORT_CAPTION_PROMPTS)) == 13
    assert tasks.get("trace").eval_prompt == tasks.LONG_CAPTION_PROMPTS[0] == (
        "A long image caption: ")
    assert tasks.get("caption").eval_prompt == "A photo of "
    assert tasks.get("caption").eval_prompt in tasks.SHORT_CAPTION_PROMPTS
    # The prompt is followed by EOS, not by the text: every one ends in a space, as official.
    for prompt in tasks.LONG_CAPTION_PROMPTS + tasks.SHORT_CAPTION_PROMPTS:
        assert prompt.endswith(" ") and not prompt.endswith("  ")


def test_training_draws_every_prompt_and_evaluation_the_fixed_one():
    rng = np.random.default_rng(0)
    for name, choices in (("trace", tasks.LONG_CAPTION_PROMPTS),
                          ("caption", tasks.SHORT_CAPTION_PROMPTS)):
        row = tasks.get(name)
        assert {row.prompt(train=True, rng=rng) for _ in range(400)} == set(choices)
        assert row.prompt(train=False, rng=rng) == row.eval_prompt


def test_templates_and_single_prompts_leave_the_random_stream_alone():
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert tasks.get("refer").prompt(train=True, rng=rng, expression="the man on the left") == (
        "where is the man on the left")
    assert tasks.get("refseg").prompt(train=False, rng=rng, expression="a dog") == (
        "where is a dog")
    assert tasks.get("loca").prompt(train=True, rng=rng, expression="a dog") == "an object of "
    assert tasks.get("densecap").prompt(train=True, rng=rng) == "an object of "
    assert rng.bit_generator.state == state
    # The official concatenation: no space added between the question and "Answer: ".
    assert tasks.question_prompt("What color?") == "Question: What color?Answer: "
    assert tasks.question_prompt("What color? ") == "Question: What color? Answer: "


def test_rows():
    expected = {  # name: (losses, slot filler, inference entry)
        "trace": ({"text", "points"}, "narrative", "caption_with_traces"),
        "caption": ({"text"}, "narrative", "caption"),
        # Official: referring data trains the box (and mask) only, no text.
        "refer": ({"box"}, "expressions", "refer"),
        "refseg": ({"box", "mask"}, "expressions", "refer_segment"),
        "loca": ({"text"}, "objects", "location_caption"),
        "densecap": ({"text", "proposals"}, "ground_truth", "dense_caption"),
        "question_answer": ({"text"}, "expressions", "caption"),
    }
    assert {name: (set(row.losses), row.slot_filler, row.inference)
            for name, row in tasks.TASKS.items()} == expected
    assert [name for name, row in tasks.TASKS.items() if not row.prompt_per_object] == [
        "trace", "caption"]
    # Every loss a row can name has a mask in the batch contract.
    assert set(tasks.LOSSES) == set(batch.LOSS_MASKS)


@pytest.mark.parametrize("changes, message", [
    (dict(slot_filler="pixels"), "slot_filler 'pixels' is not one of"),
    (dict(losses=frozenset({"text", "depth"})), "unknown losses \\['depth'\\]"),
    (dict(prompts=()), "has no training prompt"),
])
def test_a_malformed_row_is_refused_naming_the_task(changes, message):
    row = dict(name="reasonseg", prompts=("{expression} ",), eval_prompt="{expression} ",
               slot_filler="expressions", losses=frozenset({"text"}), inference="refer")
    with pytest.raises(ValueError, match=f"task 'reasonseg'.*{message}"):
        tasks.Task(**{**row, **changes})


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'vqa'; expected one of"):
        tasks.get("vqa")
