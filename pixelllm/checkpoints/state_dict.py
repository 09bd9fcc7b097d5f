"""One entry point for reading a public checkpoint into ``{torch key: numpy array}``.

Converters take that flat mapping, with the source's own key names and layouts. The file kind is
chosen from the path: ``.safetensors``, a ``torch.save`` file (``.pth``, ``.pt``, ``.bin``,
``.ckpt``), a Hugging Face shard index (``*.index.json``, whose ``weight_map`` names the shard of
every key), or a directory holding one of those.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from pixelllm.checkpoints.safetensors_file import read_safetensors
from pixelllm.checkpoints.torch_file import read_torch_file

_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_SHOWN = 20


def _listing(keys) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _read_file(path: Path, select: Callable[[str], bool]) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        return read_safetensors(path, select=select)
    if path.suffix in _TORCH_SUFFIXES:
        return read_torch_file(path, select=select)
    raise ValueError(f"{path}: unknown checkpoint kind; expected .safetensors, "
                     f"{', '.join(_TORCH_SUFFIXES)} or a *.index.json shard index")


def _read_sharded(index: Path, select: Callable[[str], bool]) -> dict[str, np.ndarray]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a shard index (no JSON 'weight_map'): {e}") from e
    if not (isinstance(weight_map, dict)
            and all(isinstance(v, str) for v in weight_map.values())):
        raise ValueError(f"{index}: 'weight_map' must map each key to a shard file name")
    shards = sorted(set(weight_map.values()))
    folder = index.parent.resolve()
    outside = [s for s in shards
               if Path(s).is_absolute() or not (folder / s).resolve().is_relative_to(folder)]
    if outside:
        raise ValueError(f"{index}: its weight_map names shard(s) outside {index.parent}: "
                         f"{', '.join(outside)}; shards must be files in the index's folder")
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise FileNotFoundError(f"{index}: {len(missing)} shard(s) listed in its weight_map are "
                                f"missing from {index.parent}: {', '.join(missing)}")
    out: dict[str, np.ndarray] = {}
    for shard in shards:
        tensors = _read_file(index.parent / shard, select)
        expected = {k for k, s in weight_map.items() if s == shard and select(k)}
        absent, extra = expected - tensors.keys(), tensors.keys() - expected
        if absent or extra:
            lines = [f"{index}: shard '{shard}' does not hold the keys its weight_map lists"]
            if absent:
                lines.append(f"  {len(absent)} listed but not in the shard: {_listing(absent)}")
            if extra:
                lines.append(f"  {len(extra)} in the shard but listed elsewhere or not at all: "
                             f"{_listing(extra)}")
            raise ValueError("\n".join(lines))
        out.update(tensors)
    return out


def _resolve(directory: Path) -> Path:
    """The one checkpoint in ``directory``, preferring safetensors as transformers does."""
    everything = sorted(p for p in directory.iterdir() if p.is_file())
    tiers = [
        [p for p in everything if p.name.endswith(".safetensors.index.json")],
        [p for p in everything if p.suffix == ".safetensors"],
        [p for p in everything if p.name.endswith(".index.json")],
        [p for p in everything if p.suffix in _TORCH_SUFFIXES],
    ]
    for candidates in tiers:
        if len(candidates) == 1:
            return candidates[0]
        if candidates:
            names = ", ".join(p.name for p in candidates)
            raise ValueError(f"{directory}: several checkpoints ({names}); pass the one to read")
    raise FileNotFoundError(f"{directory}: no checkpoint (*.safetensors, *.index.json, "
                            f"{', '.join('*' + s for s in _TORCH_SUFFIXES)})")


def checkpoint_file(path: str | Path) -> Path:
    """The file :func:`read_state_dict` reads for ``path``: ``path`` itself, or the one checkpoint
    (or shard index) in a directory; the name error messages about its contents should carry."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    return _resolve(path) if path.is_dir() else path


def state_dict_and_source(checkpoint: str | Path | Mapping[str, np.ndarray], *, what: str
                          ) -> tuple[Mapping[str, np.ndarray], str]:
    """``(state dict, name for error messages)`` of a loader's ``checkpoint`` argument: a state
    dict given as is (named ``"<what> state dict"``), or a path read by :func:`read_state_dict`
    (named by :func:`checkpoint_file`)."""
    if isinstance(checkpoint, Mapping):
        return checkpoint, f"{what} state dict"
    return read_state_dict(checkpoint), str(checkpoint_file(checkpoint))


def read_state_dict(path: str | Path, *, prefix: str = "") -> dict[str, np.ndarray]:
    """``{key: array}`` for every tensor of a checkpoint file, shard index or directory.

    Keys are the source's own names; nested dicts of a ``torch.save`` file are joined with ``.``
    (``{"model": state_dict}`` gives ``"model.<key>"``). ``prefix`` (e.g. ``"model"``) keeps only
    the keys under that dotted prefix, with it removed, and reads nothing else: the way to take
    the model out of a training checkpoint, or one tower out of a larger model.

    Raises ``ValueError`` naming the file if it is unreadable or holds no tensor under ``prefix``
    (the message lists the top-level key groups it does hold), ``FileNotFoundError`` for a missing
    file or shard, and :class:`~pixelllm.checkpoints.torch_file.ForbiddenGlobalError` for a
    pickle that names anything but tensors.
    """
    path = checkpoint_file(path)
    head = prefix.rstrip(".") + "." if prefix else ""
    seen: set[str] = set()

    def select(key: str) -> bool:
        seen.add(key)
        return key.startswith(head)

    if path.name.endswith(".index.json"):
        tensors = _read_sharded(path, select)
    else:
        tensors = _read_file(path, select)
    if not tensors:
        groups = collections.Counter(k.split(".")[0] for k in seen)
        held = ", ".join(f"{g} ({n})" for g, n in sorted(groups.items())) or "none"
        raise ValueError(f"{path}: no tensors" + (f" under '{head}'" if head else "")
                         + f"; top-level key groups (tensor count): {held}")
    return {k[len(head):]: v for k, v in tensors.items()}
