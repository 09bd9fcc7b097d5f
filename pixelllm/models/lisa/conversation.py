"""LISA's conversations: the LLaVA v1 template, its question and answer templates, and one
(question, answer) turned into the token pieces of :class:`~pixelllm.models.lisa.lisa.LisaInputs`.

A conversation is LLaVA's ``llava_v1`` template (``SeparatorStyle.TWO``, separators ``" "`` and
``"</s>"``) with one user turn and one assistant turn::

    {SYSTEM} USER: <im_start><image><im_end>\\n{question} ASSISTANT: {answer}</s>

(LISA's questions start with ``<image>\\n``; with ``use_mm_start_end`` its collate function
writes ``<image>`` as ``<im_start><image><im_end>``.) LISA tokenizes it with LLaVA's
``tokenizer_image_token``: the text before ``<image>`` and the text after it are tokenized
*separately*, each with BOS, the second's BOS dropped, and ``<image>`` becomes one placeholder
that the model replaces by the 256 projected CLIP features. :func:`tokenize` does the same and
returns the pieces the model reads around the image, with the labelled positions found as LISA's
collate function finds them (``instruction_len`` from the tokens of the text up to
``" ASSISTANT: "``, minus 2).
"""

from __future__ import annotations

from typing import NamedTuple

from pixelllm.language.tokenizer import Tokenizer

DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"

# LLaVA's conv_llava_v1.
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
ROLES = ("USER", "ASSISTANT")
SEP, SEP2 = " ", "</s>"

# LISA's templates (utils/utils.py), word for word.
SHORT_QUESTION_LIST = (
    DEFAULT_IMAGE_TOKEN + "\n" + "Can you segment the {class_name} in this image?",
    DEFAULT_IMAGE_TOKEN + "\n" + "Please segment the {class_name} in this image.",
    DEFAULT_IMAGE_TOKEN + "\n"
    + "What is {class_name} in this image? Please respond with segmentation mask.",
    DEFAULT_IMAGE_TOKEN + "\n"
    + "What is {class_name} in this image? Please output segmentation mask.",
)
LONG_QUESTION_LIST = (
    DEFAULT_IMAGE_TOKEN + "\n" + "{sent} Please respond with segmentation mask.",
    DEFAULT_IMAGE_TOKEN + "\n" + "{sent} Please output segmentation mask.",
)
EXPLANATORY_QUESTION_LIST = (
    "Please output segmentation mask and explain why.",
    "Please output segmentation mask and explain the reason.",
    "Please output segmentation mask and give some explanation.",
)
ANSWER_LIST = (
    "It is [SEG].",
    "Sure, [SEG].",
    "Sure, it is [SEG].",
    "Sure, the segmentation result is [SEG].",
    "[SEG].",
)


class ConversationTokens(NamedTuple):
    """One conversation's pieces (lists of ids), the image between ``prompt_before`` and
    ``prompt_after``: ``prompt_before`` = BOS ... ``<im_start>``; ``prompt_after`` = ``<im_end>``
    ... up to, not including, the prompt's last token; ``tokens`` = [the prompt's last token,
    answer ..., EOS]; ``label_mask[t]`` whether ``tokens[t]`` is a label (LISA's targets), so
    ``label_mask[0]`` is False and the rest True."""
    prompt_before: list[int]
    prompt_after: list[int]
    tokens: list[int]
    label_mask: list[bool]


def prompt(question: str, answer: str) -> str:
    """The ``llava_v1`` conversation string with ``<image>`` written as
    ``<im_start><image><im_end>`` (LISA's ``use_mm_start_end``)."""
    text = (f"{SYSTEM}{SEP}{ROLES[0]}: {question}{SEP}{ROLES[1]}: {answer}{SEP2}")
    return text.replace(DEFAULT_IMAGE_TOKEN,
                        DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN)


def image_split(text: str, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """LLaVA's ``tokenizer_image_token`` for one image: (ids before, ids after) the image,
    the first with BOS."""
    chunks = text.split(DEFAULT_IMAGE_TOKEN)
    if len(chunks) != 2:
        raise ValueError(f"a LISA conversation holds exactly one {DEFAULT_IMAGE_TOKEN}; "
                         f"found {len(chunks) - 1} in {text!r}")
    return tokenizer.encode(chunks[0], add_bos=True), tokenizer.encode(chunks[1])


def tokenize(question: str, answer: str, tokenizer: Tokenizer) -> ConversationTokens:
    """``question`` (with one ``<image>``, as LISA's templates) and ``answer`` -> the pieces
    around the image (see :class:`ConversationTokens`), equal to LISA's ``input_ids`` split at the
    image placeholder, and its label positions.

    Raises ``ValueError`` (naming the conversation) where LISA's own check
    (``cur_len == total_len``) would fail, or the answer would start before the image.
    """
    text = prompt(question, answer)
    before, after = image_split(text, tokenizer)
    total = len(before) + 1 + len(after)
    assistant = f"{SEP}{ROLES[1]}: "
    turn = text[:-len(SEP2)]
    parts = turn.split(assistant)
    if len(parts) != 2:
        raise ValueError(f"{text!r}: expected one {assistant!r} separating question and answer")
    # LISA: instruction_len = len(tokenizer_image_token(parts[0] + sep)) - 2, labels from
    # 1 + instruction_len, and 1 + len(tokenizer_image_token(round)) must equal the total.
    instruction = sum(map(len, image_split(parts[0] + assistant, tokenizer))) + 1 - 2
    round_length = sum(map(len, image_split(turn, tokenizer))) + 1
    if 1 + round_length != total:
        raise ValueError(f"{text!r}: tokenized in LISA's rounds it has {1 + round_length} tokens, "
                         f"whole {total} (LISA's cur_len == total_len check)")
    first_label = 1 + instruction
    last_prompt = first_label - 1 - (len(before) + 1)   # index into `after`
    if last_prompt < 0:
        raise ValueError(f"{text!r}: the answer starts before the image")
    tokens = after[last_prompt:]
    return ConversationTokens(prompt_before=before, prompt_after=after[:last_prompt],
                              tokens=tokens, label_mask=[False] + [True] * (len(tokens) - 1))
