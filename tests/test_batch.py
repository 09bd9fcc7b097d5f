"""Tests for pixelllm/batch.py: the spec derived from one table, and the checks that refuse a
batch naming the key."""

import dataclasses

import jax
import numpy as np
import pytest

from pixelllm import batch as batch_lib

SIZES = batch_lib.Sizes(canvas=8, slots=3, context_length=4, text_length=5, points_per_token=2,
                        objects=2)


def _batch(batch_size=2):
    return {key: np.ones(shape, dtype) for key, (shape, dtype)
            in batch_lib.batch_spec(SIZES, batch_size).items()}


def test_example_and_batch_spec_come_from_one_table():
    example, full = batch_lib.example_spec(SIZES), batch_lib.batch_spec(SIZES, 4)
    assert set(example) == set(full) == set(batch_lib.SPEC)
    for key, (shape, dtype) in example.items():
        assert full[key] == ((4, *shape), dtype)
    assert example["image"] == ((8, 8, 3), np.dtype(np.float32))
    assert example["token_points"] == ((3, 5, 2, 2), np.dtype(np.float32))
    assert example["task_proposals"] == ((), np.dtype(np.float32))
    assert full["gt_text_tokens"] == ((4, 2, 5), np.dtype(np.int32))
    assert set(batch_lib.SLOT_KEYS) == {key for key, (shape, _) in full.items()
                                        if shape[:2] == (4, 3)} - {"gt_boxes", "gt_mask"}
    assert batch_lib.validate(_batch(4)) == {"B": 4, "H": 8, "W": 8, "S": 3, "Lc": 4, "L": 5,
                                             "K": 2, "G": 2}


def test_validate_reads_shapes_and_dtypes_only():
    abstract = {key: jax.ShapeDtypeStruct(value.shape, value.dtype)
                for key, value in _batch().items()}
    assert batch_lib.validate(abstract)["S"] == 3


def test_a_float_text_tokens_is_refused():
    batch = _batch()
    batch["text_tokens"] = batch["text_tokens"].astype(np.float32)
    with pytest.raises(batch_lib.BatchError, match="batch\\['text_tokens'\\] must be integer"):
        batch_lib.validate(batch)


def test_disagreeing_slot_counts_are_refused():
    batch = _batch()
    batch["task_box"] = np.ones((2, 4), np.float32)
    with pytest.raises(batch_lib.BatchError, match="batch\\['task_box'\\] has S=4 but other keys "
                                                   "have S=3"):
        batch_lib.validate(batch)


def test_wrong_rank_and_fixed_sizes_are_refused():
    batch = _batch()
    with pytest.raises(batch_lib.BatchError, match="batch\\['valid_wh'\\] must have shape"):
        batch_lib.validate({**batch, "valid_wh": np.ones((2,), np.float32)})
    with pytest.raises(batch_lib.BatchError, match="batch\\['prompt_boxes'\\] must have shape "
                                                   "\\[B, S, 4\\], got \\(2, 3, 2\\)"):
        batch_lib.validate({**batch, "prompt_boxes": np.ones((2, 3, 2), np.float32)})


@pytest.mark.parametrize("key, bad", [("text_tokens", 40), ("context_tokens", -1),
                                      ("gt_text_tokens", 41)])
def test_an_out_of_range_token_id_is_refused_naming_the_key(key, bad):
    batch = _batch()
    batch_lib.check_token_ids(batch, vocab_size=40)
    batch[key][1, 0, 2] = bad
    with pytest.raises(batch_lib.BatchError, match=f"batch\\['{key}'\\] holds token id {bad}, "
                                                   "outside the vocabulary \\[0, 40\\)"):
        batch_lib.check_token_ids(batch, vocab_size=40)


def test_checker_validates_structure_once_per_signature_and_tokens_every_time(monkeypatch):
    validated = []
    validate = batch_lib.validate
    monkeypatch.setattr(batch_lib, "validate", lambda batch: validated.append(1) or validate(batch))
    checker = batch_lib.BatchChecker(vocab_size=40, sizes=SIZES)
    batch = _batch()
    assert checker(batch) is batch
    checker({**batch, "slot_mask": np.zeros((2, 3), bool)})  # other values, same signature
    assert len(validated) == 1
    # Token ids are values, checked on every call.
    batch["text_tokens"][0, 0, 0] = 99
    with pytest.raises(batch_lib.BatchError, match="text_tokens"):
        checker(batch)
    # A new signature is validated: another batch size passes, other model sizes do not.
    checker(_batch(batch_size=3))
    assert len(validated) == 2
    other = batch_lib.batch_spec(batch_lib.Sizes(canvas=8, slots=3, context_length=4,
                                                 text_length=5, points_per_token=3, objects=2), 2)
    with pytest.raises(batch_lib.BatchError, match="batch\\['token_points'\\] has K=3, the model "
                                                   "expects K=2"):
        checker({key: np.zeros(shape, dtype) for key, (shape, dtype) in other.items()})
    with pytest.raises(batch_lib.BatchError, match="must be bool"):
        checker({**_batch(), "slot_mask": np.ones((2, 3), np.float32)})


def test_original_masks_are_in_the_evaluation_spec_only_when_sized():
    evaluation = batch_lib.example_spec(SIZES, evaluation=True)
    assert set(evaluation) - set(batch_lib.SPEC) == {batch_lib.IMAGE_ID, batch_lib.ORIGINAL_WH}
    framed = batch_lib.example_spec(dataclasses.replace(SIZES, original_masks=7),
                                    evaluation=True)
    assert framed[batch_lib.ORIGINAL_MASKS] == ((3, 7, 7), np.dtype(bool))
    assert batch_lib.ORIGINAL_MASKS not in batch_lib.example_spec(
        dataclasses.replace(SIZES, original_masks=7))
