"""Field names of the examples that the preprocessing ops pass to each other.

:func:`~data_pipelines.ops.decode.decode` turns a builder example (normalized coordinates, nested
TFDS dicts, encoded images) into this *working* form; the geometric ops transform it; ``slot``
and ``tokenize`` turn it into the model batch contract. Coordinates are pixels of the current
image, (x, y) from the top left, boxes xyxy (the project convention).

==========================  ===============================================================
``image``                   uint8 ``[h, w, 3]`` RGB
``image/id``                str
``valid_wh``                float32 ``[2]``: the unpadded area, once the image is on the canvas
``context``                 str: the task prompt of a whole-image task (trace, caption)
``objects/box``             float32 ``[N, 4]``
``objects/mask``            bool ``[N, h, w]`` (referring segmentation sources)
``objects/original_mask``   bool ``[N, M, M]``: ``objects/mask`` as decoded, at the original
                            size in the top-left corner of an ``M x M`` frame; evaluation only
                            (``evaluation_metadata``), never moved by the geometric ops
``objects/id``              int64 ``[N]``
``objects/texts``           N lists of str: an object's expressions (RefCOCO) or phrase (VG)
``objects/contexts``        N lists of str, parallel to ``objects/texts``: their task prompts
``objects/questions``       N lists of str, parallel to ``objects/texts`` (instruction data:
                            the question each text answers; fills a prompt's ``{question}``)
``narratives``              list of narrative dicts (Localized Narratives), each:
    ``caption``             str
    ``utterances/text``     U str
    ``utterances/box``      float32 ``[U, 4]``: the trace box of the utterance's time window
    ``utterances/points``   float32 ``[U, P, 2]``: trace samples in the window
    ``utterances/valid``    bool ``[U]``: the builder's validity (used for word alignment)
    ``utterances/visible``  bool ``[U]``: the trace box is still inside the image (crops)
    ``trace/points``        float32 ``[P, 2]``: the raw trace points in time order (times in
                            ``alignment_traces``), moved by every op, never clipped
    ``alignment_traces``    the narrative as stored (normalized, before any op), a
                            :class:`data_pipelines.alignment.NarrativeTraces`: tokens are
                            aligned to utterances on it, so augmentation cannot change that
==========================  ===============================================================

Every ``objects/*`` field is indexed by object on its first axis (arrays) or position (lists),
so an op dropping objects drops the same rows of all of them (:func:`keep_objects`): boxes,
masks, expressions and the prompts made from them stay aligned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

IMAGE = "image"
IMAGE_ID = "image/id"
VALID_WH = "valid_wh"
CONTEXT = "context"
OBJECTS_PREFIX = "objects/"
OBJECT_BOXES = "objects/box"
OBJECT_MASKS = "objects/mask"
OBJECT_ORIGINAL_MASKS = "objects/original_mask"
OBJECT_IDS = "objects/id"
OBJECT_TEXTS = "objects/texts"
OBJECT_CONTEXTS = "objects/contexts"
OBJECT_QUESTIONS = "objects/questions"
NARRATIVES = "narratives"
CAPTION = "caption"
UTTERANCE_TEXTS = "utterances/text"
UTTERANCE_BOXES = "utterances/box"
UTTERANCE_POINTS = "utterances/points"
UTTERANCE_VALID = "utterances/valid"
UTTERANCE_VISIBLE = "utterances/visible"
TRACE_POINTS = "trace/points"
ALIGNMENT_TRACES = "alignment_traces"

Example = dict[str, Any]


def num_objects(example: Example) -> int:
    """Number of objects (0 without object fields); raises if the fields disagree."""
    lengths = {key: len(value) for key, value in example.items()
               if key.startswith(OBJECTS_PREFIX)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"example {example.get(IMAGE_ID, '?')}: object fields have different "
                         f"lengths {lengths}")
    return next(iter(lengths.values()), 0)


def keep_objects(example: Example, keep: np.ndarray) -> Example:
    """A copy of ``example`` with only the objects where ``keep`` (bool ``[N]``) is True, in
    every ``objects/*`` field together."""
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != (num_objects(example),):
        raise ValueError(f"keep mask of shape {keep.shape} for {num_objects(example)} objects")
    indices = np.flatnonzero(keep)
    out = dict(example)
    for key, value in example.items():
        if key.startswith(OBJECTS_PREFIX):
            out[key] = (value[indices] if isinstance(value, np.ndarray)
                        else [value[i] for i in indices])
    return out


def map_texts(example: Example, fn: Callable[[str], str]) -> Example:
    """A copy of ``example`` with ``fn`` applied to every text a model sees or is trained on:
    the context, object expressions and their prompts, narrative captions and utterances."""
    out = dict(example)
    if CONTEXT in example:
        out[CONTEXT] = fn(example[CONTEXT])
    for key in (OBJECT_TEXTS, OBJECT_CONTEXTS):
        if key in example:
            out[key] = [[fn(text) for text in texts] for texts in example[key]]
    if NARRATIVES in example:
        out[NARRATIVES] = [
            {**narrative, CAPTION: fn(narrative[CAPTION]),
             UTTERANCE_TEXTS: [fn(text) for text in narrative[UTTERANCE_TEXTS]]}
            for narrative in example[NARRATIVES]]
    return out


def texts(example: Example) -> list[str]:
    """Every text :func:`map_texts` maps, in its order (one definition of "every text")."""
    found = []

    def collect(text: str) -> str:
        found.append(text)
        return text

    map_texts(example, collect)
    return found
