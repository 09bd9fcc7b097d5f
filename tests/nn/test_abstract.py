import jax
import numpy as np
from flax import nnx

from pixelllm.nn import abstract


class _Two(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.first = nnx.Linear(3, 4, rngs=rngs)
        self.second = nnx.Linear(4, 5, rngs=rngs)


def test_host_counted_rngs_give_the_keys_of_plain_rngs():
    host, plain = abstract.host_counted_rngs(7), nnx.Rngs(7)
    for _ in range(3):
        np.testing.assert_array_equal(jax.random.key_data(host.params()),
                                      jax.random.key_data(plain.params()))
    count = nnx.to_flat_state(nnx.state(host, nnx.RngCount))[0][1].get_raw_value()
    assert isinstance(count, np.ndarray) and int(count) == 3


def test_abstract_build_has_the_shapes_of_a_real_build_and_no_arrays():
    model = abstract.build_abstract(lambda rngs: _Two(rngs=rngs))
    real = _Two(rngs=nnx.Rngs(0))
    shapes = {path: (v.get_value().shape, v.get_value().dtype)
              for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert shapes == {path: (v.get_value().shape, v.get_value().dtype)
                      for path, v in nnx.to_flat_state(nnx.state(real, nnx.Param))}
    assert all(isinstance(v.get_value(), jax.ShapeDtypeStruct)
               for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
