import json

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from pixelllm.checkpoints.state_dict import checkpoint_file, read_state_dict
from pixelllm.checkpoints.torch_file import ForbiddenGlobalError


def _module_state_dict():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 3))
    sd = module.state_dict()
    sd["2.weight"] = sd["2.weight"].to(torch.bfloat16)
    return sd


def _assert_same(ours, sd):
    assert set(ours) == set(sd)
    for k, v in sd.items():
        assert ours[k].shape == tuple(v.shape), k
        assert ours[k].tobytes() == v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), k


def _shard(sd, tmp_path, save, suffix, index_name):
    keys = sorted(sd)
    parts = {f"model-0000{i + 1}-of-00002{suffix}": keys[i::2] for i in range(2)}
    for name, part in parts.items():
        save({k: sd[k] for k in part}, tmp_path / name)
    weight_map = {k: name for name, part in parts.items() for k in part}
    (tmp_path / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tmp_path / index_name, parts


def test_read_state_dict_torch_file_with_prefix(tmp_path):
    sd = _module_state_dict()
    torch.save({"model": sd, "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}}, "epoch": 9},
               tmp_path / "ckpt.pth")
    _assert_same(read_state_dict(tmp_path / "ckpt.pth", prefix="model"), sd)
    _assert_same(read_state_dict(str(tmp_path / "ckpt.pth"), prefix="model."), sd)
    everything = read_state_dict(tmp_path / "ckpt.pth")
    assert set(everything) == {f"model.{k}" for k in sd} | {"optimizer.state.0.exp_avg"}
    with pytest.raises(ValueError, match=r"ckpt\.pth: no tensors under 'state_dict\.'; top-level "
                                         r"key groups \(tensor count\): model \(6\), optimizer \(1\)"):
        read_state_dict(tmp_path / "ckpt.pth", prefix="state_dict")


def test_read_state_dict_safetensors_file_and_directory(tmp_path):
    sd = _module_state_dict()
    safetensors.torch.save_file(sd, tmp_path / "model.safetensors")
    _assert_same(read_state_dict(tmp_path / "model.safetensors"), sd)
    # A directory with both formats: safetensors wins, as in transformers.
    torch.save({k: torch.zeros_like(v) for k, v in sd.items()}, tmp_path / "pytorch_model.bin")
    ours = read_state_dict(tmp_path)
    _assert_same(ours, sd)
    assert ours["2.weight"].dtype == ml_dtypes.bfloat16
    _assert_same(read_state_dict(tmp_path / "pytorch_model.bin", prefix="1"),
                 {k[2:]: torch.zeros_like(v) for k, v in sd.items() if k.startswith("1.")})


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_read_state_dict_sharded_index(tmp_path, kind):
    sd = _module_state_dict()
    if kind == "safetensors":
        index, parts = _shard(sd, tmp_path, safetensors.torch.save_file, ".safetensors",
                              "model.safetensors.index.json")
    else:
        index, parts = _shard(sd, tmp_path, torch.save, ".bin", "pytorch_model.bin.index.json")
    _assert_same(read_state_dict(index), sd)
    _assert_same(read_state_dict(tmp_path), sd)  # the directory resolves to its index
    _assert_same(read_state_dict(index, prefix="0"),
                 {k[2:]: v for k, v in sd.items() if k.startswith("0.")})

    missing = sorted(parts)[1]
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"index\.json: 1 shard\(s\) listed in its "
                                                rf"weight_map are missing from .*: {missing}"):
        read_state_dict(index)


def test_read_state_dict_index_must_match_shards(tmp_path):
    sd = _module_state_dict()
    index, parts = _shard(sd, tmp_path, safetensors.torch.save_file, ".safetensors",
                          "model.safetensors.index.json")
    first, second = sorted(parts)
    weight_map = json.loads(index.read_text())["weight_map"]
    moved = parts[first][0]
    weight_map[moved] = second  # listed in the wrong shard
    weight_map["ghost.weight"] = first  # listed but nowhere
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=rf"shard '{first}' does not hold the keys its weight_map "
                                         rf"lists\n  1 listed but not in the shard: ghost\.weight\n"
                                         rf"  1 in the shard but listed elsewhere or not at all: "
                                         rf"{moved}"):
        read_state_dict(index)


def test_read_state_dict_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.pth: no such checkpoint"):
        read_state_dict(tmp_path / "nothing.pth")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"w\.npz: unknown checkpoint kind"):
        read_state_dict(tmp_path / "w.npz")
    with pytest.raises(FileNotFoundError, match=r": no checkpoint \(\*\.safetensors"):
        read_state_dict(tmp_path)
    torch.save({"a": torch.ones(1)}, tmp_path / "a.pth")
    torch.save({"b": torch.ones(1)}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match=r"several checkpoints \(a\.pth, b\.pt\); pass the one"):
        read_state_dict(tmp_path)
    torch.save({"a": np.float64(1.0)}, tmp_path / "c.pth")  # a numpy scalar needs numpy globals
    with pytest.raises(ForbiddenGlobalError, match=r"c\.pth: refusing to load global 'numpy\."):
        read_state_dict(tmp_path / "c.pth")
    torch.save(torch.ones(2), tmp_path / "e.pth")
    with pytest.raises(ValueError, match=r"e\.pth: holds a single tensor, not a dict of tensors"):
        read_state_dict(tmp_path / "e.pth")
    torch.save({"epoch": 3}, tmp_path / "d.pth")
    with pytest.raises(ValueError, match=r"d\.pth: no tensors; top-level key groups "
                                         r"\(tensor count\): none"):
        read_state_dict(tmp_path / "d.pth")


def test_checkpoint_file_is_the_file_a_folder_is_read_from(tmp_path):
    """Loaders name this file, not the folder, in their mismatch messages."""
    safetensors.numpy.save_file({"a": np.ones(1, np.float32)}, str(tmp_path / "model.safetensors"))
    assert checkpoint_file(tmp_path) == tmp_path / "model.safetensors"
    assert checkpoint_file(tmp_path / "model.safetensors") == tmp_path / "model.safetensors"
    with pytest.raises(FileNotFoundError, match=r"gone\.pth: no such checkpoint"):
        checkpoint_file(tmp_path / "gone.pth")
