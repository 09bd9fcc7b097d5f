"""The point head and the EOS box (read from the points, as the official, or from its own output
layer), and the one coordinate conversion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixelllm.models.pixel_llm.point_head import PointHead, to_canvas, to_normalized


def _head(num_points: int = 2, seed: int = 0, box_source: str = "box_out") -> PointHead:
    return PointHead(in_features=8, num_points=num_points, hidden_features=16, depth=2,
                     box_source=box_source, rngs=nnx.Rngs(seed))


def _logit(p) -> np.ndarray:
    p = np.asarray(p, np.float32)
    return np.log(p / (1.0 - p))


@pytest.mark.parametrize("num_points", [1, 2, 5])
def test_output_shapes_for_any_number_of_points(num_points):
    head = _head(num_points)
    out = nnx.jit(head)(jax.random.normal(jax.random.key(1), (2, 3, 7, 8)))   # [B, S, L, D]
    assert out.points.shape == (2, 3, 7, num_points, 2)
    assert out.box.shape == (2, 3, 7, 4)
    assert out.points.dtype == jnp.float32 and out.box.dtype == jnp.float32


def test_num_points_must_be_positive_and_the_box_source_known():
    with pytest.raises(ValueError, match="num_points"):
        _head(num_points=0)
    with pytest.raises(ValueError, match="point_head.box_source 'eos'; choose from"):
        _head(box_source="eos")


def test_official_box_source_reads_the_box_from_the_points():
    """The default (official): no box layer; the box is the min/max of the token's own points,
    so whatever trains the points (traces) trains the referring box."""
    head = PointHead(in_features=8, num_points=2, hidden_features=16, depth=2,
                     rngs=nnx.Rngs(0))
    assert head.box_out is None
    # Corners (0.75, 0.2) and (0.25, 0.6): x out of order, sorted into the box.
    head.points_out.kernel.set_value(jnp.zeros_like(head.points_out.kernel.get_value()))
    head.points_out.bias.set_value(jnp.asarray(_logit([0.75, 0.2, 0.25, 0.6])))
    out = nnx.jit(head)(jax.random.normal(jax.random.key(2), (4, 8)))
    np.testing.assert_allclose(out.box, np.broadcast_to([0.25, 0.2, 0.75, 0.6], (4, 4)),
                               atol=1e-6)
    # With K > 2 points the box spans all of them; gradients of the box reach the point layer.
    head = _head(num_points=5, box_source="points")
    hidden = jax.random.normal(jax.random.key(3), (3, 8))
    out = head(hidden)
    np.testing.assert_allclose(out.box, np.concatenate(
        [out.points.min(axis=-2), out.points.max(axis=-2)], axis=-1), atol=0)
    grads = nnx.grad(lambda module: jnp.sum(module(hidden).box))(head)
    assert np.abs(np.asarray(grads.points_out.kernel.get_value())).max() > 0


def test_outputs_are_read_in_xy_pairs_and_the_box_corners_are_sorted():
    """With zero output kernels the outputs are sigmoid(bias): hand-picked values come back
    in (x, y) order, and the box's two predicted corners are sorted into (x0, y0, x1, y1)."""
    head = _head(num_points=3)
    want_points = [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]
    head.points_out.kernel.set_value(jnp.zeros_like(head.points_out.kernel.get_value()))
    head.points_out.bias.set_value(jnp.asarray(_logit(np.ravel(want_points))))
    # Corners (0.75, 0.2) and (0.25, 0.6): x comes out of order, y in order.
    head.box_out.kernel.set_value(jnp.zeros_like(head.box_out.kernel.get_value()))
    head.box_out.bias.set_value(jnp.asarray(_logit([0.75, 0.2, 0.25, 0.6])))
    out = nnx.jit(head)(jax.random.normal(jax.random.key(2), (4, 8)))
    np.testing.assert_allclose(out.points, np.broadcast_to(want_points, (4, 3, 2)), atol=1e-6)
    np.testing.assert_allclose(out.box, np.broadcast_to([0.25, 0.2, 0.75, 0.6], (4, 4)),
                               atol=1e-6)


def test_points_and_box_stay_inside_the_valid_area_for_any_input():
    """Huge output weights drive the sigmoids into saturation: still inside [0, 1] (inclusive,
    float32 rounds saturated values to the bounds), and the box stays sorted."""
    head = _head(num_points=4)
    for layer in (head.points_out, head.box_out):
        kernel = layer.kernel.get_value()
        layer.kernel.set_value(1e4 * jax.random.normal(jax.random.key(3), kernel.shape))
    hidden = jnp.concatenate([1e6 * jax.random.normal(jax.random.key(4), (64, 8)),
                              jax.random.normal(jax.random.key(5), (64, 8))])
    out = nnx.jit(head)(hidden)
    points, box = np.asarray(out.points), np.asarray(out.box)
    assert np.isfinite(points).all() and np.isfinite(box).all()
    assert points.min() >= 0.0 and points.max() <= 1.0
    assert box.min() >= 0.0 and box.max() <= 1.0
    # Saturation really happened (else the test would not probe the bound).
    assert (points == 0.0).any() or (points == 1.0).any()
    assert (box[:, 0] <= box[:, 2]).all() and (box[:, 1] <= box[:, 3]).all()

    valid_wh = jnp.asarray([24.0, 16.0])
    canvas = np.asarray(to_canvas(out.points, valid_wh))
    assert (canvas >= 0).all()
    assert (canvas[..., 0] <= 24.0).all() and (canvas[..., 1] <= 16.0).all()


def test_eos_box_corners_are_sorted_at_init():
    head = _head(seed=7)
    box = np.asarray(nnx.jit(head)(3.0 * jax.random.normal(jax.random.key(6), (5, 9, 8))).box)
    assert (box[..., 0] <= box[..., 2]).all() and (box[..., 1] <= box[..., 3]).all()
    # Not degenerate: the sort actually had something to do somewhere.
    assert (box[..., 0] < box[..., 2]).any()


def test_to_canvas_and_to_normalized_on_hand_picked_values():
    normalized = jnp.asarray([[0.25, 0.5], [1.0, 0.0]])            # [K=2, 2]
    valid_wh = jnp.asarray([32.0, 24.0])
    np.testing.assert_array_equal(to_canvas(normalized, valid_wh), [[8.0, 12.0], [32.0, 0.0]])
    # A box (x0, y0, x1, y1) uses the same scale on both corners.
    np.testing.assert_array_equal(to_canvas(jnp.asarray([0.5, 0.25, 0.75, 1.0]), valid_wh),
                                  [16.0, 6.0, 24.0, 24.0])
    # Per-image sizes broadcast over the slot/token/point axes.
    per_image = jnp.asarray([[32.0, 24.0], [10.0, 20.0]])[:, None, None, :]   # [B, 1, 1, 2]
    points = jnp.broadcast_to(jnp.asarray([0.5, 0.5]), (2, 3, 2, 2))        # [B, L, K, 2]
    canvas = np.asarray(to_canvas(points, per_image))
    np.testing.assert_array_equal(canvas[0], np.broadcast_to([16.0, 12.0], (3, 2, 2)))
    np.testing.assert_array_equal(canvas[1], np.broadcast_to([5.0, 10.0], (3, 2, 2)))

    np.testing.assert_array_equal(to_normalized(jnp.asarray([8.0, 12.0, 32.0, 0.0]), valid_wh),
                                  [0.25, 0.5, 1.0, 0.0])
    # A zero-size image (an empty slot) never divides by zero.
    assert np.isfinite(to_normalized(jnp.asarray([3.0, 4.0]), jnp.zeros(2))).all()
    x = jax.random.uniform(jax.random.key(8), (6, 4))
    np.testing.assert_allclose(to_normalized(to_canvas(x, valid_wh), valid_wh), x, rtol=1e-6)


def test_gradients_reach_every_head_parameter():
    head = _head(num_points=3)
    hidden = jax.random.normal(jax.random.key(9), (2, 4, 8))

    def loss(module):
        out = module(hidden)
        return jnp.sum(out.points * jnp.arange(6.0).reshape(3, 2)) + jnp.sum(out.box ** 2)

    grads = nnx.jit(nnx.grad(loss))(head)
    flat = nnx.to_flat_state(grads)
    names = {"/".join(map(str, path)) for path, _ in flat}
    assert any(name.startswith("norm") for name in names)
    assert any(name.startswith("points_out") for name in names)
    assert any(name.startswith("box_out") for name in names)
    for path, value in flat:
        value = np.asarray(value.get_value())
        assert np.isfinite(value).all() and np.abs(value).max() > 0, path
    # The input's gradient flows too (the LM's hidden states are trained through the head).
    assert np.abs(np.asarray(nnx.jit(jax.grad(lambda h: head(h).points.sum()))(hidden))).max() > 0
