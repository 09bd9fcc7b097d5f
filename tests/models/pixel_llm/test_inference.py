"""Every task's inference entry on the tiny model: documented shapes and ranges; every row of
the task table names one."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixelllm import tasks
from pixelllm.models.pixel_llm import inference

SETTINGS = inference.DecodeSettings(bos_id=0, eos_id=1, pad_id=0, max_new_tokens=4)


def test_every_task_returns_documented_shapes_and_ranges(tiny_t5_config, make_batch,
                                                         build_model):
    model = build_model(tiny_t5_config, seed=7)
    batch = make_batch(7)
    b, s = batch["text_tokens"].shape[:2]

    @nnx.jit
    def run(model, batch):
        image, wh = batch["image"], batch["valid_wh"]
        context = dict(context_tokens=batch["context_tokens"], context_mask=batch["context_mask"])
        shifted = batch["target_boxes"] * jnp.array([0.5, 0.5, 0.6, 0.6])
        return {
            "trace": inference.caption_with_traces(model, image, wh, settings=SETTINGS, **context),
            "loca": inference.location_caption(model, image, wh, boxes=batch["target_boxes"],
                                           settings=SETTINGS, **context),
            "loca_shifted": inference.location_caption(model, image, wh, boxes=shifted,
                                                   settings=SETTINGS, **context),
            "loca_points": inference.location_caption(
                model, image, wh, points=batch["target_boxes"].reshape(b, s, 2, 2),
                settings=SETTINGS, **context),
            "refer": inference.refer_segment(model, image, wh, text_tokens=batch["text_tokens"],
                                             text_mask=batch["text_mask"], **context),
            "refer_boxes": inference.refer(model, image, wh, text_tokens=batch["text_tokens"],
                                           text_mask=batch["text_mask"], **context),
            "dense": inference.dense_caption(model, image, wh,
                                         context_tokens=batch["context_tokens"][:, 0],
                                         context_mask=batch["context_mask"][:, 0],
                                         settings=SETTINGS),
        }

    out = run(model, batch)
    wh = np.asarray(batch["valid_wh"])

    trace = out["trace"]
    assert trace.tokens.shape == (b, s, 4) and trace.token_points.shape == (b, s, 4, 2, 2)
    points = np.asarray(trace.token_points)
    assert (points >= 0).all() and (points <= wh[:, None, None, None, None, :]).all()
    lengths = np.asarray(trace.lengths)
    assert ((1 <= lengths) & (lengths <= 4)).all()
    valid = np.asarray(trace.token_points_valid)
    ended = np.take_along_axis(np.asarray(trace.tokens), lengths[..., None] - 1, -1)[..., 0] == 1
    np.testing.assert_array_equal(valid.sum(-1), lengths - ended)

    # The location prompt conditions the caption; points are another prompt than a box.
    assert not np.allclose(out["loca"].log_prob, out["loca_shifted"].log_prob)
    assert out["loca_points"].tokens.shape == (b, s, 4)
    assert not np.allclose(out["loca"].log_prob, out["loca_points"].log_prob)

    refer = out["refer"]
    assert refer.boxes.shape == (b, s, 4) and refer.mask_logits.shape == (b, s, 32, 32)
    boxes = np.asarray(refer.boxes)
    assert (boxes[..., :2] <= boxes[..., 2:]).all() and (boxes[..., 2:] <= wh[:, None]).all()
    # Localization alone reads the same EOS box and makes no mask.
    np.testing.assert_allclose(out["refer_boxes"].boxes, boxes, atol=1e-5)
    assert out["refer_boxes"].mask_logits is None and out["refer_boxes"].mask_scores is None

    # Dense captioning: CenterNet2's detections (tiny: 8 per image), ranked by the detector's
    # score (official: no caption rescoring), clipped to the canvas.
    dense = out["dense"]
    count = model.proposal_head.num_detections
    assert dense.boxes.shape == (b, count, 4) and dense.captions.tokens.shape == (b, count, 4)
    np.testing.assert_array_equal(dense.scores, dense.detector_scores)
    for image in range(b):
        kept = np.asarray(dense.valid[image])
        assert (np.diff(np.asarray(dense.scores[image])[kept]) <= 0).all()
    assert (np.asarray(dense.boxes) >= 0).all() and (np.asarray(dense.boxes) <= 32).all()


def test_caption_rescoring_is_the_official_geometric_mean():
    detector = jnp.array([[0.81, 0.25, -0.5]])
    log_prob = jnp.log(jnp.array([[0.25, 1.0, 0.5]]))
    np.testing.assert_allclose(inference.rescore_by_caption(detector, log_prob),
                               [[0.45, 0.5, 0.0]], rtol=1e-6)


def test_every_task_row_names_an_inference_entry():
    for name, row in tasks.TASKS.items():
        assert inference.for_task(name) is getattr(inference, row.inference), name
    assert inference.for_task("refseg") is inference.refer_segment


def test_a_row_naming_a_missing_entry_is_refused(monkeypatch):
    row = dataclasses.replace(tasks.get("refer"), name="reasonseg", inference="jnp")
    monkeypatch.setitem(tasks.TASKS, row.name, row)
    with pytest.raises(ValueError, match="task 'reasonseg' names inference entry 'jnp'"):
        inference.for_task("reasonseg")
