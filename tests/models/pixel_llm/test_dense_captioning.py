"""Tests for pixelllm/models/pixel_llm/dense_captioning.py on hand-made candidates: which
candidates become slots, which captions they take, and that other images keep their slots."""

import jax
import numpy as np
import pytest

from pixelllm import batch as batch_lib
from pixelllm.models.pixel_llm.dense_captioning import assign_dense_caption_slots
from pixelllm.models.pixel_llm.detector import CaptionCandidates


def _batch():
    """Image 0 dense captioning (one real object, one padding object), image 1 another task."""
    b, s, lc, length, g, canvas = 2, 3, 2, 4, 2, 8
    rng = np.random.default_rng(0)
    batch = {key: rng.uniform(1, 5, shape).astype(dtype) if dtype.kind == "f" else
             rng.integers(1, 9, shape).astype(dtype) if dtype.kind == "i" else
             np.ones(shape, dtype)
             for key, (shape, dtype) in batch_lib.batch_spec(
                 batch_lib.Sizes(canvas=canvas, slots=s, context_length=lc, text_length=length,
                                 points_per_token=2, objects=g), b).items()}
    batch["task_proposals"] = np.asarray([1.0, 0.0], np.float32)
    batch["gt_boxes"][0] = [[0, 0, 4, 4], [4, 4, 8, 8]]
    batch["gt_mask"][0] = [True, False]
    batch["gt_text_tokens"][0] = [[0, 5, 6, 1], [0, 7, 7, 1]]
    batch["gt_text_mask"][0] = [[True, True, True, True], [True, True, True, True]]
    return batch


def test_matched_candidates_become_the_dense_images_slots():
    batch = _batch()
    # In the detector's order: an unmatched box, two boxes matching the real object, one box
    # that overlaps only the padding object (never matched).
    candidates = CaptionCandidates(
        boxes=np.asarray([[[5, 0, 8, 3], [0, 0, 4, 4], [0, 0, 4, 3], [4, 4, 8, 8]],
                          [[0, 0, 1, 1]] * 4], np.float32),
        gt_index=np.asarray([[0, 0, 0, 1], [0] * 4], np.int32),
        matched=np.asarray([[False, True, True, False], [False] * 4]))
    out = jax.jit(lambda b, c: assign_dense_caption_slots(b, c, num_text_proposals=2))(
        batch, candidates)
    assert set(out) == set(batch_lib.SLOT_KEYS)
    # The matched candidates in order; the third slot (past num_text_proposals) is empty.
    np.testing.assert_allclose(out["prompt_boxes"][0], [[0, 0, 4, 4], [0, 0, 4, 3], [0, 0, 0, 0]])
    np.testing.assert_array_equal(out["slot_mask"][0], [True, True, False])
    np.testing.assert_array_equal(out["task_text"][0], [1, 1, 0])
    np.testing.assert_array_equal(out["text_tokens"][0], [[0, 5, 6, 1], [0, 5, 6, 1],
                                                          [0, 0, 0, 0]])
    np.testing.assert_array_equal(out["text_mask"][0].sum(-1), [4, 4, 0])
    # No point, box or mask targets on these slots; the context (the task prompt) is kept.
    for key in ("task_points", "task_box", "task_mask", "token_points_mask", "target_boxes",
                "target_masks", "token_points"):
        assert not np.asarray(out[key][0]).any(), key
    np.testing.assert_array_equal(out["context_tokens"], batch["context_tokens"])
    np.testing.assert_array_equal(out["context_mask"], batch["context_mask"])
    # The other image keeps every slot input.
    for key in batch_lib.SLOT_KEYS:
        np.testing.assert_array_equal(out[key][1], batch[key][1], err_msg=key)


def test_unmatched_candidates_leave_empty_slots():
    batch = _batch()
    candidates = CaptionCandidates(boxes=np.asarray([[[0, 0, 4, 4]] * 3] * 2, np.float32),
                                   gt_index=np.zeros((2, 3), np.int32),
                                   matched=np.zeros((2, 3), bool))
    out = assign_dense_caption_slots(batch, candidates, num_text_proposals=2)
    assert not np.asarray(out["slot_mask"][0]).any() and not np.asarray(out["text_mask"][0]).any()
    assert not np.asarray(out["task_text"][0]).any()


def test_more_caption_slots_than_candidates_or_slots_is_an_error():
    batch = _batch()
    candidates = CaptionCandidates(boxes=np.zeros((2, 2, 4), np.float32),
                                   gt_index=np.zeros((2, 2), np.int32),
                                   matched=np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="exceeds the detector's 2 caption candidates"):
        assign_dense_caption_slots(batch, candidates, num_text_proposals=3)
    with pytest.raises(ValueError, match="exceeds the batch's 3 slots"):
        assign_dense_caption_slots(batch, candidates, num_text_proposals=4)
