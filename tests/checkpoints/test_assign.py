import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from pixelllm.checkpoints import assign
from pixelllm.nn import layers


class _TwoLayers(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([layers.linear(3, 4, axes=("embed", "mlp"), rngs=rngs),
                                layers.linear(4, 2, axes=("mlp", "embed"), rngs=rngs)])


def _arrays():
    rng = np.random.default_rng(0)
    return {"blocks/0/kernel": rng.standard_normal((3, 4)), "blocks/0/bias": rng.standard_normal(4),
            "blocks/1/kernel": rng.standard_normal((4, 2)), "blocks/1/bias": rng.standard_normal(2)}


def test_assign_loads_every_parameter_and_casts_to_the_model_dtype():
    model = _TwoLayers(nnx.Rngs(0))
    arrays = _arrays()
    assign.assign(model, arrays, source="weights.pth")
    kernel = model.blocks[1].kernel.get_value()
    assert kernel.dtype == np.float32
    np.testing.assert_allclose(np.asarray(kernel), arrays["blocks/1/kernel"].astype(np.float32))


def test_assign_names_missing_unexpected_and_misshaped_keys_and_changes_nothing():
    model = _TwoLayers(nnx.Rngs(0))
    before = np.asarray(model.blocks[0].kernel.get_value())
    arrays = _arrays()
    del arrays["blocks/1/bias"]
    arrays["blocks/2/kernel"] = np.zeros((2, 2))
    arrays["blocks/0/kernel"] = np.zeros((4, 3))
    with pytest.raises(assign.CheckpointMismatchError) as error:
        assign.assign(model, arrays, source="other_variant.pth")
    message = str(error.value)
    assert "other_variant.pth" in message
    assert "1 missing parameters: blocks/1/bias" in message
    assert "1 unexpected parameters: blocks/2/kernel" in message
    assert "blocks/0/kernel (checkpoint (4, 3), model (3, 4))" in message
    np.testing.assert_array_equal(np.asarray(model.blocks[0].kernel.get_value()), before)


def test_check_keys_truncates_long_listings():
    expected = {f"k{i}": (1,) for i in range(30)}
    with pytest.raises(assign.CheckpointMismatchError, match=r"30 missing keys: .*\(10 more\)"):
        assign.check_keys(source="x", expected=expected, found={})


def test_assign_casts_within_a_dtype_kind_and_refuses_other_kinds_naming_the_file():
    model = _TwoLayers(nnx.Rngs(0))
    arrays = {k: v.astype(ml_dtypes.bfloat16) for k, v in _arrays().items()}
    assign.assign(model, arrays, source="bf16.safetensors")  # any float width loads
    before = np.asarray(model.blocks[0].kernel.get_value())
    arrays["blocks/0/kernel"] = np.ones((3, 4), np.int8)  # a quantized file, not weights
    arrays["blocks/1/bias"] = np.ones(2, bool)
    with pytest.raises(assign.CheckpointMismatchError) as error:
        assign.assign(model, arrays, source="int8/model.safetensors")
    message = str(error.value)
    assert message.startswith("int8/model.safetensors: ")
    assert "2 parameters of another dtype kind" in message
    assert "blocks/0/kernel (checkpoint int8, model float32)" in message
    assert "blocks/1/bias (checkpoint bool, model float32)" in message
    np.testing.assert_array_equal(np.asarray(model.blocks[0].kernel.get_value()), before)
