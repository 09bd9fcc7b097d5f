"""F-LMM's SAM refiner and trained head against a torch transcription of F-LMM's glue
(``SAMWrapper.forward``, ``FrozenLlavaSAM._forward``'s crop and text projection, ``compute_loss``
with mmdet's CrossEntropyLoss / naive DiceLoss), written here on segment_anything's modules with
random tiny weights loaded into ours: masks, box prompts, losses and gradients."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import jax
import jax.numpy as jnp
from flax import nnx
from segment_anything.utils.transforms import ResizeLongestSide

from configs import sam as sam_config
from pixelllm.encoders.sam import sam as sam_lib
from pixelllm.models.flmm import mask_head as mask_head_lib
from pixelllm.models.flmm import objective
from pixelllm.models.flmm.flmm import FlmmHead, FlmmHeadInputs, coarse_window
from pixelllm.models.flmm.mask_head import UNetMaskHead
from pixelllm.models.flmm.refiner import SamRefiner, box_from_mask
from tests import segment_anything_reference


def _sam_config():
    # The tiny config's 4 mask channels leave one channel after the first downscaling conv,
    # whose LayerNorm2d then outputs a constant: no gradient would reach the dense prompt.
    model = sam_config.get_config("tiny").model
    model.prompt_encoder.mask_in_chans = 16
    return model


SAM = _sam_config()
CANVAS = SAM.image_encoder.img_size            # 40
LMM_CANVAS, GRID, CHANNELS = 48, 6, 4         # LMM canvas, its token grid, layers x heads
LAYERS, WIDTH, TOKENS = 3, 8, 3               # mixed hidden layers, LMM width, phrase tokens
ORIGINAL_HW = np.array([[30, 25], [20, 36]])
MASK_HW = (30, 36)
# Phrase token counts per image (0 = padding phrase slot).
TOKEN_COUNTS = [[3, 1], [2, 0]]


def resized_hw(hw, size):
    """segment_anything's ResizeLongestSide.get_preprocess_shape."""
    scale = size / max(hw)
    return [int(hw[0] * scale + 0.5), int(hw[1] * scale + 0.5)]


def lmm_geometry(hw):
    """LLaVA's expand-to-square: the resized image and its centred padding in the canvas."""
    image = resized_hw(hw, LMM_CANVAS)
    return image, [(LMM_CANVAS - image[0]) // 2, (LMM_CANVAS - image[1]) // 2]


# ----------------------------------------------------------------------------- torch reference

def mask2box(mask):
    """F-LMM's mask_refiner.mask2box."""
    ys, xs = np.where(mask > 0)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])


def torch_sam_wrapper(sam, image_embedding, pred_masks, text_embeds, original_size):
    """F-LMM's SAMWrapper.forward (use_text, use_mask, use_box, single mask) after encode_image;
    returns (sam masks, boxes in original pixels)."""
    transform = ResizeLongestSide(CANVAS)
    input_size = resized_hw(original_size, CANVAS)
    pad_value = min(-1.0, pred_masks.min().item())
    masks = F.interpolate(pred_masks[:, None].float(), size=input_size, mode="bilinear")
    h, w = masks.shape[-2:]
    masks = F.pad(masks, (0, CANVAS - w, 0, CANVAS - h), value=pad_value)
    mask_in = sam.prompt_encoder.mask_input_size
    prompt_masks = F.interpolate(masks.float(), size=mask_in, mode="bilinear")
    thresholded = F.interpolate(pred_masks.detach()[None].float().sigmoid(),
                                size=tuple(original_size), mode="bilinear")[0]
    thresholded = (thresholded > 0.5).to(thresholded)
    sam_masks, boxes = [], []
    for prompt_mask, pred_mask, text_embed in zip(prompt_masks, thresholded, text_embeds):
        if pred_mask.sum() > 0:
            box = mask2box(pred_mask.float().numpy())
        else:
            box = np.array([0.0, 0.0, original_size[1], original_size[0]])
        boxes.append(np.asarray(box, np.float64))
        box = transform.apply_boxes(box, tuple(original_size))
        box_torch = torch.as_tensor(box, dtype=torch.float32)[None, :]
        sparse, dense = sam.prompt_encoder(points=None, boxes=box_torch,
                                           masks=prompt_mask.view(1, 1, *mask_in))
        sparse = torch.cat([sparse, text_embed[None]], dim=1)
        low_res, _ = sam.mask_decoder(image_embeddings=image_embedding,
                                      image_pe=sam.prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=sparse,
                                      dense_prompt_embeddings=dense, multimask_output=False)
        sam_masks.append(sam.postprocess_masks(low_res, tuple(input_size),
                                               tuple(original_size))[0, 0])
    return torch.stack(sam_masks), np.stack(boxes)


EPS = torch.finfo(torch.float32).eps


def torch_compute(pred, gt):
    """FrozenLlava._compute's two losses with mmdet's definitions (loss_weight 1)."""
    count = pred.shape[0]
    pred, gt = pred.reshape(count, -1), gt.reshape(count, -1)
    probs = pred.sigmoid()
    dice = 1 - (2 * (probs * gt).sum(1) + 1.0) / (probs.sum(1) + gt.sum(1) + 1.0)
    bce = F.binary_cross_entropy_with_logits(pred.reshape(-1), gt.reshape(-1), reduction="none")
    return dice.sum() / (count + EPS), bce.sum() / (pred.numel() + EPS)


def torch_head(sam, text_proj, layer_weights, coarse, window, hidden, sam_pixels, targets):
    """FrozenLlavaSAM._forward (from the U-Net's output on) and compute_loss."""
    image_embeddings = sam.image_encoder(torch.from_numpy(np.array(sam_pixels)).permute(0, 3, 1, 2))
    weights = torch.softmax(layer_weights, dim=0)
    totals = dict(mask=0, dice=0, sam_mask=0, sam_dice=0)
    outputs, count_all = [], 0
    for b, counts in enumerate(TOKEN_COUNTS):
        valid = [p for p, n in enumerate(counts) if n]
        top, left, h, w = (int(v) for v in window[b])
        pred_masks = coarse[b, valid, top:top + h, left:left + w]
        text_embeds = [text_proj((hidden[b, p, :counts[p]] * weights.view(1, -1, 1)).sum(1))
                       for p in valid]
        sam_masks, boxes = torch_sam_wrapper(sam, image_embeddings[b:b + 1], pred_masks,
                                             text_embeds, ORIGINAL_HW[b])
        gt = torch.from_numpy(targets[b, valid, :ORIGINAL_HW[b][0], :ORIGINAL_HW[b][1]])
        coarse_gt = F.interpolate(gt[None].float(), size=pred_masks.shape[-2:])[0]
        count = len(valid)
        count_all += count
        for prefix, pred, truth in (("", pred_masks, coarse_gt), ("sam_", sam_masks, gt)):
            dice, bce = torch_compute(pred, truth)
            totals[prefix + "dice"] = totals[prefix + "dice"] + dice * count
            totals[prefix + "mask"] = totals[prefix + "mask"] + bce * count
        outputs.append((sam_masks, boxes))
    return outputs, {k: v / count_all for k, v in totals.items()}


# ----------------------------------------------------------------------------- ours

def our_head(torch_model):
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    # Built abstractly and filled: eager random initialization costs seconds per parameter.
    sam = sam_lib.load_sam(state, config=SAM)
    rngs = nnx.Rngs(0)
    refiner = SamRefiner(sam=sam, text_width=WIDTH, num_text_layers=LAYERS, rngs=rngs)
    refiner.text_projection.layer_weights.set_value(
        jnp.asarray(np.random.default_rng(3).normal(size=LAYERS), jnp.float32))
    unet = UNetMaskHead(in_channels=CHANNELS, base_channels=4, num_stages=2, convs_per_stage=1,
                        upsample_input=16, rngs=rngs)
    return FlmmHead(mask_head=unet, refiner=refiner)


def example(seed=0):
    rng = np.random.default_rng(seed)
    batch, phrases = len(TOKEN_COUNTS), len(TOKEN_COUNTS[0])
    text_valid = np.array([[[t < n for t in range(TOKENS)] for n in row] for row in TOKEN_COUNTS])
    geometry = [lmm_geometry(hw) for hw in ORIGINAL_HW]
    pixels = np.zeros((batch, CANVAS, CANVAS, 3), np.float32)
    for b, hw in enumerate(ORIGINAL_HW):
        h, w = resized_hw(hw, CANVAS)
        pixels[b, :h, :w] = rng.normal(size=(h, w, 3))
    targets = np.zeros((batch, phrases, *MASK_HW), np.float32)
    for b, (h, w) in enumerate(ORIGINAL_HW):
        targets[b, :, :h, :w] = rng.uniform(size=(phrases, h, w)) < 0.4
        targets[b, 0, : h // 2, : w // 3] = 1.0
    # Padding tokens and the padding phrase hold values too: the reference never sees them.
    return FlmmHeadInputs(
        attention=jnp.asarray(rng.uniform(size=(batch, phrases, GRID, GRID, CHANNELS)),
                              jnp.float32),
        text_hidden=jnp.asarray(rng.normal(size=(batch, phrases, TOKENS, LAYERS, WIDTH)),
                                jnp.float32),
        text_valid=jnp.asarray(text_valid),
        phrase_valid=jnp.asarray(text_valid.any(-1)),
        lmm_image_hw=jnp.asarray([g[0] for g in geometry], jnp.int32),
        lmm_pad_before=jnp.asarray([g[1] for g in geometry], jnp.int32),
        sam_pixels=jnp.asarray(pixels),
        resized_hw=jnp.asarray([resized_hw(hw, CANVAS) for hw in ORIGINAL_HW], jnp.int32),
        original_hw=jnp.asarray(ORIGINAL_HW, jnp.int32)), targets


def sam_loss_and_outputs(head, coarse_offset, inputs, targets):
    """SAM's two terms (their gradient reaches the U-Net only through the dense prompt: the box
    is read without gradient), with the head's outputs and all four terms as aux.
    ``coarse_offset`` (zeros) is added to the coarse logits to read their gradient."""
    coarse = head.coarse_masks(inputs.attention) + coarse_offset
    window = coarse_window(inputs.lmm_image_hw, inputs.lmm_pad_before,
                           lmm_canvas_hw=(LMM_CANVAS, LMM_CANVAS), coarse_hw=coarse.shape[-2:])
    out = head.refiner(coarse, coarse_window=window, text_hidden=inputs.text_hidden,
                       text_valid=inputs.text_valid, phrase_valid=inputs.phrase_valid,
                       sam_pixels=inputs.sam_pixels, resized_hw=inputs.resized_hw,
                       original_hw=inputs.original_hw, mask_hw=MASK_HW)
    terms = objective.flmm_losses(coarse=coarse, coarse_window=window, masks=out.masks,
                                  target_masks=targets, original_hw=inputs.original_hw,
                                  mask_valid=inputs.phrase_valid)
    terms = {k: v.mean() for k, v in terms.items()}
    return terms["sam_mask"] + terms["sam_dice"], (coarse, window, out, terms)


@pytest.fixture(scope="module")
def run():
    """One compiled forward and backward, shared by the tests below."""
    sam_torch = segment_anything_reference.torch_sam(SAM, seed=0)
    head = our_head(sam_torch)
    inputs, targets = example()
    offset = jnp.zeros((len(TOKEN_COUNTS), len(TOKEN_COUNTS[0]), 16, 16), jnp.float32)
    grad_fn = nnx.jit(nnx.grad(sam_loss_and_outputs,
                               argnums=(nnx.DiffState(0, nnx.Param), 1), has_aux=True))
    (grads, coarse_grad), aux = grad_fn(head, offset, inputs, targets)
    return dict(sam_torch=sam_torch, head=head, inputs=inputs, targets=targets, grads=grads,
                coarse_grad=coarse_grad, aux=aux)


# ----------------------------------------------------------------------------- tests

def test_box_from_mask_rule_and_empty_case():
    mask = np.zeros((3, 6, 7), bool)
    mask[0, 2, 3] = True                   # one pixel: (3, 2, 4, 3)
    mask[1, 1:4, 2:6] = True
    mask[1, 5, 0] = True                   # a stray pixel widens the box
    boxes = box_from_mask(jnp.asarray(mask), jnp.asarray([[6, 7], [6, 7], [5, 4]]))
    np.testing.assert_array_equal(boxes, [[3, 2, 4, 3], [0, 1, 6, 6], [0, 0, 4, 5]])
    for m, box in zip(mask[:2], np.asarray(boxes)):
        np.testing.assert_array_equal(mask2box(m), box)


def test_coarse_window_follows_crop_to_image():
    image_hw = np.array([[48, 40], [27, 48], [48, 13]])
    pad = np.array([[0, 4], [10, 0], [0, 17]])
    window = np.asarray(coarse_window(jnp.asarray(image_hw), jnp.asarray(pad),
                                      lmm_canvas_hw=(48, 48), coarse_hw=(16, 16)))
    logits = jnp.arange(16 * 16, dtype=jnp.float32).reshape(1, 16, 16)
    for (top, left, h, w), hw, before in zip(window, image_hw, pad):
        cropped = mask_head_lib.crop_to_image(logits, padded_size=(48, 48),
                                              image_size=tuple(hw), pad_before=tuple(before))
        np.testing.assert_array_equal(cropped, logits[:, top:top + h, left:left + w])
    assert tuple(window[1]) == (3, 0, 9, 16)   # int(27 * 16 / 48 + 0.5) = int(9.5) = 9


def test_head_matches_flmm_glue_masks_losses_and_gradients(run):
    head, inputs, targets, sam_torch = run["head"], run["inputs"], run["targets"], run["sam_torch"]
    refiner, grads = head.refiner, run["grads"]
    coarse, window, out, terms = run["aux"]
    assert coarse.shape == (2, 2, 16, 16)
    np.testing.assert_array_equal(window, [[0, 1, 16, 13], [3, 0, 9, 16]])

    text_proj = torch.nn.Linear(WIDTH, SAM.prompt_encoder.embed_dim)
    with torch.no_grad():
        text_proj.weight.copy_(torch.from_numpy(np.asarray(
            refiner.text_projection.proj.kernel[...]).T.copy()))
        text_proj.bias.copy_(torch.tensor(np.asarray(refiner.text_projection.proj.bias[...])))
    layer_weights = torch.tensor(np.asarray(refiner.text_projection.layer_weights[...]),
                                 requires_grad=True)
    coarse_torch = torch.tensor(np.asarray(coarse), requires_grad=True)
    outputs, torch_terms = torch_head(
        sam_torch, text_proj, layer_weights, coarse_torch, np.asarray(window),
        torch.from_numpy(np.array(inputs.text_hidden)), np.asarray(inputs.sam_pixels), targets)
    (torch_terms["sam_mask"] + torch_terms["sam_dice"]).backward()

    for b, (sam_masks, boxes) in enumerate(outputs):
        valid = [p for p, n in enumerate(TOKEN_COUNTS[b]) if n]
        h, w = ORIGINAL_HW[b]
        np.testing.assert_allclose(out.boxes[b, valid], boxes, atol=0)
        np.testing.assert_allclose(out.masks[b, valid, :h, :w], sam_masks.detach().numpy(),
                                   atol=2e-4, rtol=1e-4)
        assert not np.any(np.asarray(out.masks[b, :, h:])) and not np.any(
            np.asarray(out.masks[b, :, :, w:]))
    for name in ("mask", "dice", "sam_mask", "sam_dice"):
        np.testing.assert_allclose(terms[name], torch_terms[name].item(), atol=1e-5, rtol=1e-5)
    # Gradients of SAM's loss: zero on padding phrases and outside each image's window.
    projection = grads["refiner"]["text_projection"]
    expected_grads = [(run["coarse_grad"], coarse_torch.grad.numpy()),
                      (projection["layer_weights"][...], layer_weights.grad.numpy()),
                      (projection["proj"]["kernel"][...], text_proj.weight.grad.numpy().T)]
    for got, expected in expected_grads:
        scale = np.abs(expected).max()
        assert scale > 0
        np.testing.assert_allclose(got, expected, atol=1e-3 * scale, rtol=1e-3)


def test_sam_loss_reaches_unet_and_never_the_image_encoder(run):
    head, grads = run["head"], run["grads"]
    trained = nnx.All(nnx.Param, head.trainable())
    unet = jax.tree.leaves(grads["mask_head"])
    encoder = jax.tree.leaves(grads["refiner"]["sam"]["image_encoder"])
    prompt = jax.tree.leaves(grads["refiner"]["sam"]["prompt_encoder"]["mask_downscaling"])
    assert unet and encoder
    assert sum(float(jnp.abs(g).sum()) for g in unet) > 0
    assert sum(float(jnp.abs(g).sum()) for g in prompt) > 0
    assert all(not np.any(np.asarray(g)) for g in encoder)
    trained_paths = {path for path, _ in nnx.to_flat_state(nnx.state(head, trained))}
    assert trained_paths and not any("image_encoder" in path for path in trained_paths)
    assert any("text_projection" in path for path in trained_paths)
    assert any("mask_decoder" in path for path in trained_paths)
    assert any("mask_head" in path for path in trained_paths)


def test_mismatched_text_inputs_are_named(run):
    inputs = run["inputs"]
    coarse = jnp.zeros((2, 2, 16, 16))
    window = jnp.asarray([[0, 0, 16, 16]] * 2)
    with pytest.raises(ValueError, match="text_hidden"):
        run["head"].refiner(coarse, coarse_window=window,
                            text_hidden=inputs.text_hidden[..., 1:, :],
                            text_valid=inputs.text_valid, phrase_valid=inputs.phrase_valid,
                            sam_pixels=inputs.sam_pixels, resized_hw=inputs.resized_hw,
                            original_hw=inputs.original_hw, mask_hw=MASK_HW)
