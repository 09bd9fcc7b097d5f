import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pixelllm.nn import resize

CASES = [((8, 8), (6, 6)), ((5, 7), (9, 12)), ((64, 64), (24, 24)), ((16, 16), (27, 27)), ((3, 3), (1, 2))]


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("mode,torch_mode", [("cubic", "bicubic"), ("linear", "bilinear")])
@pytest.mark.parametrize("in_hw,out_hw", CASES)
def test_resize_2d_matches_torch_interpolate(in_hw, out_hw, mode, torch_mode, antialias):
    x = np.random.default_rng(0).standard_normal((2, *in_hw, 3)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=out_hw, mode=torch_mode,
                             align_corners=False, antialias=antialias).permute(0, 2, 3, 1).numpy()
    out = np.asarray(resize.resize_2d(jnp.asarray(x), out_hw, mode=mode, antialias=antialias))
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, atol=3e-5)


@pytest.mark.parametrize("in_len,out_len", [(27, 47), (127, 47), (5, 5)])
def test_resize_axis_linear_matches_torch_1d(in_len, out_len):
    x = np.random.default_rng(1).standard_normal((in_len, 4)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(x).T[None], size=out_len, mode="linear",
                             align_corners=False)[0].T.numpy()
    np.testing.assert_allclose(np.asarray(resize.resize_axis(jnp.asarray(x), 0, out_len, mode="linear")),
                               expected, atol=3e-5)


def test_resize_is_differentiable_and_jittable():
    x = jnp.ones((4, 4, 1))
    grad = jax.jit(jax.grad(lambda v: resize.resize_2d(v, (3, 5)).sum()))(x)
    # Each output row of a resize matrix sums to one, so the total mass moves 3*5 units.
    np.testing.assert_allclose(float(grad.sum()), 15.0, rtol=1e-5)


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="unknown resize mode 'nearest'"):
        resize.resize_matrix(4, 2, "nearest", False)
