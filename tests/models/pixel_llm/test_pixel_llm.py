import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from configs import pixelllm as pixelllm_config
from flax import nnx

from pixelllm import batch as batch_lib
from pixelllm.language.t5 import T5
from pixelllm.models.pixel_llm import generation
from pixelllm.models.pixel_llm import objective
from pixelllm.models.pixel_llm.pixel_llm import eos_positions, fuse, padding_mask
from pixelllm.nn import box_ops
from pixelllm.nn.lora import FrozenParam


def test_padding_mask():
    mask = padding_mask(jnp.array([[3.0, 2.0]]), (4, 5))
    expected = np.zeros((1, 4, 5), bool)
    expected[0, :2, :3] = True
    np.testing.assert_array_equal(mask, expected)


def test_fuse_resizes_to_the_largest_grid_and_concatenates_in_order():
    a = jnp.ones((1, 4, 4, 2))
    b = jnp.arange(9.0).reshape(1, 3, 3, 1)
    fused = fuse([a, b])
    assert fused.shape == (1, 4, 4, 3)
    np.testing.assert_allclose(fused[..., :2], 1.0)
    # A bicubic upsample keeps the centre value of a linear ramp's middle.
    assert fused[0, :, :, 2].min() < 1.0 < 7.0 < fused[0, :, :, 2].max()


def test_eos_position_is_the_last_word():
    mask = jnp.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], bool)  # BOS w w EOS / BOS EOS
    np.testing.assert_array_equal(eos_positions(mask), [2, 0])


def test_validate_names_the_offending_key(make_batch):
    batch = make_batch(0)
    sizes = batch_lib.validate(batch)
    assert sizes == {"B": 2, "S": 2, "H": 32, "W": 32, "Lc": 4, "L": 6, "K": 2, "G": 3}
    with pytest.raises(batch_lib.BatchError, match="missing keys \\['gt_mask'\\]"):
        batch_lib.validate({k: v for k, v in batch.items() if k != "gt_mask"})
    with pytest.raises(batch_lib.BatchError, match="batch\\['text_mask'\\] has L=5"):
        batch_lib.validate({**batch, "text_mask": batch["text_mask"][..., :5]})
    with pytest.raises(batch_lib.BatchError, match="batch\\['slot_mask'\\] must be bool"):
        batch_lib.validate({**batch, "slot_mask": batch["slot_mask"].astype(np.float32)})


@pytest.mark.parametrize("variant", ["tiny", "tiny_decoder"])
def test_forward_shapes_and_ranges(variant, make_batch, build_model):
    config = pixelllm_config.get_config(variant)
    model = build_model(config)
    batch = make_batch(1, tasks=("trace", "densecap"))
    out = nnx.jit(lambda m, b: m(b))(model, batch)
    s = out.slots
    b, slots, length = batch["text_tokens"].shape
    vocab = config.model.language_model.model.vocab_size
    assert s.logits.shape == (b, slots, length, vocab)
    assert s.token_points.shape == (b, slots, length, 2, 2)
    assert s.masks.shape == (b, slots, 32, 32) and s.mask_iou.shape == (b, slots)
    assert s.visual_tokens.shape[:3] == (b, slots, config.model.prompt_adapter.num_queries)
    # Points and boxes stay inside each image's valid area (bounded head).
    wh = batch["valid_wh"][:, None, None, None, :]
    assert bool(jnp.all((s.token_points >= 0) & (s.token_points <= wh)))
    boxes = s.eos_boxes
    assert bool(jnp.all(boxes[..., :2] <= boxes[..., 2:]))
    assert bool(jnp.all(boxes[..., 2:] <= batch["valid_wh"][:, None]))
    # Image 1 is dense captioning: its first slot is a sampled RoI matching its ground truth at
    # IoU >= 0.6 (the ground truth is always among CenterNet2's candidates), with the caption;
    # the trace image kept its slots.
    np.testing.assert_array_equal(out.slot_inputs["prompt_boxes"][0], batch["prompt_boxes"][0])
    overlap = np.where(batch["gt_mask"][1], np.asarray(box_ops.pairwise_iou(
        out.slot_inputs["prompt_boxes"][1, :1], batch["gt_boxes"][1]))[0], -1.0)
    assert overlap.max() >= 0.6
    assert bool(out.slot_inputs["task_text"][1, 0]) and bool(out.slot_inputs["slot_mask"][1, 0])
    np.testing.assert_array_equal(out.slot_inputs["text_tokens"][1, 0],
                                  batch["gt_text_tokens"][1, overlap.argmax()])
    assert set(out.proposal_terms) == {"heatmap_pos", "heatmap_neg", "giou", "roi_class",
                                       "roi_box"}
    total, terms = objective.compute(out, batch, config.loss)
    assert np.isfinite(float(total))
    assert {"text", "point", "box_l1", "box_giou", "mask_focal", "mask_dice", "mask_iou_mse",
            "proposal_giou", "proposal_roi_class", "proposal_roi_box"} <= set(terms)
    # Only the dense-captioning image trains the detector: its RoI samples are the normalizer.
    roi_samples = config.model.proposal_head.centernet2.roi_samples
    assert 0 < float(terms["proposal_roi_class"].normalizer) <= roi_samples
    # No slot has the box task here: its normalizer is zero and it adds nothing.
    assert float(terms["box_l1"].normalizer) == 0.0


def test_mask_adapter_starts_as_sams_own_box_prompted_mask(tiny_t5_config, make_batch,
                                                           build_model):
    model = build_model(tiny_t5_config)
    batch = make_batch(2)
    features = model.encode_image(batch["image"], batch["valid_wh"])
    boxes = jnp.asarray(batch["target_boxes"])
    b, s = boxes.shape[:2]
    visual = model.visual_tokens(features, boxes)
    hidden = jnp.ones((b, s, 6, model.lm.width))
    masks, iou = model.segment(features, boxes, visual, hidden, jnp.ones((b, s, 6), bool))
    sparse, dense = model.sam.prompt_encoder(boxes=boxes.reshape(-1, 4))
    reference, reference_iou = model.sam.mask_decoder(
        jnp.repeat(features.sam, s, axis=0), model.sam.prompt_encoder.dense_pe(), sparse, dense,
        multimask_output=False)
    np.testing.assert_allclose(masks.reshape(-1, 32, 32), reference[:, 0], atol=1e-5)
    np.testing.assert_allclose(iou.reshape(-1), reference_iou[:, 0], atol=1e-5)


def _trainable_step(model, batch, loss_weights, learning_rate=1e-2):
    optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=model.trainable())

    @nnx.jit
    def step(model, optimizer, batch):
        def loss_fn(model):
            total, _ = objective.compute(model(batch), batch, loss_weights)
            return total
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, model.trainable()))(
            model)
        optimizer.update(model, grads)
        return loss

    return optimizer, step


def test_a_gradient_step_changes_only_trainable_parameters(tiny_t5_config, make_batch,
                                                           build_model):
    model = build_model(tiny_t5_config)
    batch = make_batch(3, tasks=("trace", "refseg"))
    before = {path: np.array(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model))}
    optimizer, step = _trainable_step(model, batch, tiny_t5_config.loss)
    step(model, optimizer, batch)
    trainable = {path for path, _ in nnx.to_flat_state(nnx.state(model, model.trainable()))}
    changed = set()
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        if not np.array_equal(before[path], np.asarray(variable.get_value())):
            changed.add(path)
    assert changed <= trainable
    frozen = [p for p, v in nnx.to_flat_state(nnx.state(model)) if isinstance(v, FrozenParam)]
    assert frozen and not changed & set(frozen)
    assert not any(p[0] == "sam" for p in changed)
    for module in ("eva02", "prompt_adapter", "point_head", "mask_adapter"):
        assert any(p[0] == module for p in changed), module
    assert any("lora" in "/".join(map(str, p)) for p in changed)
    # Adam holds state for the trainable parameters only.
    opt_sizes = sum(np.size(x) for x in jax.tree.leaves(nnx.state(optimizer, nnx.OptState)))
    trainable_size = sum(np.size(v.get_value()) for _, v in
                         nnx.to_flat_state(nnx.state(model, model.trainable())))
    assert opt_sizes == 2 * trainable_size + 2  # mu, nu, Adam's count and the step


@pytest.mark.parametrize("variant", ["tiny", "tiny_decoder"])
def test_generation_matches_teacher_forcing_on_its_own_output(variant, make_batch, build_model):
    config = pixelllm_config.get_config(variant)
    model = build_model(config, seed=4)
    batch = make_batch(4)
    eos = config.model.language_model.model.get("eos_token_id", 1)

    @nnx.jit
    def run(model, batch):
        features = model.encode_image(batch["image"], batch["valid_wh"])
        gen = generation.generate(model, features, batch["valid_wh"],
                                  prompt_boxes=batch["prompt_boxes"],
                                  context_tokens=batch["context_tokens"],
                                  context_mask=batch["context_mask"], bos_id=0, eos_id=eos,
                                  pad_id=0, max_new_tokens=5, suppress_repeat=False)
        b, s, t = gen.tokens.shape
        tokens = jnp.concatenate([jnp.zeros((b, s, 1), jnp.int32), gen.tokens], axis=-1)
        mask = jnp.arange(t + 1) <= gen.lengths[..., None]
        slots = model.run_slots(features, batch["valid_wh"], prompt_boxes=batch["prompt_boxes"],
                                context_tokens=batch["context_tokens"],
                                context_mask=batch["context_mask"], text_tokens=tokens,
                                text_mask=mask, with_masks=False)
        return gen, slots, mask

    gen, slots, mask = run(model, batch)
    # Teacher forcing on the generated text predicts the same tokens...
    predicted = jnp.argmax(slots.logits[..., :-1, :], axis=-1)
    valid = mask[..., 1:]
    np.testing.assert_array_equal(np.where(valid, predicted, -1),
                                  np.where(valid, gen.tokens, -1))
    # ...and the points of each generated word (the state of token t sits at t + 1 after BOS).
    word = np.asarray(gen.token_points_valid)
    assert word.any()
    np.testing.assert_allclose(np.asarray(slots.token_points[..., 1:, :, :])[word],
                               np.asarray(gen.token_points)[word], atol=1e-3)
    finished = np.asarray(gen.lengths) < 5
    if finished.any():
        np.testing.assert_allclose(np.asarray(slots.eos_boxes)[finished],
                                   np.asarray(gen.eos_boxes)[finished], atol=1e-3)
    assert isinstance(model.lm, T5) == (variant == "tiny")
