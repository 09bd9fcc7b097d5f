import os
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from pixelllm.checkpoints.torch_file import ForbiddenGlobalError, read_torch_file

_DTYPES = {
    torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: ml_dtypes.bfloat16,
    torch.float64: np.float64, torch.int64: np.int64, torch.int32: np.int32,
    torch.int16: np.int16, torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_,
    torch.complex64: np.complex64,
    # No legacy storage class: torch.save writes these through _rebuild_tensor_v3.
    torch.uint16: np.uint16, torch.uint32: np.uint32, torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,
    torch.float8_e5m2: ml_dtypes.float8_e5m2,
}


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _random(dtype, shape, gen):
    values = torch.randn(shape, generator=gen) * 50
    if dtype == torch.bool:
        return values > 0
    if dtype.is_complex:
        return torch.complex(values, -values).to(dtype)
    if not dtype.is_floating_point:
        return values.abs().to(torch.int64).to(dtype)  # non-negative: fits the unsigned types.
    return values.to(dtype)


def _assert_bitwise(ours: np.ndarray, ref: torch.Tensor):
    assert ours.shape == tuple(ref.shape)
    assert ours.tobytes() == _bytes(ref)


def _rewrite(src, dst, edit):
    """Copies a torch.save zip, passing each record's bytes through ``edit(name, data)``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, edit(info.filename, zin.read(info)))


def test_torch_file_every_dtype_bitwise(tmp_path):
    gen = torch.Generator().manual_seed(0)
    sd = {f"t.{str(dt).removeprefix('torch.')}": _random(dt, (3, 5), gen) for dt in _DTYPES}
    sd["scalar"] = torch.tensor(7, dtype=torch.int64)
    sd["bf16_scalar"] = torch.tensor(-1.25, dtype=torch.bfloat16)
    sd["empty"] = torch.zeros(0, 4)
    torch.save(sd, tmp_path / "w.pth")
    ours = read_torch_file(tmp_path / "w.pth")
    assert list(ours) == list(sd)
    for dt, np_dt in _DTYPES.items():
        key = f"t.{str(dt).removeprefix('torch.')}"
        assert ours[key].dtype == np.dtype(np_dt), key
        _assert_bitwise(ours[key], sd[key])
    assert ours["scalar"].shape == () and ours["scalar"] == 7
    assert ours["bf16_scalar"].dtype == ml_dtypes.bfloat16 and float(ours["bf16_scalar"]) == -1.25
    assert ours["empty"].shape == (0, 4) and ours["empty"].dtype == np.float32


def test_torch_file_views_offsets_and_shared_storage(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    half = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    sd = {
        "full": base,
        "transposed": base.t(),  # non-contiguous, whole storage
        "window": base[1:3, 2:5],  # offset and non-contiguous
        "row": base[2],  # contiguous with an offset
        "expanded": torch.ones(3, 1).expand(3, 4),  # stride 0
        "half_t": half.t()[1:],  # bfloat16 view with offset
    }
    assert sd["transposed"].untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    torch.save(sd, tmp_path / "v.pt")
    ours = read_torch_file(tmp_path / "v.pt")
    for key, ref in sd.items():
        _assert_bitwise(ours[key], ref)
        assert ours[key].flags.c_contiguous, key
    np.testing.assert_array_equal(ours["window"], base.numpy()[1:3, 2:5])
    # The storage shared by five tensors was read once: contiguous ones are views of it.
    assert np.shares_memory(ours["full"], ours["row"])
    assert not np.shares_memory(ours["full"], ours["transposed"])


def test_torch_file_nested_checkpoint_and_module_state_dict(tmp_path):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8),
                                 torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2).to(torch.float16))
    sd = module.state_dict()
    ckpt = {"model": sd, "epoch": 3, "cfg": {"lr": 0.1, "name": "x", "betas": (0.9, 0.99)},
            "ema": [torch.full((2,), 5.0)], "params": {"w": torch.nn.Parameter(torch.ones(3))}}
    torch.save(ckpt, tmp_path / "c.pth")
    ours = read_torch_file(tmp_path / "c.pth")
    assert set(ours) == {f"model.{k}" for k in sd} | {"ema.0", "params.w"}
    for k, v in sd.items():
        _assert_bitwise(ours[f"model.{k}"], v)
    assert ours["model.2.num_batches_tracked"].dtype == np.int64
    np.testing.assert_array_equal(ours["ema.0"], [5.0, 5.0])
    np.testing.assert_array_equal(ours["params.w"], [1.0, 1.0, 1.0])


def test_torch_file_select_reads_only_selected_storages(tmp_path):
    torch.save({"keep": torch.arange(4.0), "skip": torch.arange(6.0)}, tmp_path / "s.pth")
    # Zero the bytes of "skip" (storage "1") in place, leaving the recorded CRC stale.
    raw = bytearray((tmp_path / "s.pth").read_bytes())
    storage = torch.arange(6.0).numpy().tobytes()
    assert raw.count(storage) == 1
    at = raw.index(storage)
    raw[at:at + len(storage)] = bytes(len(storage))
    (tmp_path / "bad.pth").write_bytes(raw)

    seen = []
    ours = read_torch_file(tmp_path / "bad.pth", select=lambda k: seen.append(k) or k == "keep")
    assert seen == ["keep", "skip"]
    np.testing.assert_array_equal(ours.pop("keep"), np.arange(4.0, dtype=np.float32))
    assert ours == {}
    with pytest.raises(ValueError, match=r"bad\.pth: record 's/data/1' fails its CRC check"):
        read_torch_file(tmp_path / "bad.pth")


class _Eval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').close()",)


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("payload,global_name", [
    # Protocol 2 spells builtins the Python 2 way, as the file holds it.
    (_Eval, "__builtin__.eval"), (_System, f"{os.system.__module__}.system")])
def test_torch_file_refuses_forbidden_global(tmp_path, payload, global_name):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(2), "x": payload(marker)}, path)
    # The payload is live: an unrestricted load runs it.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(ForbiddenGlobalError, match=rf"evil\.pth: refusing to load global "
                                                   rf"'{global_name}'") as info:
        read_torch_file(path)
    assert info.value.global_name == global_name and info.value.path == str(path)
    assert not marker.exists()


def test_torch_file_truncated_or_corrupt_names_the_file(tmp_path):
    path = tmp_path / "t.pth"
    torch.save({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 30, 10):
        (tmp_path / "cut.pth").write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"cut\.pth: not a zip archive: the file is truncated"):
            read_torch_file(tmp_path / "cut.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.pth: not a zip archive"):
        read_torch_file(tmp_path / "empty.pth")
    with pytest.raises(FileNotFoundError):
        read_torch_file(tmp_path / "absent.pth")


def test_torch_file_tensor_outside_its_storage_is_refused(tmp_path):
    torch.save({"w": torch.arange(5.0)}, tmp_path / "w.pth")

    def grow(name, data):  # size (5,) -> (7,) over a 5-element storage
        if name.endswith("data.pkl"):
            assert data.count(b"K\x05\x85") == 1
            return data.replace(b"K\x05\x85", b"K\x07\x85")
        return data

    _rewrite(tmp_path / "w.pth", tmp_path / "oob.pth", grow)
    with pytest.raises(ValueError, match=r"oob\.pth: .*reaches element 6 of storage '0', which has 5"):
        read_torch_file(tmp_path / "oob.pth")


def test_torch_file_legacy_format_says_to_resave(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match=r"old\.pth: legacy .*re-save it with a current torch"):
        read_torch_file(tmp_path / "old.pth")


def test_torch_file_without_crc(tmp_path):
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"w": torch.arange(3.0)}, tmp_path / "nocrc.pth")
    finally:
        torch.serialization.set_crc32_options(True)
    with zipfile.ZipFile(tmp_path / "nocrc.pth") as zf:
        assert {i.CRC for i in zf.infolist()} == {0}
    np.testing.assert_array_equal(read_torch_file(tmp_path / "nocrc.pth")["w"], [0.0, 1.0, 2.0])


def test_torch_file_big_endian_byteorder(tmp_path):
    gen = torch.Generator().manual_seed(1)
    sd = {str(dt): _random(dt, (2, 3), gen)
          for dt in (torch.float32, torch.bfloat16, torch.int64, torch.complex64, torch.bool,
                     torch.uint16)}
    sd["t"] = sd["torch.float32"].t()  # shares storage "0"
    torch.save(sd, tmp_path / "le.pth")
    dtypes = {str(i): v.dtype for i, v in enumerate(sd.values())}  # storage keys follow dict order

    def to_big(name, data):
        if name.endswith("/byteorder"):
            return b"big"
        if "/data/" in name:
            dtype = dtypes[name.rsplit("/", 1)[1]]
            arr = np.frombuffer(data, np.dtype(_DTYPES[dtype]))
            return arr.byteswap().tobytes()
        return data

    _rewrite(tmp_path / "le.pth", tmp_path / "be.pth", to_big)
    # torch itself reads the crafted file back to the same tensors; except uint16, whose untyped
    # storage (_rebuild_tensor_v3) torch swaps as bytes, i.e. not at all.
    reloaded = torch.load(tmp_path / "be.pth", weights_only=True)
    for k, v in reloaded.items():
        assert torch.equal(v, sd[k]) == (k != "torch.uint16"), k
    ours = read_torch_file(tmp_path / "be.pth")
    for k, v in sd.items():
        _assert_bitwise(ours[k], v)
