import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from pixelllm import sharding
from pixelllm.nn import layers


def test_eight_fake_devices_are_available():
    assert jax.device_count() == 8


def test_make_mesh_fills_minus_one_and_rejects_bad_shapes():
    mesh = sharding.make_mesh((2, -1, 1))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.make_mesh((2, 3, 1))
    with pytest.raises(ValueError, match="at most one"):
        sharding.make_mesh((-1, -1, 1))
    with pytest.raises(ValueError, match="3 entries"):
        sharding.make_mesh((8,))


def test_logical_to_spec_follows_first_rule_and_uses_each_mesh_axis_once():
    rules = [("embed", "fsdp"), ("mlp", "tensor"), ("embed", "tensor"), ("heads", "tensor"),
             ("batch", ("data", "fsdp"))]
    assert sharding.logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
    # 'heads' and 'mlp' both want 'tensor': the second use is dropped, not duplicated.
    assert sharding.logical_to_spec(("mlp", "heads"), rules) == P("tensor", None)
    assert sharding.logical_to_spec(("batch", None, "embed"), rules) == P(("data", "fsdp"), None, None)
    with pytest.raises(ValueError, match="unknown logical axis 'width'"):
        sharding.logical_to_spec(("width",), rules)


def test_indivisible_dimensions_stay_replicated_and_are_reported():
    mesh = sharding.make_mesh((1, 2, 4))
    rules = sharding.DEFAULT_RULES
    assert sharding.logical_to_spec(("embed", "mlp"), rules, (6, 12), mesh) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("embed", "mlp"), rules, (5, 6), mesh) == P(None, None)
    # The kernel still shards its 'embed' rows over fsdp=2; the bias (1030 % tensor=4 != 0) cannot.
    model = layers.linear(1030, 1030, axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    report = sharding.unsharded_report(nnx.state(model), mesh, rules, min_size=1000)
    assert [r.path for r in report] == ["bias"]
    model = layers.linear(1031, 1031, axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    report = sharding.unsharded_report(nnx.state(model), mesh, rules, min_size=1000)
    assert [(r.path, r.shape) for r in report] == [("bias", (1031,)), ("kernel", (1031, 1031))]


def test_shard_model_places_parameters_and_constrain_keeps_values():
    mesh = sharding.make_mesh((2, 2, 2))
    model = layers.linear(8, 16, axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    before = np.asarray(model.kernel.get_value())
    sharding.shard_model(model, mesh, sharding.DEFAULT_RULES)
    kernel = model.kernel.get_value()
    assert kernel.sharding.spec == P("fsdp", "tensor")
    np.testing.assert_array_equal(np.asarray(kernel), before)

    @jax.jit
    def f(x):
        return sharding.constrain(x * 2, ("batch", "embed"), mesh, sharding.DEFAULT_RULES)

    x = jnp.arange(32.0).reshape(4, 8)
    y = f(x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 2)
    assert y.sharding.spec == P(("data", "fsdp"))


def test_logical_axes_length_must_match_the_array():
    variable = layers.param(jnp.zeros((2, 3)), ("embed", "mlp"))
    state = nnx.State({"w": variable})
    state["w"].set_metadata(logical_axes=("embed",))
    with pytest.raises(ValueError, match="parameter w has shape"):
        sharding.state_shardings(state, sharding.make_mesh((1, 1, -1)), sharding.DEFAULT_RULES)
