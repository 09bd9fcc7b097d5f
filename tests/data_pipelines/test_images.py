"""Tests for data_pipelines/images.py: every pixel format ends as uint8 RGB in the stored frame
(EXIF orientation only for user photos), alpha dropped or composited, corrupt files named."""

import io

import numpy as np
import pytest
from PIL import Image

from data_pipelines.images import (ALPHA_ON_WHITE, ImageError, encode_for_storage, read_image,
                                   read_upright_photo)


def _save(image, path, **kwargs):
    image.save(path, **kwargs)
    return str(path)


def _decode_like_tfds(data: bytes) -> np.ndarray:
    # What a TFDS Image feature does when reading back: no EXIF rotation, no conversion.
    return np.asarray(Image.open(io.BytesIO(data)))


def test_grayscale_png_repeats_the_values(tmp_path):
    gray = np.array([[0, 10], [200, 255]], np.uint8)
    path = _save(Image.fromarray(gray, mode="L"), tmp_path / "g.png")
    out = read_image(path, name="g.png")
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    # Pure cyan ink: no red, full green and blue. JPEG is lossy, hence the tolerance.
    cmyk = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    path = _save(cmyk, tmp_path / "c.jpg", quality=95)
    assert Image.open(path).mode == "CMYK"
    out = read_image(path, name="c.jpg")
    assert out.shape == (16, 16, 3)
    np.testing.assert_allclose(out.reshape(-1, 3).mean(0), [0, 255, 255], atol=3)


def _rgba_png(tmp_path):
    rgba = np.array([[[200, 100, 50, 128], [7, 8, 9, 0], [10, 20, 30, 255]]], np.uint8)
    return _save(Image.fromarray(rgba, mode="RGBA"), tmp_path / "a.png")


def test_rgba_png_drops_alpha_as_tf_decodes(tmp_path):
    # tf.image.decode_image(channels=3) and PIL convert("RGB") keep a transparent pixel's colour.
    path = _rgba_png(tmp_path)
    expected = [[[200, 100, 50], [7, 8, 9], [10, 20, 30]]]
    np.testing.assert_array_equal(read_image(path, name="a.png"), expected)
    data, _, _ = encode_for_storage(path, name="a.png")
    np.testing.assert_array_equal(_decode_like_tfds(data), expected)


def test_rgba_png_is_composited_on_white_on_request(tmp_path):
    out = read_image(_rgba_png(tmp_path), name="a.png", alpha=ALPHA_ON_WHITE)
    alpha = 128 / 255
    expected = np.round(np.array([[[200, 100, 50]]]) * alpha + 255 * (1 - alpha))
    np.testing.assert_array_equal(out[0, 0], expected[0, 0])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])   # fully transparent -> white
    np.testing.assert_array_equal(out[0, 2], [10, 20, 30])      # opaque -> unchanged
    with pytest.raises(ValueError, match="alpha handling 'black'"):
        read_image(_rgba_png(tmp_path), name="a.png", alpha="black")


def test_palette_transparency_is_dropped_or_composited(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    path = _save(image, tmp_path / "p.png", transparency=1)
    np.testing.assert_array_equal(read_image(path, name="p.png")[0], [[255, 0, 0], [0, 0, 255]])
    np.testing.assert_array_equal(read_image(path, name="p.png", alpha=ALPHA_ON_WHITE)[0],
                                  [[255, 0, 0], [255, 255, 255]])


def test_sixteen_bit_png_is_scaled_to_eight_bit(tmp_path):
    values = np.array([[0, 257, 65535, 32896, 1000]], np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "d.png")
    assert Image.open(path).mode.startswith("I")
    out = read_image(path, name="d.png")
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 255, 128, 4])  # round(1000/257) = 4
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    data, height, width = encode_for_storage(path, name="d.png")
    assert data.startswith(b"\x89PNG") and (height, width) == (1, 5)
    np.testing.assert_array_equal(_decode_like_tfds(data), out)


def _rotated_jpeg(path):
    """Stored 16 wide x 8 high: left half black, right half white; EXIF 6 = turn 90 deg clockwise
    to display, so the displayed image is 8 wide x 16 high with black on top."""
    stored = np.zeros((8, 16, 3), np.uint8)
    stored[:, 8:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    return str(path)


def test_data_set_images_keep_the_stored_frame(tmp_path):
    # Annotations are in the stored frame (TF, TFDS and pycocotools ignore EXIF): no rotation.
    path = _rotated_jpeg(tmp_path / "r.jpg")
    out = read_image(path, name="r.jpg")
    assert out.shape == (8, 16, 3)
    assert out[:, :6].mean() < 10 and out[:, 10:].mean() > 245
    data, height, width = encode_for_storage(path, name="r.jpg")
    assert data == open(path, "rb").read() and (height, width) == (8, 16)
    np.testing.assert_array_equal(_decode_like_tfds(data), out)


def test_user_photos_are_turned_upright(tmp_path):
    path = _rotated_jpeg(tmp_path / "r.jpg")
    out = read_upright_photo(path, name="r.jpg")
    assert out.shape == (16, 8, 3)
    assert out[:6].mean() < 10 and out[10:].mean() > 245


def test_encode_for_storage_keeps_plain_jpeg_bytes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    path = _save(Image.fromarray(rgb), tmp_path / "x.jpg")
    data, height, width = encode_for_storage(path, name="x.jpg")
    assert data == open(path, "rb").read()
    assert (height, width) == (5, 7)


def test_encode_for_storage_keeps_plain_png_bytes(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 255, (3, 4, 3), dtype=np.uint8)
    path = _save(Image.fromarray(rgb), tmp_path / "x.png")
    data, height, width = encode_for_storage(path, name="x.png")
    assert data == open(path, "rb").read() and (height, width) == (3, 4)
    np.testing.assert_array_equal(_decode_like_tfds(data), rgb)


def test_encode_for_storage_converts(tmp_path):
    gray_path = _save(Image.fromarray(np.full((2, 3), 7, np.uint8)), tmp_path / "g.jpg")
    data, height, width = encode_for_storage(gray_path, name="g.jpg")
    assert data.startswith(b"\x89PNG") and (height, width) == (2, 3)
    np.testing.assert_array_equal(_decode_like_tfds(data), read_image(gray_path, name="g.jpg"))


@pytest.mark.parametrize("suffix", ["jpg", "png"])
def test_truncated_file_names_the_image(tmp_path, suffix):
    rgb = np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    path = _save(Image.fromarray(rgb), tmp_path / f"t.{suffix}")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ImageError, match=f"train2017/t.{suffix}"):
        read_image(path, name=f"train2017/t.{suffix}")
    with pytest.raises(ImageError, match=f"train2017/t.{suffix}"):
        encode_for_storage(path, name=f"train2017/t.{suffix}")
    with pytest.raises(ImageError, match="bytes-image"):
        read_image(data[: len(data) // 2], name="bytes-image")


def test_missing_and_garbage_files_name_the_image(tmp_path):
    with pytest.raises(ImageError, match="missing.jpg"):
        read_image(str(tmp_path / "missing.jpg"), name="missing.jpg")
    with pytest.raises(ImageError, match="missing.jpg"):
        encode_for_storage(str(tmp_path / "missing.jpg"), name="missing.jpg")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="junk.jpg"):
        read_image(str(tmp_path / "junk.jpg"), name="junk.jpg")


def test_float_images_are_refused(tmp_path):
    path = _save(Image.fromarray(np.ones((2, 2), np.float32)), tmp_path / "f.tiff")
    with pytest.raises(ImageError, match="f.tiff.*mode 'F'"):
        read_image(path, name="f.tiff")


def test_reads_from_bytes(tmp_path):
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    np.testing.assert_array_equal(read_image(buffer.getvalue(), name="b"), rgb)


def _restart_jpeg():
    """A 32x32 JPEG with a restart marker after every 16x16 MCU (4 MCUs, 3 markers)."""
    rgb = np.random.default_rng(3).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=90, restart_marker_blocks=1)
    data = buffer.getvalue()
    restarts = [i for i in range(len(data) - 1)
                if data[i] == 0xFF and 0xD0 <= data[i + 1] <= 0xD7]
    assert len(restarts) == 3
    return data, restarts


@pytest.mark.parametrize("damage", ["interval cut out", "scan cut short", "marker pasted in"])
def test_jpeg_damage_that_libjpeg_hides_is_caught(damage):
    # Each of these decodes with Pillow without an error, to wrong pixels.
    data, restarts = _restart_jpeg()
    damaged = {"interval cut out": data[:restarts[0]] + data[restarts[1]:],
               "scan cut short": data[:restarts[1]] + b"\xff\xd9",
               "marker pasted in": data[:restarts[2] - 5] + b"\xff\xe0\x00\x04ab"
                                   + data[restarts[2] - 5:]}[damage]
    Image.open(io.BytesIO(damaged)).load()
    with pytest.raises(ImageError, match="val2017/x.jpg: corrupt JPEG data"):
        read_image(damaged, name="val2017/x.jpg")
