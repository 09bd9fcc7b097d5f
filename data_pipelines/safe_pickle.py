"""Loading data-only pickles (the refer toolkit's ``refs(unc).p``) without running their code.

The RefCOCO/+/g annotations are published as Python 2 pickles of plain lists and dicts of
strings and numbers. ``pickle.load`` would run whatever a (tampered) file asks for: a pickle can
name any importable callable (``os.system``) and call it. :func:`load_data_pickle` accepts only
what such a file needs, in two layers:

1. Before anything is built, every opcode is checked against a list of data opcodes (ints,
   floats, strings, bytes, ``None``/bools, lists, tuples, dicts, the memo, framing). Everything
   that can reach or call an object (``GLOBAL``, ``STACK_GLOBAL``, ``INST``, ``OBJ``, ``REDUCE``,
   ``BUILD``, ``NEWOBJ*``, the copyreg extension codes ``EXT*``, persistent ids) is refused with
   an :class:`UnsafePickleError` naming the file, the byte offset and, where the pickle spells it
   out, the global. The extension codes are the reason for this pass: the C unpickler resolves an
   ``EXT`` code it has seen before from a process-wide cache, without asking ``find_class``.
2. The file is then read by :class:`DataOnlyUnpickler`, whose ``find_class`` and
   ``persistent_load`` refuse everything, so even an opcode the first pass missed cannot reach
   a global.

**Python 2 strings.** A Python 2 ``str`` is a byte string (opcodes ``STRING``, ``BINSTRING``,
``SHORT_BINSTRING``); Python 2 ``unicode`` arrives as ``str`` anyway. The bytes are read as
``bytes`` (``encoding="bytes"``) and then decoded with ``text_encoding``, **UTF-8 by default**,
strictly: Python 2 code, the refer toolkit included, wrote text as UTF-8 byte strings, and UTF-8
is a superset of the ASCII that all but a handful of the sentences use. Bytes that are not valid
in that encoding raise :class:`PickleTextError` naming the file and where in the structure they
are, instead of turning into mojibake (pass ``text_encoding="latin-1"`` for a file known to be
Latin-1). Python 3 ``bytes`` values are decoded the same way: in these files all strings are text.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
from typing import Any

# Opcodes that build plain data: nothing here can look up or call an object.
_DATA_OPCODES = frozenset({
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
_STRING_OPCODES = frozenset({
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE",
    "BINUNICODE8"})
# Storing into the memo leaves the stack as it is.
_MEMO_STORE_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
_OPCODES_BY_BYTE = {ord(opcode.code): opcode for opcode in pickletools.opcodes}
_FIXED_ARGUMENT_SIZES = {ord(opcode.code): opcode.arg.n if opcode.arg is not None else 0
                         for opcode in pickletools.opcodes
                         if opcode.arg is None or opcode.arg.n >= 0}
_STRING_CODES = frozenset(ord(op.code) for op in pickletools.opcodes if op.name in _STRING_OPCODES)
_MEMO_STORE_CODES = frozenset(
    ord(op.code) for op in pickletools.opcodes if op.name in _MEMO_STORE_OPCODES)
_STOP = ord(pickle.STOP)
# Arguments that start with their length: (bytes of the length, whether it is signed).
_LENGTH_PREFIXES = {
    pickletools.TAKEN_FROM_ARGUMENT1: (1, False),
    pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
    pickletools.TAKEN_FROM_ARGUMENT4U: (4, False),
    pickletools.TAKEN_FROM_ARGUMENT8U: (8, False),
}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for more than plain data (a global, a call); names the file and what."""


class PickleTextError(ValueError):
    """A byte string in the pickle is not valid text in the chosen encoding; names where."""


class DataOnlyUnpickler(pickle.Unpickler):
    """An unpickler that resolves no global and no persistent id (byte strings stay ``bytes``).

    Args:
      file: a binary file object positioned at the pickle.
      name: how errors name the file.
    """

    def __init__(self, file: io.BufferedIOBase, *, name: str):
        super().__init__(file, encoding="bytes")
        self._name = name

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(
            f"{self._name}: the pickle refers to the global {module}.{name}; only plain data "
            "(dict, list, tuple, str, int, float) is accepted")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(
            f"{self._name}: the pickle holds a persistent id {pid!r}; only plain data is accepted")


def load_data_pickle(path: str | os.PathLike, *, text_encoding: str = "utf-8") -> Any:
    """The plain data in the pickle at ``path``, byte strings decoded as ``text_encoding``.

    Raises:
      UnsafePickleError: the pickle uses an opcode or global outside plain data.
      PickleTextError: a byte string is not valid ``text_encoding``.
      pickle.UnpicklingError: the file is not a well-formed pickle (message names the file).
    """
    name = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    check_data_only(data, name=name)
    try:
        value = DataOnlyUnpickler(io.BytesIO(data), name=name).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError,
            IndexError, AttributeError) as error:
        raise pickle.UnpicklingError(f"{name}: malformed pickle: {error}") from error
    try:
        return _decode_bytes(value, encoding=text_encoding)
    except UnicodeDecodeError as error:
        location = _find_undecodable(value, encoding=text_encoding)
        raise PickleTextError(f"{name}: {location}") from error


def check_data_only(data: bytes, *, name: str) -> None:
    """Raises :class:`UnsafePickleError` at the first opcode of ``data`` that is not plain data.

    Only opcode boundaries are parsed, no argument is decoded (``pickletools.genops`` would
    decode Python 2 protocol-0 strings as ASCII and fail on UTF-8 text).

    Raises:
      UnsafePickleError: names ``name``, the byte offset, the opcode and, where it is spelled
        out in the pickle, the global it refers to.
      pickle.UnpicklingError: ``data`` is not a well-formed opcode stream.
    """
    # Byte spans of the (last two) string literals pushed since the last opcode that changed
    # the stack otherwise; at a STACK_GLOBAL they are exactly its module and name.
    pushed_strings: list[tuple[int, int]] = []
    position = 0
    length = len(data)
    while True:
        if position >= length:
            raise pickle.UnpicklingError(
                f"{name}: malformed pickle: byte {position}: unexpected end of data")
        code = data[position]
        opcode = _OPCODES_BY_BYTE.get(code)
        if opcode is None:
            raise pickle.UnpicklingError(
                f"{name}: malformed pickle: byte {position}: unknown opcode {code:#04x}")
        if opcode.name not in _DATA_OPCODES:
            raise UnsafePickleError(
                f"{name}: byte {position}: opcode {opcode.name}"
                f"{_describe_global(opcode.name, data, position, pushed_strings)} is not "
                "allowed; only plain data (dict, list, tuple, str, int, float) is accepted")
        if code == _STOP:
            return
        size = _FIXED_ARGUMENT_SIZES.get(code)
        if size is not None:
            # Most opcodes: no argument or a fixed-size one.
            payload_start, end = position + 1, position + 1 + size
            if end > length:
                raise pickle.UnpicklingError(
                    f"{name}: malformed pickle: byte {position}: the argument of {opcode.name} "
                    "runs past the end of the file")
        else:
            payload_start, end = _argument_span(opcode, data, position + 1, name=name)
        if code in _STRING_CODES:
            pushed_strings.append((payload_start, end))
            del pushed_strings[:-2]
        elif code not in _MEMO_STORE_CODES:
            pushed_strings.clear()
        position = end


def _argument_span(opcode: pickletools.OpcodeInfo, data: bytes, start: int, *,
                   name: str) -> tuple[int, int]:
    """``(payload_start, end)``: where the argument's payload (after a length prefix) starts
    and where the next opcode starts."""
    size = opcode.arg.n if opcode.arg is not None else 0
    if size >= 0:
        end = start + size
        payload_start = start
    elif size == pickletools.UP_TO_NEWLINE:
        newline = data.find(b"\n", start)
        end = len(data) + 1 if newline < 0 else newline + 1
        payload_start = start
    else:
        width, signed = _LENGTH_PREFIXES[size]
        payload_start = start + width
        length = int.from_bytes(data[start:payload_start], "little", signed=signed)
        end = payload_start + length if length >= 0 else len(data) + 1
    if end > len(data):
        raise pickle.UnpicklingError(
            f"{name}: malformed pickle: byte {start - 1}: the argument of {opcode.name} runs past "
            "the end of the file")
    return payload_start, end


def _describe_global(opcode: str, data: bytes, position: int,
                     pushed_strings: list[tuple[int, int]]) -> str:
    if opcode in ("GLOBAL", "INST"):
        # The argument is two lines: module, then name.
        lines = data[position + 1:].split(b"\n", 2)
        if len(lines) == 3:
            module, attribute = (line.decode("utf-8", "backslashreplace") for line in lines[:2])
            return f" (global {module}.{attribute})"
    if opcode == "STACK_GLOBAL" and len(pushed_strings) == 2:
        module, attribute = (data[start:end].rstrip(b"\n").decode("utf-8", "backslashreplace")
                             for start, end in pushed_strings)
        return f" (global {module}.{attribute})"
    return ""


def _decode_bytes(value: Any, *, encoding: str) -> Any:
    """``value`` with every ``bytes`` in it (dict keys included) decoded."""
    # Exact type tests: an unpickler of plain data builds exactly these types, and this walk
    # visits every value of a file of some million values.
    kind = type(value)
    if kind is bytes:
        return value.decode(encoding)
    if kind is dict:
        return {_decode_bytes(key, encoding=encoding): _decode_bytes(item, encoding=encoding)
                for key, item in value.items()}
    if kind is list:
        return [_decode_bytes(item, encoding=encoding) for item in value]
    if kind is tuple:
        return tuple(_decode_bytes(item, encoding=encoding) for item in value)
    return value


def _find_undecodable(value: Any, *, encoding: str, where: str = "") -> str | None:
    """Where (``[3]['sentences'][0]['raw']``) the first byte string that ``encoding`` rejects is,
    with the reason; ``None`` if there is none. Only run after decoding failed, so the fast path
    does not pay for building paths."""
    if isinstance(value, bytes):
        try:
            value.decode(encoding)
        except UnicodeDecodeError as error:
            return (f"{where or 'the top-level value'}: byte string {value[:60]!r} is not valid "
                    f"{encoding}: {error.reason} at byte {error.start}")
        return None
    if isinstance(value, dict):
        items = [(f"{where}[key {_readable(key, encoding)!r}]", key) for key in value]
        items += [(f"{where}[{_readable(key, encoding)!r}]", item) for key, item in value.items()]
    elif isinstance(value, list | tuple):
        items = [(f"{where}[{index}]", item) for index, item in enumerate(value)]
    else:
        return None
    for item_where, item in items:
        found = _find_undecodable(item, encoding=encoding, where=item_where)
        if found is not None:
            return found
    return None


def _readable(key: Any, encoding: str) -> Any:
    return key.decode(encoding, "backslashreplace") if isinstance(key, bytes) else key
