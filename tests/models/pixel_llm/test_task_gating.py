"""The task table drives the losses: weights come from one mapping, per-slot weights from the
slot inputs the model used, and a new task row is followed by the slot op and the loss gates
(hand-made model outputs, no model run)."""

import jax.numpy as jnp
import numpy as np
import pytest
from configs import pixelllm as pixelllm_config

from data_pipelines.ops import fields
from data_pipelines.ops.slot import SLOT_CONTEXT, slot
from data_pipelines.ops.task_prompt import task_prompt
from pixelllm import batch as batch_lib
from pixelllm import tasks
from pixelllm.models.pixel_llm import objective
from pixelllm.models.pixel_llm.pixel_llm import Outputs, SlotOutputs

WEIGHTS = pixelllm_config.get_config("tiny").loss.to_dict()


def _outputs(batch, slot_inputs=None, vocab=128):
    """Outputs that miss every target (so each active loss has a positive normalizer)."""
    b, s, length = batch["text_tokens"].shape
    height, width = batch["image"].shape[1:3]
    slots = SlotOutputs(
        logits=jnp.zeros((b, s, length, vocab)), hidden=jnp.zeros((b, s, length, 8)),
        token_points=jnp.asarray(batch["token_points"]) + 1.0,
        eos_boxes=jnp.asarray(batch["target_boxes"]) + jnp.asarray([1.0, 1.0, 2.0, 2.0]),
        masks=jnp.zeros((b, s, height, width)), mask_iou=jnp.zeros((b, s)),
        visual_tokens=jnp.zeros((b, s, 2, 8)))
    if slot_inputs is None:
        slot_inputs = {key: batch[key] for key in batch_lib.SLOT_KEYS}
    return Outputs(slots=slots, proposal_terms=None, slot_inputs=slot_inputs)


def _normalizers(batch, outputs):
    _, terms = objective.compute(outputs, batch, WEIGHTS)
    return {name: float(value.normalizer) for name, value in terms.items()}


def test_every_task_loss_has_weights_in_the_config():
    assert set(objective.WEIGHTS) == set(tasks.LOSSES)
    objective.check_weights(WEIGHTS)


@pytest.mark.parametrize("change, message", [
    ({"mask_dise": 1.0}, "unknown \\['mask_dise'\\], missing \\[\\]"),
    ({"point": None}, "unknown \\[\\], missing \\['point'\\]"),
])
def test_unknown_or_missing_weight_names_are_errors(make_batch, change, message):
    weights = {name: value for name, value in {**WEIGHTS, **change}.items() if value is not None}
    batch = make_batch(0)
    with pytest.raises(ValueError, match=f"config.loss.*{message}"):
        objective.compute(_outputs(batch), batch, weights)


def test_per_slot_weights_come_from_the_slot_inputs_the_model_used(make_batch):
    batch = make_batch(0, tasks=("caption",))  # text only in the batch
    assert _normalizers(batch, _outputs(batch))["point"] == 0.0
    # Slot inputs that train points and boxes (as a model's rebuilt slots could) are what count.
    used = {key: batch[key] for key in batch_lib.SLOT_KEYS}
    used.update(task_points=np.ones_like(batch["task_points"]),
                task_box=np.ones_like(batch["task_box"]))
    normalizers = _normalizers(batch, _outputs(batch, used))
    points_per_token = batch["token_points"].shape[3]  # each of K points has x and y
    assert normalizers["point"] == batch["token_points_mask"].sum() * points_per_token * 2
    assert normalizers["box_l1"] > 0 and normalizers["mask_dice"] == 0.0


def test_a_new_task_row_drives_the_slot_op_and_the_loss_gates(make_batch, monkeypatch):
    """Reasoning segmentation as one new row: its own template, the expressions filler,
    text + box + mask losses, the refer_segment inference entry."""
    row = tasks.Task(name="reasonseg", prompts=("{expression} Segment it. ",),
                     eval_prompt="{expression} Segment it. ", slot_filler="expressions",
                     losses=frozenset({"text", "box", "mask"}), inference="refer_segment")
    monkeypatch.setitem(tasks.TASKS, row.name, row)

    example = {fields.IMAGE: np.zeros((8, 8, 3), np.uint8), fields.IMAGE_ID: "1",
               fields.VALID_WH: np.asarray([8, 6], np.float32),
               fields.OBJECT_BOXES: np.asarray([[0, 0, 2, 2]], np.float32),
               fields.OBJECT_MASKS: np.ones((1, 8, 8), bool), fields.OBJECT_IDS: np.asarray([1]),
               fields.OBJECT_TEXTS: [["what holds the water?"]]}
    rng = np.random.default_rng(0)
    out = slot(task="reasonseg", slots=2, objects=1)(task_prompt(task="reasonseg")(example, rng),
                                                      rng)
    assert out[SLOT_CONTEXT] == ["what holds the water? Segment it. ", ""]
    assert [list(out[key]) for key in ("task_text", "task_points", "task_box", "task_mask")] == [
        [1, 0], [0, 0], [1, 0], [1, 0]]
    assert out["target_masks"][0].all() and out["task_proposals"] == 0

    batch = make_batch(0, tasks=("reasonseg",))
    normalizers = _normalizers(batch, _outputs(batch))
    assert normalizers["point"] == 0.0
    assert min(normalizers["text"], normalizers["box_l1"], normalizers["mask_dice"]) > 0

    monkeypatch.delitem(tasks.TASKS, row.name)
    with pytest.raises(ValueError, match="unknown task 'reasonseg'"):
        slot(task="reasonseg", slots=2, objects=1)
