"""The task prompts (context text before the target text), all in one place.

PixelLLM conditions its language model on a task prompt, followed by EOS ("following BLIP2").
The lists are the official recipe's (scenic ``pixel_llm`` configs, verbatim, the trailing space
included, and the "senetences" typo kept, since a model trained on the official lists has seen
that string): in training one prompt is drawn per image, in evaluation the first, fixed one is
used.

=========================  =============================================  ===================
task                       training                                       evaluation
=========================  =============================================  ===================
trace (Localized Narr.)    one of :data:`LONG_CAPTION_PROMPTS` (11)       "A long image caption: "
caption                    one of :data:`SHORT_CAPTION_PROMPTS` (13)      "A photo of "
refer, refseg              ``"where is {expression}"``                    same
loca, densecap             ``"an object of "``                            same
vqa                        ``"Question: {question} Answer: "``            same
=========================  =============================================  ===================
"""

from __future__ import annotations

import numpy as np

LONG_CAPTION_PROMPTS = (
    "A long image caption: ",
    "A long image description: ",
    "Write a long description for the image. ",
    "Write a long description for the photo. ",
    "Provide a long description of what is presented in the photo. ",
    "Describe the content of the image in detail. ",
    "Can you in detail explain what you see in the image? ",
    "Could you use a few sentences to describe what you perceive in the photo? ",
    "Please provide a long depiction of the picture. ",
    "Using language, provide a long account of the image. ",
    "Use a few senetences to illustrate what is happening in the picture. ",
)
LONG_CAPTION_EVAL_PROMPT = "A long image caption: "

SHORT_CAPTION_PROMPTS = (
    "A short image caption: ",
    "A short image description: ",
    "A photo of ",
    "An image that shows ",
    "Write a short description for the image. ",
    "Write a description for the photo. ",
    "Provide a description of what is presented in the photo. ",
    "Briefly describe the content of the image. ",
    "Can you briefly explain what you see in the image? ",
    "Could you use a few words to describe what you perceive in the photo? ",
    "Please provide a short depiction of the picture. ",
    "Using language, provide a short account of the image. ",
    "Use a few words to illustrate what is happening in the picture. ",
)
SHORT_CAPTION_EVAL_PROMPT = "A photo of "

OBJECT_PROMPT = "an object of "

# Tasks whose prompt is one text for the whole image, and those with one prompt per object.
IMAGE_PROMPT_TASKS = ("trace", "caption")
OBJECT_PROMPT_TASKS = ("refer", "refseg", "loca", "densecap")


def image_prompt(task: str, *, train: bool, rng: np.random.Generator) -> str:
    """The prompt of a whole-image task: a random one of the task's list in training (drawn
    with ``rng``), the evaluation prompt otherwise."""
    if task == "trace":
        choices, fixed = LONG_CAPTION_PROMPTS, LONG_CAPTION_EVAL_PROMPT
    elif task == "caption":
        choices, fixed = SHORT_CAPTION_PROMPTS, SHORT_CAPTION_EVAL_PROMPT
    else:
        raise ValueError(f"task {task!r} has no whole-image prompt; expected one of "
                         f"{IMAGE_PROMPT_TASKS}")
    return choices[int(rng.integers(len(choices)))] if train else fixed


def refer_prompt(expression: str) -> str:
    """``"where is {expression}"``: the referring prompt, the expression being the target text
    too (the official ``use_text_as_context``)."""
    return f"where is {expression}"


def object_prompt(task: str, expression: str) -> str:
    """The prompt of one object's slot in a per-object task."""
    if task in ("refer", "refseg"):
        return refer_prompt(expression)
    if task in ("loca", "densecap"):
        return OBJECT_PROMPT
    raise ValueError(f"task {task!r} has no per-object prompt; expected one of "
                     f"{OBJECT_PROMPT_TASKS}")


def question_prompt(question: str) -> str:
    """``"Question: {question} Answer: "``: the VQA prompt, the answer being the target."""
    return f"Question: {question} Answer: "
