"""Tests for data_pipelines/ops/geometry.py: the one coordinate rule for every field."""

import numpy as np
import pytest

from data_pipelines.ops import fields, geometry


def _example():
    image = np.zeros((10, 20, 3), np.uint8)
    image[:, 10:] = 255
    return {
        fields.IMAGE: image, fields.IMAGE_ID: "5",
        fields.OBJECT_BOXES: np.asarray([[2, 2, 6, 4], [15, 5, 19, 9]], np.float32),
        fields.OBJECT_IDS: np.asarray([1, 2]), fields.OBJECT_TEXTS: [["a"], ["b"]],
        fields.NARRATIVES: [{
            fields.CAPTION: "c", fields.UTTERANCE_TEXTS: ["c"],
            fields.UTTERANCE_BOXES: np.asarray([[0, 0, 20, 10]], np.float32),
            fields.UTTERANCE_POINTS: np.asarray([[[5, 5], [15, 5]]], np.float32),
            fields.UTTERANCE_VALID: np.asarray([True]),
            fields.UTTERANCE_VISIBLE: np.asarray([True])}],
    }


def test_resample_of_a_region_maps_edges_to_edges():
    # Region x in [10, 20), y in [0, 10) -> 5x5 pixels: x' = (x - 10) / 2, y' = y / 2.
    out = geometry.resample(_example(), size_wh=(5, 5), source_box=(10, 0, 20, 10))
    assert out[fields.IMAGE].shape == (5, 5, 3)
    # White but for the first column, whose antialiasing filter reaches the black x < 10.
    assert (out[fields.IMAGE][:, 1:] == 255).all() and (out[fields.IMAGE][:, 0] > 128).all()
    np.testing.assert_allclose(out[fields.OBJECT_BOXES], [[0, 1, 0, 2], [2.5, 2.5, 4.5, 4.5]])
    narrative = out[fields.NARRATIVES][0]
    np.testing.assert_allclose(narrative[fields.UTTERANCE_BOXES], [[0, 0, 5, 5]])
    np.testing.assert_allclose(narrative[fields.UTTERANCE_POINTS], [[[0, 2.5], [2.5, 2.5]]])


def test_min_box_size_drops_objects_left_outside():
    out = geometry.resample(_example(), size_wh=(5, 5), source_box=(10, 0, 20, 10),
                            min_box_size=1.0)
    np.testing.assert_array_equal(out[fields.OBJECT_IDS], [2])
    assert out[fields.OBJECT_TEXTS] == [["b"]]


def test_transform_coordinates_resorts_mirrored_boxes():
    out = geometry.transform_coordinates(_example(), scale=(-1.0, 2.0), offset=(20.0, 1.0))
    np.testing.assert_allclose(out[fields.OBJECT_BOXES], [[14, 5, 18, 9], [1, 11, 5, 19]])


def test_pad_to_canvas_and_image_size():
    out = geometry.pad_to_canvas(_example(), canvas=24)
    assert out[fields.IMAGE].shape == (24, 24, 3) and not out[fields.IMAGE][10:].any()
    np.testing.assert_array_equal(out[fields.VALID_WH], [20, 10])
    assert geometry.image_size(out) == (20, 10) and geometry.image_size(_example()) == (20, 10)
    with pytest.raises(ValueError, match="does not fit the 16x16 canvas"):
        geometry.pad_to_canvas(_example(), canvas=16)
    with pytest.raises(ValueError, match="resample before padding"):
        geometry.resample(out, size_wh=(4, 4))
