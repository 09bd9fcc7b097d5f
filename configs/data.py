"""Input pipeline mixtures: sources, weights, tasks, op chains and the batch contract sizes.

  --config=configs/data.py:pixelllm   multi-task training (trace + referring + dense captioning)
  --config=configs/data.py:trace      Localized Narratives trace captioning (the `*_trace` stage)
  --config=configs/data.py:ref        referring localization
  --config=configs/data.py:refseg     referring segmentation
  --config=configs/data.py:densecap   Visual Genome dense captioning
  --config=configs/data.py:smoke      the pixelllm mixture at tiny sizes (CPU tests, benchmarks)
  --config=configs/data.py:trace_coco the official trace stage: COCO Captions 1, Localized
                                      Narratives 2 (``pixel_llm_t5_trace.py``)
  --config=configs/data.py:multitask  the official multi-task mixture with COCO Captions (3) and
                                      ShareGPT4V instructions (5) added to ``pixelllm``
  --config=configs/data.py:smoke_multitask   ``multitask`` at tiny sizes
  --config=configs/data.py:ref_official      the official referring mixture: Flickr30k 1, mixed
                                      COCO 5, mixed VG 1 (``pixel_llm_t5_ref.py``)
  --config=configs/data.py:refseg_official   the official referring segmentation data: MDETR's
                                      image-safe RefCOCO/+/g merge (``pixel_llm_t5_refseg.py``)

Set ``--config.tokenizer`` (the language model's tokenizer file or folder) and
``--config.data_dir`` (the TFDS data folder the builders wrote); ``pipeline.from_config`` makes
the pipelines.

Every source names a builder (``name/config``), a split, a task, a weight and its full op chain
(``data_pipelines/ops``). ``tokenize`` entries take ``config.tokenizer`` unless they name one;
everything else is spelled out here, sizes included, and every example is checked against
``config.sizes`` (a mismatch raises, naming the key). Evaluation sources carry their own
``sizes`` (more slots: every expression or object is scored) and ``batch_size``.

Augmentation follows the official recipe (scenic ``projects/pixel_llm/io/ops.py`` and
``io/transforms.py``), with its two text bugs
fixed: Localized Narratives at scale 1 (no crop, so traces stay whole), referring data with scale
jitter 0.75-1.25 and a random crop (objects cropped away are dropped with their prompts), Visual
Genome with a horizontal flip that swaps "left"/"right" in the phrases and scale 0.1-2.0 with a
random crop. Evaluation resizes onto the canvas.

Sizes per variant are the official stage configs' (scenic ``projects/pixel_llm/configs/t5/``;
K = 2 corners, 384 canvas, G = 100 ground-truth regions, the official VG maximum, everywhere):

==========  =====  =====  =====  ===================================================
variant     S      Lc     L      official config (``max_boxes``, context, text tokens)
==========  =====  =====  =====  ===================================================
pixelllm    16     32     128    ``pixel_llm_t5_trace_ref_densecap_llava.py``
trace       1      8      128    ``pixel_llm_t5_trace.py``
ref         16     40     40     ``pixel_llm_t5_ref.py`` (context -1: the text length)
refseg      16     40     40     ``pixel_llm_t5_refseg.py``
densecap    32     8      40     ``pixel_llm_t5_densecap.py`` (S = its 32 text proposals)
==========  =====  =====  =====  ===================================================

COCO Captions train on Karpathy's ``train + restval`` (``karpathy_train``) with one of the 13
short-caption prompts (or "A photo of " alone when the text length is below 32 tokens,
:func:`pixelllm.tasks.caption_training_prompts`), scale 0.75-1.25 and a random crop, and are
evaluated on ``karpathy_val`` with "A photo of "; instruction data (ShareGPT4V's mix665k)
trains each (question, answer) pair in a slot of its own (task ``question_answer``) at scale 1.

Differences from the official mixtures: ``pixelllm``, ``trace`` and ``smoke`` leave out COCO
Captions and ShareGPT4V (``trace_coco``, ``multitask`` and ``smoke_multitask`` have them);
COCO Captions fill one slot per image with one of its captions (the official fills up to
``max_boxes`` slots with all of them, 16 in the multi-task mixture); and
the UNINEXT referring mixture (flickr 1, mixed_coco 5, mixed_vg 1) is replaced by the RefCOCO
family's train splits (refcoco_unc 2, refcocoplus_unc 2, refcocog_umd 3, the same total 7).
RefCOCOg's umd train images include some of RefCOCO's val/test images (why MDETR built its
"coco_img_safe" merge): evaluate RefCOCO/+ on a model trained without refcocog_umd, or accept the
overlap knowingly.

``ref_official`` and ``refseg_official`` train on the official referring sources instead
(builder ``referring_mixture``, :mod:`data_pipelines.builders.referring_mixture`): SeqTR's
``uni_flickr`` 1, ``uni_mixed_coco`` 5 and ``uni_mixed_vg`` 1 for localization, and MDETR's
``merge_coco_img_safe`` (RefCOCO/+/g train without any of their val/test images, with masks)
for segmentation; both evaluate as ``ref`` / ``refseg`` do.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from pixelllm import tasks
from pixelllm.batch import Sizes

_SIZES = {
    "pixelllm": dataclasses.asdict(Sizes(slots=16, context_length=32, text_length=128)),
    "trace": dataclasses.asdict(Sizes(slots=1, context_length=8, text_length=128)),
    "ref": dataclasses.asdict(Sizes(slots=16, context_length=40, text_length=40)),
    "refseg": dataclasses.asdict(Sizes(slots=16, context_length=40, text_length=40)),
    "densecap": dataclasses.asdict(Sizes(slots=32, context_length=8, text_length=40)),
    "smoke": dataclasses.asdict(Sizes(canvas=32, slots=2, context_length=8, text_length=16,
                                      points_per_token=2, objects=4)),
}
_SIZES.update(trace_coco=_SIZES["trace"], multitask=_SIZES["pixelllm"],
              smoke_multitask=_SIZES["smoke"])
_SIZES.update(ref_official=_SIZES["ref"], refseg_official=_SIZES["refseg"])

LN = "localized_narratives/coco"
REFCOCO = "refer_coco/refcoco_unc"
REFCOCO_PLUS = "refer_coco/refcocoplus_unc"
REFCOCOG = "refer_coco/refcocog_umd"
VG = "vg_densecap/densecap"
COCO_CAPTIONS = "coco_captions_manual/coco"
SHAREGPT4V = "llava_instructions/sharegpt4v_mix665k"
REFERRING_MIXTURE = "referring_mixture"


def source_ops(*, task: str, train: bool, sizes: dict, augment: str,
               alignment: str = "official", prompts: list[str] | None = None) -> list[dict]:
    """The op chain of a source: decode, the task prompt, ``augment``, slots, tokens.

    Args:
      task: a task of the task table (:data:`pixelllm.tasks.TASKS`): its prompts, slot filler
        and losses come from its row.
      train: training (random prompts, augmentation, random slot subsets) or evaluation.
      sizes: the batch contract sizes (:class:`pixelllm.batch.Sizes` fields).
      augment: ``"none"`` (resize onto the canvas), ``"crop"`` (scale 0.75-1.25 and a random
        crop), ``"flip_crop"`` (a flip swapping "left"/"right", then scale 0.1-2.0 and a crop).
      alignment: word-trace alignment of ``tokenize`` (``"official"`` or ``"exact"``).
      prompts: training prompts replacing the task's (``task_prompt``), or ``None``.
    """
    tasks.get(task)  # an unknown name fails here, naming the known ones
    canvas = sizes["canvas"]
    if not train or augment == "none":
        geometry = [{"op": "resize_and_pad", "canvas": canvas}]
    elif augment == "crop":
        geometry = [{"op": "random_scale_crop", "canvas": canvas, "min_scale": 0.75,
                     "max_scale": 1.25}]
    elif augment == "flip_crop":
        geometry = [{"op": "horizontal_flip", "probability": 0.5, "mode": "swap"},
                    {"op": "random_scale_crop", "canvas": canvas, "min_scale": 0.1,
                     "max_scale": 2.0}]
    else:
        raise ValueError(f"unknown augmentation {augment!r}; expected none, crop or flip_crop")
    prompt_op = {"op": "task_prompt", "task": task, "train": train}
    if prompts is not None:
        prompt_op["prompts"] = list(prompts)
    return [
        {"op": "decode"},
        prompt_op,
        *geometry,
        {"op": "slot", "task": task, "slots": sizes["slots"], "objects": sizes["objects"],
         "train": train},
        {"op": "tokenize", "context_length": sizes["context_length"],
         "text_length": sizes["text_length"], "points_per_token": sizes["points_per_token"],
         "alignment": alignment},
    ]


def _source(name: str, builder: str, split: str, task: str, *, sizes: dict, train: bool,
            augment: str, weight: float = 1.0) -> dict:
    # COCO-style captions choose their training prompts by the text length (official).
    prompts = (list(tasks.caption_training_prompts(sizes["text_length"]))
               if task == "caption" and train else None)
    return {"name": name, "builder": builder, "split": split, "task": task, "weight": weight,
            "ops": source_ops(task=task, train=train, sizes=sizes, augment=augment,
                              prompts=prompts)}


def _train_sources(variant: str, sizes: dict) -> list[dict]:
    def source(name, builder, task, augment, weight=1.0, split="train"):
        return _source(name, builder, split, task, sizes=sizes, train=True, augment=augment,
                       weight=weight)

    trace = [source("ln_coco_trace", LN, "trace", "none")]
    refer = [source("refcoco_unc", REFCOCO, "refer", "crop", 2.0),
             source("refcocoplus_unc", REFCOCO_PLUS, "refer", "crop", 2.0),
             source("refcocog_umd", REFCOCOG, "refer", "crop", 3.0)]
    refseg = [source("refcoco_unc_seg", REFCOCO, "refseg", "crop", 2.0),
              source("refcocoplus_unc_seg", REFCOCO_PLUS, "refseg", "crop", 2.0),
              source("refcocog_umd_seg", REFCOCOG, "refseg", "crop", 3.0)]
    densecap = [source("vg_densecap", VG, "densecap", "flip_crop", 5.0)]
    # Karpathy's train + restval, as the official (TFDS coco_captions "train+restval").
    coco = [source("coco_captions", COCO_CAPTIONS, "caption", "crop", split="karpathy_train")]
    multitask = [
        *(dict(entry, weight=3.0) for entry in coco), *trace, *refer, *densecap,
        source("sharegpt4v_mix665k", SHAREGPT4V, "question_answer", "none", 5.0)]
    # pixel_llm_t5_ref.py: uni_flickr 1, uni_mixed_coco 5, uni_mixed_vg 1.
    refer_official = [
        source(name, f"{REFERRING_MIXTURE}/{name}", "refer", "crop", weight)
        for name, weight in (("uni_flickr", 1.0), ("uni_mixed_coco", 5.0),
                             ("uni_mixed_vg", 1.0))]
    # pixel_llm_t5_refseg.py: merge_coco_img_safe alone, with masks.
    refseg_official = [source("merge_coco_img_safe",
                              f"{REFERRING_MIXTURE}/merge_coco_img_safe", "refseg", "crop")]
    return {"pixelllm": trace + refer + densecap, "smoke": trace + refer + densecap,
            "trace": trace, "ref": refer, "refseg": refseg, "densecap": densecap,
            "trace_coco": coco + [dict(entry, weight=2.0) for entry in trace],
            "multitask": multitask, "smoke_multitask": multitask,
            "ref_official": refer_official, "refseg_official": refseg_official}[variant]


# The frame of referring segmentation's original-size ground-truth masks (the batch's
# original_masks): COCO's largest image side.
ORIGINAL_MASKS_SIDE = 640


def evaluation_chain(ops: list[dict], *, task: str, sizes: dict,
                     original_masks: int = ORIGINAL_MASKS_SIDE) -> tuple[list[dict], dict]:
    """``(ops, sizes)`` of an evaluation source: ``evaluation_metadata`` right after decode (op
    0) for the task metrics' image id and original size, and for a task that segments the
    original-size ground-truth masks in an ``original_masks`` square frame (at least the data's
    largest image side)."""
    if "mask" not in tasks.get(task).losses:
        return [ops[0], {"op": "evaluation_metadata"}, *ops[1:]], sizes
    metadata = {"op": "evaluation_metadata", "original_masks": original_masks}
    return [ops[0], metadata, *ops[1:]], {**sizes, "original_masks": original_masks}


def _eval_sources(variant: str, sizes: dict) -> list[dict]:
    """Evaluation sources, each with its own sizes and batch size: evaluation scores every
    expression and every described object, so a source gets as many slots as its images can
    ask for (``slot`` raises otherwise) and a batch size that keeps the slot masks in memory.
    Their chains record the image id and original size (``evaluation_metadata``)."""
    smoke = variant.startswith("smoke")

    def source(name, builder, split, task, slots, batch_size):
        source_sizes = {**sizes, "slots": sizes["slots"] if smoke else slots}
        entry = _source(name, builder, split, task, sizes=source_sizes, train=False,
                        augment="none")
        ops, source_sizes = evaluation_chain(entry["ops"], task=task, sizes=source_sizes)
        return {**entry, "ops": ops, "sizes": source_sizes,
                "batch_size": 4 if smoke else batch_size}

    trace = [source("ln_coco_trace_val", LN, "validation", "trace", 16, 32)]
    refer = [source(f"refcoco_unc_{split}", REFCOCO, split, "refer", 64, 16)
             for split in ("val", "testA", "testB")]
    refseg = [source(f"refcoco_unc_seg_{split}", REFCOCO, split, "refseg", 64, 16)
              for split in ("val", "testA", "testB")]
    densecap = [source("vg_densecap_test", VG, "test", "densecap", 16, 32),
                source("vg_loca_test", VG, "test", "loca", 256, 4),
                source("refcocog_umd_loca_val", REFCOCOG, "val", "loca", 64, 16)]
    # One slot: the image is captioned once and scored against all its references.
    coco = [source("coco_captions_karpathy_val", COCO_CAPTIONS, "karpathy_val", "caption", 1,
                   32)]
    # The held-out images of the instruction mixture (one in 100, by image), at most 16
    # question-answer pairs per example (longer conversations are split by the builder).
    answers = [source("sharegpt4v_mix665k_held_out", SHAREGPT4V, "held_out",
                      "question_answer", 16, 32)]
    return {"pixelllm": trace + refer + densecap, "smoke": trace + refer[:1] + densecap[:1],
            "trace": trace, "ref": refer, "refseg": refseg, "densecap": densecap,
            "trace_coco": coco + trace,
            "multitask": coco + trace + refer + densecap + answers,
            "smoke_multitask": coco + trace + refer[:1] + densecap[:1],
            "ref_official": refer, "refseg_official": refseg}[variant]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "pixelllm"
    variants = ("pixelllm", "trace", "ref", "refseg", "densecap", "smoke", "trace_coco",
                "multitask", "smoke_multitask", "ref_official", "refseg_official")
    if variant not in variants:
        raise ValueError(f"unknown data variant {variant!r}; choose from {variants}")
    sizes = _SIZES[variant]
    config = ml_collections.ConfigDict()
    config.variant = variant
    config.tokenizer = config_dict.placeholder(str)
    config.data_dir = config_dict.placeholder(str)
    config.sizes = dict(sizes)
    # Official batch sizes: 128 multi-task, 256 trace, 64 referring / densecap (global).
    config.batch_size = {"pixelllm": 128, "trace": 256, "ref": 64, "refseg": 64,
                         "densecap": 64, "smoke": 4, "trace_coco": 256, "multitask": 128,
                         "smoke_multitask": 4, "ref_official": 64,
                         "refseg_official": 64}[variant]
    config.seed = 0
    config.skip_policy = "skip"
    # Bad records in a row that stop the pipeline (an unusable source would repeat forever).
    config.max_consecutive_skips = 1000
    config.num_threads = 2 if variant.startswith("smoke") else 16
    # Frozen SAM's features read from a store the cache writer filled (off while the directory
    # is empty): data_pipelines.pipeline.from_config, data_pipelines/sam_feature_store.py.
    # `augmentations` is K, the fixed random framings per image that the store holds.
    config.sam_feature_cache = {"directory": "", "augmentations": 1}
    config.train = _train_sources(variant, sizes)
    config.eval = _eval_sources(variant, sizes)
    return config
