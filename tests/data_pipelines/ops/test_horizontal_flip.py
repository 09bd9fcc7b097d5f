"""Tests for data_pipelines/ops/horizontal_flip.py: mirrored pixels and coordinates, "left" and
"right" swapped in every text, or sided examples left unflipped."""

import numpy as np
import pytest

from data_pipelines.ops import fields
from data_pipelines.ops.horizontal_flip import flip, horizontal_flip, names_a_side, swap_sides
from data_pipelines.ops.resize_and_pad import resize_and_pad
from data_pipelines.ops.task_prompt import task_prompt


@pytest.mark.parametrize("text, expected", [
    ("the man on the left", "the man on the right"),
    ("Left shoe and RIGHT glove", "Right shoe and LEFT glove"),
    ("left-hand side, right.", "right-hand side, left."),
    ("leftover bright lefty", "leftover bright lefty"),
    ("", ""),
])
def test_swap_sides(text, expected):
    assert swap_sides(text) == expected
    assert swap_sides(swap_sides(text)) == text
    assert names_a_side(text) == (text != expected)


def _example():
    image = np.zeros((2, 4, 3), np.uint8)
    image[:, :, 0] = [[10, 20, 30, 40]] * 2
    masks = np.zeros((1, 2, 4), bool)
    masks[0, :, 0] = True
    return {
        fields.IMAGE: image, fields.IMAGE_ID: "1",
        fields.OBJECT_BOXES: np.asarray([[0, 0, 1, 2]], np.float32),
        fields.OBJECT_MASKS: masks, fields.OBJECT_IDS: np.asarray([5]),
        fields.OBJECT_TEXTS: [["dog on the left"]],
        fields.NARRATIVES: [{
            fields.CAPTION: "Left is a dog", fields.UTTERANCE_TEXTS: ["Left is", "a dog"],
            fields.UTTERANCE_BOXES: np.asarray([[0, 0, 1, 1], [0.5, 0, 1.5, 2]], np.float32),
            fields.UTTERANCE_POINTS: np.asarray([[[0.25, 1]], [[1, 1.5]]], np.float32),
            fields.UTTERANCE_VALID: np.asarray([True, True]),
            fields.UTTERANCE_VISIBLE: np.asarray([True, True])}],
    }


def test_flip_mirrors_pixels_boxes_points_masks_and_swaps_sides_everywhere():
    example = task_prompt(task="refer")(_example(), np.random.default_rng(0))
    out = flip(example, swap_text=True)
    np.testing.assert_array_equal(out[fields.IMAGE][0, :, 0], [40, 30, 20, 10])
    np.testing.assert_allclose(out[fields.OBJECT_BOXES], [[3, 0, 4, 2]])
    np.testing.assert_array_equal(out[fields.OBJECT_MASKS][0, :, 3], [True, True])
    assert out[fields.OBJECT_MASKS].sum() == 2
    narrative = out[fields.NARRATIVES][0]
    np.testing.assert_allclose(narrative[fields.UTTERANCE_BOXES], [[3, 0, 4, 1], [2.5, 0, 3.5, 2]])
    np.testing.assert_allclose(narrative[fields.UTTERANCE_POINTS], [[[3.75, 1]], [[3, 1.5]]])
    assert out[fields.OBJECT_TEXTS] == [["dog on the right"]]
    assert out[fields.OBJECT_CONTEXTS] == [["where is dog on the right"]]
    assert narrative[fields.CAPTION] == "Right is a dog"
    assert narrative[fields.UTTERANCE_TEXTS] == ["Right is", "a dog"]
    # Flipping twice restores everything.
    back = flip(out, swap_text=True)
    np.testing.assert_array_equal(back[fields.IMAGE], example[fields.IMAGE])
    np.testing.assert_allclose(back[fields.OBJECT_BOXES], example[fields.OBJECT_BOXES])
    assert back[fields.OBJECT_CONTEXTS] == example[fields.OBJECT_CONTEXTS]


def test_flip_on_the_canvas_mirrors_only_the_valid_area():
    on_canvas = resize_and_pad(canvas=8)(_example(), np.random.default_rng(0))
    # 4x2 -> 8x4 on the 8x8 canvas; mirror within x in [0, 8), y rows 4.. stay padding.
    out = flip(on_canvas, swap_text=False)
    np.testing.assert_array_equal(out[fields.IMAGE], on_canvas[fields.IMAGE][:, ::-1])
    np.testing.assert_allclose(out[fields.OBJECT_BOXES], [[6, 0, 8, 4]])
    assert out[fields.OBJECT_TEXTS] == [["dog on the left"]]

    # A valid area narrower than the canvas: padding columns stay zero.
    tall = dict(on_canvas)
    tall[fields.VALID_WH] = np.asarray([6, 4], np.float32)
    image = np.zeros((8, 8, 3), np.uint8)
    image[:4, :6, 0] = np.arange(1, 7)
    tall[fields.IMAGE] = image
    tall[fields.OBJECT_MASKS] = np.zeros((1, 8, 8), bool)
    out = flip(tall, swap_text=False)
    np.testing.assert_array_equal(out[fields.IMAGE][0, :, 0], [6, 5, 4, 3, 2, 1, 0, 0])
    np.testing.assert_allclose(out[fields.OBJECT_BOXES], [[4, 0, 6, 4]])


def test_probability_and_modes():
    example = _example()
    rng = np.random.default_rng(0)
    assert horizontal_flip(probability=0.0)(example, rng) is example
    flipped = horizontal_flip(probability=1.0, mode="swap")(example, rng)
    assert flipped[fields.OBJECT_TEXTS] == [["dog on the right"]]
    # A sided example is left alone; an unsided one flips.
    assert horizontal_flip(probability=1.0, mode="skip_sided")(example, rng) is example
    unsided = fields.map_texts(example, lambda text: text.replace("left", "far").replace(
        "Left", "Here"))
    out = horizontal_flip(probability=1.0, mode="skip_sided")(unsided, rng)
    np.testing.assert_allclose(out[fields.OBJECT_BOXES], [[3, 0, 4, 2]])
    # About half of the examples flip at 0.5.
    op = horizontal_flip(probability=0.5)
    rng = np.random.default_rng(1)
    count = sum(op(example, rng) is not example for _ in range(200))
    assert 70 < count < 130


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        horizontal_flip(mode="mirror")
    with pytest.raises(ValueError, match="probability"):
        horizontal_flip(probability=2.0)
