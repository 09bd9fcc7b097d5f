"""SAM's paper-scale switches: block remat (image encoder, two-way transformer) and a bfloat16
compute dtype with float32 parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixelllm.encoders.sam.image_encoder import SamImageEncoder
from pixelllm.encoders.sam.sam import Sam
from pixelllm.encoders.sam.two_way_transformer import TwoWayTransformer

# 24 px / patch 4 = a 6x6 grid: window 4 pads it to 8x8; block 1 attends globally.
ENCODER = dict(img_size=24, pretrain_img_size=24, patch_size=4, embed_dim=16, depth=2,
               num_heads=2, mlp_ratio=2.0, out_chans=16, window_size=4, global_attn_indexes=(1,),
               layer_norm_eps=1e-6)
SAM = dict(image_encoder=ENCODER, prompt_encoder=dict(embed_dim=16, mask_in_chans=4),
           mask_decoder=dict(transformer_dim=16, transformer_depth=2, transformer_heads=2,
                             transformer_mlp_dim=32, iou_head_hidden_dim=16,
                             layer_norm_eps=1e-5))
# bf16 rounds at 2^-9 relative; through the encoder, the two-way transformer and the mask
# head the outputs stay within a few percent of their scale (measured ~1%).
BF16_TOLERANCE = 0.05


def flat_grads(grads):
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}


def assert_same(got, expected):
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, atol=1e-6, err_msg=key)


def value_and_grads(module, fn):
    value, grads = nnx.jit(nnx.value_and_grad(fn))(module)
    return value, flat_grads(grads)


def test_image_encoder_remat_keeps_outputs_and_gradients():
    images = jnp.asarray(np.random.RandomState(0).randn(2, 24, 24, 3).astype(np.float32))

    def loss(encoder):
        return jnp.mean(encoder(images) ** 2)

    expected = value_and_grads(SamImageEncoder(**ENCODER, rngs=nnx.Rngs(0)), loss)
    got = value_and_grads(SamImageEncoder(**ENCODER, remat="full", rngs=nnx.Rngs(0)), loss)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-6)
    assert_same(got[1], expected[1])


def test_two_way_transformer_remat_keeps_outputs_and_gradients():
    rng = np.random.RandomState(0)
    image = jnp.asarray(rng.randn(2, 9, 16).astype(np.float32))
    pe = jnp.asarray(rng.randn(9, 16).astype(np.float32))
    tokens = jnp.asarray(rng.randn(2, 3, 16).astype(np.float32))
    key_mask = jnp.asarray(np.arange(9)[None] < np.array([[9], [5]]))

    def loss(transformer):
        queries, keys = transformer(image, pe, tokens, key_mask)
        return jnp.sum(queries ** 2) + jnp.mean(keys ** 2)

    def build(remat):
        return TwoWayTransformer(depth=2, embedding_dim=16, num_heads=2, mlp_dim=32,
                                 layer_norm_eps=1e-5, remat=remat, rngs=nnx.Rngs(0))

    expected = value_and_grads(build("none"), loss)
    got = value_and_grads(build("dots_with_no_batch_dims_saveable"), loss)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-6)
    assert_same(got[1], expected[1])


def test_unknown_remat_policy_is_an_error():
    with pytest.raises(ValueError, match="remat='all'"):
        SamImageEncoder(**ENCODER, remat="all", rngs=nnx.Rngs(0))


def test_bfloat16_sam_is_close_to_float32_and_keeps_float32_params():
    rng = np.random.RandomState(0)
    images = jnp.asarray(rng.randn(2, 24, 24, 3).astype(np.float32))
    boxes = jnp.asarray([[2.0, 3.0, 15.0, 20.0], [0.0, 0.0, 23.0, 23.0]])
    points = jnp.asarray([[[5.0, 6.0]], [[12.0, 12.0]]])
    labels = jnp.asarray([[1], [0]])
    run = nnx.jit(lambda sam: sam(images, points=points, labels=labels, boxes=boxes,
                                  multimask_output=True))
    reference = Sam(**SAM, rngs=nnx.Rngs(0))
    low = Sam(**SAM, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))

    params = nnx.to_flat_state(nnx.state(low, nnx.Param))
    assert {v.get_value().dtype for _, v in params} == {np.dtype(np.float32)}
    assert jax.eval_shape(low.image_encoder, images).dtype == jnp.bfloat16

    masks, iou = run(reference)
    masks_low, iou_low = run(low)
    # Mask logits and IoUs leave the decoder in float32 whatever the compute dtype.
    assert masks_low.dtype == iou_low.dtype == jnp.float32
    for got, want in ((masks_low, masks), (iou_low, iou)):
        error = float(jnp.abs(got - want).max())
        assert 0 < error <= BF16_TOLERANCE * float(jnp.abs(want).max()), error
