"""The model side of the SAM feature cache: cached features stand in for SAM exactly, and a
store is tied to the SAM that wrote it by its probe."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import stages
from pixelllm import sharding
from pixelllm.models.pixel_llm.pixel_llm import PixelLLM
from pixelllm.train import sam_feature_cache, trained_set
from pixelllm.train.trainer import build_mesh

pytestmark = [pytest.mark.xdist_group("test_sam_feature_cache")]


@pytest.fixture(scope="module")
def tiny():
    config = stages.get_config("trace_tiny")
    config.mesh_shape = (1, 1, 1)
    mesh = build_mesh(config.mesh_shape)
    rules = sharding.rules_from_config(config.sharding.rules)
    model = PixelLLM.from_config(config.model, rngs=nnx.Rngs(0), mesh=mesh, rules=rules)
    return config, model, mesh, rules


def _images(canvas: int, batch: int = 2):
    image = np.random.default_rng(1).uniform(0, 255, (batch, canvas, canvas, 3)).astype(np.float32)
    valid_wh = np.array([[canvas, canvas], [canvas // 2, canvas]], np.float32)[:batch]
    return image, valid_wh


def test_cached_features_give_the_image_features_and_gradients_of_running_sam(tiny):
    config, model, mesh, rules = tiny
    canvas = model.sam.image_encoder.img_size
    image, valid_wh = _images(canvas)
    cached = sam_feature_cache.make_encoder(model, mesh, rules)(image, valid_wh)
    graphdef, trained, rest = nnx.split(model, model.trainable(), ...)

    @jax.jit
    def fused_and_grads(trained, rest, sam_features):
        def loss(trained):
            features = nnx.merge(graphdef, trained, rest).encode_image(
                image, valid_wh, sam_features=sam_features)
            return jnp.sum(features.fused ** 2), features
        return jax.value_and_grad(loss, has_aux=True)(trained)

    (ours, ours_features), ours_grads = fused_and_grads(trained, rest, cached)
    (theirs, theirs_features), theirs_grads = fused_and_grads(trained, rest, None)
    np.testing.assert_allclose(ours_features.sam, theirs_features.sam, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours_features.fused, theirs_features.fused, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    eva02 = [(a, b) for (path, a), (_, b) in zip(nnx.to_flat_state(ours_grads),
                                                 nnx.to_flat_state(theirs_grads))
             if path[0] == "eva02"]
    assert eva02 and any(np.abs(a.get_value()).max() > 0 for a, _ in eva02)
    for a, b in eva02:
        # Two programs (SAM in or out): float32 reassociation, relative to the gradient's scale.
        scale = np.abs(b.get_value()).max()
        np.testing.assert_allclose(a.get_value(), b.get_value(), rtol=1e-4, atol=1e-5 * scale)


def test_cached_features_of_another_shape_or_an_unfrozen_sam_are_refused(tiny):
    config, model, mesh, rules = tiny
    canvas = model.sam.image_encoder.img_size
    image, valid_wh = _images(canvas)
    grid = canvas // model.sam.image_encoder.patch_size
    wrong = np.zeros((2, grid + 1, grid + 1, model.sam.image_encoder.out_chans), np.float32)
    with pytest.raises(ValueError, match=r"'sam_features' have shape \(2, 9, 9, 32\)"):
        model.encode_image(image, valid_wh, sam_features=wrong)
    unfrozen = config.model.copy_and_resolve_references()
    unfrozen.frozen = ()
    trained_sam = PixelLLM.from_config(unfrozen, rngs=nnx.Rngs(0))
    right = np.zeros((2, grid, grid, model.sam.image_encoder.out_chans), np.float32)
    with pytest.raises(ValueError, match="need a frozen SAM"):
        trained_sam.encode_image(image, valid_wh, sam_features=right)
    with pytest.raises(sam_feature_cache.SamFeatureCacheError,
                       match="trains SAM's image encoder"):
        sam_feature_cache.check_frozen(trained_sam, trained_set.trained_filter(trained_sam, ()))
    # The stage's own filter leaves SAM frozen.
    sam_feature_cache.check_frozen(model, trained_set.trained_filter(model, tuple(config.frozen)))


def test_the_probe_accepts_its_own_sam_and_refuses_other_weights_or_sizes(tiny):
    config, model, mesh, rules = tiny
    probe = sam_feature_cache.probe_signature(model, mesh, rules)
    grid = probe["grid"]
    assert (probe["canvas"], probe["channels"]) == (model.sam.image_encoder.img_size,
                                                    model.sam.image_encoder.out_chans)
    assert len(probe["pooled"]) == sam_feature_cache.PROBE_POOL ** 2 * probe["channels"]
    sam_feature_cache.check_store(model, mesh, rules, {sam_feature_cache.PROBE_KEY: probe},
                                  directory="/stores/a")
    # A bfloat16 writer's probe (relative error about 1e-2) still counts as the same SAM.
    rounded = [float(jnp.asarray(v, jnp.bfloat16)) for v in probe["pooled"]]
    sam_feature_cache.check_store(model, mesh, rules,
                                  {sam_feature_cache.PROBE_KEY: dict(probe, pooled=rounded)},
                                  directory="/stores/a")
    other = PixelLLM.from_config(config.model, rngs=nnx.Rngs(1), mesh=mesh, rules=rules)
    with pytest.raises(sam_feature_cache.SamFeatureCacheError,
                       match="/stores/a was written with other SAM weights"):
        sam_feature_cache.check_store(other, mesh, rules, {sam_feature_cache.PROBE_KEY: probe},
                                      directory="/stores/a")
    with pytest.raises(sam_feature_cache.SamFeatureCacheError, match=f"grid {grid + 1}"):
        sam_feature_cache.check_store(
            model, mesh, rules, {sam_feature_cache.PROBE_KEY: dict(probe, grid=grid + 1)},
            directory="/stores/a")
    with pytest.raises(sam_feature_cache.SamFeatureCacheError, match="no 'sam_probe'"):
        sam_feature_cache.check_store(model, mesh, rules, {}, directory="/stores/a")
