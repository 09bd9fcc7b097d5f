r"""The paper's training stages, each a complete training config (``pixelllm.main``).

  --config=configs/stages.py:trace              trace pretraining (Localized Narratives)
  --config=configs/stages.py:ref                referring localization, from trace
  --config=configs/stages.py:refseg             referring segmentation, from SAM-H + ref
  --config=configs/stages.py:densecap           dense captioning, from trace
  --config=configs/stages.py:multitask          trace + referring + dense captioning
  --config=configs/stages.py:multitask_refseg   referring segmentation, from SAM-H + multitask
  --config=configs/stages.py:trace_tiny         any stage + "_tiny": tiny model, smoke data
                                                (multitask: smoke_multitask, all its sources),
                                                batch 4, 4 steps (seconds on a CPU)
  --config=configs/stages.py:trace_harness      trace at the official CPU harness's sizes
                                                (224 canvas, 128-wide towers, text model trained)
  --config=configs/stages.py:trace_harness_lora the same with the frozen text model + LoRA

A stage is an experiment (``configs/experiments/experiment.py``: model + data, sizes tied) plus
the training fields of the shared schema: ``seed``, ``train``, ``optimizer``
(:class:`pixelllm.train.optimizer.OptimizerSettings`), ``frozen`` (regexes over ``/``-joined
parameter paths, on top of the model's own frozen SAM and language-model base), ``init``,
``checkpoint`` and ``mesh_shape``. Values are the official ones (scenic
``projects/pixel_llm/configs/t5/pixel_llm_t5_<stage>.py``; ``iter_factor`` multiplied out):

================  =====  =====  =======  =====  =====  =====  ================================
stage             batch  steps  warm-up  lr     wd     decay  also frozen
================  =====  =====  =======  =====  =====  =====  ================================
trace             256    10k    250      5e-5   0      -      -
ref               64     120k   1k       5e-5   0      -      -
refseg            64     60k    500      5e-5*  0      -      EVA02, prompt adapter, LM
densecap          64     40k    1k       1e-4   0.05   0.8    point head
multitask         128    240k   2k       1e-4   0.05   0.8    -
multitask_refseg  128    30k    250      1e-4   0      -      all but the mask adapter
================  =====  =====  =======  =====  =====  =====  ================================

\* the mask adapter at 10x (``lr_multipliers``). "Also frozen" adds to the model's own frozen SAM
and language-model base.

**Modules not built**, as in the official stage (its ``box_decoder_name`` is ``none``: no
proposal head; only the two refseg configs set a ``mask_adapter_name``, whose default is
``none``): trace and ref build no mask adapter and no proposal head, refseg no proposal head,
densecap and multitask no mask adapter; multitask_refseg builds both. The stage sets
``config.model.<module>`` to None (:attr:`Stage.unbuilt`), so the model, its checkpoints and its
train step hold no such module (tiny variants too). The official densecap stage builds no point
head either (``point_predictor_name = 'none'``); this model always has one, and densecap freezes
it. Each stage builds every module of the stage it starts from, so a checkpoint restores
(:mod:`pixelllm.train.initialize` refuses arrays the model lacks); a module new in a stage (the
mask adapter of refseg and multitask_refseg) starts from its random initialization. A model
without a mask adapter cannot segment, one without a proposal head cannot caption densely: the
inference entries, the predictor and the task metrics say so, naming the config field.

``prompt_adapter/`` holds the official visual projection (``visual_project_layers``), ``lm/`` the
LoRA factors of the official text decoder (``textual/``).

**Initialization** (``config.init``, :mod:`pixelllm.train.initialize`): ``sam``, ``eva02``,
``language_model`` and ``tokenizer`` name public files (read by
``pixelllm.models.pixel_llm.pretrained.load_pretrained``); the values here are the public file
names, placeholders to replace with their paths. ``checkpoint`` is an earlier stage's work dir
(the ``--workdir`` of its run; its ``checkpoints/`` folder is read, parameters only), default
``workdirs/<stage>``. What a stage loads: the frozen SAM and language-model base always come from
the public files (a stage checkpoint holds trained parameters only); EVA02 from its public file
where the official starts from its (unreleased) WebLI checkpoint, otherwise from the earlier
stage. ``""`` loads nothing; whatever nothing loads keeps its random initialization.

Differences from the official stages: trace pretraining reads Localized Narratives only (the
official mixes COCO captions 1 : LN 2; no COCO-captions builder here); multitask_refseg reads the
refseg data at its sizes (16 slots, 40 context / 40 text tokens; the official 32 / 128); trace and
multitask start from the public SAM / EVA02 / LM files instead of the unreleased
``pixel_llm_t5_webli`` checkpoint; stages without dense-captioning data keep
``model.dense_captioning.num_text_proposals`` at most their slots (trace: 1). The data mixtures' own
differences are listed in ``configs/data.py``.

**The harness variant** (``trace_harness``, :func:`harness_config`) is the trace stage at the sizes
of the official implementation's CPU timing harness (``shared/anchors/scenic``, its "tiny
configuration"), so our train step and the official one can be timed side by side
(``benchmarks/train_step.py``): 224 canvas, batch 8, 1 slot, 8 context / 128 text tokens; EVA02
128 wide, 2 deep, 4 heads (patch 14: 16x16, SwiGLU 341, drop path 0.1); SAM 128 wide, 2 deep, 4
heads, neck 64, window 14 with block 1 global (drop path 0.5, frozen); prompt encoder 64; prompt
adapter depth 2, width 128 (8 heads, MLP 2048), 32 queries of width 128; a 2 x 128 text model
(4 heads, FFN 512, vocabulary 30522, untied output layer); point head 2 points, 3 x 512. Like
the official trace config it builds no mask adapter and no proposal head. The official harness
trains a GIT/BERT decoder; the closest here is the decoder LM (Llama-style: pre-RMSNorm, RoPE,
gated SiLU FFN, no dropout; BERT: post-LayerNorm, learned positions, GELU FFN, dropout 0.1),
trained whole in ``trace_harness`` as the harness trains its decoder, frozen with rank-32 LoRA
on q and v in ``trace_harness_lora``. Weights start random (nothing in ``config.init``).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from configs import decoder_lm as decoder_lm_config
from configs.experiments import experiment

# Public files (``load_pretrained``); replace with their paths on your machine.
SAM_H = "sam_vit_h_4b8939.pth"
EVA02_L = "eva02_large_patch14_448.mim_m38m_ft_in22k_in1k/model.safetensors"
FLAN_T5_XL = "flan-t5-xl/"
FLAN_T5_XL_TOKENIZER = "flan-t5-xl/spiece.model"
# Where each stage's run writes (its --workdir), read by the stages that start from it.
WORKDIR_ROOT = "workdirs"


# The modules of config.model a stage may leave unbuilt (None: PixelLLM builds no such module).
OPTIONAL_MODULES = ("mask_adapter", "proposal_head")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage:
    """One official stage's values (see the module docstring's table)."""

    data: str
    # The data variant of the stage's "_tiny" config: the smoke-sized mixture of its sources.
    tiny_data: str = "smoke"
    batch_size: int
    steps: int
    warmup_steps: int
    learning_rate: float
    weight_decay: float = 0.0
    layer_decay: float | None = None
    lr_multipliers: tuple[tuple[str, float], ...] = ()
    frozen: tuple[str, ...] = ()
    # The modules the official stage does not build (of OPTIONAL_MODULES): config.model.<name>
    # is None.
    unbuilt: tuple[str, ...] = ()
    # The earlier stage whose checkpoint this one starts from ("" = none).
    init_from: str = ""
    # EVA02 from its public file (the stages the official starts from WebLI).
    eva02_public: bool = False
    # Caption slots per dense-captioning image (official 32 densecap, 16 multi-task).
    num_text_proposals: int | None = None
    save_interval_steps: int = 1000
    eval_every: int = 2500

    def __post_init__(self):
        unknown = sorted(set(self.unbuilt) - set(OPTIONAL_MODULES))
        if unknown:
            raise ValueError(f"Stage.unbuilt: {unknown} are not optional modules "
                             f"{OPTIONAL_MODULES}")


# Official checkpoint and evaluation intervals: 1000 and 2500 x iter_factor (densecap 5000).
STAGES = {
    "trace": Stage(data="trace_coco", batch_size=256, steps=10_000, warmup_steps=250,
                   learning_rate=5e-5, unbuilt=OPTIONAL_MODULES, eva02_public=True),
    "ref": Stage(data="ref_official", batch_size=64, steps=120_000, warmup_steps=1_000,
                 learning_rate=5e-5, unbuilt=OPTIONAL_MODULES, init_from="trace",
                 save_interval_steps=4_000, eval_every=10_000),
    "refseg": Stage(data="refseg_official", batch_size=64, steps=60_000, warmup_steps=500,
                    learning_rate=5e-5, lr_multipliers=(("mask_adapter/", 10.0),),
                    frozen=("eva02/", "prompt_adapter/", "lm/"), unbuilt=("proposal_head",),
                    init_from="ref", save_interval_steps=2_000, eval_every=5_000),
    "densecap": Stage(data="densecap", batch_size=64, steps=40_000, warmup_steps=1_000,
                      learning_rate=1e-4, weight_decay=0.05, layer_decay=0.8,
                      frozen=("point_head/",), unbuilt=("mask_adapter",), init_from="trace",
                      num_text_proposals=32, save_interval_steps=5_000, eval_every=5_000),
    "multitask": Stage(data="multitask", tiny_data="smoke_multitask", batch_size=128,
                       steps=240_000, warmup_steps=2_000, learning_rate=1e-4,
                       weight_decay=0.05, layer_decay=0.8,
                       unbuilt=("mask_adapter",), eva02_public=True, num_text_proposals=16,
                       save_interval_steps=8_000, eval_every=20_000),
    "multitask_refseg": Stage(data="refseg_official", batch_size=128, steps=30_000,
                              warmup_steps=250, learning_rate=1e-4,
                              frozen=("eva02/", "prompt_adapter/", "lm/", "point_head/",
                                      "proposal_head/"),
                              init_from="multitask", num_text_proposals=16),
}

_TINY = "_tiny"
# The official CPU harness's sizes (shared/anchors/scenic/README.md, "The tiny configuration").
HARNESS = dict(canvas=224, batch_size=8, eva02=dict(embed_dim=128, depth=2, num_heads=4),
               sam=dict(embed_dim=128, depth=2, num_heads=4, out_chans=64, window_size=14,
                        global_attn_indexes=(1,)),
               prompt_embed_dim=64,
               prompt_adapter=dict(dim=128, depth=2, num_heads=8, mlp_dim=2048, num_queries=32,
                                   visual_features=128),
               text_model=dict(vocab_size=30522, hidden_size=128, intermediate_size=512,
                               num_layers=2, num_heads=4, num_kv_heads=4, head_dim=32,
                               tie_word_embeddings=False, rope_theta=10_000.0, rope_scaling=None,
                               max_position_embeddings=512),
               point_head=dict(hidden_features=512, depth=3))
HARNESS_VARIANTS = {"trace_harness": False, "trace_harness_lora": True}  # name -> LoRA


def stage_config(name: str, *, tiny: bool) -> ml_collections.ConfigDict:
    """The training config of stage ``name`` (a key of :data:`STAGES`), locked."""
    stage = STAGES[name]
    config = experiment.build(model_variant="tiny" if tiny else "t5_xl",
                              data_variant=stage.tiny_data if tiny else stage.data)
    batch_size = 4 if tiny else stage.batch_size
    steps = 4 if tiny else stage.steps
    config.data.batch_size = batch_size
    if not tiny:
        config.data.tokenizer = FLAN_T5_XL_TOKENIZER
    # Tiny models keep their own (smoke-sized) caption slots.
    if stage.num_text_proposals is not None and not tiny:
        config.model.dense_captioning.num_text_proposals = stage.num_text_proposals
    config.unlock()
    config.stage = name + (_TINY if tiny else "")
    for module in stage.unbuilt:
        config.model[module] = None
    config.seed = 0
    config.train = ml_collections.ConfigDict(dict(
        batch_size=batch_size, steps=steps, accumulation_steps=1, log_every=1 if tiny else 50,
        max_nonfinite_in_a_row=10, eval_every=0 if tiny else stage.eval_every,
        eval_only=False, eval_metrics=not tiny))
    config.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=stage.learning_rate,
        warmup_steps=1 if tiny else stage.warmup_steps,
        total_steps=steps,
        weight_decay=stage.weight_decay,
        b1=0.9, b2=0.999, eps=1e-8,
        layer_decay=stage.layer_decay,
        eva02_num_layers=config.model.eva02.depth if stage.layer_decay else None,
        eva02_path="eva02",
        lr_multipliers=stage.lr_multipliers,
        grad_clip_norm=None))
    config.frozen = stage.frozen
    config.init = ml_collections.ConfigDict(_init(stage, tiny=tiny))
    config.checkpoint = ml_collections.ConfigDict(dict(
        save_interval_steps=2 if tiny else stage.save_interval_steps, max_to_keep=3,
        keep_period=0))
    config.mesh_shape = (-1, 1, 1)
    config.lock()
    experiment.check(config)
    return config


def _init(stage: Stage, *, tiny: bool) -> dict[str, str]:
    """``config.init``: tiny stages start from random weights (a test points ``checkpoint`` at
    the earlier tiny stage's work dir)."""
    if tiny:
        return dict(sam="", eva02="", language_model="", tokenizer="", checkpoint="")
    return dict(sam=SAM_H, eva02=EVA02_L if stage.eva02_public else "",
                language_model=FLAN_T5_XL, tokenizer=FLAN_T5_XL_TOKENIZER,
                checkpoint=f"{WORKDIR_ROOT}/{stage.init_from}" if stage.init_from else "")


def harness_config(*, lora: bool) -> ml_collections.ConfigDict:
    """The trace stage at the official CPU harness's sizes (module docstring), locked. ``lora``:
    the text model frozen with LoRA (ours); otherwise trained whole (the harness's decoder)."""
    config = stage_config("trace", tiny=False)
    config.unlock()
    config.stage = "trace_harness" + ("_lora" if lora else "")
    model, canvas = config.model, HARNESS["canvas"]
    _set_canvas(config, canvas)
    model.eva02.update(HARNESS["eva02"])
    model.sam.image_encoder.update(HARNESS["sam"], pretrain_img_size=canvas)
    model.sam.prompt_encoder.embed_dim = HARNESS["prompt_embed_dim"]
    # SAM's mask decoder reads prompt-encoder tokens; nothing here runs it (no mask adapter).
    model.sam.mask_decoder.update(transformer_dim=HARNESS["prompt_embed_dim"],
                                  iou_head_hidden_dim=HARNESS["prompt_embed_dim"])
    # Llama's switches (decoder_lm.py), the harness's sizes; official LoRA: rank 32, scale 2.
    text_model = decoder_lm_config.get_config("llama3_2_1b").model.to_dict()
    text_model.update(HARNESS["text_model"], frozen=lora,
                      lora=dict(rank=32 if lora else 0, alpha=64.0 if lora else 1.0,
                                targets=("q", "v")))
    model.language_model = dict(kind="decoder", model=text_model)
    model.prompt_adapter.update(HARNESS["prompt_adapter"])
    model.point_head.update(HARNESS["point_head"])
    config.data.batch_size = config.train.batch_size = HARNESS["batch_size"]
    config.data.tokenizer = None
    config.init = ml_collections.ConfigDict(
        dict(sam="", eva02="", language_model="", tokenizer="", checkpoint=""))
    config.lock()
    experiment.check(config)
    return config


def _set_canvas(config: ml_collections.ConfigDict, canvas: int) -> None:
    """Every canvas size of the model and of the data config (sizes and op chains)."""
    config.model.canvas_size = canvas
    config.model.sam.image_encoder.img_size = canvas
    config.model.eva02.img_size = canvas
    config.data.sizes.canvas = canvas
    for source in (*config.data.train, *config.data.eval):
        if "sizes" in source:
            source["sizes"]["canvas"] = canvas
        for op in source["ops"]:
            if "canvas" in op:
                op["canvas"] = canvas


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name = arg or "multitask"
    if name in HARNESS_VARIANTS:
        return harness_config(lora=HARNESS_VARIANTS[name])
    tiny = name.endswith(_TINY)
    stage = name[:-len(_TINY)] if tiny else name
    if stage not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose from {sorted(STAGES)}, "
                         f"each also with {_TINY!r}")
    return stage_config(stage, tiny=tiny)
