"""``configs/stages.py:multitask_tiny`` trains on every source of the multi-task mixture
(``smoke_multitask``: COCO Captions, Localized Narratives traces, RefCOCO/+/g, Visual Genome dense
captioning, ShareGPT4V instructions, the official weights): tiny files in each public layout,
built by the real builders, two training steps of the tiny model.

The layouts come from their writers: the synthetic scenes (32 px; Localized Narratives, RefCOCO,
Visual Genome; the RefCOCO files also serve as RefCOCO+ and RefCOCOg, the refer toolkit's layout
being the same) and the COCO Captions and LLaVA builder tests' manual folders.
"""

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow_datasets as tfds

from configs import stages
from data_pipelines import pipeline, synthetic_scenes
from data_pipelines.builders.coco_captions import CocoCaptions
from data_pipelines.builders.llava_instructions import LlavaInstructions
from data_pipelines.builders.localized_narratives import LocalizedNarratives
from data_pipelines.builders.refcoco import ReferCoco
from data_pipelines.builders.visual_genome import VgDensecap
from pixelllm import batch as batch_lib
from pixelllm import tasks
from pixelllm.language.tokenizer import load_tokenizer
from pixelllm.train import trainer
from pixelllm.train.metrics_writer import read_metrics
from tests.data_pipelines.builders import test_coco_captions, test_llava_instructions

pytestmark = pytest.mark.xdist_group("test_multitask_tiny")

STEPS = 2
# The tasks of the multi-task mixture, each from its own source(s).
TASKS = {"caption", "trace", "refer", "densecap", "question_answer"}


def _tokenizer(path: Path) -> str:
    """A small SentencePiece model (under the tiny T5's 128 ids) of the task prompts and a few
    words; other words become pieces or the unknown id."""
    corpus = [*tasks.SHORT_CAPTION_PROMPTS, *tasks.LONG_CAPTION_PROMPTS, tasks.OBJECT_PROMPT,
              tasks.REFER_PROMPT, tasks.QUESTION_PROMPT, "a red circle on the left of a blue "
              "square", "the green triangle at the top", "what color is the bus", "a dog runs"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus * 20), model_writer=model,
                                   minloglevel=2, num_threads=1, character_coverage=1.0,
                                   model_type="unigram", vocab_size=100, hard_vocab_limit=False,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    path.write_bytes(model.getvalue())
    return str(path)


def _prepare(builder, manual_dir: Path) -> None:
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))


def build_all_sources(root: Path) -> tuple[str, str]:
    """``(tfds data_dir, tokenizer)`` with the training split of every multi-task source."""
    data_dir = str(root / "tfds")
    scenes = root / "scenes"
    synthetic_scenes.main(["--out", str(scenes), "--num_images", "8", "--height", "32",
                           "--width", "32", "--val_fraction", "0.25", "--test_fraction", "0"])
    _prepare(LocalizedNarratives(config="coco", data_dir=data_dir, splits=["train"]),
             scenes / "localized_narratives")
    refer = scenes / "refer"
    # RefCOCO+ (unc) and RefCOCOg (umd) in the same refer-toolkit layout as RefCOCO.
    for dataset, split_by in (("refcoco+", "unc"), ("refcocog", "umd")):
        (refer / dataset).mkdir()
        shutil.copy(refer / "refcoco" / "instances.json", refer / dataset / "instances.json")
        shutil.copy(refer / "refcoco" / "refs(unc).p", refer / dataset / f"refs({split_by}).p")
    for config in ("refcoco_unc", "refcocoplus_unc", "refcocog_umd"):
        _prepare(ReferCoco(config=config, data_dir=data_dir, splits=["train"]), refer)
    _prepare(VgDensecap(config="densecap", data_dir=data_dir, splits=["train"]),
             scenes / "visual_genome")
    (root / "coco").mkdir()
    _prepare(CocoCaptions(config="coco", data_dir=data_dir, splits=["karpathy_train"]),
             test_coco_captions._manual_dir(root / "coco"))
    (root / "llava").mkdir()
    _prepare(LlavaInstructions(config="sharegpt4v_mix665k", data_dir=data_dir),
             test_llava_instructions._manual_dir(root / "llava"))
    return data_dir, _tokenizer(root / "spiece.model")


def _task_of(example: dict, tokenizer) -> str:
    """The task an example trains, from its loss masks (and its prompt for the two text-only
    tasks)."""
    if example[batch_lib.TASK_PROPOSALS] > 0:
        return "densecap"
    if example[batch_lib.TASK_POINTS].any():
        return "trace"
    if example[batch_lib.TASK_BOX].any():
        return "refer"
    context = tokenizer.decode(example[batch_lib.CONTEXT_TOKENS][0])
    return "question_answer" if context.startswith("Question") else "caption"


def test_multitask_tiny_trains_on_every_source(tmp_path):
    data_dir, tokenizer = build_all_sources(tmp_path)
    config = stages.get_config("multitask_tiny")
    assert config.data.variant == "smoke_multitask"
    config.data.data_dir, config.data.tokenizer = data_dir, tokenizer
    config.data.num_threads = 1
    config.mesh_shape = (1, 1, 1)
    config.train.steps = STEPS
    config.train.log_every = 1

    # The batches the run reads (same config, same seed): every task of the mixture.
    decoder = load_tokenizer(tokenizer)
    batches = iter(pipeline.from_config(config.data))
    seen = [_task_of({key: value[i] for key, value in batch.items()}, decoder)
            for batch in (next(batches) for _ in range(STEPS))
            for i in range(config.data.batch_size)]
    assert set(seen) == TASKS, seen

    workdir = tmp_path / "run"
    assert trainer.train(config, workdir) == STEPS
    logged = [read_metrics(workdir)[step] for step in range(1, STEPS + 1)]
    terms = sorted(key for key in logged[0] if key.startswith("loss/"))
    for scalars in logged:
        assert all(np.isfinite(scalars[key]) for key in terms), scalars
        assert scalars["loss/total"] > 0
    # Each task's loss is there at some step (a batch holds 4 of the 7 sources): text
    # (captions, traces, answers), points (traces), boxes (referring), proposals (dense
    # captioning).
    trained = {key for key in terms if any(scalars[key] > 0 for scalars in logged)}
    assert {"loss/text", "loss/point", "loss/box_l1", "loss/box_giou"} <= trained, trained
    assert any(key.startswith("loss/proposal_") for key in trained), trained
