"""The paper's evaluations as a trainer evaluator: task metrics on the data config's evaluation
sources, in original-image pixels.

:class:`TaskMetrics` is an :data:`~pixelllm.train.trainer.Evaluator` ``(model, step) ->
{"<source>/<key>": value}``. At every call it makes one pass over each evaluation source
(``config.data.eval``; pipelines with the evaluation-only keys ``image_id`` and ``original_wh``,
:mod:`pixelllm.batch`), runs the task's inference under one ``jax.jit`` over the split model
state per (task, decode settings), and feeds the host-side metric of the task:

===============  ================================================  ================================
task             inference                                         metric (``pixelllm/evaluators``)
===============  ================================================  ================================
refer            ``inference.refer``: the box at the expression's  ``RefCocoEvaluator`` (boxes)
                 EOS, teacher-forced on the expression
refseg           ``inference.refer_segment``                       ``RefCocoEvaluator`` (boxes,
                                                                   masks)
trace            teacher-forced ``run_slots`` on the ground-truth  ``TracePointEvaluator``
                 caption: every token's points
loca             ``inference.location_caption``, ground-truth      ``CaptioningEvaluator``
                 boxes as prompts, greedy
caption          ``inference.caption``, greedy                     ``CaptioningEvaluator`` (all
                                                                   the image's references)
densecap         ``inference.dense_caption``, greedy               ``DenseCapEvaluator``
question_answer  ``inference.caption``, greedy, each slot's        ``VqaAnswerEvaluator`` (exact
                 question as its context                           match, VQA normalisation)
===============  ================================================  ================================

Ground truth comes from the batch: canvas boxes map back to original pixels by the same per-axis
factor as the predictions (:func:`~pixelllm.evaluators.refcoco.canvas_boxes_to_original`; exact,
since the canvas boxes were made by that factor), texts are the batch's tokens decoded.
Masks are scored at the original size as the official evaluator scores them: the prediction is
SAM's low-resolution logits over the image's area of the canvas, resized bilinearly to the
original size and thresholded at 0 (:func:`~pixelllm.evaluators.refcoco.mask_logits_to_original`,
on the host: original sizes vary per image, and the official evaluator does it on the host too);
the ground truth is the batch's evaluation-only ``original_masks``, the annotation's mask as
decoded at the original size (``evaluation_metadata(original_masks=M)``, which referring
segmentation sources need). Location captioning scores one
reference per item: the text of the slot (the first expression of an object). Captioning scores
one item per image against all its reference captions, as the official COCO caption evaluation:
the ``slot`` op lays every caption of an evaluation image out as its ground-truth texts
(``gt_text_tokens`` where ``gt_mask``, up to G). Dense captioning scores the batch's
ground-truth regions: the source's ``objects`` (G) must hold all of them (100, the official VG
maximum). Question answering scores one item per used slot: the answer generated after the
slot's context (``"Question: " + q + "Answer: "``) against the slot's text, by exact match
after the standard VQA answer normalisation; an item is (image, question, answer), so the
repeats of evaluation padding count once, and so does a (question, answer) pair that two
entries of one image share.

One METEOR process (``meteor``, default :class:`~pixelllm.evaluators.caption_metrics.MeteorProcess`)
serves a whole evaluation and is closed at its end. Each source's metrics are written to
``<workdir>/eval/<step>/<source>.json`` (process 0), and a table logs them beside the paper's
numbers where the source is one the paper reports (:data:`PAPER_NUMBERS`).

A source whose task needs a module the model does not build (refseg: the mask adapter,
densecap: the proposal head; ``config.model.<module>`` None, see ``configs/stages.py``) is refused
with a ``ValueError`` naming the source and the config field: by :meth:`TaskMetrics.from_config`
when the trainer starts, and by every call before anything runs.

Several processes: each reads its rows of every batch; the inputs become global arrays split
over the batch axes, the outputs come back replicated and the host-side fields are gathered from
every process, so every process computes the same metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, Protocol

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pixelllm import batch as batch_lib
from pixelllm import sharding
from pixelllm.evaluators.caption_metrics import MeteorProcess
from pixelllm.evaluators.captioning import CaptioningEvaluator
from pixelllm.evaluators.densecap import DenseCapEvaluator
from pixelllm.evaluators.refcoco import (RefCocoEvaluator, canvas_boxes_to_original,
                                         mask_logits_to_original)
from pixelllm.evaluators.trace_points import TracePointEvaluator
from pixelllm.evaluators.vqa_answers import VqaAnswerEvaluator
from pixelllm.language.tokenizer import Tokenizer, load_tokenizer
from pixelllm.models.pixel_llm import inference
from pixelllm.models.pixel_llm.inference import DecodeSettings
from pixelllm.models.pixel_llm.pixel_llm import PixelLLM
from pixelllm.train import train_step

log = logging.getLogger(__name__)

Batch = Mapping[str, np.ndarray]
Outputs = Mapping[str, np.ndarray]
# (model, contract batch of global arrays, decode settings) -> named output arrays; traced.
Predict = Callable[[PixelLLM, Mapping[str, jax.Array], DecodeSettings], dict[str, jax.Array]]

# The paper's numbers, percent: the T5-XL rows of the official repository's README (the
# paper's RefCOCO/+/g table: box P@0.5 / mask cIoU; dense captioning mAP and location-conditioned
# captioning METEOR / CIDEr on Visual Genome and RefCOCOg). Keyed by (builder, split, task).
_REFERRING = {
    ("refer_coco/refcoco_unc", "val"): (90.3, 77.2),
    ("refer_coco/refcoco_unc", "testA"): (92.3, 79.2),
    ("refer_coco/refcoco_unc", "testB"): (86.8, 74.0),
    ("refer_coco/refcocoplus_unc", "val"): (83.7, 69.2),
    ("refer_coco/refcocoplus_unc", "testA"): (87.2, 73.0),
    ("refer_coco/refcocoplus_unc", "testB"): (78.5, 64.4),
    ("refer_coco/refcocog_umd", "val"): (84.5, 70.1),
    ("refer_coco/refcocog_umd", "test"): (85.7, 72.0),
}
PAPER_NUMBERS: dict[tuple[str, str, str], dict[str, float]] = {
    **{(builder, split, "refer"): {"box_P@0.5": box}
       for (builder, split), (box, _) in _REFERRING.items()},
    **{(builder, split, "refseg"): {"box_P@0.5": box, "seg_cIoU": mask}
       for (builder, split), (box, mask) in _REFERRING.items()},
    ("vg_densecap/densecap", "test", "densecap"): {"mAP": 17.5},
    ("vg_densecap/densecap", "test", "loca"): {"METEOR": 20.1, "CIDEr": 149.0},
    ("refer_coco/refcocog_umd", "val", "loca"): {"METEOR": 15.3, "CIDEr": 92.0},
}


class Meteor(Protocol):
    """What the caption metrics need of METEOR (:class:`MeteorProcess`, or a fake in tests)."""

    def score(self, candidates, references) -> tuple[float, np.ndarray]: ...

    def score_pairs(self, candidates, references) -> np.ndarray: ...

    def close(self) -> None: ...


class EvalSource(NamedTuple):
    """An evaluation source's identity: its task (a row of :mod:`pixelllm.tasks`), builder and
    split (which paper number it is)."""
    task: str
    builder: str
    split: str


# ------------------------------------------------------------------ inference per task
# Each maps a contract batch to the arrays its metric reads; all run under one jax.jit.

def _predict_refer(model: PixelLLM, batch: Mapping[str, jax.Array],
                   settings: DecodeSettings) -> dict[str, jax.Array]:
    del settings  # teacher-forced: nothing is generated
    out = inference.refer(model, batch[batch_lib.IMAGE], batch[batch_lib.VALID_WH],
                          **_referring_inputs(batch))
    return {"boxes": out.boxes}


def _predict_refseg(model: PixelLLM, batch: Mapping[str, jax.Array],
                    settings: DecodeSettings) -> dict[str, jax.Array]:
    del settings
    out = inference.refer_segment(model, batch[batch_lib.IMAGE], batch[batch_lib.VALID_WH],
                                  **_referring_inputs(batch))
    return {"boxes": out.boxes, "mask_logits": out.mask_logits}


def _referring_inputs(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    return {name: batch[name] for name in (batch_lib.CONTEXT_TOKENS, batch_lib.CONTEXT_MASK,
                                           batch_lib.TEXT_TOKENS, batch_lib.TEXT_MASK)}


def _predict_trace(model: PixelLLM, batch: Mapping[str, jax.Array],
                   settings: DecodeSettings) -> dict[str, jax.Array]:
    """Teacher-forced on the ground-truth caption (the official trace evaluation), so each
    predicted token lines up with its target."""
    del settings
    features = model.encode_image(batch[batch_lib.IMAGE], batch[batch_lib.VALID_WH])
    slots = model.run_slots(features, batch[batch_lib.VALID_WH],
                            prompt_boxes=batch[batch_lib.PROMPT_BOXES], with_masks=False,
                            **_referring_inputs(batch))
    return {"token_points": slots.token_points}


def _predict_loca(model: PixelLLM, batch: Mapping[str, jax.Array],
                  settings: DecodeSettings) -> dict[str, jax.Array]:
    out = inference.location_caption(
        model, batch[batch_lib.IMAGE], batch[batch_lib.VALID_WH],
        context_tokens=batch[batch_lib.CONTEXT_TOKENS],
        context_mask=batch[batch_lib.CONTEXT_MASK], settings=settings,
        boxes=batch[batch_lib.PROMPT_BOXES])
    return {"tokens": out.tokens}


def _predict_caption(model: PixelLLM, batch: Mapping[str, jax.Array],
                     settings: DecodeSettings) -> dict[str, jax.Array]:
    out = inference.caption(model, batch[batch_lib.IMAGE], batch[batch_lib.VALID_WH],
                            context_tokens=batch[batch_lib.CONTEXT_TOKENS],
                            context_mask=batch[batch_lib.CONTEXT_MASK], settings=settings)
    return {"tokens": out.tokens}


def _predict_densecap(model: PixelLLM, batch: Mapping[str, jax.Array],
                      settings: DecodeSettings) -> dict[str, jax.Array]:
    # Every slot of a dense-captioning example holds the same prompt ("an object of ").
    out = inference.dense_caption(model, batch[batch_lib.IMAGE], batch[batch_lib.VALID_WH],
                                  context_tokens=batch[batch_lib.CONTEXT_TOKENS][:, 0],
                                  context_mask=batch[batch_lib.CONTEXT_MASK][:, 0],
                                  settings=settings)
    return {"boxes": out.boxes, "scores": out.scores, "valid": out.valid,
            "tokens": out.captions.tokens}


PREDICTORS: dict[str, Predict] = {
    "refer": _predict_refer, "refseg": _predict_refseg, "trace": _predict_trace,
    "loca": _predict_loca, "caption": _predict_caption, "densecap": _predict_densecap,
    # inference.caption over every slot, each with its own question as the context.
    "question_answer": _predict_caption,
}


class _Texts:
    """Token rows -> text with the run's tokenizer."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer

    def generated(self, tokens: np.ndarray) -> str:
        """A generated row (no BOS), up to its EOS."""
        return self._tokenizer.decode_generated(tokens).strip()

    def target(self, tokens: np.ndarray) -> str:
        """A batch text row: BOS, the text, EOS, padding."""
        return self._tokenizer.decode(tokens[1:]).strip()

    def context(self, tokens: np.ndarray) -> str:
        """A batch context row: the context, EOS, padding (no BOS)."""
        return self._tokenizer.decode(tokens).strip()


# ------------------------------------------------------------------ metrics per task
# Each adds one batch's real examples (original_wh > 0; padding examples are all zero) to the
# task's evaluator.

def _examples(batch: Batch) -> np.ndarray:
    return np.flatnonzero(batch[batch_lib.ORIGINAL_WH].min(axis=1) > 0)


def _to_original(boxes: np.ndarray, batch: Batch, i: int) -> np.ndarray:
    return canvas_boxes_to_original(boxes, valid_wh=batch[batch_lib.VALID_WH][i],
                                    original_wh=batch[batch_lib.ORIGINAL_WH][i])


def _add_referring(evaluator: RefCocoEvaluator, batch: Batch, outputs: Outputs,
                   texts: _Texts) -> None:
    del texts
    for i in _examples(batch):
        used = np.flatnonzero(batch[batch_lib.SLOT_MASK][i])
        if not used.size:
            continue
        image_id = int(batch[batch_lib.IMAGE_ID][i])
        masks = {}
        if "mask_logits" in outputs:
            masks = _original_masks(batch, outputs["mask_logits"][i, used], i, used)
        # Slots hold an image's expressions in the annotation order: (image, slot) names one.
        evaluator.add(image_id=image_id, expression_ids=[f"{image_id}:{s}" for s in used],
                      pred_boxes=_to_original(outputs["boxes"][i, used], batch, i),
                      gt_boxes=_to_original(batch[batch_lib.TARGET_BOXES][i, used], batch, i),
                      **masks)


def _original_masks(batch: Batch, logits: np.ndarray, i: int,
                    used: np.ndarray) -> dict[str, np.ndarray]:
    """``{"pred_masks", "gt_masks"}`` ``[N, height, width]`` bool of example ``i``'s ``used``
    slots at the original size: ``logits [N, h, w]`` as the official evaluator resizes them, the
    ground truth from the batch's ``original_masks``."""
    if batch_lib.ORIGINAL_MASKS not in batch:
        raise ValueError("referring segmentation is scored against the original-size masks: "
                         f"the batches lack {batch_lib.ORIGINAL_MASKS!r} (give the source's "
                         "sizes original_masks=M and its chain evaluation_metadata("
                         "original_masks=M))")
    width, height = (int(v) for v in batch[batch_lib.ORIGINAL_WH][i])
    frame = batch[batch_lib.ORIGINAL_MASKS].shape[-2:]
    if height > frame[0] or width > frame[1]:
        raise ValueError(f"image {int(batch[batch_lib.IMAGE_ID][i])}: original size {width} x "
                         f"{height} exceeds the original_masks frame {frame[1]} x {frame[0]}")
    return {"pred_masks": mask_logits_to_original(
                logits, valid_wh=batch[batch_lib.VALID_WH][i],
                canvas=batch[batch_lib.IMAGE].shape[2], original_wh=(width, height)),
            "gt_masks": batch[batch_lib.ORIGINAL_MASKS][i, used, :height, :width]}


def _add_trace(evaluator: TracePointEvaluator, batch: Batch, outputs: Outputs,
               texts: _Texts) -> None:
    del texts
    for i in _examples(batch):
        used = batch[batch_lib.SLOT_MASK][i]
        if not used.any():
            continue
        evaluator.add(pred_points=outputs["token_points"][i][used],
                      gt_points=batch[batch_lib.TOKEN_POINTS][i][used],
                      token_mask=batch[batch_lib.TOKEN_POINTS_MASK][i][used],
                      valid_wh=batch[batch_lib.VALID_WH][i])


def _add_captions(evaluator: CaptioningEvaluator, batch: Batch, outputs: Outputs,
                  texts: _Texts) -> None:
    """One item per used slot (location captioning): its caption against the slot's text."""
    for i in _examples(batch):
        used = np.flatnonzero(batch[batch_lib.SLOT_MASK][i])
        image_id = int(batch[batch_lib.IMAGE_ID][i])
        evaluator.add(item_ids=[f"{image_id}:{s}" for s in used],
                      candidates=[texts.generated(outputs["tokens"][i, s]) for s in used],
                      references=[[texts.target(batch[batch_lib.TEXT_TOKENS][i, s])]
                                  for s in used])


def _add_image_captions(evaluator: CaptioningEvaluator, batch: Batch, outputs: Outputs,
                        texts: _Texts) -> None:
    """One item per image: its caption (slot 0) against every reference caption of the image,
    the ground-truth texts the ``slot`` op lays out in evaluation (as the official COCO caption
    evaluation, which scores each image against all its captions)."""
    for i in _examples(batch):
        if not batch[batch_lib.SLOT_MASK][i, 0]:
            continue
        references = batch[batch_lib.GT_TEXT_TOKENS][i][batch[batch_lib.GT_MASK][i]]
        evaluator.add(item_ids=[int(batch[batch_lib.IMAGE_ID][i])],
                      candidates=[texts.generated(outputs["tokens"][i, 0])],
                      references=[[texts.target(t) for t in references]])


def _add_answers(evaluator: VqaAnswerEvaluator, batch: Batch, outputs: Outputs,
                 texts: _Texts) -> None:
    """One item per used slot (question answering): its generated answer against the slot's
    text, the item named by the image and the slot's question and answer."""
    for i in _examples(batch):
        used = np.flatnonzero(batch[batch_lib.SLOT_MASK][i])
        image_id = int(batch[batch_lib.IMAGE_ID][i])
        answers = [texts.target(batch[batch_lib.TEXT_TOKENS][i, s]) for s in used]
        questions = [texts.context(batch[batch_lib.CONTEXT_TOKENS][i, s]) for s in used]
        evaluator.add(item_ids=[json.dumps([image_id, question, answer])
                                for question, answer in zip(questions, answers)],
                      predictions=[texts.generated(outputs["tokens"][i, s]) for s in used],
                      answers=answers)


def _add_dense_captions(evaluator: DenseCapEvaluator, batch: Batch, outputs: Outputs,
                        texts: _Texts) -> None:
    for i in _examples(batch):
        detected = outputs["valid"][i].astype(bool)
        objects = batch[batch_lib.GT_MASK][i]
        evaluator.add(
            image_id=int(batch[batch_lib.IMAGE_ID][i]),
            pred_boxes=_to_original(outputs["boxes"][i][detected], batch, i),
            pred_scores=outputs["scores"][i][detected],
            pred_captions=[texts.generated(t) for t in outputs["tokens"][i][detected]],
            gt_boxes=_to_original(batch[batch_lib.GT_BOXES][i][objects], batch, i),
            gt_captions=[texts.target(t) for t in batch[batch_lib.GT_TEXT_TOKENS][i][objects]])


def _make_referring(*, split: str, meteor: Meteor,
                    max_expressions_per_image: int | None) -> RefCocoEvaluator:
    del meteor
    return RefCocoEvaluator(split=split, max_expressions_per_image=max_expressions_per_image)


def _make_trace(*, split: str, meteor: Meteor,
                max_expressions_per_image: int | None) -> TracePointEvaluator:
    del meteor, max_expressions_per_image
    return TracePointEvaluator(split=split)


def _make_captioning(*, split: str, meteor: Meteor,
                     max_expressions_per_image: int | None) -> CaptioningEvaluator:
    del max_expressions_per_image
    return CaptioningEvaluator(split=split, meteor=meteor)


def _make_dense_captioning(*, split: str, meteor: Meteor,
                           max_expressions_per_image: int | None) -> DenseCapEvaluator:
    del split, max_expressions_per_image  # one VG split; DenseCap has no per-image cap
    return DenseCapEvaluator(meteor=meteor)


def _make_answers(*, split: str, meteor: Meteor,
                  max_expressions_per_image: int | None) -> VqaAnswerEvaluator:
    del meteor, max_expressions_per_image  # exact match; every slot of an image is scored
    return VqaAnswerEvaluator(split=split)


@dataclasses.dataclass(frozen=True)
class _Metric:
    """A task's metric: how to make its evaluator (``split``, ``meteor``,
    ``max_expressions_per_image``) and feed it a batch."""
    make: Callable[..., Any]
    add: Callable[[Any, Batch, Outputs, _Texts], None]


_REFERRING_METRIC = _Metric(make=_make_referring, add=_add_referring)
_METRICS: dict[str, _Metric] = {
    "refer": _REFERRING_METRIC, "refseg": _REFERRING_METRIC,
    "trace": _Metric(make=_make_trace, add=_add_trace),
    "loca": _Metric(make=_make_captioning, add=_add_captions),
    "caption": _Metric(make=_make_captioning, add=_add_image_captions),
    "densecap": _Metric(make=_make_dense_captioning, add=_add_dense_captions),
    "question_answer": _Metric(make=_make_answers, add=_add_answers),
}


# ------------------------------------------------------------------ the evaluator

class TaskMetrics:
    """The task metrics of every evaluation source (module docstring); an ``Evaluator``.

    Args:
      pipelines: ``() -> {source name: iterable of host-local batches}`` with the
        evaluation-only keys, called at every evaluation (a fresh pass each time).
      sources: ``{source name: EvalSource}`` for every name ``pipelines`` gives.
      tokenizer: the language model's tokenizer (decode ids, and the decoding ids).
      mesh, rules: the run's mesh and logical rules (batches are split over its batch axes).
      workdir: the run's folder; JSON results go to ``<workdir>/eval/<step>/``.
      meteor: ``() -> METEOR scorer``, made once per evaluation and closed at its end.
      predictors: ``{task: Predict}`` replacing :data:`PREDICTORS` entries (a seam for tests).
      max_expressions_per_image: RefCOCO's per-image cap (None: all; the official 16).
    """

    def __init__(self, pipelines: Callable[[], Mapping[str, Iterable[Batch]]],
                 sources: Mapping[str, EvalSource], *, tokenizer: Tokenizer, mesh: Mesh,
                 rules: sharding.Rules, workdir: epath.PathLike,
                 meteor: Callable[[], Meteor] = MeteorProcess,
                 predictors: Mapping[str, Predict] | None = None,
                 max_expressions_per_image: int | None = None):
        self._predictors = {**PREDICTORS, **(predictors or {})}
        for name, source in sources.items():
            if source.task not in _METRICS:
                raise ValueError(f"evaluation source {name!r}: task {source.task!r} has no task "
                                 f"metric here (tasks with one: {sorted(_METRICS)})")
        self._pipelines = pipelines
        self._sources = dict(sources)
        self._tokenizer = tokenizer
        self._texts = _Texts(tokenizer)
        self._mesh = mesh
        self._batch_shardings = train_step.batch_shardings(mesh, rules)
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._workdir = epath.Path(workdir)
        self._meteor = meteor
        self._max_expressions_per_image = max_expressions_per_image
        # jax.jit per (task, decode settings), made at first use over that model's graph,
        # which a run's model keeps (a graphdef cannot be a static jit argument).
        self._compiled: dict[tuple[str, DecodeSettings], Callable[..., Any]] = {}

    @classmethod
    def from_config(cls, config: Any, *, mesh: Mesh, rules: sharding.Rules,
                    workdir: epath.PathLike, **kwargs: Any) -> TaskMetrics:
        """The task metrics of a training config's ``config.data.eval`` sources."""
        # Imported here: the data pipeline (grain, TFDS) is needed only for config-driven runs.
        from data_pipelines import pipeline as pipeline_lib

        if not config.data.tokenizer:
            raise ValueError("config.data.tokenizer is not set: the task metrics decode the "
                             "generated text with it")
        sources = {entry["name"]: EvalSource(task=entry["task"], builder=entry["builder"],
                                             split=entry["split"])
                   for entry in config.data.eval}
        _check_modules(sources, config.model)
        return cls(lambda: pipeline_lib.eval_from_config(config.data, evaluation_keys=True),
                   sources, tokenizer=load_tokenizer(config.data.tokenizer), mesh=mesh,
                   rules=rules, workdir=workdir, **kwargs)

    def decode_settings(self, text_length: int) -> DecodeSettings:
        """Greedy decoding (the official defaults) of up to ``text_length - 1`` tokens: the
        batch's text rows hold BOS + text + EOS in ``text_length``."""
        tokenizer = self._tokenizer
        # The first token of every text, as the tokenize op writes it (T5: the pad id).
        bos = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.pad_id
        return DecodeSettings(bos_id=bos, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                              max_new_tokens=text_length - 1)

    def __call__(self, model: nnx.Module, step: int) -> dict[str, float]:
        _check_modules(self._sources, model)
        graphdef, state = nnx.split(model)
        scalars: dict[str, float] = {}
        results: dict[str, dict[str, float]] = {}
        with contextlib.closing(self._meteor()) as meteor:
            for name, batches in self._pipelines().items():
                source = self._sources[name]
                metric = _METRICS[source.task]
                evaluator = metric.make(split=f"{source.builder}:{source.split}", meteor=meteor,
                                        max_expressions_per_image=self._max_expressions_per_image)
                count = 0
                for host_batch in batches:
                    missing = sorted(set(batch_lib.EVALUATION_SPEC) - set(host_batch)
                                     - set(batch_lib.OPTIONAL_EVALUATION_KEYS))
                    if missing:
                        raise ValueError(
                            f"evaluation source {name}: batches lack {missing}; build its "
                            "pipeline with evaluation_keys=True and the evaluation_metadata op "
                            "after decode")
                    host_batch, outputs = self._run(graphdef, state, source.task, host_batch)
                    metric.add(evaluator, host_batch, outputs, self._texts)
                    count += 1
                if not count:
                    raise ValueError(f"evaluation source {name}: the pipeline gave no batch")
                results[name] = evaluator.result()
                self._write(name, source, step, results[name])
                scalars.update({f"{name}/{key}": float(value)
                                for key, value in results[name].items()})
        log.info("task metrics at step %d:\n%s", step, format_table(results, self._sources))
        return scalars

    def _run(self, graphdef: nnx.GraphDef, state: nnx.State, task: str,
             host_batch: Batch) -> tuple[Batch, Outputs]:
        """``(every process's rows of the batch, the task's outputs)`` as host arrays."""
        settings = self.decode_settings(host_batch[batch_lib.TEXT_TOKENS].shape[-1])
        compiled_key = (task, settings)
        if compiled_key not in self._compiled:
            predict = self._predictors[task]

            def run(state: nnx.State, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
                return predict(nnx.merge(graphdef, state), batch, settings)

            self._compiled[compiled_key] = jax.jit(run, out_shardings=self._replicated)
        inputs = {key: jax.make_array_from_process_local_data(self._batch_shardings[key],
                                                              host_batch[key])
                  for key in batch_lib.SPEC}
        outputs = jax.device_get(self._compiled[compiled_key](state, inputs))
        if jax.process_count() > 1:
            host_batch = _gather_rows(host_batch)
        return host_batch, outputs

    def _write(self, name: str, source: EvalSource, step: int,
               metrics: Mapping[str, float]) -> None:
        if jax.process_index() != 0:
            return
        path = self._workdir / "eval" / str(step) / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "source": name, "task": source.task, "builder": source.builder,
            "split": source.split, "step": step,
            "max_expressions_per_image": self._max_expressions_per_image,
            "metrics": dict(metrics),
            "paper_percent": _paper(source)}, indent=2) + "\n")


def _check_modules(sources: Mapping[str, EvalSource], model: Any) -> None:
    """``ValueError`` naming the first source whose task needs a module ``model`` (a PixelLLM or
    ``config.model``) lacks."""
    for name, source in sources.items():
        missing = inference.missing_modules(model, source.task)
        if missing:
            raise ValueError(f"evaluation source {name!r}: "
                             f"{inference.missing_message(source.task, missing)}")


def _paper(source: EvalSource) -> dict[str, float]:
    return PAPER_NUMBERS.get((source.builder, source.split, source.task), {})


def _gather_rows(host_batch: Batch) -> dict[str, np.ndarray]:
    """Every process's rows of the batch, in process order (the order of the global batch).
    The int64 image ids travel as int32 pairs: JAX arrays are 32-bit unless x64 is on."""
    ids = np.ascontiguousarray(host_batch[batch_lib.IMAGE_ID], np.int64)
    rows = {key: value for key, value in host_batch.items() if key != batch_lib.IMAGE_ID}
    rows[batch_lib.IMAGE_ID] = ids.view(np.int32).reshape(-1, 2)
    gathered = {key: np.asarray(value) for key, value in
                multihost_utils.process_allgather(rows, tiled=True).items()}
    gathered[batch_lib.IMAGE_ID] = np.ascontiguousarray(
        gathered[batch_lib.IMAGE_ID], np.int32).view(np.int64).reshape(-1)
    return gathered


def format_table(results: Mapping[str, Mapping[str, float]],
                 sources: Mapping[str, EvalSource]) -> str:
    """The headline metric(s) of every source, ours x 100 beside the paper's number where the
    paper reports that source (:data:`PAPER_NUMBERS`)."""
    headline = {"refer": ("box_P@0.5",), "refseg": ("box_P@0.5", "seg_cIoU"),
                "trace": ("point_l1",), "loca": ("METEOR", "CIDEr"),
                "caption": ("METEOR", "CIDEr"), "densecap": ("mAP",),
                "question_answer": ("exact_match",)}
    rows = [("source", "metric", "ours", "paper")]
    for name, metrics in results.items():
        source = sources[name]
        paper = _paper(source)
        for key in headline[source.task]:
            rows.append((name, key, f"{100 * metrics[key]:.1f}",
                         f"{paper[key]:.1f}" if key in paper else "-"))
    widths = [max(len(row[c]) for row in rows) for c in range(4)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths))
                     for row in rows)
