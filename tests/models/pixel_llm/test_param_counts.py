"""Full paper-size PixelLLM built with ``nnx.eval_shape``: the parameter table by module.

The pretrained parts must equal the published models (counts checked against the PyTorch
references in the encoder and language-model tests); PixelLLM's own modules are counted from the
official architecture (scenic projects/pixel_llm/modeling/) by hand here.
"""

import subprocess
import sys
from pathlib import Path

import jax
import pytest
from configs import pixelllm as pixelllm_config
from flax import nnx

from pixelllm.models.pixel_llm.proposal_head import ProposalHead
from pixelllm.nn import abstract
from pixelllm.tools import param_table

REPO = Path(__file__).resolve().parents[3]

SAM_VIT_H = 641_090_864
# EVA02-L/14 trunk with its final norm: 304,055,232 at 448 (1 + 32^2 position slots); the 384
# canvas gives a 27x27 grid, so 1 + 27^2 slots of 1024.
EVA02_L_384 = 304_055_232 - (1 + 32 ** 2 - (1 + 27 ** 2)) * 1024
FLAN_T5_XL = 2_849_757_184
FLAN_T5_XL_LORA = 72 * 2 * 32 * 2048 * 2  # 72 attentions x (q, v) x rank 32 x (A: d x r, B: r x d)
GEMMA2_2B = 2_614_341_888


def _dense(i, o):
    return i * o + o


def _two_way(dim, depth, mlp, downsample=2):
    inner = dim // downsample
    cross = 3 * _dense(dim, inner) + _dense(inner, dim)
    block = 4 * _dense(dim, dim) + 2 * cross + _dense(dim, mlp) + _dense(mlp, dim) + 4 * 2 * dim
    return depth * block + cross + 2 * dim


# The official PromptAdaptor (prompt_adapter.py) at the T5 config, counted with jax.eval_shape on
# the scenic code: its dense_output_mlp (512 -> 1024 on the image side) is read only by
# prompt_fuse_fn='dense' and is not built here.
OFFICIAL_PROMPT_ADAPTER = 44_030_720
OFFICIAL_DENSE_OUTPUT_MLP = 512 * 1024 + 1024
# The official T5 model's visual_project_layers='linear' (layers.py LinearProjectLayers): Dense
# 1024 -> 2048 with bias, then LayerNorm with scale and bias (2,103,296, counted with jax.eval_shape on the official scenic layer).
OFFICIAL_T5_VISUAL_PROJECTION = 2_103_296


def _official_prompt_adapter(fused=1024 + 256, prompt=256):
    """Queries, image / PE / prompt projections (one shared by sparse and dense prompts), the
    two-way transformer, then 32 per-query output Dense layers 512 -> 1024."""
    return (32 * 512 + _dense(fused, 512) + 2 * _dense(prompt, 512) + _two_way(512, 6, 2048)
            + 32 * _dense(512, 1024))


def _visual_projection(lm_width):
    return _dense(1024, lm_width) + 2 * lm_width


def _pixelllm_modules(lm_width):
    prompt_adapter = _official_prompt_adapter() + _visual_projection(lm_width)
    # Points only: the official box is read from the points (box_source "points"), no box layer.
    point_head = 2 * lm_width + _dense(lm_width, 512) + 2 * _dense(512, 512) + _dense(512, 4)
    mask_adapter = (2 * (2 * lm_width + _dense(lm_width, 256)) + 2 * 256 + _two_way(256, 2, 2048)
                    + 2 * 256)
    # The official CenterNet2 (FPN, CenterNet head, RoI head; tests/models/pixel_llm/
    # test_centernet2.py pins each part against the official module).
    proposal_head = 21_948_560
    return {"prompt_adapter": prompt_adapter, "point_head": point_head,
            "mask_adapter": mask_adapter, "proposal_head": proposal_head}


def _light_proposal_head(fused):
    conv3 = 9 * 256 * 256 + 256
    return (_dense(fused, 256) + 2 * 256 + 4 * (conv3 + 2 * 256)
            + (9 * 256 * 1 + 1) + (9 * 256 * 4 + 4) + 1)


@pytest.fixture(scope="module")
def abstract_model():
    """Full-size abstract models (``nnx.eval_shape``), built once per variant: tracing the
    3B-parameter t5_xl model takes a few seconds (pixelllm.nn.abstract)."""
    built = {}

    def get(variant):
        if variant not in built:
            built[variant] = param_table.build_abstract(pixelllm_config.get_config(variant))
        return built[variant]
    return get


@pytest.mark.parametrize("variant,lm_width,lm_frozen,lm_lora", [
    ("t5_xl", 2048, FLAN_T5_XL, FLAN_T5_XL_LORA),
    ("gemma2_2b", 2304, GEMMA2_2B, 26 * 32 * (2304 + 8 * 256) + 26 * 32 * (2304 + 4 * 256)),
])
def test_full_size_parameter_table(variant, lm_width, lm_frozen, lm_lora, abstract_model):
    model = abstract_model(variant)
    rows = {name: (trainable, frozen)
            for name, trainable, frozen in param_table.param_rows(model, depth=1)}
    expected = {"sam": (0, SAM_VIT_H), "eva02": (EVA02_L_384, 0), "lm": (lm_lora, lm_frozen)}
    expected.update({name: (count, 0) for name, count in _pixelllm_modules(lm_width).items()})
    trainable = sum(t for t, _ in expected.values())
    frozen = sum(f for _, f in expected.values())
    expected["total"] = (trainable, frozen)
    assert rows == expected


def test_light_proposal_head_switch_at_the_paper_sizes():
    config = pixelllm_config.get_config("t5_xl")
    light = abstract.build_abstract(lambda rngs: ProposalHead(
        in_features=1280, canvas_size=384, **config.model.proposal_head.light.to_dict(),
        rngs=rngs))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(light, nnx.Param))) == (
        _light_proposal_head(1280))


def test_prompt_adapter_matches_the_official_count_at_the_t5_config(abstract_model):
    """The t5_xl adapter (official style) equals the official PromptAdaptor less its unused
    dense_output_mlp, and its projection to the LM equals the official visual projection."""
    model = abstract_model("t5_xl")
    adapter = model.prompt_adapter

    def count(module):
        return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))

    projection = count(adapter.lm_proj) + count(adapter.lm_norm)
    assert projection == _visual_projection(2048) == OFFICIAL_T5_VISUAL_PROJECTION
    core = count(adapter) - projection
    assert core == _official_prompt_adapter()
    assert core + OFFICIAL_DENSE_OUTPUT_MLP == OFFICIAL_PROMPT_ADAPTER


def test_param_table_command_prints_the_pixelllm_table():
    out = subprocess.run(
        [sys.executable, "-m", "pixelllm.tools.param_table", "--config=configs/pixelllm.py:tiny",
         "--depth=1"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}
    assert lines["sam"][1] == "0" and lines["sam"][0] == lines["sam"][2]  # all frozen
    assert lines["eva02"][2] == "0"  # all trained
    assert set(lines) == {"sam", "eva02", "lm", "prompt_adapter", "point_head", "mask_adapter",
                          "proposal_head", "total"}
