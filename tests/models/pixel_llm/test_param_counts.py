"""Full paper-size PixelLLM built with ``nnx.eval_shape``: the parameter table by module.

The pretrained parts must equal the published models (counts checked against the PyTorch
references in the encoder and language-model tests); PixelLLM's own modules are counted from the
official architecture (official-pixelllm.md §1) by hand here.
"""

import subprocess
import sys
from pathlib import Path

import pytest
from configs import pixelllm as pixelllm_config

from pixelllm.tools import param_table

REPO = Path(__file__).resolve().parents[2]

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


def _pixelllm_modules(lm_width):
    fused, prompt = 1024 + 256, 256
    prompt_adapter = (32 * 512 + _dense(fused, 512) + 3 * _dense(prompt, 512)
                      + _two_way(512, 6, 2048) + _dense(512, 1024) + _dense(1024, lm_width)
                      + 2 * lm_width)
    point_head = (2 * lm_width + _dense(lm_width, 512) + 2 * _dense(512, 512)
                  + _dense(512, 4) + _dense(512, 4))
    mask_adapter = (2 * (2 * lm_width + _dense(lm_width, 256)) + 2 * 256 + _two_way(256, 2, 2048)
                    + 2 * 256)
    conv3 = 9 * 256 * 256 + 256
    proposal_head = (_dense(fused, 256) + 2 * 256 + 4 * (conv3 + 2 * 256)
                     + (9 * 256 * 1 + 1) + (9 * 256 * 4 + 4) + 1)
    return {"prompt_adapter": prompt_adapter, "point_head": point_head,
            "mask_adapter": mask_adapter, "proposal_head": proposal_head}


@pytest.mark.parametrize("variant,lm_width,lm_frozen,lm_lora", [
    ("t5_xl", 2048, FLAN_T5_XL, FLAN_T5_XL_LORA),
    ("gemma2_2b", 2304, GEMMA2_2B, 26 * 32 * (2304 + 8 * 256) + 26 * 32 * (2304 + 4 * 256)),
])
def test_full_size_parameter_table(variant, lm_width, lm_frozen, lm_lora):
    model = param_table.build_abstract(pixelllm_config.get_config(variant))
    rows = {name: (trainable, frozen)
            for name, trainable, frozen in param_table.param_rows(model, depth=1)}
    expected = {"sam": (0, SAM_VIT_H), "eva02": (EVA02_L_384, 0), "lm": (lm_lora, lm_frozen)}
    expected.update({name: (count, 0) for name, count in _pixelllm_modules(lm_width).items()})
    trainable = sum(t for t, _ in expected.values())
    frozen = sum(f for _, f in expected.values())
    expected["total"] = (trainable, frozen)
    assert rows == expected


def test_param_table_command_prints_the_pixelllm_table():
    out = subprocess.run(
        [sys.executable, "-m", "pixelllm.tools.param_table", "--config=configs/pixelllm.py:tiny",
         "--depth=1"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}
    assert lines["sam"][1] == "0" and lines["sam"][0] == lines["sam"][2]  # all frozen
    assert lines["eva02"][2] == "0"  # all trained
    assert set(lines) == {"sam", "eva02", "lm", "prompt_adapter", "point_head", "mask_adapter",
                          "proposal_head", "total"}
