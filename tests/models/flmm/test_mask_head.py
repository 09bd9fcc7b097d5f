"""F-LMM's U-Net mask head against a torch transcription of F-LMM's UNetHead (mmseg UNet with
F-LMM's config: GroupNorm(1), InterpConv, float32 upsampling), loaded through the key map."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from pixelllm.checkpoints.assign import CheckpointMismatchError
from pixelllm.models.flmm import mask_head
from pixelllm.models.flmm.mask_head import UNetMaskHead


class TorchConvModule(nn.Module):
    """mmcv ConvModule(conv_cfg=None, norm_cfg=GroupNorm(1), act_cfg=ReLU): bias off."""

    def __init__(self, cin, cout, kernel):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.gn = nn.GroupNorm(1, cout, eps=1e-5)
        self.activate = nn.ReLU()

    def forward(self, x):
        return self.activate(self.gn(self.conv(x)))


class TorchBasicConvBlock(nn.Module):
    def __init__(self, cin, cout, num_convs):
        super().__init__()
        self.convs = nn.Sequential(*[TorchConvModule(cin if i == 0 else cout, cout, 3)
                                     for i in range(num_convs)])

    def forward(self, x):
        return self.convs(x)


class TorchUpsample(nn.Module):
    """mmseg's Upsample(scale_factor=2, bilinear) with F-LMM's float32 forward."""

    def forward(self, x):
        size = [int(t * 2.0) for t in x.shape[-2:]]
        return F.interpolate(x.float(), size, None, "bilinear", False).to(x.dtype)


class TorchInterpConv(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.interp_upsample = nn.Sequential(TorchUpsample(), TorchConvModule(cin, cout, 1))

    def forward(self, x):
        return self.interp_upsample(x)


class TorchUpConvBlock(nn.Module):
    def __init__(self, cin, skip, num_convs):
        super().__init__()
        self.conv_block = TorchBasicConvBlock(2 * skip, skip, num_convs)
        self.upsample = TorchInterpConv(cin, skip)

    def forward(self, skip, x):
        return self.conv_block(torch.cat([skip, self.upsample(x)], dim=1))


class TorchUNetHead(nn.Module):
    """F-LMM's UNetHead(normalize_input=True, upsample_input, strides 1, downsamples True)."""

    def __init__(self, cin, base, num_stages, num_convs, upsample_input):
        super().__init__()
        self.num_stages, self.upsample_input = num_stages, upsample_input
        self.encoder, self.decoder = nn.ModuleList(), nn.ModuleList()
        for i in range(num_stages):
            block = [nn.MaxPool2d(kernel_size=2)] if i else []
            if i:
                self.decoder.append(TorchUpConvBlock(base * 2**i, base * 2**(i - 1), num_convs))
            block.append(TorchBasicConvBlock(cin, base * 2**i, num_convs))
            self.encoder.append(nn.Sequential(*block))
            cin = base * 2**i
        self.conv_seg = nn.Conv2d(base, 1, kernel_size=1)

    def forward(self, x):
        x = x / x.sum((-2, -1), keepdims=True).clamp(min=1e-12)
        h, w = x.shape[-2:]
        scale_factor = max(1.0, self.upsample_input / max(h, w))
        x = F.interpolate(x.float(), scale_factor=scale_factor, mode="bilinear").to(x)
        h, w = x.shape[-2:]
        dividend = 2**(self.num_stages - 1)
        padded = x.new_zeros(*x.shape[:2], -(-h // dividend) * dividend,
                             -(-w // dividend) * dividend)
        padded[..., :h, :w] = x
        enc_outs, x = [], padded
        for enc in self.encoder:
            x = enc(x)
            enc_outs.append(x)
        for i in reversed(range(len(self.decoder))):
            x = self.decoder[i](enc_outs[i], x)
        return self.conv_seg(x[..., :h, :w])


def _randomized(module, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return module.eval()


@pytest.mark.parametrize("height, width, upsample_input", [(5, 7, 16), (6, 4, 4)])
def test_matches_torch_transcription(height, width, upsample_input):
    torch_head = _randomized(TorchUNetHead(6, 4, 4, 2, upsample_input), seed=0)
    head = UNetMaskHead(in_channels=6, base_channels=4, num_stages=4, convs_per_stage=2,
                        upsample_input=upsample_input, rngs=nnx.Rngs(0))
    state = {k: v.numpy() for k, v in torch_head.state_dict().items()}
    mask_head.load(head, state, source="flmm.pth")
    attention = np.random.default_rng(1).uniform(0, 1, (3, 6, height, width)).astype(np.float32)
    attention[0, 2] = 0.0  # an all-zero channel: the sum floor keeps it finite
    with torch.no_grad():
        expected = torch_head(torch.from_numpy(attention))[:, 0].numpy()
    # One compiled program: op-by-op dispatch compiles every small op on its own.
    got = np.asarray(nnx.jit(lambda m, x: m(x))(head, jnp.asarray(attention.transpose(0, 2, 3, 1))))
    assert got.shape == expected.shape
    if upsample_input == 16:
        assert got.shape == (3, 11, 16)  # floor(5 * 16/7), floor(7 * 16/7)
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=2e-4)


def test_parameter_count_equals_torch_at_full_size():
    abstract = jax.eval_shape(lambda: nnx.state(
        UNetMaskHead(in_channels=1024, rngs=nnx.Rngs(0)), nnx.Param))
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract))
    torch_count = sum(p.numel() for p in TorchUNetHead(1024, 64, 4, 2, 64).parameters())
    assert count == torch_count
    assert 7.76e6 < count < 7.78e6


def test_wrong_checkpoint_is_named():
    head = UNetMaskHead(in_channels=6, base_channels=4, rngs=nnx.Rngs(0))
    state = {k: v.numpy() for k, v in TorchUNetHead(6, 4, 4, 2, 64).state_dict().items()}
    del state["conv_seg.bias"]
    state["encoder.1.1.convs.0.conv.weight"] = np.zeros((8, 5, 3, 3), np.float32)
    with pytest.raises(CheckpointMismatchError, match="flmm.pth") as raised:
        mask_head.load(head, state, source="flmm.pth")
    assert "conv_seg.bias" in str(raised.value)
    assert "encoder.1.1.convs.0.conv.weight" in str(raised.value)


def test_crop_to_image_follows_flmm_rounding():
    logits = jnp.arange(2 * 64 * 64, dtype=jnp.float32).reshape(2, 64, 64)
    # A 336 x 224 (h x w) image centred in LLaVA's 336 x 336 canvas: 56 columns before it.
    cropped = mask_head.crop_to_image(logits, padded_size=(336, 336), image_size=(336, 224),
                                      pad_before=(0, 56))
    # left = int(56 * 64 / 336) = 10, width = int(224 * 64 / 336 + 0.5) = 43
    np.testing.assert_array_equal(cropped, logits[:, :, 10:53])
