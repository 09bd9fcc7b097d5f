"""Registered preprocessing ops and the specs that name them in configs.

An *op* is a pure function ``op(example, rng) -> example``: it reads a dict, returns a new dict
and never changes its input; ``rng`` (a ``numpy.random.Generator``) is its only source of
randomness, and deterministic ops ignore it. The pipeline hands every example a generator seeded
from the pipeline seed and the example's position, so a stream is reproducible and resumable.

Ops are made by *factories*, registered under a name with :func:`register`; a factory takes
keyword-only arguments (sizes, probabilities, file paths) and returns the op. Configs name the
factories in one of two forms, both explicit (no global state is consulted but this registry):

* a string in big_vision's form, Python literals as arguments and ``|`` between ops::

    "decode|resize_and_pad(canvas=384)|slot(task='refer', slots=16)"

* a list whose items are such strings or mappings with the factory name under ``"op"``, as an
  ``ml_collections`` config holds them (or ops already built)::

    [{"op": "decode"}, {"op": "resize_and_pad", "canvas": 384}]

The registry is the module-level ``dict`` filled at import time by the op modules, which
``data_pipelines.ops`` imports.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

Example = dict[str, Any]
Op = Callable[[Example, np.random.Generator], Example]
Factory = Callable[..., Op]

# Name -> factory; written only by `register` while the op modules are imported.
_FACTORIES: dict[str, Factory] = {}


class SpecError(ValueError):
    """An op spec that does not parse or names an unknown op; quotes the spec."""


def register(name: str) -> Callable[[Factory], Factory]:
    """Decorator registering an op factory under ``name``; a name can be registered once."""

    def decorate(factory: Factory) -> Factory:
        if name in _FACTORIES:
            raise ValueError(f"op {name!r} is already registered by {_FACTORIES[name].__module__}")
        _FACTORIES[name] = factory
        return factory

    return decorate


def get(name: str) -> Factory:
    """The factory registered under ``name``."""
    try:
        return _FACTORIES[name]
    except KeyError:
        raise SpecError(f"unknown op {name!r}; registered ops: {', '.join(sorted(_FACTORIES))}"
                        ) from None


def names() -> list[str]:
    """The registered op names, sorted."""
    return sorted(_FACTORIES)


def build(name: str, **kwargs: Any) -> Op:
    """The op made by the factory ``name`` with ``kwargs``."""
    factory = get(name)
    try:
        return factory(**kwargs)
    except TypeError as error:
        raise SpecError(f"op {name!r}: bad arguments {kwargs!r}: {error}") from error


def parse(spec: str | Sequence[str | Mapping[str, Any] | Op]) -> list[Op]:
    """The ops named by ``spec`` (see the module docstring), in order."""
    if isinstance(spec, str):
        items = [part for part in (p.strip() for p in spec.split("|")) if part]
        calls = [_parse_call(item) for item in items]
        return [build(name, **kwargs) for name, kwargs in calls]
    ops = []
    for item in spec:
        item = _plain(item)
        if isinstance(item, str):
            ops.extend(parse(item))
        elif isinstance(item, Mapping):
            kwargs = dict(item)
            if "op" not in kwargs:
                raise SpecError(f"op spec {dict(item)!r} has no 'op' key naming the op")
            ops.append(build(kwargs.pop("op"), **kwargs))
        elif callable(item):
            ops.append(item)
        else:
            raise SpecError(f"op spec item {item!r} is neither a string, a mapping nor an op")
    return ops


def compose(ops: Sequence[Op]) -> Op:
    """One op applying ``ops`` in order, all with the same generator."""
    ops = tuple(ops)

    def composed(example: Example, rng: np.random.Generator) -> Example:
        for op in ops:
            example = op(example, rng)
        return example

    return composed


def _parse_call(text: str) -> tuple[str, dict[str, Any]]:
    """``"name"`` or ``"name(a=1, b='x')"`` -> ``(name, kwargs)``; only literals are allowed."""
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError as error:
        raise SpecError(f"op spec {text!r} is not of the form name(arg=value, ...): {error}"
                        ) from None
    if isinstance(node, ast.Name):
        return node.id, {}
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise SpecError(f"op spec {text!r} is not of the form name(arg=value, ...)")
    if node.args:
        raise SpecError(f"op spec {text!r}: arguments must be given by keyword")
    kwargs = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            raise SpecError(f"op spec {text!r}: '**' is not allowed")
        try:
            kwargs[keyword.arg] = ast.literal_eval(keyword.value)
        except ValueError:
            raise SpecError(f"op spec {text!r}: argument {keyword.arg!r} is not a Python "
                            "literal") from None
    return node.func.id, kwargs


def _plain(value: Any) -> Any:
    """Config values as plain Python: ``ml_collections`` hands out tuples, lists and
    ``ConfigDict``s, which factories should not need to know about."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "to_dict"):
        return _plain(value.to_dict())
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    return value
