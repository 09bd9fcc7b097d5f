"""Writes the task prompts (:mod:`data_pipelines.prompts`) into the example as text.

Prompts are added as text before the geometric ops, so those ops keep them consistent with the
image: a crop drops an object's prompts with the object, a flip swaps "left"/"right" in them as
in the expressions. Whole-image tasks (trace, caption) get one ``context``; per-object tasks
(refer, refseg, loca, densecap) get ``objects/contexts``, one prompt per expression.
"""

from __future__ import annotations

import numpy as np

from data_pipelines import prompts
from data_pipelines.ops import fields, registry


@registry.register("task_prompt")
def task_prompt(*, task: str, train: bool = True) -> registry.Op:
    """Adds the prompt(s) of ``task``; ``train`` draws whole-image prompts at random from the
    official lists, otherwise the fixed evaluation prompt is used."""
    if task not in prompts.IMAGE_PROMPT_TASKS + prompts.OBJECT_PROMPT_TASKS:
        raise ValueError(f"task_prompt: unknown task {task!r}; expected one of "
                         f"{prompts.IMAGE_PROMPT_TASKS + prompts.OBJECT_PROMPT_TASKS}")

    def op(example: fields.Example, rng: np.random.Generator) -> fields.Example:
        out = dict(example)
        if task in prompts.IMAGE_PROMPT_TASKS:
            out[fields.CONTEXT] = prompts.image_prompt(task, train=train, rng=rng)
        else:
            out[fields.OBJECT_CONTEXTS] = [[prompts.object_prompt(task, text) for text in texts]
                                           for texts in example[fields.OBJECT_TEXTS]]
        return out

    return op
