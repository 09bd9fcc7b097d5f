import numpy as np
import pytest
from flax import nnx

from pixelllm.checkpoints.assign import CheckpointMismatchError
from pixelllm.checkpoints.key_map import (
    CONV, TRANSPOSE, VECTOR, Rule, apply_key_map, load, prefixed)

RULES = [
    Rule("embed.weight", "embed", VECTOR),
    Rule("layers.{i}.fc.weight", "layers/{i}/fc/kernel", TRANSPOSE),
    Rule("layers.{i}.fc.bias", "layers/{i}/fc/bias"),
    Rule("tied.weight", "embed", VECTOR),
]
DROP = ("head.*",)
EXPECTED = {"embed": (3,), "layers/0/fc/kernel": (2, 4), "layers/0/fc/bias": (4,),
            "layers/1/fc/kernel": (2, 4), "layers/1/fc/bias": (4,)}


def _state(depth=2, width=4):
    rng = np.random.default_rng(0)
    state = {"embed.weight": rng.normal(size=(1, 3)), "head.weight": np.zeros(5)}
    for i in range(depth):
        state[f"layers.{i}.fc.weight"] = rng.normal(size=(width, 2))
        state[f"layers.{i}.fc.bias"] = rng.normal(size=(width,))
    return state


def test_rules_map_indices_transform_and_drop():
    state = _state()
    params, dropped = apply_key_map(state, RULES, source="f.pth", expected=EXPECTED, drop=DROP)
    assert params.keys() == EXPECTED.keys()
    np.testing.assert_array_equal(params["layers/1/fc/kernel"], state["layers.1.fc.weight"].T)
    np.testing.assert_array_equal(params["embed"], state["embed.weight"][0])
    assert dropped == ["head.weight"]
    # A tied second source is accepted when equal.
    params, _ = apply_key_map({**state, "tied.weight": state["embed.weight"]}, RULES,
                              source="f.pth", expected=EXPECTED, drop=DROP)
    np.testing.assert_array_equal(params["embed"], state["embed.weight"][0])


def test_one_message_in_the_files_key_names():
    state = _state(depth=3, width=5)
    del state["layers.0.fc.bias"]
    state["extra.weight"] = np.zeros(1)
    state["tied.weight"] = state["embed.weight"] + 1
    with pytest.raises(CheckpointMismatchError) as raised:
        apply_key_map(state, RULES, source="f.pth", expected=EXPECTED, drop=DROP,
                      hint="this looks like X")
    assert str(raised.value).splitlines() == [
        "f.pth: checkpoint does not match the model; this looks like X",
        "  1 missing keys: layers.0.fc.bias",
        "  3 unexpected keys: extra.weight, layers.2.fc.bias, layers.2.fc.weight",
        "  3 mis-shaped keys: layers.0.fc.weight (file (5, 2), after transpose (2, 5); model "
        "layers/0/fc/kernel (2, 4)), layers.1.fc.bias (file (5,), after none (5,); model "
        "layers/1/fc/bias (4,)), layers.1.fc.weight (file (5, 2), after transpose (2, 5); model "
        "layers/1/fc/kernel (2, 4))",
        "  1 tied keys that differ: embed.weight and tied.weight (both give embed)",
    ]


def test_rules_must_share_placeholders_and_prefixing_keeps_them():
    with pytest.raises(ValueError, match="same placeholders"):
        Rule("layers.{i}.w", "layers/w")
    [rule] = prefixed([Rule("l.{i}.w", "l/{i}/k", CONV)], source="enc.", target="encoder/")
    assert rule == Rule("enc.l.{i}.w", "encoder/l/{i}/k", CONV)
    assert rule.target_of("enc.l.12.w") == "encoder/l/12/k"
    assert rule.source_of("encoder/l/3/k") == "enc.l.3.w"
    assert rule.target_of("enc.l.x.w") is None


def test_load_assigns_strictly_and_leaves_the_model_on_a_mismatch():
    model = nnx.Linear(2, 4, rngs=nnx.Rngs(0))
    rules = [Rule("fc.weight", "kernel", TRANSPOSE), Rule("fc.bias", "bias")]
    weight, bias = np.arange(8.0).reshape(4, 2), np.arange(4.0)
    before = np.asarray(model.kernel[...]).copy()
    with pytest.raises(CheckpointMismatchError, match=r"lin.pth: .*\n  1 missing keys: fc\.bias"):
        load(model, {"fc.weight": weight}, rules, source="lin.pth")
    np.testing.assert_array_equal(model.kernel[...], before)
    load(model, {"fc.weight": weight, "fc.bias": bias}, rules, source="lin.pth")
    np.testing.assert_array_equal(model.kernel[...], weight.T)
