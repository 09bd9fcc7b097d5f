"""RoIAlign against plain numpy loops of its definition: bilinear samples at half-pixel-aligned
positions, zero outside the map (official scenic); inside the map, the same as torchvision's
``roi_align(aligned=True)`` clamping rule, also written out here (torchvision does not install
beside the CPU torch wheel)."""

import numpy as np
import pytest

from pixelllm.nn.roi_align import multilevel_roi_align, roi_align


def _bilinear_zero_padded(feature, y, x):
    height, width = feature.shape[:2]
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    value = np.zeros(feature.shape[-1])
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < height and 0 <= xx < width:
                value += wy * wx * feature[yy, xx]
    return value


def _bilinear_torchvision(feature, y, x):
    """torchvision's ``bilinear_interpolate``: zero beyond one cell outside, else clamped."""
    height, width = feature.shape[:2]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(feature.shape[-1])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= height - 1:
        y0 = y1 = height - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= width - 1:
        x0 = x1 = width - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * feature[y0, x0] + (1 - ly) * lx * feature[y0, x1]
            + ly * (1 - lx) * feature[y1, x0] + ly * lx * feature[y1, x1])


def _numpy_roi_align(feature, box, output_size, ratio, sample):
    x0, y0, x1, y1 = box
    bin_w, bin_h = (x1 - x0) / output_size, (y1 - y0) / output_size
    out = np.zeros((output_size, output_size, feature.shape[-1]))
    for i in range(output_size):
        for j in range(output_size):
            for a in range(ratio):
                for b in range(ratio):
                    # aligned=True: continuous coordinates shifted by half a pixel.
                    y = y0 + (i + (a + 0.5) / ratio) * bin_h - 0.5
                    x = x0 + (j + (b + 0.5) / ratio) * bin_w - 0.5
                    out[i, j] += sample(feature, y, x) / ratio ** 2
    return out


def test_matches_the_zero_padded_definition_on_boxes_crossing_the_border():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2, 9, 11, 3)).astype(np.float32)
    low = rng.uniform(-3, 8, (2, 5, 2))
    boxes = np.concatenate([low, low + rng.uniform(0.3, 6, (2, 5, 2))], -1).astype(np.float32)
    result = np.asarray(roi_align(features, boxes, output_size=3, sampling_ratio=2))
    assert result.shape == (2, 5, 3, 3, 3)
    for b in range(2):
        for t in range(5):
            expected = _numpy_roi_align(features[b], boxes[b, t], 3, 2, _bilinear_zero_padded)
            np.testing.assert_allclose(result[b, t], expected, atol=1e-5)


def test_equals_torchvision_aligned_inside_the_map():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(1, 8, 8, 4)).astype(np.float32)
    # Every sample inside [0.5, size - 0.5]: both boundary rules agree there.
    low = rng.uniform(0.5, 3.5, (1, 6, 2))
    boxes = np.concatenate([low, low + rng.uniform(0.2, 4.0, (1, 6, 2))], -1).astype(np.float32)
    result = np.asarray(roi_align(features, boxes, output_size=2, sampling_ratio=3))
    for t in range(6):
        expected = _numpy_roi_align(features[0], boxes[0, t], 2, 3, _bilinear_torchvision)
        np.testing.assert_allclose(result[0, t], expected, atol=1e-5)


def test_multilevel_reads_each_box_on_its_level():
    rng = np.random.default_rng(2)
    levels = [rng.normal(size=(1, 8, 8, 2)).astype(np.float32),
              rng.normal(size=(1, 4, 4, 2)).astype(np.float32)]
    boxes = np.array([[[2.0, 2.0, 10.0, 12.0], [4.0, 0.0, 16.0, 8.0]]], np.float32)
    level_index = np.array([[1, 0]], np.int32)
    result = np.asarray(multilevel_roi_align(levels, boxes, level_index, strides=(2.0, 4.0),
                                             output_size=2, sampling_ratio=2))
    np.testing.assert_allclose(result[0, 0], _numpy_roi_align(
        levels[1][0], boxes[0, 0] / 4.0, 2, 2, _bilinear_zero_padded), atol=1e-5)
    np.testing.assert_allclose(result[0, 1], _numpy_roi_align(
        levels[0][0], boxes[0, 1] / 2.0, 2, 2, _bilinear_zero_padded), atol=1e-5)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="boxes"):
        roi_align(np.zeros((1, 4, 4, 2), np.float32), np.zeros((1, 4), np.float32),
                  output_size=2, sampling_ratio=2)
