"""Tests for data_pipelines/ops/resize_and_pad.py: sizes, coordinates, masks, padding."""

import numpy as np
import pytest

from data_pipelines.ops import fields
from data_pipelines.ops.resize_and_pad import fit_size, resize_and_pad


def _example(width, height):
    # Left half red, right half blue: the boundary shows where pixels land.
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2, 0] = 200
    image[:, width // 2:, 2] = 100
    masks = np.zeros((1, height, width), bool)
    masks[0, : height // 2, width // 2:] = True  # the top-right quarter
    utterance_box = np.asarray([[0, 0, width / 2, height]], np.float32)
    return {
        fields.IMAGE: image, fields.IMAGE_ID: "7",
        fields.OBJECT_BOXES: np.asarray([[width / 2, 0, width, height / 2]], np.float32),
        fields.OBJECT_MASKS: masks, fields.OBJECT_IDS: np.asarray([3]),
        fields.OBJECT_TEXTS: [["top right"]],
        fields.NARRATIVES: [{
            fields.CAPTION: "left", fields.UTTERANCE_TEXTS: ["left"],
            fields.UTTERANCE_BOXES: utterance_box,
            fields.UTTERANCE_POINTS: np.asarray([[[width / 4, height / 2]]], np.float32),
            fields.UTTERANCE_VALID: np.asarray([True]),
            fields.UTTERANCE_VISIBLE: np.asarray([True])}],
    }


@pytest.mark.parametrize("width, height, longest, expected", [
    (640, 480, 384, (384, 288)), (480, 640, 384, (288, 384)), (100, 1, 10, (10, 1)),
    (1, 1000, 10, (1, 10)), (3, 3, 8, (8, 8))])
def test_fit_size(width, height, longest, expected):
    assert fit_size(width, height, longest) == expected


def test_landscape_image_lands_top_left_with_everything_scaled():
    out = resize_and_pad(canvas=16)(_example(40, 20), np.random.default_rng(0))
    # 40x20 -> 16x8 (factor 0.4) in the top-left of a 16x16 canvas.
    assert out[fields.IMAGE].shape == (16, 16, 3) and out[fields.IMAGE].dtype == np.uint8
    np.testing.assert_array_equal(out[fields.VALID_WH], [16, 8])
    np.testing.assert_allclose(out[fields.OBJECT_BOXES], [[8, 0, 16, 4]])
    narrative = out[fields.NARRATIVES][0]
    np.testing.assert_allclose(narrative[fields.UTTERANCE_BOXES], [[0, 0, 8, 8]])
    np.testing.assert_allclose(narrative[fields.UTTERANCE_POINTS], [[[4, 4]]])
    image = out[fields.IMAGE]
    assert (image[:8, :7, 0] == 200).all() and (image[:8, 9:16, 2] == 100).all()
    assert not image[8:].any()
    expected_mask = np.zeros((16, 16), bool)
    expected_mask[:4, 8:16] = True
    np.testing.assert_array_equal(out[fields.OBJECT_MASKS][0], expected_mask)
    # The mask covers exactly its box.
    assert out[fields.OBJECT_MASKS][0].sum() == 8 * 4


def test_portrait_image_and_scale():
    out = resize_and_pad(canvas=20, scale=0.5)(_example(10, 40), np.random.default_rng(0))
    # Longest side 20 * 0.5 = 10: 10x40 -> 2x10 (round(2.5) == 2).
    width, height = 2, 10
    np.testing.assert_array_equal(out[fields.VALID_WH], [width, height])
    np.testing.assert_allclose(out[fields.OBJECT_BOXES],
                               [[width / 2, 0, width, height / 2]], rtol=1e-6)
    assert not out[fields.IMAGE][:, width:].any() and not out[fields.IMAGE][height:].any()


def test_objects_are_never_dropped_by_a_plain_resize():
    example = _example(40, 20)
    example[fields.OBJECT_BOXES] = np.asarray([[1, 1, 1.5, 1.5]], np.float32)  # tiny
    out = resize_and_pad(canvas=8)(example, np.random.default_rng(0))
    assert len(out[fields.OBJECT_BOXES]) == 1 and out[fields.OBJECT_TEXTS] == [["top right"]]


@pytest.mark.parametrize("scale", [0.0, 1.5])
def test_scale_outside_unit_interval_is_refused(scale):
    with pytest.raises(ValueError, match="scale"):
        resize_and_pad(canvas=8, scale=scale)
