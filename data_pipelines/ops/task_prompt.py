"""Writes the task prompts (the rows of :mod:`pixelllm.tasks`) into the example as text.

Prompts are added as text before the geometric ops, so those ops keep them consistent with the
image: a crop drops an object's prompts with the object, a flip swaps "left"/"right" in them as
in the expressions. Whole-image tasks (trace, caption) get one ``context``; per-object tasks
(refer, refseg, loca, densecap, question_answer) get ``objects/contexts``, one prompt per
expression; a template's ``{question}`` is filled from ``objects/questions`` (instruction data).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from data_pipelines.ops import fields, registry
from pixelllm import tasks


@registry.register("task_prompt")
def task_prompt(*, task: str, train: bool = True,
                prompts: Sequence[str] | None = None) -> registry.Op:
    """Adds the prompt(s) of ``task``; ``train`` draws prompts at random from the task's
    training list (or from ``prompts``, when a source trains on other ones, e.g.
    :func:`pixelllm.tasks.caption_training_prompts`), otherwise its fixed evaluation prompt is
    used."""
    row = tasks.get(task)
    if prompts is not None:
        row = dataclasses.replace(row, prompts=tuple(prompts))
    asks_questions = any("{question}" in p for p in (*row.prompts, row.eval_prompt))

    def op(example: fields.Example, rng: np.random.Generator) -> fields.Example:
        out = dict(example)
        if row.prompt_per_object:
            questions = example.get(fields.OBJECT_QUESTIONS)
            if asks_questions and questions is None:
                raise ValueError(f"example {example.get(fields.IMAGE_ID, '?')}: task {task!r} "
                                 f"fills its prompt from {fields.OBJECT_QUESTIONS!r}, which the "
                                 "example lacks (not instruction data?)")
            out[fields.OBJECT_CONTEXTS] = [
                [row.prompt(train=train, rng=rng, expression=text,
                            question=questions[i][j] if questions is not None else "")
                 for j, text in enumerate(texts)]
                for i, texts in enumerate(example[fields.OBJECT_TEXTS])]
        else:
            out[fields.CONTEXT] = row.prompt(train=train, rng=rng)
        return out

    return op
