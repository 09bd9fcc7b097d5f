import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from pixelllm.checkpoints.safetensors_file import read_safetensors


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_safetensors_torch_written_float32_bfloat16_bitwise(tmp_path):
    gen = torch.Generator().manual_seed(0)
    sd = {"a.weight": torch.randn(4, 3, generator=gen),
          "a.bias": torch.randn(3, generator=gen).to(torch.bfloat16),
          "b.half": torch.randn(2, 2, generator=gen).to(torch.float16),
          "steps": torch.tensor(5)}
    safetensors.torch.save_file(sd, tmp_path / "m.safetensors")
    ours = read_safetensors(tmp_path / "m.safetensors")
    assert set(ours) == set(sd)
    assert ours["a.bias"].dtype == ml_dtypes.bfloat16 and ours["a.weight"].dtype == np.float32
    for k, v in sd.items():
        assert ours[k].shape == tuple(v.shape) and ours[k].tobytes() == _bytes(v), k


def test_safetensors_numpy_written_bfloat16_roundtrip_and_select(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"x": rng.standard_normal((3, 4)).astype(ml_dtypes.bfloat16),
              "y": rng.standard_normal(5).astype(np.float32)}
    safetensors.numpy.save_file(arrays, tmp_path / "n.safetensors")
    seen = []
    ours = read_safetensors(tmp_path / "n.safetensors", select=lambda k: seen.append(k) or k == "x")
    assert sorted(seen) == ["x", "y"] and list(ours) == ["x"]
    assert ours["x"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(ours["x"].view(np.uint16), arrays["x"].view(np.uint16))


def test_safetensors_bfloat16_without_anything_else_imported(tmp_path):
    """safetensors' numpy path needs ml_dtypes registered; the module must do that itself."""
    safetensors.torch.save_file({"a": torch.tensor([1.5, -2.0], dtype=torch.bfloat16)},
                                tmp_path / "b.safetensors")
    code = ("import sys\n"
            "from pixelllm.checkpoints.safetensors_file import read_safetensors\n"
            "assert 'jax' not in sys.modules and 'torch' not in sys.modules\n"
            f"a = read_safetensors({str(tmp_path / 'b.safetensors')!r})['a']\n"
            "print(a.dtype, a.astype('float32').tolist())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "bfloat16 [1.5, -2.0]"


def test_safetensors_truncated_names_the_file(tmp_path):
    safetensors.torch.save_file({"w": torch.ones(16, 16)}, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    for cut in (len(data) - 7, 50, 4):
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"cut\.safetensors: unreadable safetensors file"):
            read_safetensors(tmp_path / "cut.safetensors")
