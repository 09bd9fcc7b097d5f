"""An on-disk store of frozen SAM image-encoder features, one ``[F, F, C]`` array per canvas.

SAM is frozen in PixelLLM, so its output for a canvas never changes: computed once per (image,
augmentation) and stored beside the data, it spares the training step SAM's forward pass. The
pipeline's ``sam_features`` op (:mod:`data_pipelines.ops.sam_features`) reads the store, the
writer tool fills it (one :class:`ShardWriter` per process, then :func:`finalize`).

Layout of a store directory (numpy and JSON only, nothing pickled)::

    manifest.json                     written last, by finalize: format version, grid F,
                                      channels C, storage dtype, the writer's metadata (SAM
                                      weights' digest, canvas...), the shard list
    features-00000-of-00002.bin       shard 0's rows: [F, F, C] arrays in the storage dtype,
                                      C order, appended one after another
    index-00000-of-00002.json         shard 0's index: entry key -> row, and its row count
    features-00001-of-00002.bin ...   one shard per writing process

An entry is keyed by :func:`entry_key`: the decoded image's digest (:func:`image_key`, so a
picture that several data sets share has one entry per augmentation), the fingerprint of the
geometry ops that made the canvas (:func:`geometry_fingerprint`, so one store can hold several
sources' augmentations) and the augmentation number. A key may sit in several shards (two
processes met the same picture); any copy is used.

Storage dtype ``"float16"`` (default) halves the disk and page cache of ``"float32"``; its
round-trip error is at most half a float16 ulp, 2**-11 relative (largest absolute error over
10**6 unit-normal values: 1.9e-3; the tests check the bound). ``"float32"`` is exact. The
reader always returns float32.

**Crash safety.** A shard's index is written atomically (temporary file, then ``os.replace``)
only after its rows are flushed, so an index never names rows the row file lacks; rows appended
after the last index write are ignored, and a :class:`ShardWriter` reopened on the same shard
cuts them off and continues (an interrupted writer resumes). ``manifest.json`` is written last
and atomically: a directory without one is not a store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

FORMAT = "pixelllm.sam_feature_store"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("float16", "float32")


class FeatureStoreError(ValueError):
    """A store that cannot be read or written as asked; names the file (or directory) and the
    field or key."""


def image_key(image: np.ndarray) -> str:
    """The hex digest (blake2b, 16 bytes) of a decoded image's shape, dtype and pixels: equal
    for the same picture however it was read, different for one changed pixel."""
    image = np.ascontiguousarray(image)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([list(image.shape), image.dtype.str]).encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def geometry_fingerprint(geometry: Sequence[Mapping[str, Any]]) -> str:
    """A short hex digest (8 bytes) of the canonical JSON of geometry op specs (sorted keys):
    the same ops with the same arguments give the same fingerprint, in any config form."""
    text = json.dumps([dict(spec) for spec in geometry], sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def entry_key(image_key: str, geometry_fingerprint: str, augmentation: int) -> str:
    """The store key of augmentation ``augmentation`` of an image under geometry ops."""
    return f"{image_key}-{geometry_fingerprint}-{augmentation}"


def shard_names(shard: int, num_shards: int) -> tuple[str, str]:
    """``(row file, index file)`` names of a shard."""
    suffix = f"{shard:05d}-of-{num_shards:05d}"
    return f"features-{suffix}.bin", f"index-{suffix}.json"


def _write_json_atomically(path: str, value: Any) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as file:
        json.dump(value, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _read_json(path: str) -> dict:
    try:
        with open(path) as file:
            return json.load(file)
    except FileNotFoundError:
        raise FeatureStoreError(f"{path} does not exist") from None
    except json.JSONDecodeError as error:
        raise FeatureStoreError(f"{path} is not valid JSON: {error}") from None


def _field(value: Mapping[str, Any], name: str, *, path: str) -> Any:
    if name not in value:
        raise FeatureStoreError(f"{path} has no {name!r} field")
    return value[name]


def _check_layout(grid: int, channels: int, dtype: str, *, where: str) -> None:
    if grid < 1 or channels < 1:
        raise FeatureStoreError(f"{where}: grid {grid} and channels {channels} must be positive")
    if dtype not in DTYPES:
        raise FeatureStoreError(f"{where}: field 'dtype' is {dtype!r}; expected one of {DTYPES}")


class ShardWriter:
    """Appends feature rows to one shard of a store directory.

    Reopening a shard that was written before (and closed or flushed) continues it: its keys
    are kept, rows past its index are cut off. Adding a key the shard holds already is a no-op
    (a canvas is a function of its key, and so are its features).

    Args:
      directory: the store directory (created if missing).
      shard: this writer's shard (the process index in a multi-host writer).
      num_shards: shards of the store (the process count).
      grid: F, the features' side.
      channels: C, the features' channels.
      dtype: the storage dtype, ``"float16"`` (half the disk) or ``"float32"`` (exact).
    """

    def __init__(self, directory: str | os.PathLike, *, shard: int, num_shards: int, grid: int,
                 channels: int, dtype: str = "float16"):
        if not 0 <= shard < num_shards:
            raise FeatureStoreError(f"shard {shard} is not in [0, {num_shards})")
        self.directory = os.fspath(directory)
        _check_layout(grid, channels, dtype, where=f"store {self.directory}")
        self.grid, self.channels, self.dtype = grid, channels, dtype
        self._row_bytes = grid * grid * channels * np.dtype(dtype).itemsize
        os.makedirs(self.directory, exist_ok=True)
        rows_name, index_name = shard_names(shard, num_shards)
        self._rows_path = os.path.join(self.directory, rows_name)
        self._index_path = os.path.join(self.directory, index_name)
        self._keys: dict[str, int] = {}
        if os.path.exists(self._index_path):
            self._keys = self._resume()
        with open(self._rows_path, "ab") as file:
            file.truncate(len(self._keys) * self._row_bytes)
        self._file = open(self._rows_path, "ab")

    def _resume(self) -> dict[str, int]:
        index = _read_json(self._index_path)
        layout = {name: _field(index, name, path=self._index_path)
                  for name in ("grid", "channels", "dtype", "rows", "keys")}
        for name, value in (("grid", self.grid), ("channels", self.channels),
                            ("dtype", self.dtype)):
            if layout[name] != value:
                raise FeatureStoreError(f"{self._index_path}: field {name!r} is {layout[name]!r}"
                                        f", this writer's is {value!r} (write a new store)")
        size = os.path.getsize(self._rows_path) if os.path.exists(self._rows_path) else 0
        if size < layout["rows"] * self._row_bytes:
            raise FeatureStoreError(f"{self._rows_path} holds {size // self._row_bytes} rows, "
                                    f"{self._index_path} field 'rows' says {layout['rows']}")
        return dict(layout["keys"])

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: str, features: np.ndarray) -> None:
        """Appends ``features`` (float ``[F, F, C]``) under ``key``."""
        if self._file.closed:
            raise FeatureStoreError(f"{self._rows_path}: add after close")
        features = np.asarray(features)
        expected = (self.grid, self.grid, self.channels)
        if features.shape != expected:
            raise FeatureStoreError(f"store {self.directory}: features of {key!r} have shape "
                                    f"{features.shape}, the store holds [F, F, C] = {expected}")
        if key in self._keys:
            return
        with np.errstate(over="ignore"):  # overflow is reported below, with the remedy
            stored = np.ascontiguousarray(features, dtype=self.dtype)
        if not np.isfinite(stored).all():
            raise FeatureStoreError(
                f"store {self.directory}: features of {key!r} are not finite in {self.dtype}"
                + (" (beyond float16's range: write with dtype='float32')"
                   if np.isfinite(features).all() else ""))
        self._file.write(stored.tobytes())
        self._keys[key] = len(self._keys)

    def flush(self) -> None:
        """Makes the rows added so far durable and indexed (a checkpoint for long writers)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        _write_json_atomically(self._index_path, {
            "grid": self.grid, "channels": self.channels, "dtype": self.dtype,
            "rows": len(self._keys), "keys": self._keys})

    def close(self) -> None:
        """Flushes (:meth:`flush`) and closes the row file."""
        if not self._file.closed:
            self.flush()
            self._file.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def finalize(directory: str | os.PathLike, *, num_shards: int,
             metadata: Mapping[str, Any]) -> None:
    """Writes ``manifest.json`` once every shard's index is there (call it after all writers
    closed, on one process, after a barrier).

    Args:
      directory: the store directory.
      num_shards: the shards the writers wrote.
      metadata: free-form JSON-serializable facts about the features (the SAM weights' digest,
        the canvas), kept in the manifest for the readers' checks.
    """
    directory = os.fspath(directory)
    layouts, shards = set(), []
    for shard in range(num_shards):
        rows_name, index_name = shard_names(shard, num_shards)
        index_path = os.path.join(directory, index_name)
        if not os.path.exists(index_path):
            raise FeatureStoreError(f"store {directory}: shard {shard} of {num_shards} has no "
                                    f"index {index_path} (did its writer close?)")
        index = _read_json(index_path)
        layouts.add(tuple(_field(index, name, path=index_path)
                          for name in ("grid", "channels", "dtype")))
        shards.append({"features": rows_name, "index": index_name,
                       "rows": _field(index, "rows", path=index_path)})
    if len(layouts) != 1:
        raise FeatureStoreError(f"store {directory}: shards disagree on (grid, channels, dtype): "
                                f"{sorted(layouts)}")
    [(grid, channels, dtype)] = layouts
    _write_json_atomically(os.path.join(directory, MANIFEST), {
        "format": FORMAT, "version": VERSION, "grid": grid, "channels": channels,
        "dtype": dtype, "metadata": dict(metadata), "shards": shards})


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A store's ``manifest.json``."""

    grid: int
    channels: int
    dtype: str
    metadata: dict
    shards: list[dict]


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """The manifest of the store in ``directory`` (cheap: no index is read)."""
    path = os.path.join(os.fspath(directory), MANIFEST)
    if not os.path.exists(path):
        raise FeatureStoreError(f"{path} does not exist: {os.fspath(directory)} is not a "
                                "finished SAM feature store (run the cache writer)")
    manifest = _read_json(path)
    if manifest.get("format") != FORMAT:
        raise FeatureStoreError(f"{path}: field 'format' is {manifest.get('format')!r}, "
                                f"expected {FORMAT!r}")
    version = _field(manifest, "version", path=path)
    if version != VERSION:
        raise FeatureStoreError(f"{path}: field 'version' is {version!r}; this reader knows "
                                f"version {VERSION} (rewrite the cache)")
    out = Manifest(**{name: _field(manifest, name, path=path)
                      for name in ("grid", "channels", "dtype", "metadata", "shards")})
    _check_layout(out.grid, out.channels, out.dtype, where=path)
    return out


class FeatureStore:
    """Read access to a finished store: memory-mapped row files, merged indices.

    Thread-safe for reading (the maps are read-only). Holds every key in memory (about 150
    bytes each).
    """

    def __init__(self, directory: str, manifest: Manifest, keys: dict[str, tuple[int, int]],
                 rows: list[np.ndarray | None]):
        self.directory = directory
        self.manifest = manifest
        self._keys = keys
        self._rows = rows

    @classmethod
    def open(cls, directory: str | os.PathLike) -> FeatureStore:
        """Opens the store in ``directory``; raises :class:`FeatureStoreError` naming the file
        and field of a missing manifest, an unknown version or a row file shorter than its
        index."""
        directory = os.fspath(directory)
        manifest = read_manifest(directory)
        shape = (manifest.grid, manifest.grid, manifest.channels)
        row_bytes = int(np.prod(shape)) * np.dtype(manifest.dtype).itemsize
        keys: dict[str, tuple[int, int]] = {}
        rows: list[np.ndarray | None] = []
        for number, shard in enumerate(manifest.shards):
            index_path = os.path.join(directory, shard["index"])
            rows_path = os.path.join(directory, shard["features"])
            index = _read_json(index_path)
            count = _field(index, "rows", path=index_path)
            size = os.path.getsize(rows_path) if os.path.exists(rows_path) else 0
            if size < count * row_bytes:
                raise FeatureStoreError(f"{rows_path} holds {size // row_bytes} rows of "
                                        f"{row_bytes} bytes, {index_path} field 'rows' says "
                                        f"{count}")
            # np.memmap refuses empty files; a shard may have no rows (a process with none).
            rows.append(np.memmap(rows_path, dtype=manifest.dtype, mode="r",
                                  shape=(count, *shape)) if count else None)
            keys.update((key, (number, row))
                        for key, row in _field(index, "keys", path=index_path).items())
        return cls(directory, manifest, keys, rows)

    @property
    def grid(self) -> int:
        return self.manifest.grid

    @property
    def channels(self) -> int:
        return self.manifest.channels

    @property
    def metadata(self) -> dict:
        return self.manifest.metadata

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def get(self, key: str) -> np.ndarray:
        """The features of ``key``: float32 ``[F, F, C]``, a fresh array."""
        try:
            shard, row = self._keys[key]
        except KeyError:
            raise FeatureStoreError(
                f"SAM feature store {self.directory} has no entry {key!r}: the cache is stale "
                "for this data or augmentation setting; rerun the cache writer") from None
        return np.array(self._rows[shard][row], dtype=np.float32)
