"""Refer-toolkit pickles through pixelllm/checkpoints/restricted_pickle.py: Python 2 data pickles
load, code never runs."""

import io
import os
import pickle
import struct

import pytest

from pixelllm.checkpoints.restricted_pickle import (
    PickleTextError, RestrictedUnpickler, UnsafePickleError, load_data_pickle)


def _py2_pickle(value, *, protocol: int) -> bytes:
    """``value`` pickled as Python 2's pickler writes it (protocol 0 or 2), ``bytes`` standing for
    Python 2 ``str`` and ``str`` for ``unicode``. Every container and byte string takes the next
    memo slot; a repeated byte string is fetched from its slot, as Python 2 does for a shared
    (interned) string."""
    out = bytearray(b"\x80\x02" if protocol == 2 else b"")
    slots: list[int] = [0]  # next free memo slot
    string_slots: dict[bytes, int] = {}

    def memoize() -> int:
        slot = slots[0]
        slots[0] += 1
        if protocol == 0:
            out.extend(b"p%d\n" % slot)
        else:
            out.extend(b"q" + bytes([slot]) if slot < 256 else b"r" + struct.pack("<I", slot))
        return slot

    def fetch(slot: int) -> None:
        if protocol == 0:
            out.extend(b"g%d\n" % slot)
        else:
            out.extend(b"h" + bytes([slot]) if slot < 256 else b"j" + struct.pack("<I", slot))

    def write(item) -> None:
        if isinstance(item, bytes):
            if item in string_slots:
                fetch(string_slots[item])
                return
            if protocol == 2:
                out.extend(b"U" + bytes([len(item)]) + item if len(item) < 256
                           else b"T" + struct.pack("<i", len(item)) + item)
            else:
                escaped = "".join(chr(c) if 32 <= c < 127 and c not in b"'\\" else f"\\x{c:02x}"
                                  for c in item)
                out.extend(b"S'" + escaped.encode("ascii") + b"'\n")
            string_slots[item] = memoize()
        elif isinstance(item, str):
            encoded = item.encode("utf-8")
            out.extend(b"X" + struct.pack("<I", len(encoded)) + encoded if protocol == 2
                       else b"V" + item.encode("raw-unicode-escape") + b"\n")
        elif item is None:
            out.extend(b"N")
        elif isinstance(item, bool):
            out.extend((b"\x88" if item else b"\x89") if protocol == 2
                       else (b"I01\n" if item else b"I00\n"))
        elif isinstance(item, int):
            if -2**31 <= item < 2**31:
                out.extend(b"J" + struct.pack("<i", item) if protocol == 2 else b"I%d\n" % item)
            elif protocol == 2:
                encoded = item.to_bytes((item.bit_length() + 8) // 8, "little", signed=True)
                out.extend(b"\x8a" + bytes([len(encoded)]) + encoded)
            else:
                out.extend(b"L%dL\n" % item)
        elif isinstance(item, float):
            out.extend(b"G" + struct.pack(">d", item) if protocol == 2
                       else b"F" + repr(item).encode("ascii") + b"\n")
        elif isinstance(item, tuple):
            out.extend(b"(")
            for element in item:
                write(element)
            out.extend(b"t")
            memoize()
        elif isinstance(item, list | dict):
            is_dict = isinstance(item, dict)
            elements = list(item.items()) if is_dict else [(element,) for element in item]
            if protocol == 0:
                # (l / (d, then one APPEND / SETITEM per element.
                out.extend(b"(d" if is_dict else b"(l")
                memoize()
                for element in elements:
                    for part in element:
                        write(part)
                    out.extend(b"s" if is_dict else b"a")
            else:
                # Empty container, then all elements in one APPENDS / SETITEMS.
                out.extend(b"}" if is_dict else b"]")
                memoize()
                out.extend(b"(")
                for element in elements:
                    for part in element:
                        write(part)
                out.extend(b"u" if is_dict else b"e")
        else:
            raise TypeError(type(item))

    write(value)
    out.extend(b".")
    return bytes(out)


# Two refs as the refer toolkit stores them, text as Python 2 byte strings (one non-ASCII,
# UTF-8 encoded) and one unicode string.
_PY2_REFS = [
    {b"ref_id": 0, b"ann_id": 1709, b"image_id": 581857, b"split": b"train", b"category_id": 1,
     b"sent_ids": [10, 11], b"file_name": b"COCO_train2014_000000581857_16.jpg",
     b"sentences": [
         {b"tokens": [b"the", b"caf\xc3\xa9", b"sign"], b"raw": b"The caf\xc3\xa9 sign",
          b"sent_id": 10, b"sent": b"the caf\xc3\xa9 sign"},
         {b"tokens": [b"left"], b"raw": "left \u00e9l\u00e8ve", b"sent_id": 11, b"sent": b"left"}]},
    {b"ref_id": 1, b"ann_id": 2**40 + 7, b"image_id": 3, b"split": b"testA", b"category_id": 90,
     b"sent_ids": [], b"sentences": [], b"file_name": b"x.jpg",
     b"extra": (1.25, None, True, False, -5)},
]
_EXPECTED_REFS = [
    {"ref_id": 0, "ann_id": 1709, "image_id": 581857, "split": "train", "category_id": 1,
     "sent_ids": [10, 11], "file_name": "COCO_train2014_000000581857_16.jpg",
     "sentences": [
         {"tokens": ["the", "caf\u00e9", "sign"], "raw": "The caf\u00e9 sign", "sent_id": 10,
          "sent": "the caf\u00e9 sign"},
         {"tokens": ["left"], "raw": "left \u00e9l\u00e8ve", "sent_id": 11, "sent": "left"}]},
    {"ref_id": 1, "ann_id": 2**40 + 7, "image_id": 3, "split": "testA", "category_id": 90,
     "sent_ids": [], "sentences": [], "file_name": "x.jpg",
     "extra": (1.25, None, True, False, -5)},
]


@pytest.mark.parametrize("protocol", [0, 2])
def test_python2_pickle_loads_with_byte_strings_decoded_as_utf8(tmp_path, protocol):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(_py2_pickle(_PY2_REFS, protocol=protocol))
    # The fixture really holds Python 2 byte strings: a default Python 3 load (ASCII) fails.
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(path.read_bytes())

    refs = load_data_pickle(path)

    assert refs == _EXPECTED_REFS
    assert type(refs[1]["extra"]) is tuple
    assert isinstance(refs[1]["ann_id"], int) and isinstance(refs[1]["extra"][0], float)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_python3_pickles_of_plain_data_round_trip(tmp_path, protocol):
    path = tmp_path / "refs.p"
    path.write_bytes(pickle.dumps(_EXPECTED_REFS, protocol=protocol))
    assert load_data_pickle(path) == _EXPECTED_REFS


def test_invalid_utf8_names_file_and_place_unless_another_encoding_is_chosen(tmp_path):
    path = tmp_path / "refs(google).p"
    refs = [{b"sentences": [{b"raw": b"na\xefve"}]}]
    path.write_bytes(_py2_pickle(refs, protocol=2))

    with pytest.raises(PickleTextError) as raised:
        load_data_pickle(path)
    message = str(raised.value)
    assert str(path) in message
    assert "[0]['sentences'][0]['raw']" in message
    assert "utf-8" in message

    latin = load_data_pickle(path, text_encoding="latin-1")
    assert latin == [{"sentences": [{"raw": "na\u00efve"}]}]


class _RunsShell:
    """Pickles to a call of os.system: what a tampered refs file would hold."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _malicious_pickle(marker, protocol: int) -> bytes:
    return pickle.dumps([{"ref_id": 1}, _RunsShell(f"touch '{marker}'")], protocol=protocol)


def test_the_malicious_fixture_does_run_code_under_plain_pickle(tmp_path):
    # Guards the next test: its payload is live, so "no marker" there means "blocked".
    marker = tmp_path / "marker"
    pickle.loads(_malicious_pickle(marker, protocol=2))
    assert marker.exists()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_globals_are_refused_naming_file_and_global_and_no_code_runs(tmp_path, protocol):
    marker = tmp_path / "marker"
    path = tmp_path / "refs(unc).p"
    path.write_bytes(_malicious_pickle(marker, protocol))

    with pytest.raises(UnsafePickleError) as raised:
        load_data_pickle(path)
    message = str(raised.value)
    assert str(path) in message
    assert f"{os.system.__module__}.system" in message  # posix.system (nt.system on Windows)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_find_class_refuses_every_global_on_its_own(tmp_path, protocol):
    # The second layer, without the opcode check in front of it.
    marker = tmp_path / "marker"
    payload = _malicious_pickle(marker, protocol)
    with pytest.raises(UnsafePickleError) as raised:
        RestrictedUnpickler(io.BytesIO(payload), name="refs(umd).p").load()
    assert "refs(umd).p" in str(raised.value)
    assert f"global {os.system.__module__}.system" in str(raised.value)
    assert not marker.exists()


@pytest.mark.parametrize("payload, opcode, offset", [
    # EXT1 code 240: resolved from copyreg's process-wide cache when it has been loaded before.
    (b"\x80\x02\x82\xf0)R.", "EXT1", 2),
    (b"Pfile-123\n.", "PERSID", 0),
    (b"\x80\x02]q\x00(K\x01e\x8f.", "EMPTY_SET", 9),
])
def test_other_non_data_opcodes_are_refused_with_their_offset(tmp_path, payload, opcode, offset):
    path = tmp_path / "refs.p"
    path.write_bytes(payload)
    with pytest.raises(UnsafePickleError) as raised:
        load_data_pickle(path)
    assert str(path) in str(raised.value)
    assert f"byte {offset}: opcode {opcode}" in str(raised.value)


@pytest.mark.parametrize("payload", [
    pickle.dumps({"a": [1, 2, 3]}, protocol=2)[:-4],  # truncated
    b"\x80\x02}q\x00(X\xff\xff\xff\x7fab",  # string length past the end
    b"\xfe.",  # not an opcode
])
def test_malformed_pickles_raise_naming_the_file(tmp_path, payload):
    path = tmp_path / "refs.p"
    path.write_bytes(payload)
    with pytest.raises(pickle.UnpicklingError, match="malformed pickle") as raised:
        load_data_pickle(path)
    assert str(path) in str(raised.value)
    assert not isinstance(raised.value, UnsafePickleError)
