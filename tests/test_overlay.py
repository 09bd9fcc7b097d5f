"""The overlay: drawn at the image's size, changed where traces, boxes, masks and the caption
are drawn, unchanged far from them, the input left alone."""

import io

import numpy as np
from PIL import Image

from pixelllm import overlay

SIZE = (48, 64)  # height, width


def _image() -> np.ndarray:
    return np.full((*SIZE, 3), 90, np.uint8)


def test_a_trace_is_drawn_where_its_points_are_and_nowhere_far():
    image = _image()
    original = image.copy()
    points = np.asarray([[40.0, 8.0], [56.0, 8.0]])
    drawn = overlay.draw(image, overlay.Drawing(traces=(("dog", points),)))
    np.testing.assert_array_equal(image, original)
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    for x, y in points.astype(int):
        assert (drawn[y, x] != image[y, x]).any()
    # The left half's lower part is far from the trace and its label; no caption band.
    np.testing.assert_array_equal(drawn[24:, :24], image[24:, :24])
    # Each trace gets its own colour.
    two = overlay.draw(image, overlay.Drawing(traces=(("a", points), ("b", points + [0, 30]))))
    assert tuple(two[8, 48]) != tuple(two[38, 48])


def test_boxes_masks_and_the_caption_band():
    image = _image()
    mask = np.zeros(SIZE, bool)
    mask[10:20, 30:40] = True
    drawn = overlay.draw(image, overlay.Drawing(
        boxes=(("car", np.asarray([4.0, 4.0, 20.0, 20.0])),), masks=(mask,),
        text="a red car on the left"))
    assert (drawn[12, 4] != image[12, 4]).any()          # the box's left edge
    assert (drawn[15, 30] != image[15, 30]).any()        # the mask's outline
    np.testing.assert_array_equal(drawn[15, 35], image[15, 35])  # inside the mask: kept
    assert (drawn[-2:] != image[-2:]).any()              # the caption band at the bottom
    np.testing.assert_array_equal(drawn[:3, 40:], image[:3, 40:])


def test_the_overlay_saves_as_a_png_of_the_image_size():
    image = np.random.default_rng(0).integers(0, 255, (*SIZE, 3), np.uint8)
    drawn = overlay.draw(image, overlay.Drawing(text="x", traces=(("x", np.zeros((0, 2))),)))
    buffer = io.BytesIO()
    Image.fromarray(drawn).save(buffer, format="PNG")
    assert Image.open(buffer).size == (SIZE[1], SIZE[0])
