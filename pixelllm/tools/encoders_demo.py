"""The encoders end to end on a generated scene: SAM box-prompted segmentation and EVA02 features.

  python -m pixelllm.tools.encoders_demo [--out=demo_out] [--sam_config=tiny]
      [--sam_checkpoint=sam_vit_b_01ec64.pth --sam_config=vit_b]

This is what ``launch/demo.sh`` runs until the PixelLLM model and its training land. It draws a
scene of coloured shapes, prompts SAM with the box of one shape, writes the mask overlay to
``<out>/sam_box_prompt.png`` and a summary to ``<out>/summary.json``, runs EVA02 on the same
scene, and prints the exact parameter table of the full-size encoders (``jax.eval_shape``).
Without ``--sam_checkpoint`` the weights are tiny and random: the plumbing is real, the mask is
not.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from PIL import Image, ImageDraw

from configs import eva02 as eva02_config
from configs import sam as sam_config
from pixelllm.encoders import eva02
from pixelllm.encoders.sam import sam
from pixelllm.tools import param_table

_OUT = flags.DEFINE_string("out", "demo_out", "Output folder.")
_SAM_CONFIG = flags.DEFINE_string("sam_config", "tiny", "configs/sam.py variant.")
_SAM_CHECKPOINT = flags.DEFINE_string(
    "sam_checkpoint", None, "A public SAM file (.pth, HF folder); random weights if unset.")
_SEED = flags.DEFINE_integer("seed", 0, "Scene and weight seed.")

# Canvas for the figure: the tiny configs' inputs are too small to look at.
_FIGURE_SIZE = 320


def draw_scene(size: int, seed: int) -> tuple[np.ndarray, list[tuple[str, tuple[float, ...]]]]:
    """An RGB uint8 ``[size, size, 3]`` scene of three shapes and their ``(name, xyxy box)``."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(180, 240, 3)))
    draw = ImageDraw.Draw(image)
    shapes = []
    for name, colour in (("red", (200, 30, 30)), ("green", (30, 160, 60)), ("blue", (40, 60, 200))):
        w, h = rng.uniform(0.2, 0.4, 2) * size
        x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
        box = (float(x0), float(y0), float(x0 + w), float(y0 + h))
        (draw.ellipse if name == "green" else draw.rectangle)(box, fill=colour)
        shapes.append((name, box))
    return np.asarray(image), shapes


def _overlay(scene: np.ndarray, mask: np.ndarray, box: tuple[float, ...]) -> Image.Image:
    image = Image.fromarray(scene).resize((_FIGURE_SIZE, _FIGURE_SIZE), Image.BILINEAR)
    scale = _FIGURE_SIZE / scene.shape[0]
    mask_image = Image.fromarray((mask * 255).astype(np.uint8)).resize(image.size, Image.NEAREST)
    tint = Image.new("RGB", image.size, (255, 220, 0))
    image = Image.composite(Image.blend(image, tint, 0.55), image, mask_image)
    ImageDraw.Draw(image).rectangle([c * scale for c in box], outline=(0, 0, 0), width=2)
    return image


def run(out: Path, sam_variant: str, sam_checkpoint: str | None, seed: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if sam_checkpoint:
        model = sam.load_sam(sam_checkpoint, config=sam_config.get_config(sam_variant).model)
    else:
        model = sam.Sam.from_config(sam_config.get_config(sam_variant).model, rngs=nnx.Rngs(seed))
    size = model.image_encoder.img_size
    scene, shapes = draw_scene(size, seed)
    name, box = shapes[0]

    start = time.perf_counter()
    masks, iou = jax.jit(lambda m, x, b: m(x, boxes=b))(
        model, sam.normalize(jnp.asarray(scene[None], jnp.float32)), jnp.asarray([box]))
    low_res = np.asarray(masks[0, 0])
    sam_seconds = time.perf_counter() - start
    # Mask logits live on a 4x-upsampled embedding grid; bring them to the image size.
    full = np.asarray(jax.image.resize(low_res, (size, size), "bilinear")) > 0
    _overlay(scene, full, box).save(out / "sam_box_prompt.png")

    eva_config = eva02_config.get_config("tiny").model
    encoder = eva02.Eva02.from_config(eva_config, rngs=nnx.Rngs(seed))
    eva_scene = np.asarray(Image.fromarray(scene).resize((eva_config.img_size,) * 2, Image.BILINEAR))
    features = encoder(jnp.asarray(eva_scene[None], jnp.float32) / 255.0)

    summary = {
        "sam_variant": sam_variant,
        "sam_weights": sam_checkpoint or "random (tiny demo weights)",
        "prompt": {"shape": name, "box_xyxy": list(box)},
        "mask_logits_shape": list(masks.shape),
        "predicted_iou": float(iou[0, 0]),
        "mask_pixels": int(full.sum()),
        "sam_seconds_incl_compile": round(sam_seconds, 2),
        "eva02_feature_shape": list(features.shape),
        "full_size_parameters": {
            "sam_vit_h": param_table.param_rows(
                param_table.build_abstract(sam_config.get_config("vit_h")), depth=1)[-1][1],
            "eva02_large_448": param_table.param_rows(
                param_table.build_abstract(eva02_config.get_config("large")), depth=1)[-1][1],
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv):
    del argv
    print("PixelLLM encoders demo: the PixelLLM model, its training and evaluation arrive with later "
          "issues; this runs SAM and EVA02 end to end.")
    summary = run(Path(_OUT.value), _SAM_CONFIG.value, _SAM_CHECKPOINT.value, _SEED.value)
    print(json.dumps(summary, indent=2))
    print(f"Wrote {_OUT.value}/sam_box_prompt.png and {_OUT.value}/summary.json")


if __name__ == "__main__":
    app.run(main)
