"""The one unpickler for files we did not write: ``torch.save`` archives and data-only pickles.

``pickle.load`` runs whatever a (tampered) file names: a pickle can import any callable
(``os.system``) and call it. Every pickle we read goes through :func:`restricted_load`, in two
layers:

1. Before anything is built, every opcode is checked (:func:`check_opcodes`). Plain data (ints,
   floats, strings, bytes, ``None``/bools, lists, tuples, dicts, the memo, framing) is always
   allowed; what can reach or call an object (``GLOBAL``, ``STACK_GLOBAL``, ``REDUCE``,
   ``BUILD``, persistent ids) only where the caller allows it (:data:`TORCH_OPCODES` for
   ``torch.save`` files), and ``INST``, ``OBJ``, ``NEWOBJ*`` and the copyreg extension codes
   ``EXT*`` never: the C unpickler resolves an ``EXT`` code it has seen before from a
   process-wide cache, without asking ``find_class``. The same pass bounds memory: an argument
   (``BINBYTES8``, a frame) may not claim more bytes than the file holds, nor a memo index exceed
   the file's length (the C unpickler sizes its memo by the largest index).
2. :class:`RestrictedUnpickler` resolves only the globals and persistent ids its caller's
   ``resolve`` / ``persistent_load`` accept, so even an opcode the first pass missed cannot reach
   anything else.

A pickle may share one object many times through its memo (a "billion laughs": each list holds
the previous one twice), cheap to load but exponential to walk as a tree, and may nest deeply or
contain itself. :class:`Walk` is the bounded traversal both readers use: at most ``len(file)``
nodes, at most :data:`MAX_DEPTH` levels, no cycles; each failure is an error naming the file.

Errors: :class:`UnsafePickleError` (refused opcode or global; nothing ran),
:class:`PickleStructureError` (budget, depth, cycle), ``pickle.UnpicklingError`` with
"malformed pickle" for a broken stream, :class:`PickleTextError` for undecodable text.

**Python 2 strings** (refer toolkit pickles, :func:`load_data_pickle`). A Python 2 ``str`` is a
byte string; the bytes are read as ``bytes`` and decoded with ``text_encoding``, UTF-8 by default,
strictly: Python 2 code, the refer toolkit included, wrote text as UTF-8 byte strings. Bytes that
are not valid in that encoding raise :class:`PickleTextError` naming the file and where in the
structure they are (pass ``text_encoding="latin-1"`` for a file known to be Latin-1).
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import pickletools
from collections.abc import Callable, Iterator
from typing import Any

# Deeper than any checkpoint or annotation file; shallow enough for Python's own recursion.
MAX_DEPTH = 100

# Opcodes that build plain data: nothing here can look up or call an object.
DATA_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4",
    "FLOAT", "BINFLOAT", "NONE", "NEWTRUE", "NEWFALSE",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
    "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8",
    "EMPTY_LIST", "APPEND", "APPENDS", "LIST",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS",
    "GET", "BINGET", "LONG_BINGET", "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE",
})
# What torch.save's data.pkl adds: globals (checked by name in `resolve`), calls of the torch
# rebuild functions and OrderedDict, the state of a state dict's `_metadata`, storage ids.
TORCH_OPCODES = frozenset({"GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "BINPERSID"})

_STRING_OPCODES = frozenset({
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE",
    "BINUNICODE8"})
_MEMO_STORE_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
_MEMO_INDEX_OPCODES = frozenset({"PUT", "LONG_BINPUT", "GET", "LONG_BINGET"})
_OPCODES_BY_BYTE = {ord(opcode.code): opcode for opcode in pickletools.opcodes}
_LENGTH_PREFIXES = {  # (bytes of the length, signed)
    pickletools.TAKEN_FROM_ARGUMENT1: (1, False),
    pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
    pickletools.TAKEN_FROM_ARGUMENT4U: (4, False),
    pickletools.TAKEN_FROM_ARGUMENT8U: (8, False),
}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for more than its caller allows (a global, a call); nothing was run."""


class PickleStructureError(pickle.UnpicklingError):
    """The unpickled value is too large as a tree, too deep, or contains itself."""


class PickleTextError(ValueError):
    """A byte string in the pickle is not valid text in the chosen encoding; names where."""


def check_opcodes(data: bytes, *, name: str, allowed: frozenset[str] = DATA_OPCODES) -> None:
    """Raises at the first opcode of ``data`` outside ``allowed`` or claiming too much memory.

    Only opcode boundaries and lengths are parsed (``pickletools.genops`` would decode Python 2
    protocol-0 strings as ASCII and fail on UTF-8 text).

    Raises:
      UnsafePickleError: names ``name``, the byte offset, the opcode and, where the pickle spells
        it out, the global it refers to.
      pickle.UnpicklingError: ``data`` is not a well-formed opcode stream, or an argument or
        memo index claims more than the file holds.
    """
    # Byte spans of the (last two) strings pushed since the last opcode that changed the stack
    # otherwise; at a STACK_GLOBAL they are exactly its module and name.
    pushed_strings: list[tuple[int, int]] = []
    position, length = 0, len(data)
    while True:
        if position >= length:
            raise pickle.UnpicklingError(
                f"{name}: malformed pickle: byte {position}: unexpected end of data")
        opcode = _OPCODES_BY_BYTE.get(data[position])
        if opcode is None:
            raise pickle.UnpicklingError(f"{name}: malformed pickle: byte {position}: unknown "
                                         f"opcode {data[position]:#04x}")
        if opcode.name not in allowed:
            raise UnsafePickleError(
                f"{name}: byte {position}: opcode {opcode.name}"
                f"{_describe_global(opcode.name, data, position, pushed_strings)} is not "
                "allowed in this file; only plain data (dict, list, tuple, str, int, float)"
                + (" and torch's tensor records" if "REDUCE" in allowed else "")
                + " are accepted")
        if opcode.name == "STOP":
            return
        payload_start, end = _argument_span(opcode, data, position + 1, name=name)
        if opcode.name == "FRAME":
            frame = int.from_bytes(data[payload_start:end], "little")
            if frame > length - end:
                raise pickle.UnpicklingError(
                    f"{name}: malformed pickle: byte {position}: a frame of {frame} bytes in a "
                    f"file with {length - end} left")
        if opcode.name in _MEMO_INDEX_OPCODES:
            _check_memo_index(data[payload_start:end], opcode, position, length, name)
        if opcode.name in _STRING_OPCODES:
            pushed_strings.append((payload_start, end))
            del pushed_strings[:-2]
        elif opcode.name not in _MEMO_STORE_OPCODES:
            pushed_strings.clear()
        position = end


def _check_memo_index(argument: bytes, opcode, position: int, length: int, name: str) -> None:
    if opcode.name in ("PUT", "GET"):  # decimal text
        text = argument.rstrip(b"\n")
        index = int(text) if text.isdigit() and len(text) < 20 else None
    else:
        index = int.from_bytes(argument, "little")
    # A file of n bytes stores at most n memo entries.
    if index is None or index > length:
        shown = argument.rstrip(b"\n").decode("ascii", "replace") if index is None else index
        raise pickle.UnpicklingError(
            f"{name}: malformed pickle: byte {position}: {opcode.name} memo index {shown} in a "
            f"file of {length} bytes")


def _argument_span(opcode: pickletools.OpcodeInfo, data: bytes, start: int, *,
                   name: str) -> tuple[int, int]:
    """``(payload_start, end)``: where the argument's payload (after a length prefix) starts
    and where the next opcode starts; the length is compared with the bytes left."""
    size = opcode.arg.n if opcode.arg is not None else 0
    if size >= 0:
        payload_start, end = start, start + size
    elif size == pickletools.UP_TO_NEWLINE:
        # GLOBAL and INST take two lines (module, then name); the others one.
        end = start
        for _ in range(2 if opcode.name in ("GLOBAL", "INST") else 1):
            newline = data.find(b"\n", end)
            end = len(data) + 1 if newline < 0 else newline + 1
        payload_start = start
    else:
        width, signed = _LENGTH_PREFIXES[size]
        payload_start = start + width
        declared = int.from_bytes(data[start:payload_start], "little", signed=signed)
        end = payload_start + declared if declared >= 0 else len(data) + 1
    if end > len(data):
        raise pickle.UnpicklingError(
            f"{name}: malformed pickle: byte {start - 1}: the argument of {opcode.name} runs past "
            f"the end of the file ({len(data)} bytes)")
    return payload_start, end


def _describe_global(opcode: str, data: bytes, position: int,
                     pushed_strings: list[tuple[int, int]]) -> str:
    if opcode in ("GLOBAL", "INST"):
        lines = data[position + 1:].split(b"\n", 2)
        if len(lines) == 3:
            module, attribute = (line.decode("utf-8", "backslashreplace") for line in lines[:2])
            return f" (global {module}.{attribute})"
    if opcode == "STACK_GLOBAL" and len(pushed_strings) == 2:
        module, attribute = (data[start:end].rstrip(b"\n").decode("utf-8", "backslashreplace")
                             for start, end in pushed_strings)
        return f" (global {module}.{attribute})"
    return ""


def _refuse_global(name: str) -> Callable[[str, str], Any]:
    def refuse(module: str, attribute: str) -> Any:
        raise UnsafePickleError(
            f"{name}: the pickle refers to the global {module}.{attribute}; only plain data "
            "(dict, list, tuple, str, int, float) is accepted")
    return refuse


def _refuse_persistent_id(name: str) -> Callable[[Any], Any]:
    def refuse(pid: Any) -> Any:
        raise UnsafePickleError(
            f"{name}: the pickle holds a persistent id {pid!r}; only plain data is accepted")
    return refuse


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only what its caller accepts.

    Args:
      file: a binary file object positioned at the pickle.
      name: how errors name the file.
      resolve: ``(module, name) -> object`` for each global the pickle names; raises to refuse.
        Default: every global is refused.
      persistent_load: ``pid -> object`` for persistent ids; default: all refused.
      encoding: how Python 2 byte strings are read (``"bytes"`` keeps them as ``bytes``).
    """

    def __init__(self, file: io.BufferedIOBase, *, name: str,
                 resolve: Callable[[str, str], Any] | None = None,
                 persistent_load: Callable[[Any], Any] | None = None, encoding: str = "bytes"):
        super().__init__(file, encoding=encoding)
        self._resolve = resolve or _refuse_global(name)
        self._persistent_load = persistent_load or _refuse_persistent_id(name)

    def find_class(self, module: str, name: str) -> Any:
        return self._resolve(module, name)

    def persistent_load(self, pid: Any) -> Any:
        return self._persistent_load(pid)


def restricted_load(data: bytes, *, name: str, allowed: frozenset[str] = DATA_OPCODES,
                    resolve: Callable[[str, str], Any] | None = None,
                    persistent_load: Callable[[Any], Any] | None = None,
                    encoding: str = "bytes") -> Any:
    """:func:`check_opcodes`, then :class:`RestrictedUnpickler` on ``data``.

    Raises :class:`UnsafePickleError` as is, and every other failure of a broken stream as
    ``pickle.UnpicklingError`` "{name}: malformed pickle: ...".
    """
    check_opcodes(data, name=name, allowed=allowed)
    try:
        return RestrictedUnpickler(io.BytesIO(data), name=name, resolve=resolve,
                                   persistent_load=persistent_load, encoding=encoding).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, RecursionError, MemoryError) as error:
        raise pickle.UnpicklingError(
            f"{name}: malformed pickle: {type(error).__name__}: {error}") from error


class Walk:
    """A bounded walk over an unpickled value: the node budget, depth limit and cycle check.

    ``budget``: nodes visited at most (a pickle of n bytes builds at most n distinct nodes, so
    only shared references can exceed ``len(data)``). Use :meth:`enter` around each container.
    """

    def __init__(self, *, name: str, budget: int):
        self.name, self.left = name, budget
        self._open: set[int] = set()

    def visit(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise PickleStructureError(
                f"{self.name}: the unpickled value has more nodes than the file has bytes: it "
                "shares objects many times over (a 'billion laughs' pickle); refusing to expand it")

    @contextlib.contextmanager
    def enter(self, container: Any) -> Iterator[None]:
        """Around the walk of ``container``'s items: refuses a cycle and too deep a nesting."""
        key = id(container)
        if key in self._open:
            raise PickleStructureError(f"{self.name}: the unpickled value contains itself")
        if len(self._open) >= MAX_DEPTH:
            raise PickleStructureError(
                f"{self.name}: the unpickled value nests deeper than {MAX_DEPTH} levels")
        self._open.add(key)
        try:
            yield
        finally:
            self._open.discard(key)


def decode_text(value: Any, *, walk: Walk, encoding: str) -> Any:
    """``value`` (plain data) with every ``bytes`` in it (dict keys included) decoded."""
    walk.visit()
    # Exact type tests: an unpickler of plain data builds exactly these types, and this walk
    # visits every value of a file of some million values.
    kind = type(value)
    if kind is bytes:
        return value.decode(encoding)
    if kind not in (dict, list, tuple):
        return value
    with walk.enter(value):
        if kind is dict:
            return {decode_text(key, walk=walk, encoding=encoding):
                    decode_text(item, walk=walk, encoding=encoding)
                    for key, item in value.items()}
        items = [decode_text(item, walk=walk, encoding=encoding) for item in value]
        return items if kind is list else tuple(items)


def load_data_pickle(path: str | os.PathLike, *, text_encoding: str = "utf-8") -> Any:
    """The plain data in the pickle at ``path`` (e.g. refer's ``refs(unc).p``), byte strings
    decoded as ``text_encoding``.

    Raises:
      UnsafePickleError: the pickle uses an opcode or global outside plain data.
      PickleStructureError: shared references beyond the file's size, deep nesting, a cycle.
      PickleTextError: a byte string is not valid ``text_encoding``.
      pickle.UnpicklingError: the file is not a well-formed pickle (message names the file).
    """
    name = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    value = restricted_load(data, name=name)
    try:
        return decode_text(value, walk=Walk(name=name, budget=len(data)), encoding=text_encoding)
    except UnicodeDecodeError as error:
        raise PickleTextError(f"{name}: {_find_undecodable(value, encoding=text_encoding)}") \
            from error


def _find_undecodable(value: Any, *, encoding: str) -> str:
    """Where (``[3]['sentences'][0]['raw']``) the first byte string that ``encoding`` rejects
    is, with the reason. Only run after decoding (and so the bounded walk) succeeded up to it."""
    for where, item in _leaves(value, ""):
        try:
            item.decode(encoding)
        except UnicodeDecodeError as error:
            return (f"{where or 'the top-level value'}: byte string {item[:60]!r} is not valid "
                    f"{encoding}: {error.reason} at byte {error.start}")
    return "a byte string is not valid " + encoding


def _leaves(value: Any, where: str) -> Iterator[tuple[str, bytes]]:
    if isinstance(value, bytes):
        yield where, value
    elif isinstance(value, dict):
        for key in value:
            yield from _leaves(key, f"{where}[key {_readable(key)!r}]")
        for key, item in value.items():
            yield from _leaves(item, f"{where}[{_readable(key)!r}]")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _leaves(item, f"{where}[{index}]")


def _readable(key: Any) -> Any:
    return key.decode("utf-8", "backslashreplace") if isinstance(key, bytes) else key
