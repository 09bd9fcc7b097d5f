import jax
import jax.numpy as jnp
import numpy as np

from pixelllm.nn import box_ops

# Two overlapping boxes worked out by hand:
# A = [0, 0, 4, 4] (area 16), B = [2, 2, 6, 8] (area 24); overlap [2, 2, 4, 4] = 4;
# union 16 + 24 - 4 = 36; enclosing [0, 0, 6, 8] = 48.
A = jnp.array([0.0, 0.0, 4.0, 4.0])
B = jnp.array([2.0, 2.0, 6.0, 8.0])


def test_area_clamps_inverted_boxes():
    boxes = jnp.array([[0.0, 0.0, 4.0, 4.0], [1.0, 2.0, 4.0, 7.0], [5.0, 5.0, 3.0, 9.0]])
    np.testing.assert_allclose(box_ops.area(boxes), [16.0, 15.0, 0.0])


def test_iou_and_giou_hand_computed():
    np.testing.assert_allclose(box_ops.iou(A, B), 4.0 / 36.0, rtol=1e-6)
    np.testing.assert_allclose(box_ops.generalized_iou(A, B), 4.0 / 36.0 - (48.0 - 36.0) / 48.0,
                               rtol=1e-6)
    # Disjoint: C = [0, 0, 4, 1] area 4, union 2 -> GIoU = 0 - 2/4.
    disjoint = box_ops.generalized_iou(jnp.array([0.0, 0.0, 1.0, 1.0]),
                                       jnp.array([3.0, 0.0, 4.0, 1.0]))
    np.testing.assert_allclose(disjoint, -0.5, rtol=1e-6)
    np.testing.assert_allclose(box_ops.generalized_iou(B, B), 1.0)


def test_iou_broadcasts_over_leading_dims():
    a = jnp.stack([A, B])[:, None, :]           # [2, 1, 4]
    b = jnp.stack([A, B, A])[None, :, :]        # [1, 3, 4]
    out = box_ops.iou(a, b)
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out, [[1.0, 4 / 36, 1.0], [4 / 36, 1.0, 4 / 36]], rtol=1e-6)


def test_pairwise_iou_matches_elementwise_loop():
    rng = np.random.default_rng(0)
    low = rng.uniform(0, 10, (2, 3, 2))
    a = jnp.asarray(np.concatenate([low, low + rng.uniform(0.5, 5, (2, 3, 2))], -1), jnp.float32)
    low = rng.uniform(0, 10, (2, 4, 2))
    b = jnp.asarray(np.concatenate([low, low + rng.uniform(0.5, 5, (2, 4, 2))], -1), jnp.float32)
    out = box_ops.pairwise_iou(a, b)
    assert out.shape == (2, 3, 4)
    for batch in range(2):
        for i in range(3):
            for j in range(4):
                np.testing.assert_allclose(out[batch, i, j], box_ops.iou(a[batch, i], b[batch, j]))


def test_degenerate_boxes_give_zero_not_nan():
    zero = jnp.zeros(4)
    point = jnp.array([3.0, 3.0, 3.0, 3.0])
    assert float(box_ops.iou(zero, zero)) == 0.0
    assert float(box_ops.generalized_iou(zero, zero)) == 0.0
    assert float(box_ops.generalized_iou(point, point)) == 0.0
    # A point outside a real box: no overlap, union 16, enclosing [0, 0, 6, 6] = 36.
    np.testing.assert_allclose(box_ops.generalized_iou(jnp.array([6.0, 6.0, 6.0, 6.0]), A),
                               -(36.0 - 16.0) / 36.0, rtol=1e-6)


def test_gradients_are_finite_at_degenerate_boxes():
    def loss(boxes):
        return (box_ops.generalized_iou(boxes[0], boxes[1]) + box_ops.iou(boxes[0], boxes[1])
                + box_ops.area(boxes[0]))

    for pair in ([[0.0] * 4, [0.0] * 4], [[3.0, 3.0, 3.0, 3.0], [3.0, 3.0, 3.0, 3.0]],
                 [[2.0, 2.0, 1.0, 1.0], [0.0, 0.0, 4.0, 4.0]]):
        grad = jax.grad(loss)(jnp.array(pair))
        assert np.isfinite(np.asarray(grad)).all(), pair


def test_clip_per_image_size():
    boxes = jnp.array([[[-3.0, 2.0, 12.0, 30.0]], [[-3.0, 2.0, 12.0, 30.0]]])   # [2, 1, 4]
    wh = jnp.array([[10.0, 20.0], [40.0, 25.0]])                                # [2, 2]
    out = box_ops.clip(boxes, wh[:, None, :])
    np.testing.assert_allclose(out, [[[0.0, 2.0, 10.0, 20.0]], [[0.0, 2.0, 12.0, 25.0]]])
