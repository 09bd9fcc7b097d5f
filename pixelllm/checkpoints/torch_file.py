"""Reading ``torch.save`` files (``.pth``, ``.pt``, ``.bin``) into numpy, without torch.

A ``torch.save`` file is a zip archive ``<name>/data.pkl`` (the pickled object) plus one
uncompressed record ``<name>/data/<key>`` per storage and ``<name>/byteorder``. Unpickling runs
whatever callables the pickle names, so ``data.pkl`` goes through the project's restricted
unpickler (:mod:`pixelllm.checkpoints.restricted_pickle`), which here resolves only the handful of
globals a dict of tensors needs and refuses every other one (``os.system``, ``builtins.eval``,
...) before it can run. Tensors come back as lazy references; only the storages of the tensors
the caller selects are read, each once.

Sizes are checked before anything is allocated: a record may not claim more bytes than the file
has after it, a storage record must hold exactly the bytes the pickle's storage table gives it,
and a compressed record may not inflate past its declared size (nor declare more than deflate can
produce from its compressed bytes).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import pickle
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from pixelllm.checkpoints import restricted_pickle

# torch.save writes legacy typed-storage classes for these dtypes...
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}
# ... and for the others an UntypedStorage (bytes) plus the dtype, pickled by its name.
_TORCH_DTYPES = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint64": np.dtype(np.uint64),
    "uint32": np.dtype(np.uint32),
    "uint16": np.dtype(np.uint16),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
}
_REBUILDERS = {"_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
               "_rebuild_parameter_with_state"}
# Start of every pre-1.6 (non-zip) torch.save file: pickle protocol 2, then LONG1 of its magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
_LOCAL_HEADER = struct.Struct("<4s22xHH")
# Deflate emits at most 258 bytes per 2 bits of input (about 1032:1); a record claiming more than
# this many times its compressed size is corrupt or a zip bomb.
_MAX_INFLATION = 1032
_CHUNK = 1 << 20


class ForbiddenGlobalError(restricted_pickle.UnsafePickleError):
    """The pickle names a global that a checkpoint of tensors has no use for; nothing was run."""

    def __init__(self, path: str, global_name: str):
        self.path = path
        self.global_name = global_name
        super().__init__(
            f"{path}: refusing to load global '{global_name}': a checkpoint of tensors only needs "
            "collections.OrderedDict, torch._utils._rebuild_* and torch storage/dtype names. The file "
            "may be malicious; if you trust it, re-save just its tensors "
            "(torch.save(model.state_dict(), path)) and read that.")


# Per-load sentinels, created fresh on each lookup so a pickle cannot mutate shared objects.
@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
    dtype: np.dtype | None  # None: UntypedStorage, counted in bytes.


@dataclasses.dataclass(frozen=True, slots=True)
class _TorchDtype:
    dtype: np.dtype


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageRef:
    key: str
    dtype: np.dtype | None
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * (1 if self.dtype is None else self.dtype.itemsize)


@dataclasses.dataclass(frozen=True, slots=True)
class _TensorRef:
    storage: _StorageRef
    dtype: np.dtype
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # In elements, as torch counts them.


class _TensorRecords:
    """What ``data.pkl`` may name: the globals and storage ids of a dict of tensors."""

    def __init__(self, *, path: str):
        self._path = path

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in _REBUILDERS:
            # Bound methods: a pickle cannot set attributes on them (BUILD), unlike on functions.
            return getattr(self, name)
        if module in ("torch", "torch.storage") and name == "UntypedStorage":
            return _StorageType(None)
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return _TorchDtype(_TORCH_DTYPES[name])
        raise ForbiddenGlobalError(self._path, f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and isinstance(pid[4], int) and pid[4] >= 0):
            raise pickle.UnpicklingError(f"{self._path}: unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        return _StorageRef(key=key, dtype=storage_type.dtype, numel=numel)

    def _tensor(self, storage, offset, size, stride, dtype) -> _TensorRef:
        if not (isinstance(storage, _StorageRef) and isinstance(offset, int) and offset >= 0
                and isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
                and all(isinstance(n, int) and n >= 0 for n in size)
                and all(isinstance(s, int) and s >= 0 for s in stride)):
            raise pickle.UnpicklingError(
                f"{self._path}: malformed tensor record (offset={offset!r}, size={size!r}, "
                f"stride={stride!r})")
        elements = storage.nbytes // dtype.itemsize
        if math.prod(size) > 0:
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= elements:
                raise pickle.UnpicklingError(
                    f"{self._path}: tensor (offset {offset}, size {size}, stride {stride}) reaches "
                    f"element {last} of storage '{storage.key}', which has {elements}")
        return _TensorRef(storage=storage, dtype=dtype, offset=offset, shape=size, strides=stride)

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False,
                           backward_hooks=None, metadata=None):
        if not isinstance(storage, _StorageRef) or storage.dtype is None:
            raise pickle.UnpicklingError(f"{self._path}: _rebuild_tensor_v2 needs a typed storage")
        return self._tensor(storage, storage_offset, size, stride, storage.dtype)

    def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad, backward_hooks,
                           dtype, metadata=None):
        if not isinstance(dtype, _TorchDtype):
            raise pickle.UnpicklingError(f"{self._path}: _rebuild_tensor_v3 needs a dtype")
        return self._tensor(storage, storage_offset, size, stride, dtype.dtype)

    def _rebuild_parameter(self, data, requires_grad, backward_hooks):
        return data

    def _rebuild_parameter_with_state(self, data, requires_grad, backward_hooks, state):
        return data


class _Archive:
    """The records of one ``torch.save`` zip, read straight into numpy buffers."""

    def __init__(self, path: str, file, zf: zipfile.ZipFile):
        self.path, self._file, self._zip = path, file, zf
        self._file_size = os.fstat(file.fileno()).st_size
        pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{path}: not a torch.save archive (expected one '<name>/data.pkl', "
                             f"found {pickles})")
        self.prefix = pickles[0][: -len("data.pkl")]
        if self.prefix + "constants.pkl" in zf.namelist():
            raise ValueError(f"{path}: a TorchScript archive (torch.jit.save), not a torch.save "
                             "state dict; save model.state_dict() with torch.save and read that")
        # Files from before the byteorder record existed were all little-endian.
        order = (self.read(self.prefix + "byteorder").tobytes()
                 if self.prefix + "byteorder" in zf.namelist() else b"little")
        if order not in (b"little", b"big"):
            raise ValueError(f"{path}: unknown byteorder record {order!r}")
        self.swap = order.decode() != sys.byteorder

    def size(self, name: str) -> int:
        """The declared (inflated) size of record ``name``, checked against the file."""
        try:
            info = self._zip.getinfo(name)
        except KeyError:
            raise ValueError(f"{self.path}: record '{name}' is missing: corrupt file") from None
        stored = info.compress_type == zipfile.ZIP_STORED
        held = info.file_size if stored else info.compress_size
        if info.header_offset + held > self._file_size:
            raise ValueError(f"{self.path}: record '{name}' claims {held} bytes at offset "
                             f"{info.header_offset}, past the end of the {self._file_size}-byte "
                             "file: corrupt file")
        if not stored and info.file_size > _MAX_INFLATION * max(info.compress_size, 1):
            raise ValueError(f"{self.path}: record '{name}' claims to inflate {info.compress_size} "
                             f"bytes to {info.file_size}, more than deflate can: corrupt file or "
                             "zip bomb")
        return info.file_size

    def read(self, name: str) -> np.ndarray:
        """One record as a writable uint8 array, CRC-checked; sizes are checked first."""
        size = self.size(name)
        info = self._zip.getinfo(name)
        if info.compress_type != zipfile.ZIP_STORED:
            return self._inflate(info, size)
        self._file.seek(info.header_offset)
        header = self._file.read(_LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
            raise ValueError(f"{self.path}: bad zip header for record '{name}': corrupt file")
        _, name_len, extra_len = _LOCAL_HEADER.unpack(header)
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        if start + size > self._file_size:
            raise ValueError(f"{self.path}: record '{name}' is truncated ({size} bytes declared, "
                             f"{max(self._file_size - start, 0)} in the file)")
        self._file.seek(start)
        data = np.empty(size, np.uint8)
        view, filled = memoryview(data), 0
        while filled < size:
            n = self._file.readinto(view[filled:])
            if not n:
                raise ValueError(f"{self.path}: record '{name}' is truncated "
                                 f"({filled} of {size} bytes)")
            filled += n
        # torch.serialization.set_crc32_options(False) writes CRC 0 instead of the checksum.
        if info.CRC != 0 and zlib.crc32(data) != info.CRC:
            raise ValueError(f"{self.path}: record '{name}' fails its CRC check: corrupt file")
        return data

    def _inflate(self, info: zipfile.ZipInfo, size: int) -> np.ndarray:
        """A compressed record, in chunks, refused as soon as it passes its declared size."""
        out = bytearray()
        try:
            with self._zip.open(info) as member:  # zipfile checks the CRC at the end.
                # zipfile stops at the declared size itself; this loop does not rely on it.
                while chunk := member.read(_CHUNK):
                    out += chunk
                    if len(out) > size:
                        break
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise ValueError(f"{self.path}: record '{info.filename}' does not inflate: {e}") from e
        if len(out) != size:
            raise ValueError(f"{self.path}: record '{info.filename}' inflates to "
                             f"{'more than' if len(out) > size else len(out)} bytes; its header "
                             f"declares {size}: corrupt file")
        return np.frombuffer(out, np.uint8)


def _open(path: str, file) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(file)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, struct.error):
        file.seek(0)
        start = file.read(len(_LEGACY_MAGIC))
        if start == _LEGACY_MAGIC:
            raise ValueError(
                f"{path}: legacy (pre-1.6, non-zip) torch.save format, which is not supported; "
                "re-save it with a current torch: "
                "torch.save(torch.load(path, weights_only=True), new_path)") from None
        raise ValueError(f"{path}: not a zip archive: the file is truncated or corrupt, or not a "
                         "torch.save file") from None


def _flatten(tree: Any, prefix: str, out: dict[str, _TensorRef],
             walk: restricted_pickle.Walk, path: str) -> None:
    walk.visit()
    if isinstance(tree, _TensorRef):
        if prefix in out:
            raise ValueError(
                f"{path}: key '{prefix}' occurs twice once nested keys are joined by '.'")
        out[prefix] = tree
    elif isinstance(tree, Mapping):
        with walk.enter(tree):
            for k, v in tree.items():
                _flatten(v, f"{prefix}.{k}" if prefix else str(k), out, walk, path)
    elif isinstance(tree, (list, tuple)):
        with walk.enter(tree):
            for i, v in enumerate(tree):
                _flatten(v, f"{prefix}.{i}" if prefix else str(i), out, walk, path)
    # Anything else (epoch counters, config strings, ...) holds no weights.


def _materialize(ref: _TensorRef, elements: np.ndarray) -> np.ndarray:
    if 0 in ref.shape:
        return np.empty(ref.shape, ref.dtype)
    item = ref.dtype.itemsize
    # Through the byte buffer: numpy re-checks that the strided tensor stays inside it.
    view = np.ndarray(ref.shape, ref.dtype, buffer=elements.view(np.uint8),
                      offset=ref.offset * item, strides=tuple(s * item for s in ref.strides))
    # Contiguous tensors stay views of their storage (no second copy); torch's own views of one
    # storage come back sharing memory the same way.
    return view if view.flags.c_contiguous else np.ascontiguousarray(view)


def read_torch_file(path: str | Path, *,
                    select: Callable[[str], bool] | None = None) -> dict[str, np.ndarray]:
    """Every tensor of a ``torch.save`` file, as ``{key: array}``, reading only what is selected.

    Nested dicts (``{"model": state_dict, "epoch": 3}``) are flattened with ``.`` (lists and tuples
    by index), so the model's tensors come back as ``"model.<key>"``; non-tensor values are
    dropped. ``select(key)`` is called once per tensor key; only the storages of keys it accepts
    are read (default: all). Arrays keep the tensors' dtypes (``ml_dtypes.bfloat16`` for
    bfloat16); tensors that shared a storage in torch may share memory.

    Raises :class:`ForbiddenGlobalError` if the pickle names anything but what a dict of tensors
    needs (:class:`~pixelllm.checkpoints.restricted_pickle.UnsafePickleError` for a refused
    opcode), :class:`~pixelllm.checkpoints.restricted_pickle.PickleStructureError` for shared
    references beyond the pickle's size, deep nesting or a cycle, and ``ValueError`` naming the
    file if it is truncated, corrupt, claims sizes it does not hold or is in the pre-1.6 format.
    """
    path = str(path)
    with open(path, "rb") as file, _open(path, file) as zf:
        archive = _Archive(path, file, zf)
        data = archive.read(archive.prefix + "data.pkl").tobytes()
        records = _TensorRecords(path=path)
        try:
            tree = restricted_pickle.restricted_load(
                data, name=path, allowed=restricted_pickle.DATA_OPCODES
                | restricted_pickle.TORCH_OPCODES, resolve=records.find_class,
                persistent_load=records.persistent_load, encoding="utf-8")
        except restricted_pickle.UnsafePickleError:
            raise
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path}: cannot unpickle data.pkl ({e}): the file is corrupt or not "
                             "a state dict") from e
        if not isinstance(tree, Mapping):
            held = "a single tensor" if isinstance(tree, _TensorRef) else type(tree).__name__
            raise ValueError(f"{path}: holds {held}, not a dict of tensors")
        refs: dict[str, _TensorRef] = {}
        _flatten(tree, "", refs, restricted_pickle.Walk(name=path, budget=len(data)), path)
        raws: dict[str, np.ndarray] = {}
        elements: dict[tuple[str, np.dtype], np.ndarray] = {}
        out = {}
        for key, ref in refs.items():
            if select is not None and not select(key):
                continue
            storage = ref.storage
            if storage.key not in raws:
                record = f"{archive.prefix}data/{storage.key}"
                declared = archive.size(record)
                if declared != storage.nbytes:
                    raise ValueError(f"{path}: storage '{storage.key}' has {declared} bytes, the "
                                     f"pickle says {storage.nbytes}: corrupt file")
                raws[storage.key] = archive.read(record)
            if (storage.key, ref.dtype) not in elements:
                raw = raws[storage.key]
                typed = raw[: raw.size - raw.size % ref.dtype.itemsize].view(ref.dtype)
                elements[storage.key, ref.dtype] = typed.byteswap() if archive.swap else typed
            out[key] = _materialize(ref, elements[storage.key, ref.dtype])
        return out
