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
