"""Tests for data_pipelines/ops/random_scale_crop.py: windows, dropped objects with all their
fields (the context prompts included: the official crop bug), traces, scale."""

import numpy as np
import pytest

from data_pipelines.ops import fields
from data_pipelines.ops.random_scale_crop import random_scale_crop
from data_pipelines.ops.slot import SLOT_CONTEXT, SLOT_TEXT, slot
from data_pipelines.ops.task_prompt import task_prompt

WIDTH, HEIGHT, CANVAS = 16, 8, 8


def _example():
    """A 16x8 image whose red channel is 8 * column, so a crop's offset can be read off; a
    "left dog" in columns [0, 4) and a "right cat" in [12, 16), with masks and a narrative."""
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    image[:, :, 0] = 8 * np.arange(WIDTH)
    image[:, :, 1] = 8 * np.arange(HEIGHT)[:, None]
    masks = np.zeros((2, HEIGHT, WIDTH), bool)
    masks[0, :, 0:4] = True
    masks[1, :, 12:16] = True
    return {
        fields.IMAGE: image, fields.IMAGE_ID: "9",
        fields.OBJECT_BOXES: np.asarray([[0, 0, 4, 8], [12, 0, 16, 8]], np.float32),
        fields.OBJECT_MASKS: masks, fields.OBJECT_IDS: np.asarray([10, 20]),
        fields.OBJECT_TEXTS: [["the left dog", "a dog"], ["the right cat"]],
        fields.NARRATIVES: [{
            fields.CAPTION: "a dog and a cat", fields.UTTERANCE_TEXTS: ["a dog", "and a cat"],
            fields.UTTERANCE_BOXES: np.asarray([[0, 0, 2, 8], [10, 1, 16, 7]], np.float32),
            fields.UTTERANCE_POINTS: np.asarray([[[1, 4], [0, 0]], [[11, 2], [15.5, 6]]],
                                                np.float32),
            fields.UTTERANCE_VALID: np.asarray([True, True]),
            fields.UTTERANCE_VISIBLE: np.asarray([True, True])}],
    }


def _crop(example, seed):
    op = random_scale_crop(canvas=CANVAS, min_scale=2.0, max_scale=2.0)
    return op(example, np.random.default_rng(seed))


def test_window_at_scale_one_copies_pixels_and_shifts_everything():
    example = _example()
    for seed in range(12):
        out = _crop(example, seed)
        left = int(out[fields.IMAGE][0, 0, 0]) // 8
        # Longest side 2 * 8 = 16: no resampling, an 8x8 window of the 16x8 image.
        np.testing.assert_array_equal(out[fields.IMAGE],
                                      example[fields.IMAGE][:, left:left + 8])
        np.testing.assert_array_equal(out[fields.VALID_WH], [8, 8])
        narrative = out[fields.NARRATIVES][0]
        points = narrative[fields.UTTERANCE_POINTS]
        assert (points >= 0).all() and (points <= 8).all()
        expected_first = np.clip(np.asarray([[1 - left, 4], [-left, 0]]), 0, 8)
        np.testing.assert_allclose(points[0], expected_first)
        # Trace boxes x in [0, 2] and [10, 16]: seen by windows starting before 2 / after 2.
        np.testing.assert_array_equal(narrative[fields.UTTERANCE_VISIBLE],
                                      [left < 2, left + 8 > 10])


def test_objects_leaving_the_window_go_with_all_their_fields_prompts_included():
    example = task_prompt(task="refer")(_example(), np.random.default_rng(0))
    assert example[fields.OBJECT_CONTEXTS] == [["where is the left dog", "where is a dog"],
                                               ["where is the right cat"]]
    seen_ids = set()
    for seed in range(40):
        out = _crop(example, seed)
        left = int(out[fields.IMAGE][0, 0, 0]) // 8
        # The dog keeps >= 1 px for windows starting at <= 3, the cat for >= 5.
        expected_ids = [i for i, keep in ((10, left <= 3), (20, left >= 5)) if keep]
        ids = list(out[fields.OBJECT_IDS])
        assert ids == expected_ids
        seen_ids.add(tuple(ids))
        for row, object_id in enumerate(ids):
            original = [10, 20].index(object_id)
            assert out[fields.OBJECT_TEXTS][row] == example[fields.OBJECT_TEXTS][original]
            assert out[fields.OBJECT_CONTEXTS][row] == example[fields.OBJECT_CONTEXTS][original]
            expected_box = np.clip(example[fields.OBJECT_BOXES][original] - [left, 0, left, 0],
                                   0, 8)
            np.testing.assert_allclose(out[fields.OBJECT_BOXES][row], expected_box)
            np.testing.assert_array_equal(
                out[fields.OBJECT_MASKS][row],
                example[fields.OBJECT_MASKS][original][:, left:left + 8])
    assert {(10,), (20,)} <= seen_ids


def test_slots_after_a_crop_pair_each_prompt_with_its_own_box():
    """The official bug: with the dog cropped away, the first slot's context must be the cat's
    prompt, not the dog's."""
    example = task_prompt(task="refer")(_example(), np.random.default_rng(0))
    for seed in range(40):
        cropped = _crop(example, seed)
        if list(cropped[fields.OBJECT_IDS]) == [20]:
            break
    else:
        pytest.fail("no seed cropped the dog away")
    left = int(cropped[fields.IMAGE][0, 0, 0]) // 8
    out = slot(task="refer", slots=3, objects=1, train=False)(cropped, np.random.default_rng(0))
    assert out[SLOT_CONTEXT] == ["where is the right cat", "", ""]
    assert out[SLOT_TEXT] == ["the right cat", "", ""]
    np.testing.assert_allclose(out["target_boxes"][0], [12 - left, 0, 8, 8])
    np.testing.assert_array_equal(out["slot_mask"], [True, False, False])


def test_scale_below_the_canvas_resizes_without_cropping():
    out = random_scale_crop(canvas=CANVAS, min_scale=0.5, max_scale=0.5)(
        _example(), np.random.default_rng(0))
    # Longest side 4: 16x8 -> 4x2, the whole image, padded.
    np.testing.assert_array_equal(out[fields.VALID_WH], [4, 2])
    np.testing.assert_allclose(out[fields.OBJECT_BOXES], [[0, 0, 1, 2], [3, 0, 4, 2]])
    assert not out[fields.IMAGE][2:].any() and not out[fields.IMAGE][:, 4:].any()


def test_scale_is_drawn_in_range_and_the_op_is_deterministic_given_the_generator():
    op = random_scale_crop(canvas=CANVAS, min_scale=0.25, max_scale=0.75)
    widths = set()
    for seed in range(30):
        out = op(_example(), np.random.default_rng(seed))
        width, height = out[fields.VALID_WH]
        # Longest side 8 * s for s in [0.25, 0.75], the 2:1 aspect kept up to rounding.
        assert 2 <= width <= 6 and abs(height - width / 2) <= 1
        widths.add(float(width))
        again = op(_example(), np.random.default_rng(seed))
        np.testing.assert_array_equal(again[fields.IMAGE], out[fields.IMAGE])
    assert len(widths) >= 3


def test_bad_scale_range_is_refused():
    with pytest.raises(ValueError, match="min_scale"):
        random_scale_crop(canvas=8, min_scale=1.5, max_scale=1.0)
