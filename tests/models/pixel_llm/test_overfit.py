"""The whole model learns one small mixed batch (captioning with traces and referring
segmentation): text, per-word points and EOS boxes. Mask quality rests on SAM's pretrained
weights (frozen), so random tiny SAM masks are not expected to fit here.

Like every test, it compiles without LLVM optimization of the CPU code (tests/conftest.py):
compiling the step and the inference takes far longer than running 100 steps."""

import numpy as np
import optax
from configs import pixelllm as pixelllm_config
from flax import nnx

from pixelllm.models.pixel_llm import inference, objective
from pixelllm.nn import box_ops


def test_overfits_one_mixed_batch(make_batch, build_model):
    config = pixelllm_config.get_config("tiny")
    # No dense captioning in this batch: the light detector keeps the 100 steps cheap.
    config.model.proposal_head.kind = "light"
    # The refseg slots' text is asserted below, so they train it (the extension switch).
    weights = dict(config.loss.to_dict(), label_smoothing=0.0, text_on_referring=True)
    model = build_model(config, seed=5)
    model.train()
    batch = make_batch(5, tasks=("trace", "refseg"))
    # 100 steps end well under a tenth of each threshold below (measured: text 0.002, point 0.02,
    # box_l1 0.01, IoU > 0.99, greedy points within 0.1 px).
    steps = 100
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 20, steps, 1e-4)
    optimizer = nnx.Optimizer(model, optax.adam(schedule), wrt=model.trainable())

    @nnx.jit
    def step(model, optimizer, batch):
        def loss_fn(model):
            out = model(batch)
            total, terms = objective.compute(out, batch, weights)
            return total, (terms, out.slots)
        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, model.trainable()),
                                     has_aux=True)
        (_, (terms, slots)), grads = grad_fn(model)
        optimizer.update(model, grads)
        return {name: value.mean() for name, value in terms.items()}, slots

    first, _ = step(model, optimizer, batch)
    for _ in range(steps - 1):
        last, slots = step(model, optimizer, batch)
    last = {name: float(value) for name, value in last.items()}
    assert last["text"] < 0.05 < float(first["text"])
    assert last["point"] < 0.5 < float(first["point"])  # mean absolute error, canvas pixels
    assert last["box_l1"] < 0.5 < float(first["box_l1"])
    text = np.asarray(batch["text_tokens"])[..., 1:]
    predicted = np.asarray(slots.logits[..., :-1, :].argmax(-1))
    mask = np.asarray(batch["text_mask"])[..., 1:]
    np.testing.assert_array_equal(predicted[mask], text[mask])
    box_rows = np.asarray(batch["task_box"]) > 0
    iou = np.asarray(box_ops.iou(slots.eos_boxes, batch["target_boxes"]))[box_rows]
    assert iou.min() > 0.9, iou

    # Inference on the trained batch: greedy captioning of the trace image reproduces its text
    # with every word's points near their targets, and referring localization finds the box.
    model.eval()
    trace = 0  # image 0 has the trace task
    settings = inference.DecodeSettings(bos_id=0, eos_id=1, pad_id=0,
                                    max_new_tokens=batch["text_tokens"].shape[-1])

    @nnx.jit
    def infer(model, batch):
        captions = inference.caption_with_traces(
            model, batch["image"], batch["valid_wh"], context_tokens=batch["context_tokens"],
            context_mask=batch["context_mask"], settings=settings)
        referring = inference.refer_segment(model, batch["image"], batch["valid_wh"],
                                            context_tokens=batch["context_tokens"],
                                            context_mask=batch["context_mask"],
                                            text_tokens=batch["text_tokens"],
                                            text_mask=batch["text_mask"])
        return captions, referring

    captions, referring = infer(model, batch)
    generated = np.asarray(captions.tokens[trace])
    np.testing.assert_array_equal(generated[:, :text.shape[-1]], text[trace])
    words = np.asarray(batch["token_points_mask"])[trace, :, 1:]
    error = np.abs(np.asarray(captions.token_points[trace])[:, :words.shape[-1]][words]
                   - np.asarray(batch["token_points"])[trace, :, 1:][words])
    assert error.max() < 2.0, error.max()  # canvas pixels
    iou = np.asarray(box_ops.iou(referring.boxes, batch["target_boxes"]))[box_rows]
    assert iou.min() > 0.9, iou
