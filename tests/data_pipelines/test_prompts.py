"""Tests for data_pipelines/prompts.py: the official lists, evaluation prompts, templates."""

import numpy as np
import pytest

from data_pipelines import prompts


def test_official_list_sizes_and_eval_prompts():
    assert len(prompts.LONG_CAPTION_PROMPTS) == 11
    assert len(prompts.SHORT_CAPTION_PROMPTS) == 13
    assert len(set(prompts.LONG_CAPTION_PROMPTS)) == 11
    assert len(set(prompts.SHORT_CAPTION_PROMPTS)) == 13
    assert prompts.LONG_CAPTION_PROMPTS[0] == prompts.LONG_CAPTION_EVAL_PROMPT
    assert prompts.LONG_CAPTION_EVAL_PROMPT == "A long image caption: "
    assert prompts.SHORT_CAPTION_EVAL_PROMPT == "A photo of "
    assert prompts.SHORT_CAPTION_EVAL_PROMPT in prompts.SHORT_CAPTION_PROMPTS
    # The prompt is followed by EOS, not by the text: every one ends in a space, as official.
    for prompt in prompts.LONG_CAPTION_PROMPTS + prompts.SHORT_CAPTION_PROMPTS:
        assert prompt.endswith(" ") and not prompt.endswith("  ")


def test_image_prompt_draws_every_prompt_in_training_and_the_fixed_one_in_eval():
    rng = np.random.default_rng(0)
    drawn = {prompts.image_prompt("trace", train=True, rng=rng) for _ in range(400)}
    assert drawn == set(prompts.LONG_CAPTION_PROMPTS)
    drawn = {prompts.image_prompt("caption", train=True, rng=rng) for _ in range(400)}
    assert drawn == set(prompts.SHORT_CAPTION_PROMPTS)
    assert prompts.image_prompt("trace", train=False, rng=rng) == "A long image caption: "
    assert prompts.image_prompt("caption", train=False, rng=rng) == "A photo of "


def test_templates():
    assert prompts.refer_prompt("the man on the left") == "where is the man on the left"
    assert prompts.object_prompt("refseg", "a dog") == "where is a dog"
    assert prompts.object_prompt("loca", "a dog") == "an object of "
    assert prompts.object_prompt("densecap", "a dog") == "an object of "
    assert prompts.question_prompt("What color?") == "Question: What color? Answer: "


@pytest.mark.parametrize("call", [
    lambda: prompts.image_prompt("refer", train=True, rng=np.random.default_rng(0)),
    lambda: prompts.object_prompt("trace", "x"),
])
def test_unknown_task_raises(call):
    with pytest.raises(ValueError, match="task"):
        call()
