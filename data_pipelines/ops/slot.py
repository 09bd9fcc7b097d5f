"""Task slotting: a canvas example of one source becomes the S caption slots of its task.

The model reads every image through S slots (prompt box + context text -> target text) and, for
dense captioning, G ground-truth objects. This op decides what fills them, and fills every key
of the batch contract (:mod:`pixelllm.batch`) except the tokens, which :mod:`tokenize` makes
from the texts this op leaves behind. The task's row of :mod:`pixelllm.tasks` picks the filler
and the losses; the loss masks (``task_*``) are the slot mask times the row's losses:

============  ==========================================  ==========================
filler        slots                                       prompt box
============  ==========================================  ==========================
narrative     1: one narrative (random in training); its  whole valid image
              trace when the task trains points; in
              evaluation, every narrative's caption (the
              references) in ``gt_*``, up to G
expressions   one per (object, expression), up to S; the  whole valid image
              object's mask when the task trains masks
objects       one per object (a random expression), <= S  the object's box
ground_truth  none (every slot keeps the task's prompt,    (proposals)
              for the slots the model builds from
              proposals); up to G objects in ``gt_*``
============  ==========================================  ==========================

An object with several texts contributes a random one (training) or its first (evaluation) to
the objects and ground_truth fillers. The narrative filler's evaluation references (up to G,
whole-image boxes) are what the caption metric scores against (COCO: all 5-7 captions of an
image; G = 100 in the full configs holds them); no loss reads them (``task_proposals`` is 0).

When there are more candidates than slots, training takes a random subset (in the candidates'
order); evaluation raises, naming the image, since every expression or object must be scored
(give the evaluation pipeline more slots). Ground-truth objects beyond G are a random subset in
training and the first G in evaluation: they feed the proposal and dense-captioning losses, while
dense-captioning metrics read the annotation files. Unused slots and objects are zero with their
masks False.

An example with ``objects/original_mask`` (evaluation of referring segmentation:
``evaluation_metadata(original_masks=M)``) also gets the evaluation-only ``original_masks``
``[S, M, M]``: each expressions slot's object mask at the original size (zero elsewhere), laid
out like ``target_masks``.

Texts for :mod:`tokenize` (removed by it): ``slots/context`` and ``slots/text`` (S str, empty
for unused slots), ``slots/trace`` (S narrative dicts or None) and ``gt/text`` (G str).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from data_pipelines.ops import fields, registry
from pixelllm import batch, tasks

SLOT_CONTEXT = "slots/context"
SLOT_TEXT = "slots/text"
SLOT_TRACE = "slots/trace"
GT_TEXT = "gt/text"


@registry.register("slot")
def slot(*, task: str, slots: int, objects: int, train: bool = True) -> registry.Op:
    """Fills ``slots`` (S) caption slots and ``objects`` (G) ground-truth objects for ``task``
    (a name of :data:`pixelllm.tasks.TASKS`).

    The op maps a canvas example (``image [C, C, 3]``, ``valid_wh``, coordinates in canvas
    pixels) to ``image`` float32 ``[C, C, 3]``, ``valid_wh``, ``prompt_boxes [S, 4]``,
    ``target_boxes [S, 4]``, ``target_masks [S, C, C]``, ``slot_mask [S]``, ``task_text``,
    ``task_points``, ``task_box``, ``task_mask`` ``[S]``, ``task_proposals []``,
    ``gt_boxes [G, 4]``, ``gt_mask [G]`` and the texts described in the module docstring.
    """
    row = tasks.get(task)
    if row.slot_filler not in _FILLERS:
        raise ValueError(f"slot: task {task!r} needs slot filler {row.slot_filler!r}, which "
                         f"this op does not have (it has {sorted(_FILLERS)})")
    fill = _FILLERS[row.slot_filler]
    if slots < 1 or objects < 0:
        raise ValueError(f"slot: need slots >= 1 and objects >= 0, got {slots}, {objects}")

    def op(example: fields.Example, rng: np.random.Generator) -> fields.Example:
        if fields.VALID_WH not in example:
            raise ValueError(f"example {example.get(fields.IMAGE_ID, '?')}: slot needs the "
                             "image on the canvas (resize_and_pad or random_scale_crop first)")
        canvas = example[fields.IMAGE].shape[0]
        out = {
            batch.IMAGE: example[fields.IMAGE].astype(np.float32),
            batch.VALID_WH: np.asarray(example[fields.VALID_WH], np.float32),
            batch.PROMPT_BOXES: np.zeros((slots, 4), np.float32),
            batch.TARGET_BOXES: np.zeros((slots, 4), np.float32),
            batch.TARGET_MASKS: np.zeros((slots, canvas, canvas), bool),
            batch.SLOT_MASK: np.zeros((slots,), bool),
            batch.GT_BOXES: np.zeros((objects, 4), np.float32),
            batch.GT_MASK: np.zeros((objects,), bool),
            SLOT_CONTEXT: [""] * slots,
            SLOT_TEXT: [""] * slots,
            SLOT_TRACE: [None] * slots,
            GT_TEXT: [""] * objects,
        }
        # Evaluation metadata (the evaluation_metadata op) and cached SAM features (the
        # sam_features op) ride along to the batch.
        out.update({key: example[key] for key in (*batch.EVALUATION_SPEC, *batch.CACHED_SPEC)
                    if key in example})
        if fields.OBJECT_ORIGINAL_MASKS in example:
            side = example[fields.OBJECT_ORIGINAL_MASKS].shape[1:]
            out[batch.ORIGINAL_MASKS] = np.zeros((slots, *side), bool)
        fill(example, out, task=row, train=train, rng=rng)
        used = out[batch.SLOT_MASK].astype(np.float32)
        for loss, key in batch.LOSS_MASKS.items():
            on = np.float32(loss in row.losses)
            out[key] = on if key == batch.TASK_PROPOSALS else used * on
        return out

    return op


Filler = Callable[..., None]


def _whole_image(example: fields.Example) -> np.ndarray:
    valid_w, valid_h = (float(v) for v in example[fields.VALID_WH])
    return np.asarray([0.0, 0.0, valid_w, valid_h], np.float32)


def _fill_narrative(example: fields.Example, out: fields.Example, *, task: tasks.Task,
                    train: bool, rng: np.random.Generator) -> None:
    """Slot 0: one narrative's caption (random in training), with its trace if the task trains
    points."""
    narratives = example[fields.NARRATIVES]
    if not narratives:
        return
    narrative = narratives[int(rng.integers(len(narratives))) if train else 0]
    out[SLOT_CONTEXT][0] = example[fields.CONTEXT]
    out[SLOT_TEXT][0] = narrative[fields.CAPTION]
    out[SLOT_TRACE][0] = narrative if "points" in task.losses else None
    out[batch.PROMPT_BOXES][0] = _whole_image(example)
    out[batch.SLOT_MASK][0] = True
    if not train:
        # The official caption evaluation scores the image's caption against every caption
        # of the image: they become the image's ground-truth texts, each of the whole image.
        for g, reference in enumerate(narratives[:len(out[GT_TEXT])]):
            out[batch.GT_BOXES][g] = _whole_image(example)
            out[batch.GT_MASK][g] = True
            out[GT_TEXT][g] = reference[fields.CAPTION]


def _fill_expressions(example: fields.Example, out: fields.Example, *, task: tasks.Task,
                      train: bool, rng: np.random.Generator) -> None:
    """One slot per (object, expression), with the object's box (and mask if the task trains
    masks) as targets."""
    pairs = [(i, j) for i, texts in enumerate(example[fields.OBJECT_TEXTS])
             for j in range(len(texts))]
    slots = len(out[SLOT_TEXT])
    _check_fits(example, pairs, slots, train=train, what="expressions")
    for s, (i, j) in enumerate(_choose(pairs, slots, train=train, rng=rng)):
        out[SLOT_CONTEXT][s] = example[fields.OBJECT_CONTEXTS][i][j]
        out[SLOT_TEXT][s] = example[fields.OBJECT_TEXTS][i][j]
        out[batch.PROMPT_BOXES][s] = _whole_image(example)
        out[batch.TARGET_BOXES][s] = example[fields.OBJECT_BOXES][i]
        if "mask" in task.losses:
            out[batch.TARGET_MASKS][s] = example[fields.OBJECT_MASKS][i]
        if batch.ORIGINAL_MASKS in out:
            out[batch.ORIGINAL_MASKS][s] = example[fields.OBJECT_ORIGINAL_MASKS][i]
        out[batch.SLOT_MASK][s] = True


def _fill_objects(example: fields.Example, out: fields.Example, *, task: tasks.Task,
                  train: bool, rng: np.random.Generator) -> None:
    """One slot per described object, prompted with its box, captioned by one of its texts."""
    del task  # every objects task fills the same way
    described = [i for i, texts in enumerate(example[fields.OBJECT_TEXTS]) if texts]
    slots = len(out[SLOT_TEXT])
    _check_fits(example, described, slots, train=train, what="described objects")
    for s, i in enumerate(_choose(described, slots, train=train, rng=rng)):
        texts = example[fields.OBJECT_TEXTS][i]
        j = int(rng.integers(len(texts))) if train else 0
        out[SLOT_CONTEXT][s] = example[fields.OBJECT_CONTEXTS][i][j]
        out[SLOT_TEXT][s] = texts[j]
        out[batch.PROMPT_BOXES][s] = example[fields.OBJECT_BOXES][i]
        out[batch.SLOT_MASK][s] = True


def _fill_ground_truth(example: fields.Example, out: fields.Example, *, task: tasks.Task,
                       train: bool, rng: np.random.Generator) -> None:
    """No slots: up to G described objects become ``gt_*``. Every slot keeps the task's prompt
    as its context, since the model fills these slots from its proposals and must see the
    context that inference gives it."""
    out[SLOT_CONTEXT][:] = [task.prompt(train=train, rng=rng)] * len(out[SLOT_CONTEXT])
    described = [i for i, texts in enumerate(example[fields.OBJECT_TEXTS]) if texts]
    for g, i in enumerate(_choose(described, len(out[GT_TEXT]), train=train, rng=rng)):
        out[batch.GT_BOXES][g] = example[fields.OBJECT_BOXES][i]
        out[batch.GT_MASK][g] = True
        texts = example[fields.OBJECT_TEXTS][i]
        out[GT_TEXT][g] = texts[int(rng.integers(len(texts))) if train else 0]


_FILLERS: dict[str, Filler] = {"narrative": _fill_narrative, "expressions": _fill_expressions,
                               "objects": _fill_objects, "ground_truth": _fill_ground_truth}


def _check_fits(example: fields.Example, candidates: list, slots: int, *, train: bool,
                what: str) -> None:
    if not train and len(candidates) > slots:
        raise ValueError(f"example {example.get(fields.IMAGE_ID, '?')}: {len(candidates)} "
                         f"{what} do not fit {slots} slots; evaluation scores every one, so "
                         "give the evaluation pipeline more slots")


def _choose(candidates: list, count: int, *, train: bool, rng: np.random.Generator) -> list:
    """At most ``count`` candidates: a random subset in their order (training) or the first."""
    if len(candidates) <= count:
        return candidates
    if not train:
        return candidates[:count]
    picked = np.sort(rng.choice(len(candidates), size=count, replace=False))
    return [candidates[k] for k in picked]
