"""A check of a JPEG file's marker structure, for the corruption that libjpeg hides.

libjpeg recovers from damaged entropy-coded data with a warning ("Corrupt JPEG data: ...",
"Premature end of data segment") and fills what it lost with flat blocks; Pillow's decoder
discards those warnings, so such a file decodes to garbage without an error. Pillow raises only
for a file that ends before the decoder is done and for fatal errors (bad headers or tables).

:func:`check` walks the markers without decoding and catches the damage that shows in them:

* a marker that may not stand inside or right after the entropy-coded data of a sequential
  image (anything but an in-sequence restart marker, then EOI once every component has been
  scanned), e.g. a block of bytes cut out or pasted in across a marker;
* restart markers out of sequence or too few, when the file uses them (``DRI``): a lost or
  repeated restart interval, a scan cut short and closed with EOI;
* a segment whose length runs past the end of the file, a scan before the frame header.

What no marker shows cannot be caught here: changed, zeroed, inserted or removed bytes inside
the entropy-coded data of a file without restart markers (or inside one restart interval)
decode to wrong pixels silently, as in every JPEG reader that does not fail on libjpeg warnings.
"""

from __future__ import annotations

import math

_SOI, _EOI, _SOS, _DRI, _DNL = 0xD8, 0xD9, 0xDA, 0xDD, 0xDC
_RST = range(0xD0, 0xD8)
# Start-of-frame markers (C4 DHT, C8 JPG and CC DAC are not frames).
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
                  0xCF})
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
# Markers without a length field besides SOI, EOI and RSTn.
_STANDALONE = frozenset({0x01})


class CorruptJpegError(ValueError):
    """A JPEG file whose marker structure is damaged; says where (byte offset) and how."""


def check(data: bytes) -> None:
    """Raises :class:`CorruptJpegError` if the JPEG ``data``'s markers show damage (see the
    module docstring). A file that ends early passes: the decoder reports truncation itself."""
    if data[:2] != b"\xff\xd8":
        raise CorruptJpegError("no start-of-image marker")
    frame: _Frame | None = None
    restart_interval = 0
    scanned: set[int] = set()
    position = 2
    while True:
        marker, position = _next_marker(data, position)
        if marker is None or marker == _EOI:
            return
        if marker in _RST or marker == _SOI:
            raise CorruptJpegError(f"marker 0x{marker:02X} at byte {position - 2} outside "
                                   "entropy-coded data")
        if marker in _STANDALONE:
            continue
        if position + 2 > len(data):
            return
        length = int.from_bytes(data[position:position + 2], "big")
        if length < 2:
            raise CorruptJpegError(f"segment 0x{marker:02X} at byte {position - 2} declares "
                                   f"length {length}")
        segment = data[position + 2:position + length]
        if len(segment) < length - 2:
            return
        position += length
        if marker in _SOF:
            frame = _Frame.parse(segment, progressive=marker in _PROGRESSIVE_SOF)
        elif marker == _DRI:
            restart_interval = int.from_bytes(segment[:2], "big")
        elif marker == _SOS:
            if frame is None:
                raise CorruptJpegError(f"scan at byte {position - length - 2} before the frame "
                                       "header")
            components = list(segment[1:1 + 2 * segment[0]:2])
            position, restarts = _entropy_coded_data(data, position)
            if position is None:
                return
            if restart_interval and not frame.progressive and frame.height:
                expected = math.ceil(frame.mcus(components) / restart_interval) - 1
                if restarts != expected:
                    raise CorruptJpegError(
                        f"scan ending at byte {position} has {restarts} restart marker(s); its "
                        f"{frame.mcus(components)} MCUs at interval {restart_interval} need "
                        f"{expected}")
            scanned.update(components)
            if not frame.progressive and scanned >= set(frame.sampling):
                following, _ = _next_marker(data, position)
                if following not in (_EOI, _DNL, None):
                    raise CorruptJpegError(f"marker 0x{following:02X} at byte {position} where "
                                           "the image should end (entropy-coded data damaged)")


class _Frame:
    """The frame header's size, per-component sampling factors and coding process."""

    def __init__(self, *, height: int, width: int, sampling: dict[int, tuple[int, int]],
                 progressive: bool):
        self.height, self.width, self.sampling = height, width, sampling
        self.progressive = progressive

    @classmethod
    def parse(cls, segment: bytes, *, progressive: bool) -> _Frame:
        if len(segment) < 6 or len(segment) < 6 + 3 * segment[5]:
            raise CorruptJpegError("frame header shorter than its component count")
        sampling = {segment[6 + 3 * i]: (segment[7 + 3 * i] >> 4, segment[7 + 3 * i] & 15)
                    for i in range(segment[5])}
        return cls(height=int.from_bytes(segment[1:3], "big"),
                   width=int.from_bytes(segment[3:5], "big"), sampling=sampling,
                   progressive=progressive)

    def mcus(self, components: list[int]) -> int:
        """MCUs of a scan over ``components`` (ITU T.81 A.2: one component scans its own
        8x8 blocks, several scan interleaved MCUs of the largest sampling factors)."""
        h_max = max(h for h, _ in self.sampling.values())
        v_max = max(v for _, v in self.sampling.values())
        if len(components) == 1:
            h, v = self.sampling.get(components[0], (h_max, v_max))
            return (math.ceil(math.ceil(self.width * h / h_max) / 8)
                    * math.ceil(math.ceil(self.height * v / v_max) / 8))
        return math.ceil(self.width / (8 * h_max)) * math.ceil(self.height / (8 * v_max))


def _next_marker(data: bytes, position: int) -> tuple[int | None, int]:
    """``(marker, position after it)`` of the marker at ``position`` (fill bytes skipped), or
    ``(None, position)`` at the end of the data."""
    if position >= len(data):
        return None, position
    if data[position] != 0xFF:
        raise CorruptJpegError(f"byte {position} is 0x{data[position]:02X} where a marker "
                               "should start")
    while position < len(data) and data[position] == 0xFF:
        position += 1
    if position >= len(data):
        return None, position
    return data[position], position + 1


def _entropy_coded_data(data: bytes, position: int) -> tuple[int | None, int]:
    """``(position of the marker that ends the scan, restart markers in it)``; the position is
    ``None`` when the data ends first. Restart markers must count 0, 1, ..., 7, 0, ..."""
    restarts = 0
    while True:
        found = data.find(b"\xff", position)
        if found < 0 or found + 1 >= len(data):
            return None, restarts
        following = data[found + 1]
        if following in (0x00, 0xFF):  # a stuffed 0xFF byte, or fill before a marker
            position = found + 1 if following == 0xFF else found + 2
            continue
        if following in _RST:
            if following - 0xD0 != restarts % 8:
                raise CorruptJpegError(f"restart marker {following - 0xD0} at byte {found} "
                                       f"where {restarts % 8} should come (a restart interval "
                                       "lost or repeated)")
            restarts += 1
            position = found + 2
            continue
        return found, restarts
