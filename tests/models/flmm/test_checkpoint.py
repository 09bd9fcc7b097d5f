"""F-LMM's released checkpoint layout -> our head: a torch stand-in of ``FrozenLlavaSAM`` under
F-LMM's attribute names (``mask_head`` = mmseg's UNet + ``conv_seg``, ``text_layer_weights``,
``text_proj``, ``sam.model`` = segment_anything's Sam, frozen ``llava``) written the way xtuner
releases it (trained parameters and persistent buffers, ``torch.save``), loaded with the SAM file
for the frozen image encoder, and run against the torch transcriptions of F-LMM's U-Net and
SAMWrapper glue with those weights."""

import copy

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from torch import nn

from pixelllm.checkpoints.assign import CheckpointMismatchError
from pixelllm.checkpoints.state_dict import read_state_dict
from pixelllm.models.flmm import checkpoint
from tests import segment_anything_reference
from tests.models.flmm import test_llava as llava_reference
from tests.models.flmm import test_mask_head as unet_reference
from tests.models.flmm import test_refiner as glue_reference

SAM = glue_reference.SAM
# The glue reference's sizes (attention channels, mixed layers, LMM width); a U-Net of 3 stages
# with 2 convs each, so every key family of mmseg's UNet occurs.
CHANNELS, LAYERS, WIDTH = glue_reference.CHANNELS, glue_reference.LAYERS, glue_reference.WIDTH
BASE, STAGES, CONVS, UPSAMPLE = 4, 3, 2, 16


class TorchSamWrapper(nn.Module):
    """F-LMM's SAMWrapper: segment_anything's Sam as ``model`` (mask_refiner.py)."""

    def __init__(self, sam):
        super().__init__()
        self.model = sam
        self.model.image_encoder.requires_grad_(False)


class TorchFrozenLlavaSAM(nn.Module):
    """FrozenLlavaSAM's modules under its names (frozen_llava.py: ``mask_head``, the ``[L]``
    ``text_layer_weights``, ``sam``, ``text_proj`` Linear D -> SAM width); ``llava`` a frozen
    stand-in with one weight."""

    def __init__(self, sam, *, channels, layers, width, seed):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.llava = nn.Linear(2, 2).requires_grad_(False)
        self.mask_head = unet_reference._randomized(
            unet_reference.TorchUNetHead(channels, BASE, STAGES, CONVS, UPSAMPLE), seed=seed)
        self.text_layer_weights = nn.Parameter(torch.randn(layers, generator=generator))
        self.sam = TorchSamWrapper(sam)
        self.text_proj = nn.Linear(width, SAM.prompt_encoder.embed_dim)
        with torch.no_grad():
            self.text_proj.weight.copy_(torch.randn(self.text_proj.weight.shape,
                                                    generator=generator) * 0.3)
            self.text_proj.bias.copy_(torch.randn(self.text_proj.bias.shape,
                                                  generator=generator) * 0.3)


def released_state_dict(model):
    """What xtuner (DeepSpeed, ``exclude_frozen_parameters``) and
    ``deepspeed2torch_state_dict.py`` write: every parameter but the frozen ones, and the
    persistent buffers."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def trained_sam(pretrained):
    """F-LMM's SAM after training: the pretrained image encoder, other prompt encoder and mask
    decoder weights; the Fourier buffer scaled so that reading it from the SAM file shows."""
    sam = copy.deepcopy(pretrained)
    segment_anything_reference.randomize(sam.prompt_encoder, seed=1)
    segment_anything_reference.randomize(sam.mask_decoder, seed=2)
    with torch.no_grad():
        sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.mul_(1.5)
    return sam


def release(tmp_path, *, channels=CHANNELS, layers=LAYERS, width=WIDTH):
    """(torch model, F-LMM file, SAM file) written under ``tmp_path``."""
    pretrained = segment_anything_reference.torch_sam(SAM, seed=0)
    model = TorchFrozenLlavaSAM(trained_sam(pretrained), channels=channels, layers=layers,
                                width=width, seed=3).eval()
    flmm_path = tmp_path / checkpoint.RELEASED_CHECKPOINT
    sam_path = tmp_path / checkpoint.SAM_CHECKPOINT
    torch.save(released_state_dict(model), flmm_path)
    torch.save(pretrained.state_dict(), sam_path)
    return model, flmm_path, sam_path


def load_head(flmm_path, sam_path):
    # The tiny SAM's decoder has 4 heads: not in the shapes, so its config is given.
    return checkpoint.load_head(flmm_path, sam=sam_path, sam_config=SAM,
                                upsample_input=UPSAMPLE)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    model, flmm_path, sam_path = release(tmp_path_factory.mktemp("flmm"))
    head = load_head(flmm_path, sam_path)
    return dict(model=model, flmm_path=flmm_path, sam_path=sam_path, head=head)


def test_release_holds_the_trained_parts_only(released):
    keys = set(read_state_dict(released["flmm_path"]))
    assert {"text_layer_weights", "text_proj.weight", "mask_head.conv_seg.bias",
            "mask_head.decoder.1.upsample.interp_upsample.1.gn.weight",
            "sam.model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
            "sam.model.mask_decoder.iou_token.weight"} <= keys
    assert not any(k.startswith(("llava.", "sam.model.image_encoder.")) for k in keys)


def test_sizes_are_read_from_the_file(released):
    config = checkpoint.config_from_state_dict(read_state_dict(released["flmm_path"]),
                                               source="f")
    assert config == {"mask_head": dict(in_channels=CHANNELS, base_channels=BASE,
                                        num_stages=STAGES, convs_per_stage=CONVS),
                      "text": dict(text_width=WIDTH, prompt_width=SAM.prompt_encoder.embed_dim,
                                   num_text_layers=LAYERS)}


def test_loaded_head_computes_flmm_with_the_released_weights(released):
    model, head = released["model"], released["head"]
    inputs, targets = glue_reference.example()
    forward = nnx.jit(lambda h, x: h(x, lmm_canvas_hw=(glue_reference.LMM_CANVAS,) * 2,
                                     mask_hw=glue_reference.MASK_HW))
    out = forward(head, inputs)
    attention = np.array(inputs.attention)
    batch, phrases = attention.shape[:2]
    with torch.no_grad():
        coarse = model.mask_head(torch.from_numpy(
            attention.reshape(batch * phrases, *attention.shape[2:]).transpose(0, 3, 1, 2)))
        coarse = coarse[:, 0].reshape(batch, phrases, *coarse.shape[-2:])
        outputs, _ = glue_reference.torch_head(
            model.sam.model, model.text_proj, model.text_layer_weights, coarse,
            np.asarray(out.coarse_window), torch.from_numpy(np.array(inputs.text_hidden)),
            np.asarray(inputs.sam_pixels), targets)
    np.testing.assert_allclose(out.coarse, coarse.numpy(), atol=2e-4, rtol=2e-4)
    for b, (sam_masks, boxes) in enumerate(outputs):
        valid = [p for p, n in enumerate(glue_reference.TOKEN_COUNTS[b]) if n]
        h, w = glue_reference.ORIGINAL_HW[b]
        np.testing.assert_array_equal(out.boxes[b, valid], boxes)
        np.testing.assert_allclose(out.masks[b, valid, :h, :w], sam_masks.numpy(),
                                   atol=2e-4, rtol=1e-4)
    # The Fourier matrix is the F-LMM file's, not the SAM file's.
    np.testing.assert_array_equal(
        head.refiner.sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix[...],
        model.sam.model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.numpy())


def _flat(module):
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(module))}


def _assert_same(a, b):
    flat_a, flat_b = _flat(a), _flat(b)
    assert flat_a.keys() == flat_b.keys()
    for path in flat_a:
        np.testing.assert_array_equal(flat_a[path], flat_b[path], err_msg=str(path))


def test_whole_model_file_and_mmengine_wrapper_load_the_same(released, tmp_path):
    # A file saved with the frozen parts too (llava.*, sam.model.image_encoder.*), wrapped as an
    # mmengine checkpoint: the LLaVA keys are ignored, the image encoder read from it.
    full = released["model"].state_dict()
    wrapped = tmp_path / "full.pth"
    torch.save({"state_dict": full, "meta": {"epoch": 8}}, wrapped)
    head = load_head(wrapped, released["sam_path"])
    _assert_same(head, released["head"])
    state = read_state_dict(wrapped)
    fresh = load_head(released["flmm_path"], released["sam_path"])
    checkpoint.load(fresh, state, source=str(wrapped))  # no SAM file: the file's own encoder
    _assert_same(fresh, released["head"])


def _mismatch(head, state, **kwargs):
    with pytest.raises(CheckpointMismatchError) as raised:
        checkpoint.load(head, state, **kwargs)
    return str(raised.value)


def test_wrong_keys_and_shapes_are_refused_by_name(released):
    head = load_head(released["flmm_path"], released["sam_path"])
    before = _flat(head)
    state = read_state_dict(released["flmm_path"])
    sam_state = read_state_dict(released["sam_path"])
    wrong = dict(state)
    wrong["text_proj.b"] = wrong.pop("text_proj.bias")
    wrong["mask_head.conv_seg.weight"] = np.zeros((1, BASE + 1, 1, 1), np.float32)
    wrong["sam.model.mask_decoder.iou_token.weight"] = np.zeros((2, 32), np.float32)
    message = _mismatch(head, wrong, source="flmm.pth", sam_state_dict=sam_state)
    assert message.startswith("flmm.pth: ")
    for key in ("text_proj.bias", "text_proj.b", "mask_head.conv_seg.weight",
                "sam.model.mask_decoder.iou_token.weight"):
        assert key in message
    # A SAM file of another encoder is named with its key; nothing was assigned.
    short = {k: v for k, v in sam_state.items() if k != "image_encoder.neck.0.weight"}
    message = _mismatch(head, state, source="flmm.pth", sam_state_dict=short,
                        sam_source="sam.pth")
    assert message.startswith("sam.pth: ") and "image_encoder.neck.0.weight" in message
    assert checkpoint.SAM_CHECKPOINT in message
    message = _mismatch(head, state, source="flmm.pth")
    assert "sam.model.image_encoder." in message and checkpoint.SAM_CHECKPOINT in message
    after = _flat(head)
    for path in before:
        np.testing.assert_array_equal(before[path], after[path], err_msg=str(path))


def test_load_released_composes_llava_hf_and_checks_the_sizes(tmp_path):
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(llava_reference.hf_config()).eval()
    hf.save_pretrained(tmp_path / "llava")
    text = hf.config.text_config
    layers, heads = text.num_hidden_layers, text.num_attention_heads
    fits = tmp_path / "fits"
    fits.mkdir()
    _, flmm_path, sam_path = release(fits, channels=layers * heads, layers=layers,
                                     width=text.hidden_size)
    lmm, head = checkpoint.load_released(flmm=flmm_path, sam=sam_path, llava=tmp_path / "llava",
                                         sam_config=SAM)
    projector_bias = next(v for k, v in hf.state_dict().items()
                          if k.endswith("multi_modal_projector.linear_1.bias"))
    np.testing.assert_array_equal(lmm.multi_modal_projector.linear_1.bias[...],
                                  projector_bias.numpy())
    assert head.refiner.text_projection.width == text.hidden_size
    # The glue reference's sizes (4 channels, 3 layers of width 8) do not fit this LLaVA.
    other = tmp_path / "other"
    other.mkdir()
    _, flmm_path, sam_path = release(other)
    with pytest.raises(CheckpointMismatchError, match=checkpoint.RELEASED_CHECKPOINT) as raised:
        checkpoint.load_released(flmm=flmm_path, sam=sam_path, llava=tmp_path / "llava",
                                 sam_config=SAM)
    assert f"{CHANNELS} attention channels" in str(raised.value)
    assert f"{layers * heads} ({layers} layers x {heads} heads)" in str(raised.value)
