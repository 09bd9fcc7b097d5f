"""Tests for data_pipelines/ops/fields.py: object rows kept together, texts mapped everywhere."""

import numpy as np
import pytest

from data_pipelines.ops import fields


def _example():
    return {
        fields.IMAGE: np.zeros((2, 2, 3), np.uint8), fields.IMAGE_ID: "3",
        fields.CONTEXT: "where",
        fields.OBJECT_BOXES: np.arange(12, dtype=np.float32).reshape(3, 4),
        fields.OBJECT_IDS: np.asarray([7, 8, 9]),
        fields.OBJECT_TEXTS: [["a"], ["b", "c"], []],
        fields.OBJECT_CONTEXTS: [["pa"], ["pb", "pc"], []],
        fields.NARRATIVES: [{fields.CAPTION: "cap", fields.UTTERANCE_TEXTS: ["u1", "u2"]}],
    }


def test_keep_objects_keeps_the_same_rows_of_every_object_field():
    out = fields.keep_objects(_example(), np.asarray([False, True, True]))
    np.testing.assert_array_equal(out[fields.OBJECT_IDS], [8, 9])
    np.testing.assert_array_equal(out[fields.OBJECT_BOXES], [[4, 5, 6, 7], [8, 9, 10, 11]])
    assert out[fields.OBJECT_TEXTS] == [["b", "c"], []]
    assert out[fields.OBJECT_CONTEXTS] == [["pb", "pc"], []]
    assert fields.num_objects(out) == 2 and fields.num_objects(_example()) == 3
    with pytest.raises(ValueError, match="keep mask of shape"):
        fields.keep_objects(_example(), np.asarray([True]))


def test_object_fields_of_different_lengths_are_an_error():
    example = {**_example(), fields.OBJECT_IDS: np.asarray([7, 8])}
    with pytest.raises(ValueError, match="example 3: object fields have different lengths"):
        fields.num_objects(example)


def test_map_texts_and_texts_cover_every_text():
    example = _example()
    out = fields.map_texts(example, str.upper)
    assert out[fields.CONTEXT] == "WHERE"
    assert out[fields.OBJECT_TEXTS] == [["A"], ["B", "C"], []]
    assert out[fields.OBJECT_CONTEXTS] == [["PA"], ["PB", "PC"], []]
    assert out[fields.NARRATIVES][0][fields.CAPTION] == "CAP"
    assert out[fields.NARRATIVES][0][fields.UTTERANCE_TEXTS] == ["U1", "U2"]
    assert sorted(fields.texts(example)) == sorted(["where", "a", "b", "c", "pa", "pb", "pc",
                                                    "cap", "u1", "u2"])
    assert example[fields.CONTEXT] == "where"  # the input is untouched
