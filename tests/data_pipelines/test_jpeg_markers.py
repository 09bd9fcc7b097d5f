"""Tests for data_pipelines/jpeg_markers.py: intact files of every common layout pass, damage
that shows in the markers is reported with its byte offset."""

import io

import numpy as np
import pytest
from PIL import Image

from data_pipelines import jpeg_markers


def _jpeg(height, width, *, mode="RGB", **options):
    rgb = np.random.default_rng(height * width).integers(0, 255, (height, width, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buffer, format="JPEG", **options)
    return buffer.getvalue()


@pytest.mark.parametrize("height, width, mode, options", [
    (32, 32, "RGB", {}),
    (17, 23, "RGB", {"restart_marker_blocks": 1}),             # 4:2:0, partial MCUs
    (17, 23, "RGB", {"restart_marker_blocks": 3, "subsampling": 0}),
    (19, 29, "RGB", {"restart_marker_rows": 1, "subsampling": 1}),
    (13, 30, "L", {"restart_marker_blocks": 2}),              # one component, 8x8 MCUs
    (21, 18, "RGB", {"progressive": True, "restart_marker_blocks": 1}),
    (9, 31, "CMYK", {"restart_marker_blocks": 2}),
])
def test_intact_files_pass(height, width, mode, options):
    data = _jpeg(height, width, mode=mode, **options)
    jpeg_markers.check(data)
    jpeg_markers.check(data + b"trailing bytes after EOI")
    jpeg_markers.check(data[:len(data) // 2])  # truncation is the decoder's to report


def test_restart_markers_out_of_sequence_or_missing():
    data = _jpeg(17, 23, restart_marker_blocks=1)
    restarts = [i for i in range(len(data) - 1)
                if data[i] == 0xFF and 0xD0 <= data[i + 1] <= 0xD7]
    with pytest.raises(jpeg_markers.CorruptJpegError, match=f"restart marker 2 at byte "
                                                            f"{restarts[0]} where 0 should come"):
        jpeg_markers.check(data[:restarts[0]] + data[restarts[2]:])
    with pytest.raises(jpeg_markers.CorruptJpegError, match="has 1 restart marker.*4 MCUs.*need 3"):
        jpeg_markers.check(data[:restarts[1]] + b"\xff\xd9")


def test_a_marker_inside_the_scan_data():
    data = _jpeg(16, 16)
    sos = data.index(b"\xff\xda")
    inside = sos + 40
    with pytest.raises(jpeg_markers.CorruptJpegError, match=f"marker 0x01 at byte {inside}"):
        jpeg_markers.check(data[:inside] + b"\xff\x01" + data[inside:])


def test_headers():
    with pytest.raises(jpeg_markers.CorruptJpegError, match="no start-of-image"):
        jpeg_markers.check(b"\x89PNG")
    data = _jpeg(8, 8)
    sof = data.index(b"\xff\xc0")
    with pytest.raises(jpeg_markers.CorruptJpegError, match="scan at byte .* before the frame"):
        jpeg_markers.check(data[:sof] + data[sof + 2 + int.from_bytes(data[sof + 2:sof + 4],
                                                                      "big"):])
