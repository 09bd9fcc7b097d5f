r"""The paper's training stages, each a complete training config (``pixelllm.main``).

  --config=configs/stages.py:trace              trace pretraining (Localized Narratives)
  --config=configs/stages.py:ref                referring localization, from trace
  --config=configs/stages.py:refseg             referring segmentation, from SAM-H + ref
  --config=configs/stages.py:densecap           dense captioning, from trace
  --config=configs/stages.py:multitask          trace + referring + dense captioning
  --config=configs/stages.py:multitask_refseg   referring segmentation, from SAM-H + multitask
  --config=configs/stages.py:trace_tiny         any stage + "_tiny": tiny model, smoke data,
                                                batch 4, 4 steps (seconds on a CPU)

A stage is an experiment (``configs/experiments/experiment.py``: model + data, sizes tied) plus
the training fields of the shared schema: ``seed``, ``train``, ``optimizer``
(:class:`pixelllm.train.optimizer.OptimizerSettings`), ``frozen`` (regexes over ``/``-joined
parameter paths, on top of the model's own frozen SAM and language-model base), ``init``,
``checkpoint`` and ``mesh_shape``. Values are the official ones (scenic
``projects/pixel_llm/configs/t5/pixel_llm_t5_<stage>.py``; ``iter_factor`` multiplied out):

================  =====  =====  =======  =====  =====  =====  ================================
stage             batch  steps  warm-up  lr     wd     decay  also frozen
================  =====  =====  =======  =====  =====  =====  ================================
trace             256    10k    250      5e-5   0      -      (mask adapter, proposal head)
ref               64     120k   1k       5e-5   0      -      (mask adapter, proposal head)
refseg            64     60k    500      5e-5*  0      -      EVA02, prompt adapter, LM
                                                              (proposal head)
densecap          64     40k    1k       1e-4   0.05   0.8    (mask adapter, point head)
multitask         128    240k   2k       1e-4   0.05   0.8    (mask adapter)
multitask_refseg  128    30k    250      1e-4   0      -      all but the mask adapter
================  =====  =====  =======  =====  =====  =====  ================================

\* the mask adapter at 10x (``lr_multipliers``). "Also frozen" adds to the model's own frozen SAM
and language-model base. In parentheses: modules the official stage does not build (its
``box_decoder_name``, ``mask_adapter_name`` or ``point_predictor_name`` is ``none``), which this
model always has: frozen, they get no optimizer state and, where the stage decays weights, are not
shrunk by a weight decay without a gradient.

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
"""

from __future__ import annotations

import dataclasses

import ml_collections

from configs.experiments import experiment

# Public files (``load_pretrained``); replace with their paths on your machine.
SAM_H = "sam_vit_h_4b8939.pth"
EVA02_L = "eva02_large_patch14_448.mim_m38m_ft_in22k_in1k/model.safetensors"
FLAN_T5_XL = "flan-t5-xl/"
FLAN_T5_XL_TOKENIZER = "flan-t5-xl/spiece.model"
# Where each stage's run writes (its --workdir), read by the stages that start from it.
WORKDIR_ROOT = "workdirs"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage:
    """One official stage's values (see the module docstring's table)."""

    data: str
    batch_size: int
    steps: int
    warmup_steps: int
    learning_rate: float
    weight_decay: float = 0.0
    layer_decay: float | None = None
    lr_multipliers: tuple[tuple[str, float], ...] = ()
    frozen: tuple[str, ...] = ()
    # The earlier stage whose checkpoint this one starts from ("" = none).
    init_from: str = ""
    # EVA02 from its public file (the stages the official starts from WebLI).
    eva02_public: bool = False
    # Caption slots per dense-captioning image (official 32 densecap, 16 multi-task).
    num_text_proposals: int | None = None
    save_interval_steps: int = 1000
    eval_every: int = 2500


# Official checkpoint and evaluation intervals: 1000 and 2500 x iter_factor (densecap 5000).
STAGES = {
    "trace": Stage(data="trace", batch_size=256, steps=10_000, warmup_steps=250,
                   learning_rate=5e-5, frozen=("mask_adapter/", "proposal_head/"),
                   eva02_public=True),
    "ref": Stage(data="ref", batch_size=64, steps=120_000, warmup_steps=1_000,
                 learning_rate=5e-5, frozen=("mask_adapter/", "proposal_head/"),
                 init_from="trace", save_interval_steps=4_000, eval_every=10_000),
    "refseg": Stage(data="refseg", batch_size=64, steps=60_000, warmup_steps=500,
                    learning_rate=5e-5, lr_multipliers=(("mask_adapter/", 10.0),),
                    frozen=("eva02/", "prompt_adapter/", "lm/", "proposal_head/"),
                    init_from="ref", save_interval_steps=2_000, eval_every=5_000),
    "densecap": Stage(data="densecap", batch_size=64, steps=40_000, warmup_steps=1_000,
                      learning_rate=1e-4, weight_decay=0.05, layer_decay=0.8,
                      frozen=("mask_adapter/", "point_head/"), init_from="trace",
                      num_text_proposals=32, save_interval_steps=5_000, eval_every=5_000),
    "multitask": Stage(data="pixelllm", batch_size=128, steps=240_000, warmup_steps=2_000,
                       learning_rate=1e-4, weight_decay=0.05, layer_decay=0.8,
                       frozen=("mask_adapter/",), eva02_public=True, num_text_proposals=16,
                       save_interval_steps=8_000, eval_every=20_000),
    "multitask_refseg": Stage(data="refseg", batch_size=128, steps=30_000, warmup_steps=250,
                              learning_rate=1e-4,
                              frozen=("eva02/", "prompt_adapter/", "lm/", "point_head/",
                                      "proposal_head/"),
                              init_from="multitask", num_text_proposals=16),
}

_TINY = "_tiny"


def stage_config(name: str, *, tiny: bool) -> ml_collections.ConfigDict:
    """The training config of stage ``name`` (a key of :data:`STAGES`), locked."""
    stage = STAGES[name]
    config = experiment.build(model_variant="tiny" if tiny else "t5_xl",
                              data_variant="smoke" if tiny else stage.data)
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
    config.seed = 0
    config.train = ml_collections.ConfigDict(dict(
        batch_size=batch_size, steps=steps, accumulation_steps=1, log_every=1 if tiny else 50,
        max_nonfinite_in_a_row=10, eval_every=0 if tiny else stage.eval_every,
        eval_only=False))
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


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name = arg or "multitask"
    tiny = name.endswith(_TINY)
    stage = name[:-len(_TINY)] if tiny else name
    if stage not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose from {sorted(STAGES)}, "
                         f"each also with {_TINY!r}")
    return stage_config(stage, tiny=tiny)
