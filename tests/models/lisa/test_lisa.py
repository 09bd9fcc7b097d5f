"""LISA's pieces: the [SEG] offset rule, mask post-processing against torch's F.interpolate, the
mask losses without masks, and what trains (the trained set and where gradients reach) on a
tiny LISA with the real CLIP tower."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from configs import sam as sam_config
from pixelllm.encoders.clip import ClipVision
from pixelllm.encoders.sam import sam as sam_lib
from pixelllm.language import decoder
from pixelllm.models.lisa import lisa as lisa_lib
from pixelllm.models.lisa import objective
from pixelllm.nn import losses
from pixelllm.nn.lora import LoRASettings


SEG = 9


def test_seg_slots_take_the_position_before_each_seg():
    # Image 0: conversation 0 has [SEG] at 2, conversation 1 has two, at 1 and 4 (and a [SEG]
    # id in its padding, which does not count); image 1 has none.
    tokens = np.array([[[5, 6, SEG, 7, 0, 0], [5, SEG, 6, 7, SEG, SEG]],
                       [[5, 6, 7, 0, 0, 0], [0, 0, 0, 0, 0, 0]]])
    mask = np.array([[[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]],
                     [[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]]], bool)
    index, valid = lisa_lib.seg_slots(jnp.asarray(tokens), jnp.asarray(mask), seg_token_id=SEG,
                                      max_masks=4)
    length = tokens.shape[-1]
    np.testing.assert_array_equal(valid, [[True, True, True, False], [False] * 4])
    np.testing.assert_array_equal(index[0, :3], [1, length + 0, length + 3])


@pytest.mark.parametrize("low, resized, original", [
    (40, (40, 33), (30, 25)), (40, (22, 40), (20, 36)), (16, (64, 47), (97, 71))])
def test_postprocess_masks_matches_torch(low, resized, original):
    size = 40 if low == 40 else 64
    rng = np.random.default_rng(0)
    low_res = rng.normal(size=(1, 2, low, low)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(low_res), (size, size), mode="bilinear",
                             align_corners=False)[..., :resized[0], :resized[1]]
    expected = F.interpolate(expected, original, mode="bilinear", align_corners=False).numpy()
    out_hw = (original[0] + 3, original[1] + 5)
    ours = sam_lib.postprocess_masks(jnp.asarray(low_res), input_size=size,
                                      resized_hw=jnp.asarray([resized]),
                                      original_hw=jnp.asarray([original]), out_hw=out_hw)
    assert ours.shape == (1, 2, *out_hw)
    np.testing.assert_allclose(ours[..., :original[0], :original[1]], expected, atol=1e-5)
    assert np.all(np.asarray(ours)[..., original[0]:, :] == 0)
    assert np.all(np.asarray(ours)[..., original[1]:] == 0)


def test_mask_losses_without_masks_are_zero():
    masks = jnp.ones((2, 3, 8, 8)) * 5.0
    valid_pixels = losses.pixel_valid_mask(jnp.asarray([[8, 8], [4, 6]]), (8, 8))
    none = jnp.zeros((2, 3), bool)
    assert float(objective.mask_bce(masks, masks, valid_pixels, none).mean()) == 0.0
    assert float(objective.mask_dice(masks, masks, valid_pixels, none).mean()) == 0.0


def tiny_lisa(lora_dropout: float = 0.0):
    lm = decoder.DecoderLM(decoder.DecoderConfig(
        vocab_size=SEG, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
        num_kv_heads=2, head_dim=16, lora=LoRASettings(rank=4, alpha=8.0, dropout=lora_dropout)),
        rngs=nnx.Rngs(0))
    assert lm.add_token_rows(1) == SEG
    sam = sam_lib.Sam(**sam_config.get_config("tiny").model.to_dict(), rngs=nnx.Rngs(1))
    # The real CLIP tower (LLaVA's second-to-last layer, CLS dropped), at a tiny size.
    tower = ClipVision(width=16, depth=2, heads=2, mlp_dim=32, patch_size=4, image_size=8,
                       rngs=nnx.Rngs(2))
    return lisa_lib.Lisa(vision_tower=tower, vision_width=16,
                         language_model=lm, sam=sam, seg_token_id=SEG, rngs=nnx.Rngs(3))


def tiny_inputs(rng: np.random.Generator) -> lisa_lib.LisaInputs:
    """One image, one conversation with one [SEG], for :func:`tiny_lisa`."""
    return lisa_lib.LisaInputs(
        clip_pixels=jnp.asarray(rng.normal(size=(1, 8, 8, 3)), jnp.float32),
        sam_pixels=jnp.asarray(rng.normal(size=(1, 40, 40, 3)), jnp.float32),
        prompt_before=jnp.asarray([[[1, 2]]]), prompt_before_mask=jnp.ones((1, 1, 2), bool),
        prompt_after=jnp.asarray([[[3, 4]]]), prompt_after_mask=jnp.ones((1, 1, 2), bool),
        tokens=jnp.asarray([[[5, 6, SEG, 7]]]), token_mask=jnp.ones((1, 1, 4), bool),
        resized_hw=jnp.asarray([[40, 30]]), original_hw=jnp.asarray([[20, 15]]))


def paths(state):
    return {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(state)}


def test_only_lisas_trained_parts_are_trainable_and_frozen_encoders_get_no_gradient():
    # LISA's LoRA dropout, exaggerated, and nonzero B factors so that the dropout shows.
    model = tiny_lisa(lora_dropout=0.5)
    for layer in model.language_model.layers:
        b = layer.attn.v.lora_b.get_value()
        layer.attn.v.lora_b.set_value(jnp.full(b.shape, 0.5))
    trained = paths(nnx.state(model, model.trainable()))
    assert {"language_model/embedding", "language_model/lm_head",
            "language_model/added_tokens/embedding", "language_model/added_tokens/head",
            "language_model/layers/0/attn/q/lora_a", "language_model/layers/1/attn/v/lora_b",
            "text_hidden_fcs/fc1/kernel", "text_hidden_fcs/fc2/bias",
            "sam/mask_decoder/iou_token"} <= trained
    for frozen in ("vision_tower/", "mm_projector/", "sam/image_encoder/", "sam/prompt_encoder/",
                   "language_model/layers/0/attn/q/kernel", "language_model/final_norm"):
        assert not any(p.startswith(frozen) for p in trained), frozen

    rng = np.random.default_rng(0)
    inputs = tiny_inputs(rng)
    targets = jnp.asarray(rng.integers(0, 2, (1, 1, 20, 15)), jnp.float32)

    def loss(model, rngs):
        out = model(inputs, max_masks=1, mask_hw=(20, 15), rngs=rngs)
        terms = objective.lisa_losses(
            logits=out.logits, tokens=inputs.tokens, label_mask=jnp.asarray([[[0, 1, 1, 1]]], bool),
            masks=out.masks, mask_valid=out.mask_valid, target_masks=targets,
            original_hw=inputs.original_hw)
        return objective.total_loss(terms)

    # A training step (rngs: LoRA dropout on, as LISA's model.train()): gradients w.r.t. the
    # trained set and every other nnx.Param, in one pass.
    step = nnx.jit(nnx.value_and_grad(
        loss, argnums=nnx.DiffState(0, nnx.Any(model.trainable(), nnx.Param))))
    rngs = nnx.Rngs(dropout=0)
    first_loss, grads = step(model, rngs)
    # The rngs reach the language model's adapters: fresh dropout masks, another loss.
    second_loss, _ = step(model, rngs)
    assert abs(float(first_loss) - float(second_loss)) > 1e-5
    norms = {p: float(jnp.abs(v.get_value()).max()) for p, v in
             (("/".join(map(str, k)), v) for k, v in nnx.to_flat_state(grads))}
    # stop_gradient: nothing reaches SAM's image encoder or the vision tower.
    for frozen in ("sam/image_encoder/", "vision_tower/"):
        reached = [p for p, n in norms.items() if p.startswith(frozen)]
        assert reached and all(norms[p] == 0.0 for p in reached), frozen
    # (SAM's IoU head is not in LISA's loss: it gets no gradient either way.)
    for live in ("text_hidden_fcs/fc1/kernel", "sam/mask_decoder/mask_tokens",
                 "language_model/lm_head", "language_model/embedding",
                 "language_model/added_tokens/embedding", "language_model/layers/1/attn/v/lora_b",
                 "mm_projector/kernel"):
        assert norms[live] > 0, live

