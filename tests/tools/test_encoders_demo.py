import json

import numpy as np
import torch
from PIL import Image

from pixelllm.tools import encoders_demo


def test_demo_writes_overlay_and_summary_with_random_weights(tmp_path):
    summary = encoders_demo.run(tmp_path, "tiny", None, seed=0)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert Image.open(tmp_path / "sam_box_prompt.png").size == (320, 320)
    assert summary["mask_logits_shape"] == [1, 1, 40, 40]
    assert summary["eva02_feature_shape"] == [1, 4, 4, 64]
    assert summary["full_size_parameters"] == {"sam_vit_h": 641_090_864,
                                               "eva02_large_448": 304_055_232}
    assert 0 <= summary["mask_pixels"] <= 40 * 40


def test_demo_loads_a_public_format_checkpoint(tmp_path):
    from tests.encoders.sam.test_sam import _torch_sam  # the tiny segment_anything reference

    path = tmp_path / "sam_tiny.pth"
    torch.save(_torch_sam().state_dict(), path)
    summary = encoders_demo.run(tmp_path / "out", "tiny", str(path), seed=0)
    assert summary["sam_weights"] == str(path)
    random_summary = encoders_demo.run(tmp_path / "random", "tiny", None, seed=0)
    # Same scene and prompt, other weights: the predicted IoU must come from the loaded file.
    assert summary["prompt"] == random_summary["prompt"]
    assert not np.isclose(summary["predicted_iou"], random_summary["predicted_iou"])


def test_scene_boxes_enclose_their_shapes():
    scene, shapes = encoders_demo.draw_scene(64, seed=3)
    background = scene[0, 0]
    for _, (x0, y0, x1, y1) in shapes:
        inside = scene[int(y0) + 1:int(y1), int(x0) + 1:int(x1)]
        assert (np.abs(inside.astype(int) - background).sum(-1) > 0).any()
