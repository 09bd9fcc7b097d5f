"""PixelLLM's model-level switches: `dtype` (bfloat16 compute, float32 parameters) and `remat`,
threaded to every part."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixelllm.models.pixel_llm.pixel_llm import PixelLLM

# Module fixtures compile the tiny model: all of this module runs on one xdist worker
# (launch/test.sh uses --dist loadgroup), so they are built once.
pytestmark = pytest.mark.xdist_group("test_precision")

# bf16 rounds at 2^-9 relative; through the tiny encoders, adapter, T5 and heads the outputs
# stay within a few percent of their scale (measured: logits ~1.2%, points ~0.4%).
BF16_TOLERANCE = 0.05
SLOT_OUTPUTS = ("logits", "token_points", "eos_boxes", "masks", "mask_iou")

forward = nnx.jit(lambda model, batch: model(batch))


def build(config, **fields):
    model_config = config.model.copy_and_resolve_references()
    model_config.update(fields)
    return PixelLLM.from_config(model_config, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def batch(make_batch):
    batch = make_batch(0, batch=3, tasks=("trace", "refseg", "densecap"))
    return {key: jnp.asarray(value) for key, value in batch.items()}


@pytest.fixture(scope="module")
def reference(tiny_t5_config, batch):
    return forward(build(tiny_t5_config), batch)


def test_bfloat16_forward_is_close_to_float32(tiny_t5_config, batch, reference):
    model = build(tiny_t5_config, dtype="bfloat16")
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert {v.get_value().dtype for _, v in params} == {np.dtype(np.float32)}
    assert model.eva02.dtype == model.sam.image_encoder.dtype == jnp.bfloat16
    assert model.prompt_adapter.dtype == model.mask_adapter.dtype == jnp.bfloat16

    out = forward(model, batch)
    assert out.slots.visual_tokens.dtype == jnp.bfloat16
    for name in SLOT_OUTPUTS:
        got, want = getattr(out.slots, name), getattr(reference.slots, name)
        # Coordinates, mask logits and LM logits stay float32 for the losses.
        assert got.dtype == jnp.float32, name
        error = float(jnp.abs(got - want).max())
        assert 0 < error <= BF16_TOLERANCE * float(jnp.abs(want).max()), (name, error)
    # The detector's dense terms (RoI terms depend on which RoIs NMS keeps, a discrete choice).
    for name in ("heatmap_pos", "heatmap_neg", "giou"):
        got, want = out.proposal_terms[name], reference.proposal_terms[name]
        assert got.total.dtype == jnp.float32 and float(want.normalizer) > 0, name
        assert abs(float(got.mean()) - float(want.mean())) <= (
            BF16_TOLERANCE * abs(float(want.mean()))), name


def test_remat_reaches_every_tower_and_keeps_outputs(tiny_t5_config, batch, reference):
    model = build(tiny_t5_config, remat="full")
    assert model.eva02.remat == model.sam.image_encoder.remat == "full"
    assert model.prompt_adapter.transformer.remat == model.mask_adapter.transformer.remat == "full"
    assert model.lm.config.remat == "full"
    out = forward(model, batch)
    for name in SLOT_OUTPUTS:
        np.testing.assert_allclose(getattr(out.slots, name), getattr(reference.slots, name),
                                   rtol=1e-5, atol=1e-5, err_msg=name)


def test_unknown_model_remat_names_the_field(tiny_t5_config):
    with pytest.raises(ValueError, match=r"model\.remat='some'"):
        build(tiny_t5_config, remat="some")
