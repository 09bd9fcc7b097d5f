r"""The demo (``bash launch/demo.sh``): a small PixelLLM trained on every task at once on the
synthetic grounded scenes (``python -m data_pipelines.synthetic_scenes``), from random weights.

  --config=configs/demo.py          the demo run (about 12 minutes of training on 2 CPU cores)
  --config=configs/demo.py:quick    the same model and data for a few steps (``--quick``)

The model is the tiny PixelLLM (``configs/pixelllm.py:tiny``: the full model's code at small
sizes) on a 64-pixel canvas with wider towers, trained with the multi-task stage's fields
(``configs/stages.py``). Since no pretrained weights exist here, the parts the paper freezes
are trained too, and the config says so: ``model.frozen`` is empty (SAM trains) and the text
model is trained whole without LoRA (``language_model.model.frozen=False``, LoRA rank 0). The
multi-task stage builds no mask adapter (the official trains it in a later stage); the demo
segments too, so it builds the tiny model's.

Data (builders' ``manual_dir`` = the generator's folders; ``data.tokenizer`` = its
``spiece.model``), one mixture of every task:

==================  ==================================  ==========  ======  ==================
source              builder / split                     task        weight  evaluated on
==================  ==================================  ==========  ======  ==================
ln_trace            localized_narratives/coco train     trace       2       validation
ln_caption          localized_narratives/coco train     caption     1       validation
refcoco_refer       refer_coco/refcoco_unc train        refer       2       test
refcoco_refseg      refer_coco/refcoco_unc train        refseg      2       test
vg_densecap         vg_densecap/densecap train          densecap    2       test
vg_loca             vg_densecap/densecap train          loca        1       test
==================  ==================================  ==========  ======  ==================

The held-out splits are never trained on (the generator puts each image in one split of every
source). Referring data trains with the scale-jitter crop, dense captioning with the same crop
(the official flip + 0.1-2.0 crop would leave few whole shapes on a 64-pixel canvas), the rest
at scale 1.
"""

from __future__ import annotations

import ml_collections

from configs import data as data_config
from configs import pixelllm as pixelllm_config
from configs import stages
from configs.experiments import experiment
from pixelllm import tasks

CANVAS = 64
# The generated scenes' side in pixels (pixelllm/tools/demo.py), the frame of the evaluation's
# original-size masks.
SCENE_SIDE = 128
SIZES = dict(canvas=CANVAS, slots=4, context_length=16, text_length=48, points_per_token=2,
             objects=8)
# Evaluation scores every expression (up to 3 per shape) and every shape of an image.
EVAL_SLOTS = 16
LN = data_config.LN
REFCOCO = data_config.REFCOCO
VG = data_config.VG
# name, builder, task, augmentation, weight; held-out split.
TRAIN_SOURCES = (
    ("ln_trace", LN, "trace", "none", 2.0),
    ("ln_caption", LN, "caption", "none", 1.0),
    ("refcoco_refer", REFCOCO, "refer", "crop", 2.0),
    ("refcoco_refseg", REFCOCO, "refseg", "crop", 2.0),
    ("vg_densecap", VG, "densecap", "crop", 2.0),
    ("vg_loca", VG, "loca", "none", 1.0),
)
HELD_OUT_SPLIT = {LN: "validation", REFCOCO: "test", VG: "test"}
# Steps, batch, evaluation batch, warm-up: the demo and the quick run. The quick run's time is
# mostly compiling (the train step, 7 evaluation programs): its 4 steps still save two
# checkpoints (the interval's and the last), and its evaluation batch is the size of each
# held-out split of its 40 scenes (4), so no evaluation runs a batch of padding.
RUNS = {"demo": dict(steps=1000, batch_size=16, eval_batch_size=16, warmup_steps=100),
        "quick": dict(steps=4, batch_size=4, eval_batch_size=4, warmup_steps=1)}


def _model(config: ml_collections.ConfigDict) -> None:
    model = config.model
    model.canvas_size = CANVAS
    model.sam.image_encoder.update(img_size=CANVAS, pretrain_img_size=CANVAS, patch_size=4,
                                   window_size=4, embed_dim=48)
    model.eva02.update(img_size=CANVAS, patch_size=8, embed_dim=96, depth=3, rope_ref_grid=8)
    model.prompt_adapter.update(dim=64, num_heads=4, mlp_dim=128, num_queries=16,
                                visual_features=64)
    text_model = model.language_model.model
    text_model.update(d_model=128, d_kv=32, d_ff=256, num_heads=4, frozen=False,
                      dropout_rate=0.0)
    text_model.lora.update(rank=0, alpha=1.0)
    model.point_head.hidden_features = 128
    # No pretrained SAM: its encoder trains with the rest.
    model.frozen = ()
    model.dense_captioning.num_text_proposals = SIZES["slots"]
    # The multi-task stage builds no mask adapter (the official trains it in its own stage);
    # the demo segments too: the tiny model's own.
    model.mask_adapter = pixelllm_config.get_config("tiny").model.mask_adapter


def _loss(config: ml_collections.ConfigDict) -> None:
    # The official pixel L1 weights (0.1) are set for a 384-pixel canvas; on the 64-pixel
    # canvas the same errors are 6x fewer pixels, so the point and box terms get 10x.
    config.loss.update(point=1.0, box_l1=1.0)


def _data(config: ml_collections.ConfigDict, *, batch_size: int, eval_batch_size: int) -> None:
    data = config.data
    data.variant = "synthetic_scenes"
    data.sizes = dict(SIZES)
    data.batch_size = batch_size
    data.num_threads = 2
    data.train = [
        {"name": name, "builder": builder, "split": "train", "task": task, "weight": weight,
         "ops": data_config.source_ops(task=task, train=True, sizes=SIZES, augment=augment,
                                       prompts=_prompts(task))}
        for name, builder, task, augment, weight in TRAIN_SOURCES]
    eval_sizes = dict(SIZES, slots=EVAL_SLOTS)
    data.eval = []
    for name, builder, task, _, _ in TRAIN_SOURCES:
        ops, sizes = data_config.evaluation_chain(
            data_config.source_ops(task=task, train=False, sizes=eval_sizes, augment="none"),
            task=task, sizes=eval_sizes, original_masks=SCENE_SIDE)
        data.eval.append({
            "name": f"{name}_{HELD_OUT_SPLIT[builder]}", "builder": builder,
            "split": HELD_OUT_SPLIT[builder], "task": task, "weight": 1.0, "ops": ops,
            "sizes": sizes, "batch_size": eval_batch_size})


def _prompts(task: str) -> list[str] | None:
    # Short captions choose their prompts by the text length, as configs/data.py does.
    if task == "caption":
        return list(tasks.caption_training_prompts(SIZES["text_length"]))
    return None


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    run = arg or "demo"
    if run not in RUNS:
        raise ValueError(f"unknown demo run {run!r}; choose from {sorted(RUNS)}")
    settings = RUNS[run]
    config = stages.stage_config("multitask", tiny=True)
    config.unlock()
    config.stage = f"demo_{run}" if run != "demo" else "demo"
    _model(config)
    _loss(config)
    _data(config, batch_size=settings["batch_size"],
          eval_batch_size=settings["eval_batch_size"])
    config.model.point_head.num_points = SIZES["points_per_token"]
    train = config.train
    train.batch_size = settings["batch_size"]
    train.steps = settings["steps"]
    train.log_every = 10 if run == "demo" else 1
    # Evaluated once, at the last step, in the training process (the demo's report reads
    # eval/<last step>/).
    train.eval_every = settings["steps"]
    train.eval_metrics = True
    optimizer = config.optimizer
    optimizer.update(learning_rate=2e-3, warmup_steps=settings["warmup_steps"],
                     total_steps=settings["steps"], weight_decay=0.05, layer_decay=None,
                     eva02_num_layers=None, grad_clip_norm=1.0)
    config.checkpoint.update(save_interval_steps=500 if run == "demo" else 2, max_to_keep=2)
    # Everything trains at once, whatever the multi-task stage freezes.
    config.frozen = ()
    config.mesh_shape = (-1, 1, 1)
    config.lock()
    experiment.check(config)
    return config
