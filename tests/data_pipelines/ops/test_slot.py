"""Tests for data_pipelines/ops/slot.py: what fills the S slots and G objects per task, the task
masks, and the zeros of unused slots."""

import numpy as np
import pytest

from data_pipelines.ops import fields
from data_pipelines.ops.slot import GT_TEXT, SLOT_CONTEXT, SLOT_TEXT, SLOT_TRACE, slot
from data_pipelines.ops.task_prompt import task_prompt

CANVAS = 8


def _objects_example(task):
    masks = np.zeros((3, CANVAS, CANVAS), bool)
    for i in range(3):
        masks[i, i, i] = True
    example = {
        fields.IMAGE: np.full((CANVAS, CANVAS, 3), 9, np.uint8), fields.IMAGE_ID: "1",
        fields.VALID_WH: np.asarray([8, 6], np.float32),
        fields.OBJECT_BOXES: np.asarray([[0, 0, 1, 1], [1, 1, 2, 2], [2, 2, 3, 3]],
                                        np.float32),
        fields.OBJECT_MASKS: masks, fields.OBJECT_IDS: np.asarray([1, 2, 3]),
        fields.OBJECT_TEXTS: [["a", "b"], [], ["c", "d", "e"]],
    }
    return task_prompt(task=task)(example, np.random.default_rng(0))


def _narrative(caption):
    return {fields.CAPTION: caption, fields.UTTERANCE_TEXTS: [caption],
            fields.UTTERANCE_BOXES: np.zeros((1, 4), np.float32),
            fields.UTTERANCE_POINTS: np.zeros((1, 2, 2), np.float32),
            fields.UTTERANCE_VALID: np.asarray([True]),
            fields.UTTERANCE_VISIBLE: np.asarray([True])}


def _trace_example(task="trace"):
    example = {fields.IMAGE: np.zeros((CANVAS, CANVAS, 3), np.uint8), fields.IMAGE_ID: "2",
               fields.VALID_WH: np.asarray([8, 6], np.float32),
               fields.NARRATIVES: [_narrative("first"), _narrative("second")]}
    return task_prompt(task=task, train=False)(example, np.random.default_rng(0))


def _masks(out):
    return [list(out[name]) for name in ("task_text", "task_points", "task_box", "task_mask")]


def test_refer_fills_one_slot_per_expression_in_evaluation_order():
    out = slot(task="refer", slots=6, objects=2, train=False)(_objects_example("refer"),
                                                               np.random.default_rng(0))
    assert out[SLOT_TEXT] == ["a", "b", "c", "d", "e", ""]
    assert out[SLOT_CONTEXT] == ["where is a", "where is b", "where is c", "where is d",
                                 "where is e", ""]
    np.testing.assert_array_equal(out["slot_mask"], [1, 1, 1, 1, 1, 0])
    np.testing.assert_allclose(out["prompt_boxes"][:5], [[0, 0, 8, 6]] * 5)
    np.testing.assert_allclose(out["target_boxes"][[0, 1, 2, 4]],
                               [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    assert not out["prompt_boxes"][5].any() and not out["target_boxes"][5].any()
    # The official referring losses: the box only (no text, no points).
    assert _masks(out) == [[0] * 6, [0] * 6, [1, 1, 1, 1, 1, 0], [0] * 6]
    assert not out["target_masks"].any()  # refer: no masks
    assert out["task_proposals"] == 0 and not out["gt_mask"].any()
    assert out["image"].dtype == np.float32 and (out["image"] == 9).all()


def test_refseg_evaluation_lays_out_the_original_masks_per_slot():
    example = _objects_example("refseg")
    original = np.zeros((3, 5, 5), bool)  # each object's mask in a 5 x 5 original frame
    for i in range(3):
        original[i, 4 - i, i] = True
    out = slot(task="refseg", slots=6, objects=2, train=False)(
        {**example, fields.OBJECT_ORIGINAL_MASKS: original}, np.random.default_rng(0))
    framed = out["original_masks"]
    assert framed.shape == (6, 5, 5) and framed.dtype == bool
    # Slots a, b (object 0) and c, d, e (object 2), like target_masks; the unused slot is zero.
    np.testing.assert_array_equal(framed[:5], original[[0, 0, 2, 2, 2]])
    np.testing.assert_array_equal(out["target_masks"][:5], example[fields.OBJECT_MASKS][
        [0, 0, 2, 2, 2]])
    assert not framed[5].any()
    assert "original_masks" not in slot(task="refseg", slots=6, objects=2, train=False)(
        example, np.random.default_rng(0))


def test_refseg_carries_the_masks_and_training_takes_a_random_subset_in_order():
    example = _objects_example("refseg")
    seen = set()
    for seed in range(30):
        out = slot(task="refseg", slots=2, objects=1)(example, np.random.default_rng(seed))
        texts = out[SLOT_TEXT]
        assert len(texts) == 2 and "".join(texts) in {"ab", "ac", "ad", "ae", "bc", "bd", "be",
                                                      "cd", "ce", "de"}
        for s, text in enumerate(texts):
            owner = 0 if text in "ab" else 2
            assert out[SLOT_CONTEXT][s] == f"where is {text}"
            np.testing.assert_array_equal(out["target_masks"][s],
                                          example[fields.OBJECT_MASKS][owner])
        assert _masks(out) == [[0, 0], [0, 0], [1, 1], [1, 1]]
        seen.add("".join(texts))
    assert len(seen) >= 6


def test_loca_prompts_with_the_object_box_and_skips_undescribed_objects():
    out = slot(task="loca", slots=3, objects=1, train=False)(_objects_example("loca"),
                                                              np.random.default_rng(0))
    assert out[SLOT_TEXT] == ["a", "c", ""]
    assert out[SLOT_CONTEXT] == ["an object of ", "an object of ", ""]
    np.testing.assert_allclose(out["prompt_boxes"][:2], [[0, 0, 1, 1], [2, 2, 3, 3]])
    assert not out["target_boxes"].any()
    assert _masks(out) == [[1, 1, 0], [0] * 3, [0] * 3, [0] * 3]
    training = {slot(task="loca", slots=3, objects=1)(_objects_example("loca"),
                                                      np.random.default_rng(seed))[SLOT_TEXT][1]
                for seed in range(30)}
    assert training == {"c", "d", "e"}


def test_densecap_fills_the_ground_truth_objects_only():
    out = slot(task="densecap", slots=2, objects=3, train=False)(_objects_example("densecap"),
                                                                  np.random.default_rng(0))
    assert not out["slot_mask"].any() and out["task_proposals"] == 1
    np.testing.assert_array_equal(out["gt_mask"], [True, True, False])
    np.testing.assert_allclose(out["gt_boxes"], [[0, 0, 1, 1], [2, 2, 3, 3], [0, 0, 0, 0]])
    assert out[GT_TEXT] == ["a", "c", ""]
    assert _masks(out) == [[0, 0]] * 4
    limited = slot(task="densecap", slots=2, objects=1, train=False)(
        _objects_example("densecap"), np.random.default_rng(0))
    assert limited[GT_TEXT] == ["a"]


@pytest.mark.parametrize("task, losses", [("trace", [1, 1, 0, 0]), ("caption", [1, 0, 0, 0])])
def test_trace_and_caption_use_one_narrative(task, losses):
    out = slot(task=task, slots=2, objects=1, train=False)(_trace_example(task),
                                                            np.random.default_rng(0))
    assert out[SLOT_TEXT] == ["first", ""]
    assert out[SLOT_CONTEXT][0] == ("A long image caption: " if task == "trace" else
                                    "A photo of ")
    assert (out[SLOT_TRACE][0] is not None) == (task == "trace") and out[SLOT_TRACE][1] is None
    np.testing.assert_allclose(out["prompt_boxes"], [[0, 0, 8, 6], [0, 0, 0, 0]])
    assert _masks(out) == [[v, 0] for v in losses]
    chosen = {slot(task=task, slots=2, objects=1)(_trace_example(task),
                                                  np.random.default_rng(seed))[SLOT_TEXT][0]
              for seed in range(20)}
    assert chosen == {"first", "second"}


@pytest.mark.parametrize("task, what", [("refer", "5 expressions"),
                                        ("loca", "2 described objects")])
def test_evaluation_refuses_to_drop_slots(task, what):
    with pytest.raises(ValueError, match=f"example 1: {what} do not fit 1 slots"):
        slot(task=task, slots=1, objects=1, train=False)(_objects_example(task),
                                                        np.random.default_rng(0))


def test_slot_needs_the_canvas_and_a_known_task():
    example = _trace_example()
    del example[fields.VALID_WH]
    with pytest.raises(ValueError, match="resize_and_pad or random_scale_crop first"):
        slot(task="trace", slots=1, objects=1)(example, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown task"):
        slot(task="vqa", slots=1, objects=1)
