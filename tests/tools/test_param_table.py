import subprocess
import sys
from pathlib import Path

from configs import decoder_lm, sam as sam_config
from flax import nnx

from pixelllm.tools import param_table

REPO = Path(__file__).resolve().parents[2]


def test_param_rows_split_trainable_and_frozen_by_module():
    rows = param_table.param_rows(param_table.build_abstract(sam_config.get_config("vit_h")), depth=1)
    assert dict((name, (train, frozen)) for name, train, frozen in rows) == {
        "image_encoder": (637_026_048, 0), "prompt_encoder": (6_476, 0),
        "mask_decoder": (4_058_340, 0), "total": (641_090_864, 0)}
    assert rows[-1][0] == "total"

    model = param_table.build_abstract(decoder_lm.get_config("tiny_llama"))
    total = param_table.param_rows(model, depth=1)[-1]
    lora_size = sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))
    assert total[1] == lora_size > 0  # only the adapters train
    assert total[2] > 10 * lora_size  # the frozen base dominates


def test_command_line_applies_config_overrides():
    out = subprocess.run(
        [sys.executable, "-m", "pixelllm.tools.param_table", "--config=configs/sam.py:vit_h",
         "--config.model.image_encoder.img_size=384", "--depth=1"],
        cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1].split() == ["total", "641,090,864", "641,090,864", "0"]
    bad = subprocess.run(
        [sys.executable, "-m", "pixelllm.tools.param_table", "--config=configs/sam.py:vit_x"],
        cwd=REPO, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown SAM variant 'vit_x'" in bad.stderr
