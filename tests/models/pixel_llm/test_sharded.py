"""PixelLLM forward + backward sharded over a (data, fsdp, tensor) = (2, 2, 2) mesh of 8 fake CPU
devices equals the single-device computation. Both programs compile with
``jax_disable_most_optimizations`` (no LLVM optimization of the CPU code: about 40% less compile
time for a single run of each)."""

import jax
import numpy as np
import pytest
from configs import pixelllm as pixelllm_config
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from pixelllm import sharding
from pixelllm.models.pixel_llm import objective


def _loss_and_grads(model, batch, weights):
    trainable = model.trainable()
    graphdef, params, rest = nnx.split(model, trainable, ...)

    @jax.jit
    def run(params, rest, batch):
        def loss_fn(params):
            total, _ = objective.compute(nnx.merge(graphdef, params, rest)(batch), batch, weights)
            return total
        return jax.value_and_grad(loss_fn)(params)

    return run(params, rest, batch)


# The T5 variant is covered end to end, update included, by tests/train/test_train_step.py.
@pytest.mark.parametrize("variant", ["tiny_decoder"])
def test_sharded_forward_backward_matches_single_device(variant, make_batch, build_model):
    config = pixelllm_config.get_config(variant)
    batch = make_batch(6, batch=4, tasks=("trace", "refseg", "densecap", "refer"))
    loss, grads = _loss_and_grads(build_model(config, seed=6), batch, config.loss)

    mesh = sharding.make_mesh((2, 2, 2))
    rules = sharding.rules_from_config(config.sharding.rules)
    model = sharding.shard_model(build_model(config, seed=6, mesh=mesh, rules=rules), mesh, rules)
    kernel = model.prompt_adapter.transformer.layers[0].mlp.lin1.kernel[...]
    assert kernel.sharding.spec == PartitionSpec("fsdp", "tensor")
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    sharded_batch = jax.device_put(batch, batch_sharding)
    sharded_loss, sharded_grads = _loss_and_grads(model, sharded_batch, config.loss)

    np.testing.assert_allclose(float(sharded_loss), float(loss), rtol=1e-5)
    flat = dict(nnx.to_flat_state(grads))
    flat_sharded = dict(nnx.to_flat_state(sharded_grads))
    assert flat.keys() == flat_sharded.keys()
    # Per-parameter relative error of the gradient (norms, not elements: gradients that are zero
    # in exact arithmetic, e.g. key biases under softmax, are pure rounding noise elementwise).
    for path, value in flat.items():
        reference = np.asarray(value.get_value())
        error = np.linalg.norm(np.asarray(flat_sharded[path].get_value()) - reference)
        assert error <= 1e-4 * np.linalg.norm(reference) + 1e-6, "/".join(map(str, path))
