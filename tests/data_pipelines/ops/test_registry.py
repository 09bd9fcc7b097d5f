"""Tests for data_pipelines/ops/registry.py: spec parsing, errors, composition."""

import ml_collections
import numpy as np
import pytest

from data_pipelines import ops  # noqa: F401  (registers the ops)
from data_pipelines.ops import fields, registry


def _example(width=20, height=10):
    return {fields.IMAGE: np.full((height, width, 3), 50, np.uint8), fields.IMAGE_ID: "1",
            fields.OBJECT_BOXES: np.asarray([[10, 5, 20, 10]], np.float32),
            fields.OBJECT_IDS: np.asarray([4]), fields.OBJECT_TEXTS: [["a dog"]]}


def test_every_op_is_registered():
    assert {"decode", "task_prompt", "horizontal_flip", "random_scale_crop", "resize_and_pad",
            "slot", "tokenize"} <= set(registry.names())


@pytest.mark.parametrize("spec", [
    "resize_and_pad(canvas=8)",
    " task_prompt(task='loca') | resize_and_pad(canvas=8, scale=1.0) ",
    [{"op": "task_prompt", "task": "loca"}, "resize_and_pad(canvas=8)"],
    ["task_prompt(task='loca')", registry.build("resize_and_pad", canvas=8)],
    ml_collections.ConfigDict({"ops": [{"op": "task_prompt", "task": "loca"},
                                       {"op": "resize_and_pad", "canvas": 8}]}).ops,
])
def test_parse_forms_build_the_same_ops(spec):
    op = registry.compose(registry.parse(spec))
    out = op(_example(), np.random.default_rng(0))
    # 20x10 -> 8x4 on an 8x8 canvas: the box (10, 5, 20, 10) scales by 0.4.
    np.testing.assert_allclose(out[fields.OBJECT_BOXES], [[4, 2, 8, 4]])
    np.testing.assert_array_equal(out[fields.VALID_WH], [8, 4])


def test_config_dict_items_are_plain_python():
    config = ml_collections.ConfigDict({"op": "random_scale_crop", "canvas": 8,
                                        "min_scale": 1.0, "max_scale": 1.0})
    [op] = registry.parse([config])
    out = op(_example(), np.random.default_rng(0))
    assert out[fields.IMAGE].shape == (8, 8, 3)


def test_ops_do_not_modify_their_input():
    example = _example()
    before = {k: np.copy(v) if isinstance(v, np.ndarray) else v for k, v in example.items()}
    registry.compose(registry.parse("task_prompt(task='loca')|horizontal_flip(probability=1.0)"
                                    "|resize_and_pad(canvas=8)"))(example,
                                                                  np.random.default_rng(0))
    assert example.keys() == before.keys()
    for key, value in before.items():
        np.testing.assert_array_equal(example[key], value)


@pytest.mark.parametrize("spec, message", [
    ("no_such_op(x=1)", "unknown op 'no_such_op'; registered ops: decode"),
    ("resize_and_pad(8)", "by keyword"),
    ("resize_and_pad(canvas=size)", "not a Python literal"),
    ("resize_and_pad(canvas=", "not of the form"),
    ("resize_and_pad.x(canvas=1)", "not of the form"),
    ("resize_and_pad(size=8)", "bad arguments"),
    ([{"canvas": 8}], "no 'op' key"),
    ([3], "neither a string, a mapping nor an op"),
])
def test_bad_specs_raise_naming_the_problem(spec, message):
    with pytest.raises(registry.SpecError, match=message.replace("(", r"\(")):
        registry.parse(spec)


def test_a_name_registers_once():
    with pytest.raises(ValueError, match="already registered"):
        registry.register("decode")(lambda: None)


def test_compose_applies_in_order_with_one_generator():
    seen = []

    def record(tag):
        def op(example, rng):
            seen.append((tag, rng))
            return {**example, "trail": example["trail"] + tag}
        return op

    rng = np.random.default_rng(0)
    out = registry.compose([record("a"), record("b")])({"trail": ""}, rng)
    assert out["trail"] == "ab"
    assert [tag for tag, _ in seen] == ["a", "b"] and all(r is rng for _, r in seen)
