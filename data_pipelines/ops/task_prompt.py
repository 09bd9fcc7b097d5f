"""Writes the task prompts (the rows of :mod:`pixelllm.tasks`) into the example as text.

Prompts are added as text before the geometric ops, so those ops keep them consistent with the
image: a crop drops an object's prompts with the object, a flip swaps "left"/"right" in them as
in the expressions. Whole-image tasks (trace, caption) get one ``context``; per-object tasks
(refer, refseg, loca, densecap) get ``objects/contexts``, one prompt per expression.
"""

from __future__ import annotations

import numpy as np

from data_pipelines.ops import fields, registry
from pixelllm import tasks


@registry.register("task_prompt")
def task_prompt(*, task: str, train: bool = True) -> registry.Op:
    """Adds the prompt(s) of ``task``; ``train`` draws prompts at random from the task's
    training list, otherwise its fixed evaluation prompt is used."""
    row = tasks.get(task)

    def op(example: fields.Example, rng: np.random.Generator) -> fields.Example:
        out = dict(example)
        if row.prompt_per_object:
            out[fields.OBJECT_CONTEXTS] = [
                [row.prompt(train=train, rng=rng, expression=text) for text in texts]
                for texts in example[fields.OBJECT_TEXTS]]
        else:
            out[fields.CONTEXT] = row.prompt(train=train, rng=rng)
        return out

    return op
