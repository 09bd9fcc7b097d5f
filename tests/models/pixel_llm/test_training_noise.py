"""Training noise as the official PixelLLM: the frozen SAM runs with drop path in training, T5's
point-head feature is taken before its final dropout, and input dropout touches the context
embeddings only (never the visual tokens). Without ``rngs`` (evaluation) all of it is off."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from configs import pixelllm as pixelllm_config
from configs import t5 as t5_config
from flax import nnx

from pixelllm.encoders.sam.image_encoder import SamImageEncoder
from pixelllm.language.t5 import T5
from pixelllm.models.pixel_llm.pixel_llm import PixelLLM

# 24 px / patch 4 = a 6x6 grid; block 1 attends globally.
ENCODER = dict(img_size=24, pretrain_img_size=24, patch_size=4, embed_dim=16, depth=3,
               num_heads=2, mlp_ratio=2.0, out_chans=16, window_size=4, global_attn_indexes=(1,),
               layer_norm_eps=1e-6)


def test_paper_config_runs_sam_with_drop_path_half():
    assert pixelllm_config.get_config("t5_xl").model.sam.image_encoder.drop_path_rate == 0.5


def test_sam_drop_path_only_with_rngs():
    noisy = SamImageEncoder(**ENCODER, drop_path_rate=0.5, rngs=nnx.Rngs(0))
    clean = SamImageEncoder(**ENCODER, rngs=nnx.Rngs(0))
    # Linear in depth from 0 (scenic's SAM): 0, 0.25, 0.5.
    assert [block.drop_path for block in noisy.blocks] == [0.0, 0.25, 0.5]
    images = jax.random.normal(jax.random.key(1), (8, 24, 24, 3))
    run = nnx.jit(lambda model, x, rngs: model(x, rngs=rngs))
    evaluation = np.asarray(nnx.jit(lambda model, x: model(x))(noisy, images))
    np.testing.assert_array_equal(evaluation,
                                  np.asarray(nnx.jit(lambda m, x: m(x))(clean, images)))
    first = np.asarray(run(noisy, images, nnx.Rngs(dropout=0)))
    np.testing.assert_array_equal(np.asarray(run(noisy, images, nnx.Rngs(dropout=0))), first)
    # Some of the 8 examples lose a branch: they differ from evaluation, per example.
    changed = np.abs(first - evaluation).max(axis=(1, 2, 3)) > 1e-4
    assert changed.any()
    # A rate-0 encoder is unchanged by rngs.
    np.testing.assert_array_equal(np.asarray(run(clean, images, nnx.Rngs(dropout=0))), evaluation)


def test_sam_rejects_a_drop_path_rate_of_one():
    with pytest.raises(ValueError, match="drop_path_rate"):
        SamImageEncoder(**ENCODER, drop_path_rate=1.0, rngs=nnx.Rngs(0))


def _t5(rate=0.5):
    config = t5_config.get_config("tiny").model.to_dict()
    config["dropout_rate"] = rate
    return T5(config, rngs=nnx.Rngs(0))


def test_t5_point_feature_is_before_the_final_dropout():
    """With dropout 0.5 the logits see the final dropout, ``hidden`` (the point head's input)
    does not."""
    model = _t5()
    prefix = jax.random.normal(jax.random.key(0), (2, 5, 64))
    tokens = jnp.asarray([[0, 5, 6, 7], [0, 8, 9, 1]])
    forward = nnx.jit(lambda m, rngs: m.forward(
        prefix=prefix, prefix_mask=jnp.ones((2, 5), bool), tokens=tokens,
        token_mask=tokens >= 0, rngs=rngs))
    out = forward(model, nnx.Rngs(dropout=0))
    hidden = np.asarray(out.hidden)
    # A dropout of 0.5 after the norm would zero about half of the entries.
    assert (hidden == 0).mean() < 0.05
    # The logits are not those of the undropped hidden: the final dropout sits between.
    undropped = np.asarray(nnx.jit(lambda m, h: m.logits(h))(model, out.hidden))
    assert np.abs(np.asarray(out.logits) - undropped).max() > 1e-3
    # Without rngs the logits are those of hidden.
    plain = forward(model, None)
    np.testing.assert_allclose(np.asarray(plain.logits),
                               np.asarray(nnx.jit(lambda m, h: m.logits(h))(model, plain.hidden)),
                               rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def noisy_model():
    config = pixelllm_config.get_config("tiny")
    config.model.language_model.model.dropout_rate = 0.5
    config.model.sam.image_encoder.drop_path_rate = 0.5
    return PixelLLM.from_config(config.model, rngs=nnx.Rngs(0))


def test_input_dropout_touches_the_context_only(noisy_model):
    visual = jax.random.normal(jax.random.key(2), (2, 3, 4, 64))        # [B, S, Q, D]
    context = jax.random.randint(jax.random.key(3), (2, 3, 6), 2, 100)
    mask = jnp.ones((2, 3, 6), bool)
    prefix = nnx.jit(lambda m, v, c, k, rngs: m.prefix(v, c, k, rngs=rngs))
    train, _ = prefix(noisy_model, visual, context, mask, nnx.Rngs(dropout=0))
    evaluation, _ = prefix(noisy_model, visual, context, mask, None)
    train, evaluation = np.asarray(train), np.asarray(evaluation)
    np.testing.assert_array_equal(train[:, :4], np.asarray(visual).reshape(6, 4, 64))
    np.testing.assert_array_equal(evaluation[:, :4], train[:, :4])
    dropped = train[:, 4:] == 0
    assert 0.3 < dropped.mean() < 0.7
    np.testing.assert_allclose(train[:, 4:][~dropped], 2.0 * evaluation[:, 4:][~dropped],
                               rtol=1e-6)


def test_pixelllm_training_forward_runs_sam_with_drop_path(noisy_model):
    images = jax.random.uniform(jax.random.key(4), (4, 32, 32, 3), maxval=255.0)
    valid = jnp.full((4, 2), 32.0)
    encode = nnx.jit(lambda m, x, wh, rngs: m.encode_image(x, wh, rngs=rngs).sam)
    evaluation = np.asarray(encode(noisy_model, images, valid, None))
    train = np.asarray(encode(noisy_model, images, valid, nnx.Rngs(dropout=1)))
    assert np.abs(train - evaluation).max() > 1e-4
