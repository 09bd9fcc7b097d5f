"""One vocabulary for converting a public checkpoint's tensors into a model's parameters.

A key map is a sequence of :class:`Rule`\\ s, each mapping a source key pattern to a model path
pattern plus a :class:`Transform`::

    Rule("blocks.{i}.attn.qkv.weight", "blocks/{i}/attn/qkv/kernel", TRANSPOSE)

``{name}`` placeholders match a decimal index and carry it from the source key to the path.
``drop`` patterns name source keys that are known but are not parameters (a classifier head,
fixed buffers); ``*`` in them matches any text. Transforms are ``KEEP``, ``TRANSPOSE`` (torch
``Linear`` ``[out, in]`` -> ``[in, out]``), :func:`permute` (``CONV``: torch ``OIHW`` -> ``HWIO``),
:func:`reshape`, or a named function for what these cannot say.

:func:`apply_key_map` converts a state dict strictly against the model's ``{path: shape}``; any
problem (file keys no rule takes, parameters the file lacks, shapes that differ, two file keys
that disagree about one parameter) is raised as one :class:`CheckpointMismatchError` naming the
file and speaking in the file's key names. :func:`load` does that and assigns the result.

Rules always speak of layers one by one (``layers/{i}/...``). A model that stores a stack of
layers as one module with a leading layer axis (``layers/...``, ``[n, ...]``, for ``nnx.scan``)
names that prefix in ``stacked``: :func:`per_layer_shapes` and :func:`stack_layers` translate
between the two layouts, and :func:`load` applies them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from flax import nnx

from pixelllm.checkpoints.assign import WEIGHTS, CheckpointMismatchError, assign, param_shapes

_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_SHOWN = 20


@dataclasses.dataclass(frozen=True)
class Transform:
    """A named array transform from the source's layout to the model's."""
    name: str
    apply: Callable[[np.ndarray], np.ndarray]


KEEP = Transform("none", np.asarray)
TRANSPOSE = Transform("transpose", lambda w: np.asarray(w).T)


def permute(*axes: int) -> Transform:
    return Transform(f"permute{axes}", lambda w: np.transpose(w, axes))


def reshape(*shape: int) -> Transform:
    return Transform(f"reshape{shape}", lambda w: np.reshape(w, shape))


CONV = permute(2, 3, 1, 0)  # torch Conv2d (out, in, kh, kw) -> Flax (kh, kw, in, out)
VECTOR = reshape(-1)  # nn.Embedding(1, C).weight [1, C] -> [C]


def _compile(pattern: str, *, wildcard: bool) -> re.Pattern:
    parts, pos = [], 0
    tokens = _PLACEHOLDER.pattern + (r"|\*" if wildcard else "")
    for m in re.finditer(tokens, pattern):
        parts.append(re.escape(pattern[pos:m.start()]))
        parts.append(r".*" if m.group(0) == "*" else rf"(?P<{m.group(1)}>\d+)")
        pos = m.end()
    parts.append(re.escape(pattern[pos:]))
    return re.compile("".join(parts) + r"\Z")


@dataclasses.dataclass(frozen=True)
class Rule:
    """``source`` key pattern (dots) -> ``target`` parameter path pattern (slashes)."""
    source: str
    target: str
    transform: Transform = KEEP
    _source_re: re.Pattern = dataclasses.field(init=False, repr=False, compare=False)
    _target_re: re.Pattern = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if set(_PLACEHOLDER.findall(self.source)) != set(_PLACEHOLDER.findall(self.target)):
            raise ValueError(f"key map rule {self.source!r} -> {self.target!r}: the two patterns "
                             "must use the same placeholders")
        object.__setattr__(self, "_source_re", _compile(self.source, wildcard=False))
        object.__setattr__(self, "_target_re", _compile(self.target, wildcard=False))

    def target_of(self, key: str) -> str | None:
        m = self._source_re.match(key)
        return None if m is None else self.target.format(**m.groupdict())

    def source_of(self, path: str) -> str | None:
        m = self._target_re.match(path)
        return None if m is None else self.source.format(**m.groupdict())


def prefixed(rules: Iterable[Rule], *, source: str = "", target: str = "") -> list[Rule]:
    """``rules`` with ``source`` prepended to every source pattern, ``target`` to every path."""
    return [Rule(source + r.source, target + r.target, r.transform) for r in rules]


def _listing(items: Sequence[str]) -> str:
    more = f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def apply_key_map(state_dict: Mapping[str, np.ndarray], rules: Sequence[Rule], *, source: str,
                  expected: Mapping[str, tuple[int, ...]], drop: Sequence[str] = (),
                  hint: str | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
    """Converts ``state_dict`` with ``rules`` for a model whose parameters are ``expected``
    (``{path: shape}``, e.g. :func:`~pixelllm.checkpoints.assign.param_shapes`).

    Returns ``({path: array}, dropped source keys)``: keys matching a ``drop`` pattern are left
    out before any rule is tried. The first rule that matches a key wins.
    Two keys may give one path only with equal values (tied weights). Raises
    :class:`CheckpointMismatchError` starting ``"{source}: "`` (then ``hint`` if given) and
    listing, in source key names: keys no rule takes or whose path the model lacks
    (unexpected), parameters the file does not hold (missing, named as the first rule that
    produces them would read them), shapes after the transform that differ from the model's, and
    disagreeing tied keys.
    """
    drop_patterns = [_compile(pattern, wildcard=True) for pattern in drop]
    converted: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    unexpected, misshaped, disagree, dropped = [], [], [], []
    for key in state_dict:
        if any(pattern.match(key) for pattern in drop_patterns):
            dropped.append(key)
            continue
        for rule in rules:
            path = rule.target_of(key)
            if path is None:
                continue
            if path not in expected:
                unexpected.append(key)
                break
            try:
                value = rule.transform.apply(state_dict[key])
            except ValueError as e:
                misshaped.append(f"{key} {tuple(np.shape(state_dict[key]))} (cannot "
                                 f"{rule.transform.name}: {e})")
                break
            if tuple(value.shape) != tuple(expected[path]):
                misshaped.append(f"{key} (file {tuple(np.shape(state_dict[key]))}, after "
                                 f"{rule.transform.name} {tuple(value.shape)}; model {path} "
                                 f"{tuple(expected[path])})")
            elif path in converted:
                if not np.array_equal(converted[path], value):
                    disagree.append(f"{origin[path]} and {key} (both give {path})")
            else:
                converted[path], origin[path] = value, key
            break
        else:
            unexpected.append(key)
    taken = set(origin.values()) | {m.split(" ", 1)[0] for m in misshaped}
    missing = []
    for path in sorted(set(expected) - set(converted)):
        name = next((s for r in rules if (s := r.source_of(path))), None)
        if name not in taken:
            missing.append(name or f"(no rule gives model parameter {path})")
    if not (unexpected or missing or misshaped or disagree):
        return converted, dropped
    lines = [f"{source}: checkpoint does not match the model" + (f"; {hint}" if hint else "")]
    for title, items in (("missing keys", missing), ("unexpected keys", sorted(unexpected)),
                         ("mis-shaped keys", sorted(misshaped)),
                         ("tied keys that differ", disagree)):
        if items:
            lines.append(f"  {len(items)} {title}: {_listing(items)}")
    raise CheckpointMismatchError("\n".join(lines))


def _stack_prefix(path: str, stacked: Sequence[str]) -> str | None:
    return next((prefix for prefix in stacked if path.startswith(prefix + "/")), None)


def per_layer_shapes(expected: Mapping[str, tuple[int, ...]], stacked: Sequence[str]
                     ) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` with every ``"{prefix}/rest": [n, ...]`` under a ``stacked`` prefix
    listed per layer as ``"{prefix}/{i}/rest": [...]`` for ``i < n``; other paths unchanged."""
    out = {}
    for path, shape in expected.items():
        prefix = _stack_prefix(path, stacked)
        if prefix is None:
            out[path] = tuple(shape)
            continue
        rest = path[len(prefix) + 1:]
        out.update({f"{prefix}/{i}/{rest}": tuple(shape[1:]) for i in range(shape[0])})
    return out


def stack_layers(params: Mapping[str, np.ndarray], stacked: Sequence[str]
                 ) -> dict[str, np.ndarray]:
    """Inverse of :func:`per_layer_shapes` on arrays: ``"{prefix}/{i}/rest"`` for ``i = 0..n-1``
    -> ``"{prefix}/rest"`` stacked ``[n, ...]``; other paths unchanged. Raises ``ValueError``
    naming the path when the layer indices of one parameter are not ``0..n-1``."""
    out: dict[str, np.ndarray] = {}
    layers: dict[str, dict[int, np.ndarray]] = {}
    for path, value in params.items():
        prefix = _stack_prefix(path, stacked)
        index, _, rest = path[len(prefix) + 1:].partition("/") if prefix else ("", "", "")
        if not index.isdigit():
            out[path] = value
            continue
        layers.setdefault(f"{prefix}/{rest}", {})[int(index)] = value
    for path, by_index in layers.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise ValueError(f"{path}: layers {sorted(by_index)} are not 0..{len(by_index) - 1}")
        out[path] = np.stack([np.asarray(by_index[i]) for i in range(len(by_index))])
    return out


def load(module: nnx.Module, state_dict: Mapping[str, np.ndarray], rules: Sequence[Rule], *,
         source: str, drop: Sequence[str] = (), hint: str | None = None,
         wrt: nnx.filterlib.Filter = WEIGHTS, stacked: Sequence[str] = ()) -> nnx.Module:
    """Converts ``state_dict`` with ``rules`` (see :func:`apply_key_map`) and assigns every
    parameter of ``module`` selected by ``wrt`` (in place, strictly: nothing changes on a
    mismatch); returns it. ``stacked``: path prefixes where ``module`` holds its layers stacked
    (see the module docstring); the rules still name them one by one, as do error messages."""
    expected = per_layer_shapes(param_shapes(module, wrt), stacked)
    params, _ = apply_key_map(state_dict, rules, source=source, drop=drop, expected=expected,
                              hint=hint)
    return assign(module, stack_layers(params, stacked), source=source, wrt=wrt)
