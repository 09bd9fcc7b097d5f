"""Task slotting: a canvas example of one source becomes the S caption slots of its task.

The model reads every image through S slots (prompt box + context text -> target text) and, for
dense captioning, G ground-truth objects. This op decides what fills them, and fills every key
of the batch contract (README "Data"; ``data_pipelines.pipeline.CONTRACT``) except the tokens,
which :mod:`tokenize` makes from the texts this op leaves behind:

==========  ==========================================  ==========================  ==========
task        slots                                       prompt box                  losses on
==========  ==========================================  ==========================  ==========
trace       1: one narrative (random in training)       whole valid image           text, points
caption     1: one narrative's caption, no trace        whole valid image           text
refer       one per (object, expression), up to S       whole valid image           text, box
refseg      as refer, plus the object's mask            whole valid image           + mask
loca        one per object (a random expression), ≤ S   the object's box            text
densecap    none; up to G objects in ``gt_*``           (proposals)                 proposals
==========  ==========================================  ==========================  ==========

An object with several texts contributes a random one (training) or its first (evaluation) to
loca and densecap.

When there are more candidates than slots, training takes a random subset (in the candidates'
order); evaluation raises, naming the image, since every expression or object must be scored
(give the evaluation pipeline more slots). Ground-truth objects beyond G are a random subset in
training and the first G in evaluation: they feed the proposal and dense-captioning losses, while
dense-captioning metrics read the annotation files. Unused slots and objects are zero with their
masks False.

Texts for :mod:`tokenize` (removed by it): ``slots/context`` and ``slots/text`` (S str, empty
for unused slots), ``slots/trace`` (S narrative dicts or None) and ``gt/text`` (G str).
"""

from __future__ import annotations

import numpy as np

from data_pipelines.ops import fields, registry

TASKS = ("trace", "caption", "refer", "refseg", "loca", "densecap")
# Per-slot loss masks of each task: (text, points, box, mask).
_SLOT_LOSSES = {
    "trace": (1, 1, 0, 0),
    "caption": (1, 0, 0, 0),
    "refer": (1, 0, 1, 0),
    "refseg": (1, 0, 1, 1),
    "loca": (1, 0, 0, 0),
    "densecap": (0, 0, 0, 0),
}

SLOT_CONTEXT = "slots/context"
SLOT_TEXT = "slots/text"
SLOT_TRACE = "slots/trace"
GT_TEXT = "gt/text"


@registry.register("slot")
def slot(*, task: str, slots: int, objects: int, train: bool = True) -> registry.Op:
    """Fills ``slots`` (S) caption slots and ``objects`` (G) ground-truth objects for ``task``.

    The op maps a canvas example (``image [C, C, 3]``, ``valid_wh``, coordinates in canvas
    pixels) to ``image`` float32 ``[C, C, 3]``, ``valid_wh``, ``prompt_boxes [S, 4]``,
    ``target_boxes [S, 4]``, ``target_masks [S, C, C]``, ``slot_mask [S]``, ``task_text``,
    ``task_points``, ``task_box``, ``task_mask`` ``[S]``, ``task_proposals []``,
    ``gt_boxes [G, 4]``, ``gt_mask [G]`` and the texts described in the module docstring.
    """
    if task not in TASKS:
        raise ValueError(f"slot: unknown task {task!r}; expected one of {TASKS}")
    if slots < 1 or objects < 0:
        raise ValueError(f"slot: need slots >= 1 and objects >= 0, got {slots}, {objects}")

    def op(example: fields.Example, rng: np.random.Generator) -> fields.Example:
        if fields.VALID_WH not in example:
            raise ValueError(f"example {example.get(fields.IMAGE_ID, '?')}: slot needs the "
                             "image on the canvas (resize_and_pad or random_scale_crop first)")
        canvas = example[fields.IMAGE].shape[0]
        valid_w, valid_h = (float(v) for v in example[fields.VALID_WH])
        whole_image = np.asarray([0.0, 0.0, valid_w, valid_h], np.float32)
        out = {
            "image": example[fields.IMAGE].astype(np.float32),
            "valid_wh": np.asarray(example[fields.VALID_WH], np.float32),
            "prompt_boxes": np.zeros((slots, 4), np.float32),
            "target_boxes": np.zeros((slots, 4), np.float32),
            "target_masks": np.zeros((slots, canvas, canvas), bool),
            "slot_mask": np.zeros((slots,), bool),
            "task_proposals": np.float32(task == "densecap"),
            "gt_boxes": np.zeros((objects, 4), np.float32),
            "gt_mask": np.zeros((objects,), bool),
            SLOT_CONTEXT: [""] * slots,
            SLOT_TEXT: [""] * slots,
            SLOT_TRACE: [None] * slots,
            GT_TEXT: [""] * objects,
        }
        if task in ("trace", "caption"):
            narratives = example[fields.NARRATIVES]
            if narratives:
                narrative = narratives[int(rng.integers(len(narratives))) if train else 0]
                out[SLOT_CONTEXT][0] = example[fields.CONTEXT]
                out[SLOT_TEXT][0] = narrative[fields.CAPTION]
                out[SLOT_TRACE][0] = narrative if task == "trace" else None
                out["prompt_boxes"][0] = whole_image
                out["slot_mask"][0] = True
        elif task in ("refer", "refseg"):
            pairs = [(i, j) for i, texts in enumerate(example[fields.OBJECT_TEXTS])
                     for j in range(len(texts))]
            _check_fits(example, pairs, slots, train=train, what="expressions")
            for s, (i, j) in enumerate(_choose(pairs, slots, train=train, rng=rng)):
                out[SLOT_CONTEXT][s] = example[fields.OBJECT_CONTEXTS][i][j]
                out[SLOT_TEXT][s] = example[fields.OBJECT_TEXTS][i][j]
                out["prompt_boxes"][s] = whole_image
                out["target_boxes"][s] = example[fields.OBJECT_BOXES][i]
                if task == "refseg":
                    out["target_masks"][s] = example[fields.OBJECT_MASKS][i]
                out["slot_mask"][s] = True
        elif task == "loca":
            described = [i for i, texts in enumerate(example[fields.OBJECT_TEXTS]) if texts]
            _check_fits(example, described, slots, train=train, what="described objects")
            for s, i in enumerate(_choose(described, slots, train=train, rng=rng)):
                texts = example[fields.OBJECT_TEXTS][i]
                j = int(rng.integers(len(texts))) if train else 0
                out[SLOT_CONTEXT][s] = example[fields.OBJECT_CONTEXTS][i][j]
                out[SLOT_TEXT][s] = texts[j]
                out["prompt_boxes"][s] = example[fields.OBJECT_BOXES][i]
                out["slot_mask"][s] = True
        else:  # densecap
            described = [i for i, texts in enumerate(example[fields.OBJECT_TEXTS]) if texts]
            for g, i in enumerate(_choose(described, objects, train=train, rng=rng)):
                out["gt_boxes"][g] = example[fields.OBJECT_BOXES][i]
                out["gt_mask"][g] = True
                texts = example[fields.OBJECT_TEXTS][i]
                out[GT_TEXT][g] = texts[int(rng.integers(len(texts))) if train else 0]
        used = out["slot_mask"].astype(np.float32)
        for name, on in zip(("task_text", "task_points", "task_box", "task_mask"),
                            _SLOT_LOSSES[task], strict=True):
            out[name] = used * on
        return out

    return op


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
