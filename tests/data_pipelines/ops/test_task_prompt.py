"""Tests for data_pipelines/ops/task_prompt.py."""

import numpy as np
import pytest

from data_pipelines.ops import fields
from data_pipelines.ops.task_prompt import task_prompt
from pixelllm import tasks

OBJECTS = {fields.IMAGE: np.zeros((2, 2, 3), np.uint8),
           fields.OBJECT_BOXES: np.zeros((2, 4), np.float32),
           fields.OBJECT_TEXTS: [["red car", "the car"], ["a tree"]]}


def test_whole_image_prompts_are_drawn_in_training_and_fixed_in_evaluation():
    rng = np.random.default_rng(0)
    drawn = {task_prompt(task="trace")(OBJECTS, rng)[fields.CONTEXT] for _ in range(300)}
    assert drawn == set(tasks.LONG_CAPTION_PROMPTS)
    assert task_prompt(task="trace", train=False)(OBJECTS, rng)[fields.CONTEXT] == (
        "A long image caption: ")
    assert task_prompt(task="caption", train=False)(OBJECTS, rng)[fields.CONTEXT] == (
        "A photo of ")


@pytest.mark.parametrize("task, expected", [
    ("refer", [["where is red car", "where is the car"], ["where is a tree"]]),
    ("refseg", [["where is red car", "where is the car"], ["where is a tree"]]),
    ("loca", [["an object of "] * 2, ["an object of "]]),
    ("densecap", [["an object of "] * 2, ["an object of "]]),
])
def test_object_prompts_parallel_the_expressions(task, expected):
    out = task_prompt(task=task)(OBJECTS, np.random.default_rng(0))
    assert out[fields.OBJECT_CONTEXTS] == expected
    assert fields.CONTEXT not in out
    assert fields.OBJECT_CONTEXTS not in OBJECTS


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'vqa'"):
        task_prompt(task="vqa")
