"""Tests for data_pipelines/ops/decode.py: builder examples (as ``as_data_source`` returns them)
-> working examples with pixel coordinates."""

import io

import numpy as np
import pytest
from PIL import Image

from data_pipelines.images import ImageError
from data_pipelines.ops import fields
from data_pipelines.ops.decode import decode


def _png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _points(x, y):
    return np.tile(np.asarray([[x, y]], np.float32), (16, 1))


def _narratives_record(image):
    """Two narratives of a 6x4 image, utterances stored flat as the builder does."""
    return {
        "image": image, "image/id": b"42", "image/filename": b"000000000042.jpg",
        "image/height": np.int32(4), "image/width": np.int32(6),
        "narratives": {"caption": [b"a dog here", b"grass"], "annotator_id": [np.int32(3),
                                                                              np.int32(5)]},
        "utterances": {
            "narrative": [np.int32(0), np.int32(0), np.int32(1)],
            "text": [b"a dog", b"here", b"grass"],
            "start_time": [np.float32(0), np.float32(1), np.float32(0)],
            "end_time": [np.float32(1), np.float32(2), np.float32(1)],
            "box": [np.asarray([0, 0, 0.5, 0.5], np.float32),
                    np.asarray([0.5, 0.25, 1, 1], np.float32),
                    np.asarray([0, 0.5, 1, 1], np.float32)],
            "points": [_points(0.25, 0.25), _points(0.75, 0.5), _points(0.5, 0.75)],
            "valid": [np.True_, np.False_, np.True_],
        },
        "trace": {"narrative": [np.int32(0), np.int32(0), np.int32(1)],
                  "xy": [np.asarray([0.5, 0.5], np.float32), np.asarray([1, 0.25], np.float32),
                         np.asarray([0, 1], np.float32)],
                  "t": [np.float64(0.5), np.float64(1.5), np.float64(0.25)]},
    }


def test_localized_narratives_record():
    pixels = np.arange(6 * 4 * 3, dtype=np.uint8).reshape(4, 6, 3)
    out = decode()(_narratives_record(_png(pixels)), np.random.default_rng(0))
    np.testing.assert_array_equal(out[fields.IMAGE], pixels)
    assert out[fields.IMAGE_ID] == "42"
    first, second = out[fields.NARRATIVES]
    assert first[fields.CAPTION] == "a dog here" and second[fields.CAPTION] == "grass"
    assert first[fields.UTTERANCE_TEXTS] == ["a dog", "here"]
    # Normalized -> pixels of the 6x4 image.
    np.testing.assert_allclose(first[fields.UTTERANCE_BOXES], [[0, 0, 3, 2], [3, 1, 6, 4]])
    np.testing.assert_allclose(first[fields.UTTERANCE_POINTS][:, 0], [[1.5, 1], [4.5, 2]])
    assert first[fields.UTTERANCE_POINTS].shape == (2, 16, 2)
    np.testing.assert_array_equal(first[fields.UTTERANCE_VALID], [True, False])
    np.testing.assert_array_equal(first[fields.UTTERANCE_VISIBLE], [True, True])
    np.testing.assert_allclose(second[fields.UTTERANCE_BOXES], [[0, 2, 6, 4]])
    # The stored narrative, normalized, kept for word alignment.
    stored = first[fields.ALIGNMENT_TRACES]
    assert stored.caption == "a dog here" and stored.utterances == ("a dog", "here")
    np.testing.assert_allclose(stored.boxes, [[0, 0, 0.5, 0.5], [0.5, 0.25, 1, 1]])


def test_decoded_array_images_pass_through_and_wrong_ones_are_refused():
    pixels = np.zeros((4, 6, 3), np.uint8)
    out = decode()(_narratives_record(pixels), np.random.default_rng(0))
    assert out[fields.IMAGE] is pixels
    with pytest.raises(ValueError, match="000000000042.jpg: image must be uint8"):
        decode()(_narratives_record(pixels.astype(np.float32)), np.random.default_rng(0))


def test_corrupt_image_bytes_raise_image_error_naming_the_file():
    record = _narratives_record(_png(np.zeros((4, 6, 3), np.uint8))[:30])
    with pytest.raises(ImageError, match="000000000042.jpg"):
        decode()(record, np.random.default_rng(0))


def test_refcoco_record_groups_expressions_and_decodes_masks():
    mask = np.zeros((4, 6, 1), np.uint8)
    mask[:2, :3] = 255
    record = {
        "image": np.zeros((4, 6, 3), np.uint8), "image/id": b"7", "image/filename": b"c.jpg",
        "objects": {"id": [np.int64(100), np.int64(200)], "ref_id": [1, 2],
                    "box": [np.asarray([0, 0, 0.5, 0.5], np.float32),
                            np.asarray([0.5, 0.5, 1, 1], np.float32)],
                    "category": [1, 2],
                    # As TFDS decodes it, and as PNG bytes.
                    "mask": [mask, _png(np.zeros((4, 6), np.uint8))]},
        "expressions": {"object": [np.int32(1), np.int32(0), np.int32(1)],
                        "text": [b"right one", b"left one", b"the other"],
                        "id": [7, 8, 9]},
    }
    out = decode()(record, np.random.default_rng(0))
    np.testing.assert_allclose(out[fields.OBJECT_BOXES], [[0, 0, 3, 2], [3, 2, 6, 4]])
    np.testing.assert_array_equal(out[fields.OBJECT_IDS], [100, 200])
    assert out[fields.OBJECT_TEXTS] == [["left one"], ["right one", "the other"]]
    assert out[fields.OBJECT_MASKS].dtype == bool
    np.testing.assert_array_equal(out[fields.OBJECT_MASKS][0], mask[:, :, 0] > 0)
    assert not out[fields.OBJECT_MASKS][1].any()
    assert fields.num_objects(out) == 2


def test_visual_genome_record_and_empty_objects():
    record = {"image": np.zeros((10, 20, 3), np.uint8), "image/id": b"3",
              "objects": {"id": [np.int64(5)], "box": [np.asarray([0.1, 0.2, 0.3, 0.4],
                                                                  np.float32)],
                          "phrase": [b"a red car"]}}
    out = decode()(record, np.random.default_rng(0))
    np.testing.assert_allclose(out[fields.OBJECT_BOXES], [[2, 2, 6, 4]], rtol=1e-6)
    assert out[fields.OBJECT_TEXTS] == [["a red car"]]
    empty = {**record, "objects": {"id": [], "box": [], "phrase": []}}
    out = decode()(empty, np.random.default_rng(0))
    assert out[fields.OBJECT_BOXES].shape == (0, 4) and out[fields.OBJECT_TEXTS] == []


def test_mask_of_the_wrong_size_is_refused():
    record = {"image": np.zeros((4, 6, 3), np.uint8), "image/id": b"7",
              "objects": {"id": [1], "box": [np.zeros(4, np.float32)],
                          "mask": [np.zeros((5, 6, 1), np.uint8)]},
              "expressions": {"object": [0], "text": [b"x"], "id": [1]}}
    with pytest.raises(ValueError, match="object 0 mask is 6x5, the image 6x4"):
        decode()(record, np.random.default_rng(0))


def test_encoded_images_keep_the_stored_frame_of_their_boxes():
    # An EXIF orientation tag is not applied: the stored boxes are in the stored frame.
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(buffer, format="JPEG", exif=exif)
    out = decode()(_narratives_record(buffer.getvalue()), np.random.default_rng(0))
    assert out[fields.IMAGE].shape == (4, 6, 3)
    np.testing.assert_allclose(out[fields.NARRATIVES][0][fields.UTTERANCE_BOXES][0], [0, 0, 3, 2])
