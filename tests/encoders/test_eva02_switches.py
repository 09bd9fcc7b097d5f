"""EVA02's paper-scale switches: remat, scanned layers and the bfloat16 compute dtype."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixelllm.checkpoints.assign import assign
from pixelllm.encoders.eva02 import Eva02, load, stack_block_params, unstack_block_params

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
            rope_ref_grid=4)
# bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 0.2%); through three blocks and the
# final norm of unit-scale features the error stays a few percent of the output's scale.
BF16_TOLERANCE = 0.05


def model(**overrides):
    return Eva02(**TINY, **overrides, rngs=nnx.Rngs(0, dropout=1))


def images(seed=0):
    return jnp.asarray(np.random.RandomState(seed).randn(2, 16, 16, 3).astype(np.float32))


def loss_and_grads(m, x):
    def loss(m):
        return jnp.mean(m(x).astype(jnp.float32) ** 2)
    return nnx.jit(nnx.value_and_grad(loss))(m)


def flat(tree):
    return {"/".join(map(str, path)): np.asarray(v.get_value())
            for path, v in nnx.to_flat_state(tree)}


@pytest.fixture(scope="module")
def baseline():
    """Loss and per-layer gradients of the plain model (no remat, unscanned)."""
    value, grads = loss_and_grads(model(), images())
    return value, flat(grads)


def assert_same_gradients(got, expected):
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, atol=1e-7, err_msg=key)


@pytest.mark.parametrize("policy", ["full", "dots_with_no_batch_dims_saveable"])
def test_remat_keeps_outputs_and_gradients(policy, baseline):
    value, grads = loss_and_grads(model(remat=policy), images())
    np.testing.assert_allclose(value, baseline[0], rtol=1e-6)
    assert_same_gradients(flat(grads), baseline[1])


def test_unknown_remat_policy_names_the_field():
    with pytest.raises(ValueError, match="remat='everything'"):
        model(remat="everything")


def test_scanned_layers_equal_unscanned_for_the_same_weights(baseline):
    plain, scanned = model(), model(scan_layers=True, remat="full")
    plain_params, scanned_params = flat(nnx.state(plain, nnx.Param)), flat(
        nnx.state(scanned, nnx.Param))
    # Same init either way, and the stacked layout is exactly the stacked per-layer one.
    stacked = stack_block_params(plain_params)
    assert stacked.keys() == scanned_params.keys()
    for key in stacked:
        np.testing.assert_array_equal(stacked[key], scanned_params[key], err_msg=key)
    assert scanned_params["blocks/attn/q/kernel"].shape == (2, 32, 32)
    assert unstack_block_params(scanned_params).keys() == plain_params.keys()
    value, grads = loss_and_grads(scanned, images())
    np.testing.assert_allclose(value, baseline[0], rtol=1e-5)
    assert_same_gradients(unstack_block_params(flat(grads)), baseline[1])

    # Other weights, per layer, through the stacking a loader uses: outputs still agree.
    rng = np.random.RandomState(1)
    weights = {k: (v + 0.1 * rng.randn(*v.shape)).astype(np.float32)
               for k, v in plain_params.items()}
    assign(plain, weights, source="test")
    assign(scanned, stack_block_params(weights), source="test")
    x = images()
    forward = nnx.jit(lambda m, x: m(x))
    np.testing.assert_allclose(forward(scanned, x), forward(plain, x), rtol=1e-5, atol=1e-5)


def test_scanned_model_loads_a_timm_checkpoint_like_the_unscanned_one():
    torch = pytest.importorskip("torch")
    from timm.models.eva import Eva

    torch.manual_seed(0)
    reference = Eva(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                    qkv_fused=False, swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True,
                    ref_feat_shape=(4, 4), num_classes=0).eval()
    state = {k: v.detach().numpy().copy() for k, v in reference.state_dict().items()}
    plain = load(model(), state, source="timm tiny")
    scanned = load(model(scan_layers=True), state, source="timm tiny")
    x = images()
    forward = nnx.jit(lambda m, x: m(x))
    np.testing.assert_allclose(forward(scanned, x), forward(plain, x), rtol=1e-5, atol=1e-5)


def test_scanned_layers_keep_logical_axes_with_a_layer_axis():
    scanned = model(scan_layers=True)
    kernel = scanned.blocks.attn.q.kernel
    assert kernel.get_metadata()["logical_axes"] == (None, "embed", "heads")


def test_scanned_drop_path_trains_per_layer():
    m = model(scan_layers=True, drop_path_rate=0.5)
    x = jnp.repeat(images()[:1], 8, axis=0)
    forward = nnx.jit(lambda m, x: m(x))
    reference = np.asarray(forward(m, x))
    m.train()
    first, second = np.asarray(forward(m, x)), np.asarray(forward(m, x))
    assert np.abs(first - second).max() > 1e-3  # the stacked dropout streams advance
    assert np.abs(first - reference).max() > 1e-3
    m.eval()
    np.testing.assert_array_equal(np.asarray(forward(m, x)), reference)


def test_bfloat16_forward_is_close_to_float32_and_params_stay_float32():
    x = images()
    reference = np.asarray(nnx.jit(lambda m, x: m(x))(model(), x))
    low = model(dtype=jnp.bfloat16)
    out = nnx.jit(lambda m, x: m(x))(low, x)
    assert out.dtype == jnp.bfloat16
    assert {v.get_value().dtype for _, v in nnx.to_flat_state(nnx.state(low, nnx.Param))} == {
        np.dtype(np.float32)}
    error = np.abs(np.asarray(out, np.float32) - reference).max()
    assert error <= BF16_TOLERANCE * np.abs(reference).max(), error
    assert error > 0  # the compute dtype is really bfloat16
