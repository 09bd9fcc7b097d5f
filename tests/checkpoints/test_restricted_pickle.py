"""Hostile inputs, built by hand, for the one restricted unpickler and the .pth / shard readers:
each is refused quickly, within bounded memory, with an error that names the file."""

import json
import pickle
import re
import struct
import time
import zipfile

import numpy as np
import pytest
import torch

from pixelllm.checkpoints.restricted_pickle import (
    PickleStructureError, UnsafePickleError, load_data_pickle)
from pixelllm.checkpoints.state_dict import read_state_dict
from pixelllm.checkpoints.torch_file import read_torch_file


def _laughs(levels: int) -> list:
    """A value of 2**levels leaves that pickles to a few hundred bytes: each list holds the
    previous one twice, through the memo."""
    value: list = []
    for _ in range(levels):
        value = [value, value]
    return value


def _deep(levels: int, *, key: bytes | None = None) -> bytes:
    """``[[[...]]]`` nested ``levels`` deep, as opcodes (pickle.dumps itself would recurse);
    with ``key``, inside ``{key: ...}``."""
    lists = b"]" * levels + b"a" * (levels - 1)
    if key is None:
        return b"\x80\x02" + lists + b"."
    return b"\x80\x02}X" + struct.pack("<I", len(key)) + key + lists + b"s."


# d = {"a": d}: EMPTY_DICT, BINPUT 0, BINUNICODE "a", BINGET 0, SETITEM.
_SELF_CONTAINING = b"\x80\x02}q\x00X\x01\x00\x00\x00ah\x00s."


def _write(tmp_path, name: str, payload: bytes):
    path = tmp_path / name
    path.write_bytes(payload)
    return path


@pytest.mark.parametrize("payload, error, message", [
    (pickle.dumps(_laughs(60), protocol=2), PickleStructureError, "billion laughs"),
    (_deep(5000), PickleStructureError, "nests deeper than 100 levels"),
    (_SELF_CONTAINING, PickleStructureError, "contains itself"),
    # BINBYTES8 declaring 1 TiB in a 15-byte file.
    (b"\x80\x04\x8e" + (1 << 40).to_bytes(8, "little") + b"abc.", pickle.UnpicklingError,
     "argument of BINBYTES8 runs past the end of the file"),
    # A frame declaring 1 TiB.
    (b"\x80\x04\x95" + (1 << 40).to_bytes(8, "little") + b"N.", pickle.UnpicklingError,
     "a frame of 1099511627776 bytes"),
    # LONG_BINPUT at index 2**31 - 1: the C unpickler would size its memo to it.
    (b"\x80\x02]r\xff\xff\xff\x7f.", pickle.UnpicklingError, "LONG_BINPUT memo index 2147483647"),
    (b"(S'true'\nios\nsystem\n.", UnsafePickleError, r"opcode INST \(global os\.system\)"),
    (b"\x80\x02\x82\xf0)R.", UnsafePickleError, "opcode EXT1"),
])
def test_hostile_data_pickles_are_refused_naming_the_file(tmp_path, payload, error, message):
    path = _write(tmp_path, "refs(unc).p", payload)
    start = time.perf_counter()
    with pytest.raises(error, match=message) as raised:
        load_data_pickle(path)
    assert str(raised.value).startswith(f"{path}: ")
    assert time.perf_counter() - start < 5


def test_shared_references_within_the_file_size_still_load(tmp_path):
    # Sharing is legitimate while the expanded value stays within the file's size.
    strings = [b"the same sentence"] * 50
    path = _write(tmp_path, "refs.p", pickle.dumps([strings, strings], protocol=4))
    assert load_data_pickle(path) == [["the same sentence"] * 50] * 2


def _patch_central_directory(data: bytes, name: str, *, file_size: int | None = None,
                             compress_size: int | None = None) -> bytes:
    """``data`` (a zip) with the central-directory sizes of record ``name`` replaced."""
    out = bytearray(data)
    position = out.find(b"PK\x01\x02")
    while position >= 0:
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", out, position + 28)
        if out[position + 46:position + 46 + name_len].decode() == name:
            if compress_size is not None:
                struct.pack_into("<I", out, position + 20, compress_size)
            if file_size is not None:
                struct.pack_into("<I", out, position + 24, file_size)
            return bytes(out)
        position = out.find(b"PK\x01\x02", position + 46 + name_len + extra_len + comment_len)
    raise AssertionError(f"no record {name}")


def _torch_zip(path, records: dict[str, bytes], *, deflated: tuple[str, ...] = ()):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in records.items():
            zf.writestr(name, data, zipfile.ZIP_DEFLATED if name in deflated else zipfile.ZIP_STORED)
    return path


def _records(value) -> dict[str, bytes]:
    buffer = torch.serialization.io.BytesIO()
    torch.save(value, buffer)
    with zipfile.ZipFile(buffer) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def test_pth_billion_laughs_deep_and_self_containing_are_refused(tmp_path):
    laughs = _torch_zip(tmp_path / "laughs.pth",
                        _records({"w": torch.ones(2), "tree": _laughs(60)}))
    with pytest.raises(PickleStructureError, match=rf"{laughs}: .*billion laughs"):
        read_torch_file(laughs)
    records = _records({"w": torch.ones(2)})
    pkl = next(name for name in records if name.endswith("/data.pkl"))
    for payload, message in ((_deep(5000, key=b"w"), "nests deeper"),
                             (_SELF_CONTAINING, "contains itself")):
        path = _torch_zip(tmp_path / "nested.pth", {**records, pkl: payload})
        with pytest.raises(PickleStructureError, match=rf"{path}: .*{message}"):
            read_torch_file(path)


def test_pth_opcodes_outside_the_torch_allowance_are_refused(tmp_path):
    records = _records({"w": torch.ones(2)})
    pkl = next(name for name in records if name.endswith("/data.pkl"))
    path = _torch_zip(tmp_path / "ext.pth", {**records, pkl: b"\x80\x02\x82\xf0)R."})
    with pytest.raises(UnsafePickleError, match=rf"{path}: byte 2: opcode EXT1"):
        read_torch_file(path)


def test_pth_storage_claiming_more_than_its_record_is_refused_before_reading(tmp_path):
    records = _records({"w": torch.ones(4)})
    pkl = next(name for name in records if name.endswith("/data.pkl"))
    # The storage table's element count: BININT1 4 after the location string (and its memo
    # slot) -> BININT 2**30.
    storage_id = re.compile(rb"(X\x03\x00\x00\x00cpuq.)K\x04", re.DOTALL)
    assert len(storage_id.findall(records[pkl])) == 1
    patched = storage_id.sub(lambda m: m.group(1) + b"J" + (1 << 30).to_bytes(4, "little"),
                             records[pkl])
    path = _torch_zip(tmp_path / "big_storage.pth", {**records, pkl: patched})
    with pytest.raises(ValueError, match=rf"{path}: storage '0' has 16 bytes, the pickle says "
                                         r"4294967296"):
        read_torch_file(path)


def test_pth_record_claiming_more_than_the_file_is_refused(tmp_path):
    records = _records({"w": torch.ones(4)})
    storage = next(name for name in records if name.endswith("/data/0"))
    path = _torch_zip(tmp_path / "long_record.pth", records)
    path.write_bytes(_patch_central_directory(path.read_bytes(), storage,
                                              file_size=1 << 31, compress_size=1 << 31))
    with pytest.raises(ValueError, match=rf"{path}: record '{storage}' claims 2147483648 bytes"):
        read_torch_file(path)


def test_pth_compressed_record_inflating_past_its_declared_size_is_refused(tmp_path):
    records = _records({"w": torch.zeros(1000)})
    storage = next(name for name in records if name.endswith("/data/0"))
    path = _torch_zip(tmp_path / "deflated.pth", records, deflated=(storage,))
    np.testing.assert_array_equal(read_torch_file(path)["w"], np.zeros(1000, np.float32))
    with zipfile.ZipFile(path) as zf:
        compressed = zf.getinfo(storage).compress_size
    # Declared smaller than what the data inflates to.
    path.write_bytes(_patch_central_directory(path.read_bytes(), storage, file_size=16))
    with pytest.raises(ValueError, match=rf"{path}: .*(storage '0' has 16 bytes|inflate)"):
        read_torch_file(path)
    # Declared larger than deflate can produce from its compressed bytes (a zip bomb's header).
    path.write_bytes(_patch_central_directory(path.read_bytes(), storage,
                                              file_size=2000 * compressed))
    with pytest.raises(ValueError, match=rf"{path}: record '{storage}' claims to inflate"):
        read_torch_file(path)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/absolute.safetensors",
                                   "sub/../../outside.safetensors"])
def test_shard_index_paths_must_stay_in_the_index_folder(tmp_path, shard):
    folder = tmp_path / "model"
    folder.mkdir()
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(ValueError, match=rf"{index}: its weight_map names shard\(s\) outside"):
        read_state_dict(index)
