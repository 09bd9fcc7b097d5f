"""LISA's inference (:mod:`pixelllm.models.lisa.inference`) against a PyTorch transcription of
``model/LISA.py`` ``evaluate()`` on the reference modules of ``test_lisa_parity`` (tiny
transformers Llama, segment_anything SAM, same random weights): transformers' greedy
``generate`` gives the tokens, LISA's last no-cache step (a forward over the whole sequence but
its last token) the hidden states, its shifted ``seg_token_mask`` the [SEG] embeddings, then
SAM's decoder and ``postprocess_masks``. Also the chat prompt against LLaVA's tokenization."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from data_pipelines import lisa_inputs
from pixelllm.models.lisa import inference
from tests.models.lisa.test_conversation import (  # noqa: F401 (a pytest fixture)
    lisa_tokenizer_image_token, tokenizers)
from tests.models.lisa.test_lisa_parity import (  # noqa: F401 (a pytest fixture)
    BOS, CLIP_SIZE, EOS, IMAGE, PAD, SAM, SEG, TOKENS, WIDTH, models, patchify, prompt_ids,
    resized_hw)

# One question per image; both prompts end in the same token (" ASSISTANT:"'s last).
QUESTIONS = [[20, 21, 22], [28, 29]]
ORIGINAL_HW = np.array([[30, 25], [20, 36]])
MASK_HW = (30, 36)
MAX_NEW_TOKENS = 20
# The [SEG] row of the output layer is pushed along a fixed direction so that greedy decoding
# emits [SEG] (at 0 the random model emits none).
SEG_PUSH = 0.8


@pytest.fixture(scope="module")
def seg_row(models):
    """``push -> None``: sets the [SEG] row of both output layers to the reference's trained row
    plus ``push`` times a fixed direction (each test sets its own)."""
    model, (hf, *_) = models
    base = hf.lm_head.weight[SEG].detach().clone()
    direction = torch.randn(WIDTH, generator=torch.Generator().manual_seed(5))

    def set_row(push):
        row = base + push * direction
        with torch.no_grad():
            hf.lm_head.weight[SEG] = row
        model.language_model.added_tokens.head.set_value(jnp.asarray(row.numpy()[:, None]))

    return set_row


def pixels():
    rng = np.random.default_rng(1)
    clip = rng.normal(size=(2, CLIP_SIZE, CLIP_SIZE, 3)).astype(np.float32)
    sam = rng.normal(size=(2, 40, 40, 3)).astype(np.float32)
    return clip, sam


def reference_evaluate(reference_modules, clip_pixels, sam_pixels):
    """LISA's ``evaluate()`` per image (batch 1, as chat.py): ``[(generated ids, masks [n, H, W],
    pred_embeddings [n, C])]``."""
    hf, sam, tower_w, tower_b, projector, fcs = reference_modules
    results = []
    with torch.no_grad():
        features = projector(torch.from_numpy(patchify(clip_pixels)) @ tower_w.T + tower_b)
        image_embeddings = sam.image_encoder(torch.from_numpy(sam_pixels).permute(0, 3, 1, 2))
        embed = hf.model.embed_tokens
        for i, question in enumerate(QUESTIONS):
            prompt = prompt_ids(question)
            split = prompt.index(IMAGE)
            embeds = torch.cat([embed(torch.tensor(prompt[:split])), features[i],
                                embed(torch.tensor(prompt[split + 1:]))])[None]
            new = hf.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2]),
                              max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1,
                              eos_token_id=EOS, pad_token_id=PAD)[0]
            output_ids = torch.tensor(prompt + new.tolist())
            # LISA's last decoding step without a cache: all but the last token, last layer.
            sequence = torch.cat([embeds, embed(new[:-1])[None]], dim=1)
            hidden = hf(inputs_embeds=sequence, output_hidden_states=True).hidden_states[-1]
            seg_token_mask = output_ids[None, 1:] == SEG
            seg_token_mask = torch.cat([torch.zeros(1, TOKENS - 1, dtype=bool), seg_token_mask], 1)
            pred_embeddings = fcs(hidden)[seg_token_mask]
            if not len(pred_embeddings):
                # No [SEG]: no mask (segment_anything's decoder cannot reshape an empty batch).
                results.append((new.tolist(), np.zeros((0, *ORIGINAL_HW[i])),
                                np.zeros((0, SAM.prompt_encoder.embed_dim))))
                continue
            grid = sam.prompt_encoder.image_embedding_size
            dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                len(pred_embeddings), -1, *grid)
            low_res, _ = sam.mask_decoder(
                image_embeddings=image_embeddings[i:i + 1],
                image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=pred_embeddings[:, None],
                dense_prompt_embeddings=dense, multimask_output=False)
            size = SAM.image_encoder.img_size
            masks = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
            crop = resized_hw(ORIGINAL_HW[i], size)
            masks = F.interpolate(masks[..., :crop[0], :crop[1]], tuple(ORIGINAL_HW[i]),
                                  mode="bilinear", align_corners=False)[:, 0]
            results.append((new.tolist(), masks.numpy(), pred_embeddings.numpy()))
    return results


def our_generation(model, clip_pixels, sam_pixels, *, max_masks):
    prompts = []
    for question in QUESTIONS:
        ids = prompt_ids(question)
        split = ids.index(IMAGE)
        prompts.append(inference.ChatPrompt(prompt_before=ids[:split],
                                            prompt_after=ids[split + 1:-1], start_token=ids[-1]))
    arrays, start = inference.prompt_arrays(prompts, before_length=7, after_length=9, pad_id=PAD)
    size = SAM.image_encoder.img_size
    prompt = inference.LisaPrompt(
        clip_pixels=jnp.asarray(clip_pixels), sam_pixels=jnp.asarray(sam_pixels),
        resized_hw=jnp.asarray([resized_hw(hw, size) for hw in ORIGINAL_HW]),
        original_hw=jnp.asarray(ORIGINAL_HW), **{k: jnp.asarray(v) for k, v in arrays.items()})
    return runner(max_masks)(model, prompt, start)


@functools.cache
def runner(max_masks):
    """One compiled generation per ``max_masks`` (the weights are arguments)."""
    return nnx.jit(lambda m, p, start: inference.generate(
        m, p, start_token=start, eos_id=EOS, max_new_tokens=MAX_NEW_TOKENS, max_masks=max_masks,
        mask_hw=MASK_HW, pad_id=PAD), static_argnums=2)


def check_against_reference(out, expected, *, max_masks):
    for i, (ids, masks, embeddings) in enumerate(expected):
        assert int(out.lengths[i]) == len(ids)
        np.testing.assert_array_equal(out.tokens[i], ids + [PAD] * (MAX_NEW_TOKENS - len(ids)))
        kept = min(len(masks), max_masks)
        np.testing.assert_array_equal(out.mask_valid[i], np.arange(max_masks) < kept)
        np.testing.assert_allclose(out.seg_embeddings[i, :kept], embeddings[:kept], atol=1e-4)
        h, w = ORIGINAL_HW[i]
        np.testing.assert_allclose(out.masks[i, :kept, :h, :w], masks[:kept], atol=1e-4)
        assert np.all(np.asarray(out.masks[i, kept:]) == 0)
        assert np.all(np.asarray(out.masks[i, :, h:]) == 0)
        assert np.all(np.asarray(out.masks[i, :, :, w:]) == 0)


def test_generation_matches_lisa_evaluate(models, seg_row):
    seg_row(SEG_PUSH)
    clip_pixels, sam_pixels = pixels()
    expected = reference_evaluate(models[1], clip_pixels, sam_pixels)
    # The scenario exercises what it should: several [SEG] in both images, one right before
    # </s>, answers stopping at </s> before max_new_tokens, every [SEG] in a slot.
    assert all(ids.count(SEG) > 1 for ids, _, _ in expected)
    assert any(ids[-2:] == [SEG, EOS] for ids, _, _ in expected)
    assert all(ids[-1] == EOS and len(ids) < MAX_NEW_TOKENS for ids, _, _ in expected)
    assert max(len(m) for _, m, _ in expected) <= 12
    assert np.abs(expected[0][1]).max() > 0.1
    out = our_generation(models[0], clip_pixels, sam_pixels, max_masks=12)
    check_against_reference(out, expected, max_masks=12)


def test_max_masks_keeps_the_first_generated_segs(models, seg_row):
    seg_row(SEG_PUSH)
    clip_pixels, sam_pixels = pixels()
    expected = reference_evaluate(models[1], clip_pixels, sam_pixels)
    assert min(len(m) for _, m, _ in expected) > 2
    out = our_generation(models[0], clip_pixels, sam_pixels, max_masks=2)
    check_against_reference(out, expected, max_masks=2)


def test_no_generated_seg_gives_no_masks(models, seg_row):
    seg_row(0.0)
    clip_pixels, sam_pixels = pixels()
    expected = reference_evaluate(models[1], clip_pixels, sam_pixels)
    assert all(SEG not in ids for ids, _, _ in expected)
    out = our_generation(models[0], clip_pixels, sam_pixels, max_masks=12)
    check_against_reference(out, expected, max_masks=12)
    assert not np.asarray(out.mask_valid).any()


def test_chat_prompt_is_chat_py_tokenized_by_llava(tokenizers):
    hf, ours = tokenizers
    question = "What is the thing that keeps people dry in the rain?"
    # chat.py: "<image>\n" + prompt, <im_start><image><im_end>, llava_v1 with an empty answer.
    text = ("A chat between a curious human and an artificial intelligence assistant. The "
            "assistant gives helpful, detailed, and polite answers to the human's questions. "
            "USER: <im_start><image><im_end>\n" + question + " ASSISTANT:")
    ids = lisa_tokenizer_image_token(text, hf)
    prompt = inference.chat_prompt(question, ours)
    assert prompt.prompt_before + [IMAGE] + prompt.prompt_after + [prompt.start_token] == ids
    assert hf.decode([prompt.start_token]).endswith(":")
    with pytest.raises(ValueError, match="must not hold <image>"):
        inference.chat_prompt("<image>\n" + question, ours)


def test_prompt_arrays_pad_and_check():
    prompts = [inference.ChatPrompt([BOS, 5], [7, 8, 9], 10), inference.ChatPrompt([BOS], [7], 10)]
    arrays, start = inference.prompt_arrays(prompts, before_length=3, after_length=4, pad_id=PAD)
    assert start == 10
    np.testing.assert_array_equal(arrays["prompt_before"], [[BOS, 5, PAD], [BOS, PAD, PAD]])
    np.testing.assert_array_equal(arrays["prompt_after_mask"], [[1, 1, 1, 0], [1, 0, 0, 0]])
    with pytest.raises(ValueError, match="prompt_after: a prompt has 3 ids, over the 2 slots"):
        inference.prompt_arrays(prompts, before_length=3, after_length=2, pad_id=PAD)
    with pytest.raises(ValueError, match="end in different tokens"):
        inference.prompt_arrays([prompts[0], prompts[1]._replace(start_token=11)],
                                before_length=3, after_length=4, pad_id=PAD)


def test_chat_inputs_preprocess_as_chat_py(tokenizers):
    _, ours = tokenizers
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (37, 50, 3), np.uint8), rng.integers(0, 256, (48, 30, 3),
                                                                        np.uint8)]
    questions = ["Can you segment the red apple?", "What keeps people dry in the rain?"]
    prompt, start = inference.chat_inputs(images, questions, tokenizer=ours, clip_image_size=8,
                                          sam_image_size=40, before_length=128, after_length=64)
    for i, (image, question) in enumerate(zip(images, questions)):
        expected = inference.chat_prompt(question, ours)
        assert start == expected.start_token
        after = np.asarray(prompt.prompt_after[i])[np.asarray(prompt.prompt_after_mask[i])]
        assert after.tolist() == expected.prompt_after
        sam, hw = lisa_inputs.sam_pixels(image, size=40)
        np.testing.assert_array_equal(prompt.sam_pixels[i], sam)
        np.testing.assert_array_equal(prompt.clip_pixels[i],
                                      lisa_inputs.clip_pixels(image, size=8))
        assert prompt.resized_hw[i].tolist() == list(hw)
        assert prompt.original_hw[i].tolist() == list(image.shape[:2])
    with pytest.raises(ValueError, match="2 images but 1 questions"):
        inference.chat_inputs(images, questions[:1], tokenizer=ours, clip_image_size=8,
                              sam_image_size=40, before_length=128, after_length=64)
