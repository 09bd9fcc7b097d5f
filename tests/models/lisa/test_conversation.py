"""LISA's conversations: the template strings, and the token pieces against LISA's own
tokenization (LLaVA's ``tokenizer_image_token`` and the target masking of LISA's
``collate_fn``, replicated below on a transformers tokenizer) with a tiny Llama-style
SentencePiece tokenizer that has LISA's added tokens."""

import pytest
import transformers

from pixelllm.language.hf_tokenizer import HFTokenizer
from pixelllm.models.lisa import checkpoint, conversation
from tests import llama_sentencepiece

IMAGE_TOKEN_INDEX, IGNORE_INDEX = -200, -100
CORPUS = ["Can you segment the red apple in this image?", "Please output segmentation mask.",
          "A chat between a curious human and an artificial intelligence assistant.",
          "The assistant gives helpful, detailed, and polite answers to the human's questions.",
          "USER: ASSISTANT: It is. Sure, the segmentation result is the food with most vitamin C",
          "What is the thing that keeps people dry in the rain? Please respond with it."]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """(transformers tokenizer as LISA sets it up, the project's reader of its tokenizer.json)."""
    root = tmp_path_factory.mktemp("lisa_tokenizer")
    llama_sentencepiece.write_model(root / "sp", CORPUS, vocab_size=360)
    # add_bos_token as LLaMA's tokenizer_config.json sets it; LISA loads it with use_fast=False.
    hf = transformers.LlamaTokenizer.from_pretrained(str(root / "sp"), add_bos_token=True)
    # LLaVA's <im_patch>, then LISA's train_ds.py additions, in its order.
    hf.add_tokens(conversation.DEFAULT_IMAGE_PATCH_TOKEN, special_tokens=True)
    hf.add_tokens("[SEG]")
    hf.add_tokens([conversation.DEFAULT_IM_START_TOKEN, conversation.DEFAULT_IM_END_TOKEN],
                  special_tokens=True)
    hf.save_pretrained(str(root / "lisa"))
    return hf, HFTokenizer(root / "lisa" / "tokenizer.json")


def lisa_tokenizer_image_token(prompt, tokenizer):
    """LLaVA's mm_utils.tokenizer_image_token."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    separated = [e for pair in zip(chunks, [[IMAGE_TOKEN_INDEX] * (offset + 1)] * len(chunks))
                 for e in pair][:-1]
    for x in separated:
        ids.extend(x[offset:])
    return ids


def lisa_ids_and_targets(question, answer, tokenizer):
    """LISA's collate_fn for one llava_v1 conversation (use_mm_start_end)."""
    text = (conversation.SYSTEM + " USER: " + question + " ASSISTANT: " + answer + "</s>")
    text = text.replace("<image>", "<im_start><image><im_end>")
    ids = lisa_tokenizer_image_token(text, tokenizer)
    target = list(ids)
    sep = " ASSISTANT: "
    cur_len = 1
    target[:cur_len] = [IGNORE_INDEX]
    for rou in text.split("</s>"):
        if rou == "":
            break
        parts = rou.split(sep)
        parts[0] += sep
        round_len = len(lisa_tokenizer_image_token(rou, tokenizer))
        instruction_len = len(lisa_tokenizer_image_token(parts[0], tokenizer)) - 2
        target[cur_len:cur_len + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * (len(target) - cur_len)
    assert cur_len == len(ids)
    return text, ids, target


CASES = [
    (conversation.SHORT_QUESTION_LIST[0].format(class_name="red apple"),
     conversation.ANSWER_LIST[0]),
    (conversation.LONG_QUESTION_LIST[1].format(
        sent="What is the thing that keeps people dry in the rain?"),
     conversation.ANSWER_LIST[3]),
    (conversation.SHORT_QUESTION_LIST[2].format(class_name="food with most vitamin C"),
     conversation.ANSWER_LIST[4]),
    (conversation.LONG_QUESTION_LIST[0].format(sent="Can you segment the apple?") + " "
     + conversation.EXPLANATORY_QUESTION_LIST[0], "Sure, [SEG]. It is red."),
]


@pytest.mark.parametrize("question, answer", CASES)
def test_pieces_equal_lisas_ids_split_at_the_image(tokenizers, question, answer):
    hf, ours = tokenizers
    text, ids, target = lisa_ids_and_targets(question, answer, hf)
    assert conversation.prompt(question, answer) == text
    pieces = conversation.tokenize(question, answer, ours)
    assert (pieces.prompt_before + [IMAGE_TOKEN_INDEX] + pieces.prompt_after + pieces.tokens
            == ids)
    assert pieces.prompt_before[0] == hf.bos_token_id
    assert pieces.prompt_before[-1] == hf.convert_tokens_to_ids("<im_start>")
    assert pieces.prompt_after[0] == hf.convert_tokens_to_ids("<im_end>")
    assert pieces.tokens[-1] == hf.eos_token_id
    # LISA's labels are exactly the text positions after the first: the answer and </s>.
    labelled = [t for t, is_label in zip(pieces.tokens, pieces.label_mask) if is_label]
    assert labelled == [t for t in target if t != IGNORE_INDEX]
    assert hf.decode(labelled) == answer + "</s>"
    assert hf.convert_tokens_to_ids("[SEG]") in labelled


def test_the_templates_are_lisas():
    assert conversation.SYSTEM.startswith("A chat between a curious human")
    assert conversation.ANSWER_LIST == ("It is [SEG].", "Sure, [SEG].", "Sure, it is [SEG].",
                                        "Sure, the segmentation result is [SEG].", "[SEG].")
    assert all(q.startswith("<image>\n") for q in conversation.SHORT_QUESTION_LIST
               + conversation.LONG_QUESTION_LIST)
    assert conversation.prompt("<image>\nq", "a") == (
        conversation.SYSTEM + " USER: <im_start><image><im_end>\nq ASSISTANT: a</s>")


def test_a_conversation_needs_one_image(tokenizers):
    with pytest.raises(ValueError, match="exactly one <image>; found 0"):
        conversation.tokenize("no image here", "[SEG].", tokenizers[1])


def test_lisas_seg_id_passes_the_converters_check(tokenizers):
    hf, ours = tokenizers
    seg = hf("[SEG]", add_special_tokens=False).input_ids[0]     # LISA's train_ds.py
    assert seg == hf.convert_tokens_to_ids("[SEG]")
    checkpoint.check_seg_token(ours, seg)
    with pytest.raises(ValueError, match="not as the model's seg_token_id"):
        checkpoint.check_seg_token(ours, seg - 1)
