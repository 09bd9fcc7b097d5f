"""The task table: every task PixelLLM trains and evaluates on, declared once.

A row (:class:`Task`) says what the task's context text is (its prompts), which slot filler of
``data_pipelines/ops/slot.py`` fills its caption slots, which losses it turns on (written into the
batch's loss masks, :data:`pixelllm.batch.LOSS_MASKS`) and which function of
``pixelllm/models/pixel_llm/inference.py`` serves it. The data pipeline (``task_prompt`` and
``slot`` ops), the data configs, the objective and inference all read this table; adding a task
is one new row (plus a slot filler or an inference function if no existing one fits).

=========  ===================================  ===========  ======================  ===========
task       prompt (training / evaluation)       filler       losses                  inference
=========  ===================================  ===========  ======================  ===========
trace      one of 11 long-caption prompts /     narrative    text, points            caption_with_traces
           "A long image caption: "
caption    one of 13 short-caption prompts /    narrative    text                    caption
           "A photo of "
refer      "where is {expression}"              expressions  box (+)                 refer
refseg     "where is {expression}"              expressions  box, mask (+)           refer_segment
loca       "an object of "                      objects      text                    location_caption
densecap   "an object of "                      ground_truth proposals, text (*)     dense_caption
question_  "Question: {question}Answer: "       expressions  text                    caption
answer     (instruction data: one slot per pair)
=========  ===================================  ===========  ======================  ===========

(+) As the official (scenic ``configs/t5/pixel_llm_t5_ref.py``: ``add_task_mask(['point'])``),
referring data trains the box only, not the expression's text; ``config.loss.text_on_referring``
(:mod:`pixelllm.models.pixel_llm.objective`) adds the text loss as an extension.

(*) Dense captioning has no slots in the data; the model fills them from its proposals and the
ground-truth captions (``assign_dense_caption_slots``) and trains their text.

The prompt lists are the official recipe's (scenic ``pixel_llm`` configs, verbatim, the trailing
space included, and the "senetences" typo kept, since a model trained on the official lists has
seen that string). PixelLLM follows the prompt with EOS ("following BLIP2"). In training a prompt
is drawn per image (or per object), in evaluation the fixed ``eval_prompt`` is used; templates
fill ``{expression}`` with the object's expression (the referring expression is the target text
too: the official ``use_text_as_context``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# The losses a task can turn on (the batch's loss masks, pixelllm.batch.LOSS_MASKS).
LOSSES = ("text", "points", "box", "mask", "proposals")

# Slot fillers (data_pipelines/ops/slot.py): "narrative" = one slot from an image caption;
# "expressions" = one slot per (object, expression); "objects" = one slot per described object,
# prompted with its box; "ground_truth" = no slots, the described objects fill gt_*.
SLOT_FILLERS = ("narrative", "expressions", "objects", "ground_truth")

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

REFER_PROMPT = "where is {expression}"
OBJECT_PROMPT = "an object of "
# The official VQA context (scenic ``context_prefix='Question: '``, ``context_suffix='Answer: '``
# around the question): no space is added between the question and "Answer: ", since a model
# trained on the official prompts saw exactly that string.
QUESTION_PROMPT = "Question: {question}Answer: "
# The official COCO caption source draws from the 13 short-caption prompts only when its text
# may hold this many tokens or more; below, it trains on "A photo of " alone (scenic
# ``get_coco_cap_train_source``: ``max_text_tokens < 32``).
MIN_TEXT_LENGTH_FOR_CAPTION_PROMPTS = 32


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task:
    """One row of the task table.

    Attributes:
      name: the task's name in data configs and ops.
      prompts: the training prompts (templates may hold ``{expression}``); one is drawn at random.
      eval_prompt: the evaluation prompt (or template).
      slot_filler: one of :data:`SLOT_FILLERS`.
      losses: the subset of :data:`LOSSES` the task trains.
      inference: the name of its entry in ``pixelllm/models/pixel_llm/inference.py``.
    """

    name: str
    prompts: tuple[str, ...]
    eval_prompt: str
    slot_filler: str
    losses: frozenset[str]
    inference: str

    def __post_init__(self):
        if self.slot_filler not in SLOT_FILLERS:
            raise ValueError(f"task {self.name!r}: slot_filler {self.slot_filler!r} is not one "
                             f"of {SLOT_FILLERS}")
        unknown = sorted(set(self.losses) - set(LOSSES))
        if unknown:
            raise ValueError(f"task {self.name!r}: unknown losses {unknown}; expected a subset "
                             f"of {LOSSES}")
        if not self.prompts:
            raise ValueError(f"task {self.name!r} has no training prompt")

    @property
    def prompt_per_object(self) -> bool:
        """Whether each object (expression) gets its own prompt, rather than the whole image
        one."""
        return self.slot_filler != "narrative"

    def prompt(self, *, train: bool, rng: np.random.Generator, expression: str = "",
               question: str = "") -> str:
        """The context text: a random training prompt (drawn with ``rng`` only when there is a
        choice, so single-prompt tasks leave the random stream alone) or the evaluation one,
        with ``{expression}`` and ``{question}`` filled in."""
        if not train:
            template = self.eval_prompt
        elif len(self.prompts) == 1:
            template = self.prompts[0]
        else:
            template = self.prompts[int(rng.integers(len(self.prompts)))]
        return template.format(expression=expression, question=question)


TASKS: dict[str, Task] = {task.name: task for task in (
    Task(name="trace", prompts=LONG_CAPTION_PROMPTS, eval_prompt="A long image caption: ",
         slot_filler="narrative", losses=frozenset({"text", "points"}),
         inference="caption_with_traces"),
    Task(name="caption", prompts=SHORT_CAPTION_PROMPTS, eval_prompt="A photo of ",
         slot_filler="narrative", losses=frozenset({"text"}), inference="caption"),
    Task(name="refer", prompts=(REFER_PROMPT,), eval_prompt=REFER_PROMPT,
         slot_filler="expressions", losses=frozenset({"box"}), inference="refer"),
    Task(name="refseg", prompts=(REFER_PROMPT,), eval_prompt=REFER_PROMPT,
         slot_filler="expressions", losses=frozenset({"box", "mask"}),
         inference="refer_segment"),
    Task(name="loca", prompts=(OBJECT_PROMPT,), eval_prompt=OBJECT_PROMPT,
         slot_filler="objects", losses=frozenset({"text"}), inference="location_caption"),
    Task(name="densecap", prompts=(OBJECT_PROMPT,), eval_prompt=OBJECT_PROMPT,
         slot_filler="ground_truth", losses=frozenset({"proposals", "text"}),
         inference="dense_caption"),
    # Official: instruction data trains the text only (add_task_mask(['caption'])).
    Task(name="question_answer", prompts=(QUESTION_PROMPT,), eval_prompt=QUESTION_PROMPT,
         slot_filler="expressions", losses=frozenset({"text"}), inference="caption"),
)}


def get(name: str) -> Task:
    """The row of task ``name``; an unknown name raises, listing the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name]


def question_prompt(question: str) -> str:
    """``"Question: " + question + "Answer: "`` (:data:`QUESTION_PROMPT`): the VQA prompt of
    the caption task's inference, the answer being the generated text."""
    return QUESTION_PROMPT.format(question=question)


def caption_training_prompts(text_length: int) -> tuple[str, ...]:
    """The training prompts of COCO-style captions whose text holds ``text_length`` tokens:
    the 13 short-caption prompts, or "A photo of " alone below
    :data:`MIN_TEXT_LENGTH_FOR_CAPTION_PROMPTS` (as the official source chooses)."""
    if text_length < MIN_TEXT_LENGTH_FOR_CAPTION_PROMPTS:
        return ("A photo of ",)
    return SHORT_CAPTION_PROMPTS
