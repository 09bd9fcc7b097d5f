"""LISA end to end against a PyTorch reference assembled from transformers' LlamaForCausalLM,
segment_anything's modules and LISA's glue (``model/LISA.py``, ``llava_arch.py``), written here:
text logits at the answer positions, the [SEG] embeddings, the masks at the original resolution
and the loss terms. Both sides get the same random tiny weights, loaded into ours through the
project's loaders; the vision tower is a linear patch embedding on both sides."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from flax import nnx

from configs import sam as sam_config
from pixelllm.encoders.sam import sam as sam_lib
from pixelllm.language import decoder
from pixelllm.models.lisa import lisa as lisa_lib
from pixelllm.models.lisa import objective
from pixelllm.nn.lora import LoRASettings
from tests import segment_anything_reference

SAM = sam_config.get_config("tiny").model
BASE_VOCAB, SEG = 63, 63            # [SEG] is the one token row added to a 63-token vocabulary
PAD, BOS, EOS, IM_START, IM_END = 0, 1, 2, 60, 61
IMAGE = -200                        # LLaVA's IMAGE_TOKEN_INDEX placeholder
PATCH, CLIP_SIZE, VISION_WIDTH = 4, 16, 24
TOKENS = (CLIP_SIZE // PATCH) ** 2
WIDTH = 32


class PatchTower(nnx.Module):
    """A stand-in vision tower: a linear embedding of 4x4 patches, ``[N, H, W, 3] -> [N, T, C]``."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.proj = nnx.Linear(PATCH * PATCH * 3, VISION_WIDTH, rngs=rngs)

    def patch_features(self, pixels):
        return self.proj(patchify(pixels))


def patchify(pixels):
    n, h, w, c = pixels.shape
    x = pixels.reshape(n, h // PATCH, PATCH, w // PATCH, PATCH, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, -1, PATCH * PATCH * c)


def torch_sam():
    return segment_anything_reference.torch_sam(SAM, seed=0)


def torch_llama():
    config = transformers.LlamaConfig(
        vocab_size=BASE_VOCAB + 1, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
        max_position_embeddings=128, tie_word_embeddings=False, attn_implementation="eager",
        hidden_act="silu", rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.3 * torch.randn(p.shape) if p.ndim == 1
                    else torch.randn(p.shape) / math.sqrt(p.shape[1]))
    return model.eval()


def our_llama(hf):
    config = decoder.DecoderConfig(
        vocab_size=BASE_VOCAB, hidden_size=WIDTH, intermediate_size=64, num_layers=2,
        num_heads=2, num_kv_heads=2, head_dim=16, norm_eps=1e-6, rope_theta=10_000.0,
        lora=LoRASettings(rank=4, alpha=8.0, targets=("q", "v")))
    lm = decoder.DecoderLM(config, rngs=nnx.Rngs(1))
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:BASE_VOCAB]
    state["lm_head.weight"] = state["lm_head.weight"][:BASE_VOCAB]
    decoder.load(lm, state, source="tiny llama")
    # LISA's tokenizer.add_tokens("[SEG]") + resize_token_embeddings: one row, here the
    # reference's trained row.
    assert lm.add_token_rows(1) == SEG
    lm.added_tokens.embedding.set_value(jnp.asarray(hf.model.embed_tokens.weight[SEG:].detach().numpy()))
    lm.added_tokens.head.set_value(jnp.asarray(hf.lm_head.weight[SEG:].detach().numpy().T))
    return lm


# Conversations: (image index, question ids, answer ids). Image 0 has two conversations (one with
# two [SEG]), image 1 one; answers end with </s> as LLaVA's `sep2`.
SYSTEM = [5, 6, 7, 8]     # "A chat between ... USER:"
ASSISTANT = [9, 10]       # " ASSISTANT:"
CONVERSATIONS = [
    (0, [20, 21, 22], [30, SEG, 31, EOS]),
    (0, [23, 24, 25, 26, 27], [32, SEG, 33, SEG, 31, EOS]),
    (1, [28, 29], [SEG, 31, EOS]),
]
ORIGINAL_HW = np.array([[30, 25], [20, 36]])
MASK_HW = (30, 36)
MAX_MASKS, CONVS = 4, 2


def resized_hw(hw, size):
    """segment_anything's ResizeLongestSide.get_preprocess_shape."""
    scale = size / max(hw)
    return [int(hw[0] * scale + 0.5), int(hw[1] * scale + 0.5)]


def prompt_ids(question):
    """LLaVA v1 with mm_use_im_start_end: <s> system USER: <im_start><image><im_end>\\n q ASSISTANT:"""
    return [BOS, *SYSTEM, IM_START, IMAGE, IM_END, 13, *question, *ASSISTANT]


def sigmoid_ce_loss(inputs, targets, num_masks):
    """LISA's, as in model/LISA.py."""
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.flatten(1, 2).mean(1).sum() / (num_masks + 1e-8)


def dice_loss(inputs, targets, num_masks, scale=1000, eps=1e-6):
    """LISA's, as in model/LISA.py."""
    inputs = inputs.sigmoid().flatten(1, 2)
    targets = targets.flatten(1, 2)
    numerator = 2 * (inputs / scale * targets).sum(-1)
    denominator = (inputs / scale).sum(-1) + (targets / scale).sum(-1)
    loss = 1 - (numerator + eps) / (denominator + eps)
    return loss.sum() / (num_masks + 1e-8)


def torch_reference(hf, sam, tower_w, tower_b, projector, fcs, clip_pixels, sam_pixels,
                    gt_masks):
    """LISA's model_forward on the reference modules (CPU instead of its hard-coded CUDA)."""
    with torch.no_grad():
        image_features = projector(torch.from_numpy(patchify(clip_pixels)) @ tower_w.T + tower_b)
        sequences, labels, ids = [], [], []
        for image, question, answer in CONVERSATIONS:
            prompt = prompt_ids(question)
            split = prompt.index(IMAGE)
            embed = hf.model.embed_tokens
            sequences.append(torch.cat([
                embed(torch.tensor(prompt[:split])), image_features[image],
                embed(torch.tensor(prompt[split + 1:] + answer))]))
            ids.append(prompt + answer)
            labels.append([-100] * (len(prompt) + TOKENS - 1) + answer)
        length = max(len(s) for s in sequences)
        embeds = torch.stack([F.pad(s, (0, 0, 0, length - len(s))) for s in sequences])
        attention = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in sequences])
        label_ids = torch.tensor([lab + [-100] * (length - len(lab)) for lab in labels])
        out = hf(inputs_embeds=embeds, attention_mask=attention, output_hidden_states=True)
        ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), label_ids[:, 1:].flatten())
        # LISA: seg_token_mask on input_ids (one placeholder), shifted by the 255 extra tokens.
        id_length = max(len(i) for i in ids)
        input_ids = torch.tensor([i + [PAD] * (id_length - len(i)) for i in ids])
        seg_mask = torch.cat([input_ids[:, 1:] == SEG, torch.zeros(len(ids), 1, dtype=bool)], 1)
        seg_mask = torch.cat([torch.zeros(len(ids), TOKENS - 1, dtype=bool), seg_mask], 1)
        seg_mask = F.pad(seg_mask, (0, length - seg_mask.shape[1]))
        pred_embeddings = fcs(out.hidden_states[-1])[seg_mask]
        counts = seg_mask.int().sum(-1).cumsum(-1)
        seg_offset = torch.cat([torch.zeros(1, dtype=torch.long), counts])[torch.tensor([0, 2, 3])]
        image_embeddings = sam.image_encoder(torch.from_numpy(sam_pixels).permute(0, 3, 1, 2))
        pred_masks, bce, dice, num_masks = [], 0, 0, 0
        for i in range(2):
            text = pred_embeddings[seg_offset[i]:seg_offset[i + 1]]
            # LISA's prompt_encoder(points=None, boxes=None, masks=None, text_embeds=text[:, None])
            sparse = text[:, None]
            grid = sam.prompt_encoder.image_embedding_size
            dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                len(text), -1, *grid)
            low_res, _ = sam.mask_decoder(
                image_embeddings=image_embeddings[i:i + 1],
                image_pe=sam.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense, multimask_output=False)
            size = SAM.image_encoder.img_size
            masks = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
            crop = resized_hw(ORIGINAL_HW[i], size)
            masks = masks[..., :crop[0], :crop[1]]
            masks = F.interpolate(masks, tuple(ORIGINAL_HW[i]), mode="bilinear",
                                  align_corners=False)[:, 0]
            pred_masks.append(masks)
            gt = gt_masks[i]
            bce = bce + sigmoid_ce_loss(masks, gt, num_masks=gt.shape[0]) * gt.shape[0]
            dice = dice + dice_loss(masks, gt, num_masks=gt.shape[0]) * gt.shape[0]
            num_masks += gt.shape[0]
    return dict(logits=out.logits.numpy(), embeddings=pred_embeddings.numpy(),
                masks=[m.numpy() for m in pred_masks], ce=float(ce),
                bce=float(bce / (num_masks + 1e-8)), dice=float(dice / (num_masks + 1e-8)))


def our_inputs(clip_pixels, sam_pixels):
    """The same conversations in the static layout: [B=2, C=2, ...] with a padding conversation."""
    before = np.zeros((2, CONVS, 6), np.int32)
    after = np.zeros((2, CONVS, 12), np.int32)
    tokens = np.zeros((2, CONVS, 8), np.int32)
    masks = {name: np.zeros(a.shape, bool) for name, a in
             (("before", before), ("after", after), ("tokens", tokens))}
    label_mask = np.zeros(tokens.shape, bool)
    slot = {0: 0, 1: 0}
    for image, question, answer in CONVERSATIONS:
        c = slot[image]
        slot[image] += 1
        prompt = prompt_ids(question)
        split = prompt.index(IMAGE)
        parts = {"before": prompt[:split], "after": prompt[split + 1:-1],
                 "tokens": prompt[-1:] + answer}
        for name, array in (("before", before), ("after", after), ("tokens", tokens)):
            array[image, c, :len(parts[name])] = parts[name]
            masks[name][image, c, :len(parts[name])] = True
        label_mask[image, c, 1:1 + len(answer)] = True
    size = SAM.image_encoder.img_size
    inputs = lisa_lib.LisaInputs(
        clip_pixels=jnp.asarray(clip_pixels), sam_pixels=jnp.asarray(sam_pixels),
        prompt_before=jnp.asarray(before), prompt_before_mask=jnp.asarray(masks["before"]),
        prompt_after=jnp.asarray(after), prompt_after_mask=jnp.asarray(masks["after"]),
        tokens=jnp.asarray(tokens), token_mask=jnp.asarray(masks["tokens"]),
        resized_hw=jnp.asarray([resized_hw(hw, size) for hw in ORIGINAL_HW]),
        original_hw=jnp.asarray(ORIGINAL_HW))
    return inputs, jnp.asarray(label_mask)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    hf, sam_torch = torch_llama(), torch_sam()
    tower = PatchTower(rngs=nnx.Rngs(2))
    sam = sam_lib.Sam(**SAM.to_dict(), rngs=nnx.Rngs(3))
    sam_lib.load(sam, {k: v.numpy() for k, v in sam_torch.state_dict().items()}, source="tiny sam")
    model = lisa_lib.Lisa(vision_tower=tower, vision_width=VISION_WIDTH,
                          language_model=our_llama(hf), sam=sam, seg_token_id=SEG,
                          rngs=nnx.Rngs(4))
    # The reference's projector and text_hidden_fcs take our random weights.
    projector = torch.nn.Linear(VISION_WIDTH, WIDTH)
    fcs = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU(),
                              torch.nn.Linear(WIDTH, SAM.prompt_encoder.embed_dim))
    with torch.no_grad():
        for torch_linear, ours in ((projector, model.mm_projector),
                                   (fcs[0], model.text_hidden_fcs.fc1),
                                   (fcs[2], model.text_hidden_fcs.fc2)):
            torch_linear.weight.copy_(torch.from_numpy(np.asarray(ours.kernel[...]).T.copy()))
            torch_linear.bias.copy_(torch.from_numpy(np.array(ours.bias[...])))
    tower_w = torch.from_numpy(np.asarray(tower.proj.kernel[...]).T.copy())
    tower_b = torch.from_numpy(np.array(tower.proj.bias[...]))
    return model, (hf, sam_torch, tower_w, tower_b, projector, fcs)


def test_lisa_matches_pytorch_reference(models):
    model, reference_modules = models
    rng = np.random.default_rng(0)
    clip_pixels = rng.normal(size=(2, CLIP_SIZE, CLIP_SIZE, 3)).astype(np.float32)
    sam_pixels = rng.normal(size=(2, 40, 40, 3)).astype(np.float32)
    counts = [3, 1]
    gt = [rng.integers(0, 2, (n, *hw)).astype(np.float32) for n, hw in zip(counts, ORIGINAL_HW)]
    expected = torch_reference(*reference_modules, clip_pixels, sam_pixels,
                               [torch.from_numpy(g) for g in gt])

    inputs, label_mask = our_inputs(clip_pixels, sam_pixels)
    out = nnx.jit(lambda m, x: m(x, max_masks=MAX_MASKS, mask_hw=MASK_HW))(model, inputs)

    # Text logits at the answer positions: text position t = reference position P - 1 + t.
    for row, ((image, question, answer), c) in enumerate(zip(CONVERSATIONS, (0, 1, 0))):
        start = len(prompt_ids(question)) - 1 + TOKENS - 1
        ref = expected["logits"][row, start:start + len(answer) + 1]
        np.testing.assert_allclose(out.logits[image, c, :len(answer) + 1], ref, atol=1e-4)

    np.testing.assert_array_equal(out.mask_valid, [[True] * 3 + [False], [True] + [False] * 3])
    ours_embeddings = np.asarray(out.seg_embeddings)[np.asarray(out.mask_valid)]
    np.testing.assert_allclose(ours_embeddings, expected["embeddings"], atol=1e-4)

    for i, (h, w) in enumerate(ORIGINAL_HW):
        ours_masks = np.asarray(out.masks[i, :counts[i]])
        np.testing.assert_allclose(ours_masks[:, :h, :w], expected["masks"][i], atol=1e-4)
        assert np.all(ours_masks[:, h:] == 0) and np.all(ours_masks[:, :, w:] == 0)
    assert np.abs(expected["masks"][0]).max() > 0.1   # masks are not trivially zero

    targets = np.zeros((2, MAX_MASKS, *MASK_HW), np.float32)
    for i, g in enumerate(gt):
        targets[i, :len(g), :g.shape[1], :g.shape[2]] = g
    terms = objective.lisa_losses(
        logits=out.logits, tokens=inputs.tokens, label_mask=label_mask, masks=out.masks,
        mask_valid=out.mask_valid, target_masks=jnp.asarray(targets),
        original_hw=inputs.original_hw)
    for name in ("ce", "bce", "dice"):
        np.testing.assert_allclose(float(terms[name].mean()), expected[name], rtol=1e-5,
                                   err_msg=name)
    total = objective.total_loss(terms)
    np.testing.assert_allclose(float(total), expected["ce"] + 2.0 * expected["bce"]
                               + 0.5 * expected["dice"], rtol=1e-5)
