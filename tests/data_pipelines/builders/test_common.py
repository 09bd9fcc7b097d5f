"""Tests for data_pipelines/builders/common.py: the image size check and the field type checks.

The builder base class is exercised through the three builders' tests.
"""

import io

import numpy as np
import pytest
from PIL import Image

from data_pipelines.builders import common
from data_pipelines.skips import BadRecordError, SkipCounter


def _write_png(path, height, width):
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 7, np.uint8)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def test_read_image_of_size_keeps_an_image_of_the_annotated_size(tmp_path):
    path = tmp_path / "ok.png"
    raw = _write_png(path, 2, 3)
    skips = SkipCounter()
    encoded = common.read_image_of_size(str(path), size=(2, 3), size_file="a.json",
                                        record="image 1", skips=skips)
    assert encoded == raw  # an RGB PNG is stored as it is
    assert skips.counts() == {}


def test_read_image_of_size_reports_other_sizes_and_corrupt_files(tmp_path):
    transposed = tmp_path / "transposed.png"
    _write_png(transposed, 3, 2)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(_write_png(tmp_path / "whole.png", 2, 3)[:30])
    skips = SkipCounter()
    for path in (transposed, corrupt):
        assert common.read_image_of_size(str(path), size=(2, 3), size_file="a.json",
                                         record="image 1", skips=skips) is None
    assert skips.counts() == {common.SIZE_MISMATCH: 1, common.CORRUPT_IMAGE: 1}
    with pytest.raises(BadRecordError, match=r"transposed.png: image 1: image is 2x3, a.json "
                                             r"says 3x2"):
        common.read_image_of_size(str(transposed), size=(2, 3), size_file="a.json",
                                  record="image 1", skips=SkipCounter(policy="fail"))


@pytest.mark.parametrize("value, is_int, is_finite", [
    (3, True, True), (True, False, False), (2.0, False, True), (float("nan"), False, False),
    (float("-inf"), False, False), ("1", False, False), (None, False, False),
])
def test_field_type_checks(value, is_int, is_finite):
    assert common.is_int(value) is is_int
    assert common.is_finite_number(value) is is_finite


def test_unusable_record_error_carries_its_reason():
    error = common.UnusableRecordError("empty phrase", "region 4: phrase '' is empty")
    assert isinstance(error, ValueError)
    assert (error.reason, str(error)) == ("empty phrase", "region 4: phrase '' is empty")


def test_read_image_of_size_reads_the_stored_frame(tmp_path):
    # Annotation sizes are those of the stored pixels; an EXIF orientation tag changes nothing.
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(np.full((2, 3, 3), 7, np.uint8)).save(path, quality=95, exif=exif)
    skips = SkipCounter(policy="fail")
    encoded = common.read_image_of_size(str(path), size=(2, 3), size_file="image_data.json",
                                        record="image 1", skips=skips)
    assert encoded == path.read_bytes()
