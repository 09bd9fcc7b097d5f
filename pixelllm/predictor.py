"""Running a trained PixelLLM on a user's images: one method per task, user-frame coordinates.

:class:`Predictor` wraps the inference entries of :mod:`pixelllm.models.pixel_llm.inference`
(named by the task table, :mod:`pixelllm.tasks`). Images are uint8 RGB ``[H, W, 3]`` of any
size; each is resized and padded onto the model's canvas exactly as the evaluation data
pipeline does (``resize_and_pad``: longest side to the canvas, bilinear, zero padding bottom and
right), and every coordinate goes in and out in the user's image pixels (``(x, y)``, boxes
``(x0, y0, x1, y1)``, pixel ``i`` covering ``[i, i+1)``, the README's conventions). Masks come
back at the user's image size, made from SAM's logits as the official RefCOCO evaluator makes
them (:func:`~pixelllm.evaluators.refcoco.mask_logits_to_original`), on the host: any image
size runs on the same compiled program.

**No recompilation per image.** A call's images are split into chunks of at most ``max_batch``
and each chunk is padded to the next batch bucket (powers of two up to ``max_batch``); prompts
and expressions are padded to the next power-of-two token length (at least
``min_text_length``). Every image becomes a fixed-size canvas, so a compiled function depends
only on (task, decode settings, batch bucket, text bucket). Each task runs one ``jax.jit`` over
the model's split state (:func:`~pixelllm.models.pixel_llm.inference.compile_entry`), which
keeps NNX's per-call graph bookkeeping out of decoding; :attr:`Predictor.traces` counts the
traces per task.

Results are small frozen dataclasses of plain Python and numpy values, each with ``to_json()``
(a dict of JSON types) and ``drawing()`` (what :func:`pixelllm.overlay.draw` renders).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from pycocotools import mask as mask_util

from data_pipelines.ops import fields, geometry
from data_pipelines.ops.resize_and_pad import fit_size
from data_pipelines.ops.tokenize import Encoder
from pixelllm import overlay, tasks
from pixelllm.evaluators.refcoco import mask_logits_to_original
from pixelllm.language.tokenizer import Tokenizer, load_tokenizer
from pixelllm.models.pixel_llm import inference
from pixelllm.models.pixel_llm.pixel_llm import PixelLLM
from pixelllm.models.pixel_llm.pretrained import Checkpoint, load_pretrained
from pixelllm.train import trainer

# The prompts of the tasks (the task table's evaluation prompts).
TRACE_PROMPT = tasks.get("trace").eval_prompt
OBJECT_PROMPT = tasks.get("loca").eval_prompt


def bucket(size: int, *, minimum: int = 1) -> int:
    """The smallest power of two ``>= max(size, minimum)``."""
    return 1 << max(0, math.ceil(math.log2(max(size, minimum, 1))))


# ---------------------------------------------------------------------------------- the canvas


@dataclasses.dataclass(frozen=True)
class CanvasFrame:
    """Where a ``width x height`` user image lies on the canvas: resized to ``valid_wh``
    (longest side = the canvas) at the top-left corner."""

    width: int
    height: int
    valid_wh: tuple[int, int]

    @property
    def scale(self) -> np.ndarray:
        """``[2]`` canvas pixels per user pixel along x and y."""
        return np.asarray([self.valid_wh[0] / self.width, self.valid_wh[1] / self.height],
                          np.float64)

    def points_to_canvas(self, points: np.ndarray) -> np.ndarray:
        """``[..., 2]`` user pixels -> canvas pixels (float32)."""
        return (np.asarray(points, np.float64) * self.scale).astype(np.float32)

    def points_from_canvas(self, points: np.ndarray) -> np.ndarray:
        """``[..., 2]`` canvas pixels -> user pixels, clipped to the image (float32)."""
        user = np.asarray(points, np.float64) / self.scale
        return np.clip(user, 0, [self.width, self.height]).astype(np.float32)

    def boxes_to_canvas(self, boxes: np.ndarray) -> np.ndarray:
        """``[..., 4]`` user boxes -> canvas boxes."""
        boxes = np.asarray(boxes)
        return self.points_to_canvas(boxes.reshape(*boxes.shape[:-1], 2, 2)).reshape(boxes.shape)

    def boxes_from_canvas(self, boxes: np.ndarray) -> np.ndarray:
        """``[..., 4]`` canvas boxes -> user boxes, clipped to the image."""
        boxes = np.asarray(boxes)
        return self.points_from_canvas(boxes.reshape(*boxes.shape[:-1], 2, 2)).reshape(
            boxes.shape)

    def mask_from_logits(self, logits: np.ndarray, *, canvas: int) -> np.ndarray:
        """SAM's ``[h, w]`` mask logits over the ``canvas``-pixel canvas -> ``[height, width]``
        bool, as the official evaluator makes masks (bilinear from the logits of the image's
        area, ``logit > 0``: :func:`~pixelllm.evaluators.refcoco.mask_logits_to_original`)."""
        return mask_logits_to_original(np.asarray(logits)[None], valid_wh=self.valid_wh,
                                       canvas=canvas, original_wh=(self.width, self.height))[0]


def place_on_canvas(image: np.ndarray, canvas: int) -> tuple[np.ndarray, CanvasFrame]:
    """``(canvas image [canvas, canvas, 3] uint8, frame)``: ``image`` (uint8 ``[H, W, 3]``)
    through the data pipeline's resize and pad (``data_pipelines.ops.resize_and_pad``)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"an image must be uint8 RGB [H, W, 3]; got {image.dtype} "
                         f"{list(image.shape)}")
    height, width = image.shape[:2]
    resized = geometry.resample({fields.IMAGE: image},
                                size_wh=fit_size(width, height, canvas))
    padded = geometry.pad_to_canvas(resized, canvas=canvas)
    valid_w, valid_h = (int(v) for v in padded[fields.VALID_WH])
    return padded[fields.IMAGE], CanvasFrame(width=width, height=height,
                                             valid_wh=(valid_w, valid_h))


def check_box(box: Sequence[float], *, width: int, height: int, name: str) -> np.ndarray:
    """``box`` as float32 ``[4]`` if it is ``(x0, y0, x1, y1)`` with ``x0 < x1``, ``y0 < y1``
    inside the ``width x height`` image; else ``ValueError`` naming ``name``."""
    box = np.asarray(box, np.float64)
    if box.shape != (4,) or not np.isfinite(box).all():
        raise ValueError(f"{name}: a box is 4 finite numbers x0,y0,x1,y1; got {box.tolist()}")
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"{name}: box {box.tolist()} is not inside the {width}x{height} image "
                         "(need 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height)")
    return box.astype(np.float32)


def check_points(points: Sequence[Sequence[float]], *, width: int, height: int,
                 name: str) -> np.ndarray:
    """``points`` as float32 ``[P, 2]`` (``P >= 1``) inside the image; else ``ValueError``."""
    points = np.asarray(points, np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or not len(points) or not np.isfinite(
            points).all():
        raise ValueError(f"{name}: points are one or more finite x,y pairs; got "
                         f"{points.tolist()}")
    if not ((points >= 0) & (points <= [width, height])).all():
        raise ValueError(f"{name}: points {points.tolist()} are not inside the "
                         f"{width}x{height} image")
    return points.astype(np.float32)


def check_text(text: str, *, name: str) -> str:
    """``text`` if it holds a non-space character; else ``ValueError`` naming ``name``."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{name}: empty text")
    return text


# ---------------------------------------------------------------------------------- results


def _floats(array: np.ndarray) -> list:
    return np.round(np.asarray(array, np.float64), 2).tolist()


@dataclasses.dataclass(frozen=True)
class Word:
    """A generated word and its trace: ``points [P, 2]`` user pixels, the points regressed
    for each of the word's tokens in order (``K`` per token, ``config.model.point_head``)."""

    text: str
    points: np.ndarray

    def to_json(self) -> dict[str, Any]:
        return {"word": self.text, "points": _floats(self.points)}


@dataclasses.dataclass(frozen=True)
class Caption:
    """A caption with a trace per word (:meth:`Predictor.caption`). ``score``: the decoder's
    score (greedy: mean log-probability per word, official; beam: length-penalised)."""

    text: str
    score: float
    words: tuple[Word, ...]

    def to_json(self) -> dict[str, Any]:
        return {"caption": self.text, "score": self.score,
                "words": [word.to_json() for word in self.words]}

    def drawing(self) -> overlay.Drawing:
        return overlay.Drawing(traces=tuple((w.text, w.points) for w in self.words),
                               text=self.text)


@dataclasses.dataclass(frozen=True)
class Answer:
    """The generated answer to ``question`` (:meth:`Predictor.answer`)."""

    question: str
    text: str
    score: float

    def to_json(self) -> dict[str, Any]:
        return {"question": self.question, "answer": self.text, "score": self.score}

    def drawing(self) -> overlay.Drawing:
        return overlay.Drawing(text=f"Q: {self.question}  A: {self.text}")


@dataclasses.dataclass(frozen=True)
class Localization:
    """A referring expression's ``box [4]`` (user pixels) and, from :meth:`Predictor.segment`,
    its ``mask [H, W]`` bool and SAM's predicted IoU ``mask_score`` (else None)."""

    expression: str
    box: np.ndarray
    mask: np.ndarray | None = None
    mask_score: float | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"expression": self.expression, "box": _floats(self.box)}
        if self.mask is not None:
            rle = mask_util.encode(np.asfortranarray(self.mask.astype(np.uint8)))
            out["mask"] = {"size": [int(v) for v in rle["size"]],
                           "counts": rle["counts"].decode("ascii")}
            out["mask_score"] = self.mask_score
        return out

    def drawing(self) -> overlay.Drawing:
        return overlay.Drawing(boxes=((self.expression, self.box),),
                               masks=() if self.mask is None else (self.mask,),
                               text=self.expression)


@dataclasses.dataclass(frozen=True)
class RegionCaption:
    """A caption of a region: ``box [4]`` user pixels (or, for a point prompt, ``points
    [P, 2]`` and ``box`` None); ``score`` the decoder's score, or for dense captioning the
    detection's score."""

    text: str
    score: float
    box: np.ndarray | None = None
    points: np.ndarray | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"caption": self.text, "score": self.score}
        if self.box is not None:
            out["box"] = _floats(self.box)
        if self.points is not None:
            out["points"] = _floats(self.points)
        return out

    def drawing(self) -> overlay.Drawing:
        return overlay.Drawing(
            boxes=() if self.box is None else ((self.text, self.box),),
            traces=() if self.points is None else ((self.text, self.points),),
            text=self.text)


@dataclasses.dataclass(frozen=True)
class DenseCaptions:
    """The detected regions of an image with their captions, best score first."""

    regions: tuple[RegionCaption, ...]

    def to_json(self) -> dict[str, Any]:
        return {"regions": [region.to_json() for region in self.regions]}

    def drawing(self) -> overlay.Drawing:
        return overlay.Drawing(boxes=tuple((r.text, r.box) for r in self.regions))


# ---------------------------------------------------------------------------------- predictor


@dataclasses.dataclass(frozen=True)
class _Request:
    """One image's inputs on the canvas: token id lists are padded per chunk."""

    image: np.ndarray
    frame: CanvasFrame
    context: list[int]
    text: list[int] | None = None
    boxes: np.ndarray | None = None
    points: np.ndarray | None = None


def decode(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """The text of generated ``ids`` (no stop id among them). Ids past the tokenizer's
    vocabulary (the padding rows of the model's, e.g. T5's 32,100 ids of 32,128 rows) have no
    text."""
    return tokenizer.decode_generated(ids)


def word_of_each_token(tokenizer: Tokenizer, ids: Sequence[int]) -> list[int]:
    """The index in ``decode(tokenizer, ids).split()`` of the word each token of ``ids`` belongs
    to, by the training alignment's rule (:mod:`pixelllm.language.tokenizer`): a token belongs
    to the word of the first non-space character it adds to the decoded text; a token adding
    only spaces (or nothing) to the word it introduces. ``-1`` for every token of a text
    without words."""
    count = len(decode(tokenizer, ids).split())
    if count == 0:
        return [-1] * len(ids)
    words, previous = [], ""
    for end in range(1, len(ids) + 1):
        prefix = decode(tokenizer, ids[:end])
        adds_text = len(prefix.rstrip()) > len(previous.rstrip())
        words_so_far = len(prefix.split())
        # A token ending in a space has opened no word yet: it goes with the next one.
        word = words_so_far - 1 if adds_text and not prefix[-1:].isspace() else words_so_far
        words.append(min(max(word, 0), count - 1))
        previous = prefix
    return words


class Predictor:
    """PixelLLM on user images: :meth:`caption`, :meth:`locate`, :meth:`segment`,
    :meth:`describe_region`, :meth:`dense_caption`, :meth:`answer`.

    Args:
      model: a PixelLLM (its parameters are read once, at construction).
      tokenizer: the tokenizer its data was encoded with.
      max_new_tokens: the generated length limit of :attr:`settings` (EOS included).
      max_batch: the largest batch run at once; batch buckets are the powers of two up to it.
      min_text_length: the smallest token-length bucket of prompts and expressions.

    Attributes:
      settings: the default :class:`~pixelllm.models.pixel_llm.inference.DecodeSettings`
        (official greedy); pass ``settings=predictor.settings._replace(beam_size=4)`` to a
        generating method for beam search (``fixed_length=True``: texts cut at their first
        EOS here, scores over every decoded token).
      traces: how many times each task's function was traced (compiled).
      unavailable: ``{task: modules}``, the tasks this model cannot run (names of the task table,
        :mod:`pixelllm.tasks`) and the modules each lacks: ``"refseg"`` (:meth:`segment`) without
        a mask adapter, ``"densecap"`` (:meth:`dense_caption`) without a proposal head (e.g. a
        training stage that builds none, ``configs/stages.py``). Calling such a method raises
        ``ValueError`` naming ``config.model.<module>``.
    """

    def __init__(self, model: PixelLLM, tokenizer: Tokenizer, *, max_new_tokens: int,
                 max_batch: int = 8, min_text_length: int = 8):
        if max_batch < 1 or max_batch & (max_batch - 1):
            raise ValueError(f"max_batch {max_batch} must be a power of two")
        self.tokenizer = tokenizer
        self.canvas = model.canvas_size
        self.max_batch = max_batch
        self.min_text_length = min_text_length
        bos_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.pad_id
        self._encoder = Encoder(tokenizer=tokenizer, bos_id=bos_id)
        self.settings = inference.DecodeSettings(bos_id=bos_id, eos_id=tokenizer.eos_id,
                                                 pad_id=tokenizer.pad_id,
                                                 max_new_tokens=max_new_tokens)
        self._graphdef, self._state = nnx.split(model)
        self.unavailable = {task: missing for task in tasks.TASKS
                            if (missing := inference.missing_modules(model, task))}
        self._functions: dict[tuple[str, inference.DecodeSettings | None], Callable] = {}
        self.traces: collections.Counter[str] = collections.Counter()

    @property
    def parameter_arrays(self) -> list[jax.Array]:
        """The model's state as the compiled programs read it (for size reports)."""
        return jax.tree.leaves(self._state)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_workdir(cls, workdir: epath.PathLike, **options) -> Predictor:
        """The run in ``workdir`` (``pixelllm.main --workdir``) at its latest checkpoint, with its
        data's tokenizer and its text length; read-only (a running trainer is not disturbed).
        ``options``: :class:`Predictor`'s keyword arguments."""
        config, model, _ = trainer.load_trained_model(workdir)
        if not config.data.tokenizer:
            raise ValueError(f"{epath.Path(workdir) / trainer.CONFIG_FILE}: data.tokenizer is "
                             "empty; the predictor needs the run's tokenizer")
        return cls._from_config(config, model, load_tokenizer(config.data.tokenizer),
                                **options)

    @classmethod
    def from_pretrained(cls, config: ml_collections.ConfigDict, *,
                        sam: Checkpoint | None = None, eva02: Checkpoint | None = None,
                        language_model: Checkpoint | None = None,
                        tokenizer: epath.PathLike | None = None, seed: int = 0,
                        **options) -> Predictor:
        """A model built from an experiment or stage config (``config.model``,
        ``config.data.sizes``) and the public files (:func:`~pixelllm.models.pixel_llm.
        pretrained.load_pretrained`); parts given no file keep their ``seed`` initialization.
        ``tokenizer``: default ``config.data.tokenizer``, else the language-model folder's."""
        model = PixelLLM.from_config(config.model, rngs=nnx.Rngs(seed))
        tokenizer = tokenizer or config.data.get("tokenizer") or None
        if tokenizer is None and isinstance(language_model, str | os.PathLike) and epath.Path(
                language_model).is_dir():
            tokenizer = language_model
        if tokenizer is None:
            raise ValueError("no tokenizer: pass tokenizer=, set config.data.tokenizer or give "
                             "a language_model folder that holds one")
        load_pretrained(model, sam=sam, eva02=eva02, language_model=language_model,
                        tokenizer=tokenizer)
        return cls._from_config(config, model, load_tokenizer(tokenizer), **options)

    @classmethod
    def _from_config(cls, config, model: PixelLLM, tokenizer: Tokenizer, **options) -> Predictor:
        # Generated texts as long as the training texts (BOS excluded, EOS included).
        options.setdefault("max_new_tokens", config.data.sizes.text_length - 1)
        return cls(model, tokenizer, **options)

    # ------------------------------------------------------------------ tasks

    def caption(self, images: Sequence[np.ndarray], *, prompt: str = TRACE_PROMPT,
                settings: inference.DecodeSettings | None = None) -> list[Caption]:
        """A caption of each image with a trace per word (task ``trace``; ``prompt`` "A photo of
        " gives the short captions of task ``caption``)."""
        check_text(prompt, name="prompt")
        requests = [self._request(image, prompt) for image in images]
        return [self._caption(out, request.frame)
                for out, request in zip(self._run("trace", requests, settings), requests)]

    def answer(self, images: Sequence[np.ndarray], questions: Sequence[str], *,
               settings: inference.DecodeSettings | None = None) -> list[Answer]:
        """The answer to ``questions[i]`` about ``images[i]`` (the VQA prompt,
        :func:`pixelllm.tasks.question_prompt`)."""
        self._check_count(images, questions, "questions")
        requests = [self._request(image, tasks.question_prompt(
            check_text(question, name=f"question {i}")))
            for i, (image, question) in enumerate(zip(images, questions))]
        outs = self._run("caption", requests, settings)
        return [Answer(question=question, text=self._caption(out, request.frame).text,
                       score=float(out.log_prob[0]))
                for out, request, question in zip(outs, requests, questions)]

    def locate(self, images: Sequence[np.ndarray], expressions: Sequence[str]
               ) -> list[Localization]:
        """The box of ``expressions[i]`` in ``images[i]`` (task ``refer``)."""
        return self._refer("refer", images, expressions)

    def segment(self, images: Sequence[np.ndarray], expressions: Sequence[str]
                ) -> list[Localization]:
        """The box and mask of ``expressions[i]`` in ``images[i]`` (task ``refseg``)."""
        return self._refer("refseg", images, expressions)

    def describe_region(self, images: Sequence[np.ndarray], *,
                        boxes: Sequence[Sequence[float]] | None = None,
                        points: Sequence[Sequence[Sequence[float]]] | None = None,
                        settings: inference.DecodeSettings | None = None
                        ) -> list[RegionCaption]:
        """A caption of ``boxes[i]`` (x0, y0, x1, y1) or of ``points[i]`` (``[P, 2]``, the same
        ``P`` for every image of a call: SAM's point prompt) in ``images[i]`` (task ``loca``)."""
        if (boxes is None) == (points is None):
            raise ValueError("describe_region: pass exactly one of boxes and points")
        prompts = boxes if boxes is not None else points
        self._check_count(images, prompts, "boxes" if boxes is not None else "points")
        requests = []
        for i, (image, prompt) in enumerate(zip(images, prompts)):
            request = self._request(image, OBJECT_PROMPT)
            width, height = request.frame.width, request.frame.height
            if boxes is not None:
                box = check_box(prompt, width=width, height=height, name=f"box {i}")
                request = dataclasses.replace(request,
                                              boxes=request.frame.boxes_to_canvas(box[None]))
            else:
                xy = check_points(prompt, width=width, height=height, name=f"points {i}")
                request = dataclasses.replace(request,
                                              points=request.frame.points_to_canvas(xy[None]))
            requests.append(request)
        counts = {len(r.points[0]) for r in requests if r.points is not None}
        if len(counts) > 1:
            raise ValueError(f"points: every image of one call needs the same number of points; "
                             f"got {sorted(counts)}")
        outs = self._run("loca", requests, settings)
        results = []
        for out, request, prompt in zip(outs, requests, prompts):
            text = self._caption(out, request.frame).text
            results.append(RegionCaption(
                text=text, score=float(out.log_prob[0]),
                box=np.asarray(prompt, np.float32) if boxes is not None else None,
                points=np.asarray(prompt, np.float32) if points is not None else None))
        return results

    def dense_caption(self, images: Sequence[np.ndarray], *,
                      settings: inference.DecodeSettings | None = None) -> list[DenseCaptions]:
        """The detector's regions of each image with a caption each (task ``densecap``)."""
        requests = [self._request(image, OBJECT_PROMPT) for image in images]
        results = []
        for out, request in zip(self._run("densecap", requests, settings), requests):
            regions = []
            for n in np.flatnonzero(out.valid):
                ids = self._generated_ids(out.captions.tokens[n], out.captions.lengths[n])
                regions.append(RegionCaption(
                    text=decode(self.tokenizer, ids), score=float(out.scores[n]),
                    box=request.frame.boxes_from_canvas(out.boxes[n])))
            results.append(DenseCaptions(regions=tuple(
                sorted(regions, key=lambda region: -region.score))))
        return results

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _check_count(images: Sequence[np.ndarray], values: Sequence[Any], name: str) -> None:
        if len(values) != len(images):
            raise ValueError(f"{name}: {len(values)} given for {len(images)} images")

    def _request(self, image: np.ndarray, context: str) -> _Request:
        canvas_image, frame = place_on_canvas(image, self.canvas)
        return _Request(image=canvas_image, frame=frame,
                        context=self.tokenizer.encode(context) + [self.tokenizer.eos_id])

    def _refer(self, task: str, images: Sequence[np.ndarray], expressions: Sequence[str]
               ) -> list[Localization]:
        self._check_count(images, expressions, "expressions")
        requests = []
        for i, (image, expression) in enumerate(zip(images, expressions)):
            check_text(expression, name=f"expression {i}")
            request = self._request(image, tasks.get(task).eval_prompt.format(
                expression=expression))
            text = [self._encoder.bos_id] + self.tokenizer.encode(expression) + [
                self.tokenizer.eos_id]
            requests.append(dataclasses.replace(request, text=text))
        results = []
        for out, request, expression in zip(self._run(task, requests, None), requests,
                                            expressions):
            frame = request.frame
            results.append(Localization(
                expression=expression, box=frame.boxes_from_canvas(out.boxes[0]),
                mask=None if out.mask_logits is None else frame.mask_from_logits(
                    out.mask_logits[0], canvas=self.canvas),
                mask_score=None if out.mask_scores is None else float(out.mask_scores[0])))
        return results

    def _generated_ids(self, tokens: np.ndarray, length: int) -> list[int]:
        """The word tokens of a generated row: the first EOS and what follows dropped (a
        ``fixed_length`` decode goes on after its EOS)."""
        ids = [int(t) for t in tokens[:int(length)]]
        return ids[:ids.index(self.tokenizer.eos_id)] if self.tokenizer.eos_id in ids else ids

    def _caption(self, out: inference.Generation, frame: CanvasFrame) -> Caption:
        """Slot 0 of a generation as a :class:`Caption` in the user's frame."""
        ids = self._generated_ids(out.tokens[0], out.lengths[0])
        text = decode(self.tokenizer, ids)
        names = text.split()
        points = frame.points_from_canvas(out.token_points[0, :len(ids)])  # [T, K, 2]
        per_word = [[] for _ in names]
        for token, word in enumerate(word_of_each_token(self.tokenizer, ids)):
            if word >= 0:
                per_word[word].append(points[token])
        words = tuple(Word(text=name, points=np.concatenate(found).reshape(-1, 2)
                           if found else np.zeros((0, 2), np.float32))
                      for name, found in zip(names, per_word))
        return Caption(text=text, score=float(out.log_prob[0]), words=words)

    def _function(self, task: str, settings: inference.DecodeSettings | None) -> Callable:
        """The jitted entry of ``task`` with ``settings`` closed over (one per key; jax.jit keeps
        one executable per batch and text bucket)."""
        key = (task, settings)
        if key not in self._functions:
            entry = inference.for_task(task)

            def counted(model: PixelLLM, **inputs: Any) -> Any:
                self.traces[task] += 1  # Python runs here only while tracing.
                return entry(model, **inputs)

            static = {} if settings is None else {"settings": settings}
            self._functions[key] = inference.compile_entry(counted, self._graphdef, **static)
        return self._functions[key]

    def _run(self, task: str, requests: list[_Request],
             settings: inference.DecodeSettings | None) -> list[Any]:
        """Runs ``task`` on ``requests`` in padded chunks; per request, its output tree (numpy)
        with the batch axis removed. ``ValueError`` for a task of :attr:`unavailable`."""
        if task in self.unavailable:
            raise ValueError(inference.missing_message(task, self.unavailable[task]))
        generates = task not in ("refer", "refseg")
        function = self._function(task, (settings or self.settings) if generates else None)
        outputs = []
        for start in range(0, len(requests), self.max_batch):
            chunk = requests[start:start + self.max_batch]
            inputs = self._inputs(task, chunk)
            result = jax.device_get(function(self._state, inputs))
            outputs += [jax.tree.map(lambda x, i=i: x[i], result) for i in range(len(chunk))]
        return outputs

    def _tokens(self, rows: list[list[int]], *, slots: bool) -> tuple[np.ndarray, np.ndarray]:
        """Padded ``(tokens, mask)`` of ``rows``, ``[B, 1, L]`` (or ``[B, L]`` without
        ``slots``), ``L`` the token bucket of the longest row."""
        length = bucket(max(len(row) for row in rows), minimum=self.min_text_length)
        tokens = np.full((len(rows), length), self.tokenizer.pad_id, np.int32)
        for i, row in enumerate(rows):
            tokens[i, :len(row)] = row
        mask = np.arange(length)[None] < np.asarray([len(row) for row in rows])[:, None]
        return (tokens[:, None], mask[:, None]) if slots else (tokens, mask)

    def _inputs(self, task: str, chunk: list[_Request]) -> dict[str, np.ndarray]:
        """The inference entry's arguments for ``chunk``, padded to its batch bucket by
        repeating the last request (whose outputs are dropped)."""
        padded = chunk + [chunk[-1]] * (bucket(len(chunk)) - len(chunk))
        inputs = {
            "image": np.stack([r.image for r in padded]).astype(np.float32),
            "valid_wh": np.asarray([r.frame.valid_wh for r in padded], np.float32),
        }
        # Dense captioning shares one prompt over the detector's boxes: no slot axis.
        inputs["context_tokens"], inputs["context_mask"] = self._tokens(
            [r.context for r in padded], slots=task != "densecap")
        if padded[0].text is not None:
            inputs["text_tokens"], inputs["text_mask"] = self._tokens([r.text for r in padded],
                                                                      slots=True)
        if padded[0].boxes is not None:
            inputs["boxes"] = np.stack([r.boxes for r in padded])
        if padded[0].points is not None:
            inputs["points"] = np.stack([r.points for r in padded])
        return inputs
