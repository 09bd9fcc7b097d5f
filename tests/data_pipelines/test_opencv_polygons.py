"""OpenCV's polygon fill without OpenCV: pictures cv2 4.14 drew, and cv2 itself where installed."""

import numpy as np
import pytest

from data_pipelines.opencv_polygons import fill_polygon


def _picture(rows):
    return np.array([[c == "#" for c in row] for row in rows], np.uint8)


# cv2.polylines + cv2.fillPoly (value 1) of each polygon, as LISA draws ReasonSeg masks.
CV2_PICTURES = [
    ([(1, 0), (8, 3), (3, 6)], [".##......",
                                ".####....",
                                "..#####..",
                                "..#######",
                                "..######.",
                                "...###...",
                                "...#....."]),
    # Vertices outside the canvas: clipped.
    ([(-3, 2), (5, -4), (9, 5), (2, 9)], ["#######"] * 6),
    # Concave: the notch's scan lines stop at the edge crossings.
    ([(0, 0), (6, 0), (6, 4), (3, 1), (0, 4)], ["#######",
                                                "#######",
                                                "###.###",
                                                "##...##",
                                                "#.....#"]),
]


@pytest.mark.parametrize("vertices, rows", CV2_PICTURES)
def test_matches_pictures_drawn_by_cv2(vertices, rows):
    canvas = np.zeros((len(rows), len(rows[0])), np.uint8)
    fill_polygon(canvas, vertices, 1)
    np.testing.assert_array_equal(canvas, _picture(rows))


def test_writes_the_value_over_what_is_there():
    canvas = np.full((3, 4), 7, np.uint8)
    fill_polygon(canvas, [(1, 0), (2, 0), (2, 1), (1, 1)], 255)
    expected = np.full((3, 4), 7, np.uint8)
    expected[0:2, 1:3] = 255
    np.testing.assert_array_equal(canvas, expected)


def test_degenerate_polygons_draw_their_lines():
    # As cv2.fillPoly draws a one- and a two-vertex polygon.
    point = np.zeros((3, 3), np.uint8)
    fill_polygon(point, [(1, 1)], 1)
    assert point.sum() == 1 and point[1, 1] == 1
    line = np.zeros((3, 5), np.uint8)
    fill_polygon(line, [(0, 2), (4, 0)], 1)
    np.testing.assert_array_equal(line, _picture(["....#", "..##.", "##..."]))
    with pytest.raises(ValueError, match="at least one vertex"):
        fill_polygon(line, [], 1)


def test_agrees_with_cv2_on_random_polygons():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for trial in range(400):
        height, width = rng.integers(1, 30, size=2)
        low, high = (-10, 40) if trial % 2 else (0, 30)
        vertices = rng.uniform(low, high, size=(rng.integers(1, 9), 2)).astype(np.int32)
        expected = np.zeros((height, width), np.uint8)
        cv2.polylines(expected, vertices[None], True, 1, 1)
        cv2.fillPoly(expected, vertices[None], 1)
        canvas = np.zeros((height, width), np.uint8)
        fill_polygon(canvas, vertices.tolist(), 1)
        np.testing.assert_array_equal(canvas, expected, err_msg=str(vertices.tolist()))
