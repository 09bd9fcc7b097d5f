"""The ``question_answer`` task metric of ``pixelllm/train/evaluation.py``: each used slot's
generated answer against the slot's text, exact match after the VQA normalisation, one item per
(image, question, answer). A stand-in predictor (the ``predictors`` seam) "generates" answers
laid out by hand in the batch; the model is never run."""

import json

import jax
import numpy as np
import pytest
from configs import pixelllm as pixelllm_config
from flax import nnx

from pixelllm import batch as batch_lib
from pixelllm import sharding
from pixelllm.language.tokenizer import Tokenizer
from pixelllm.train import evaluation
from pixelllm.train.evaluation import EvalSource, TaskMetrics

CANVAS, SLOTS, CONTEXT, TEXT, EOS = 16, 2, 5, 4, 1
WORDS = ["<pad>", "</s>", "Question:", "Answer:", "How", "many?", "Color?", "Moving?",
         "Two.", "2", "Red", "red.", "Yes", "no", "Blue", "the", "dog", "Who?"]
SOURCE = EvalSource(task="question_answer", builder="llava_instructions/sharegpt4v_mix665k",
                    split="held_out")


class WordListTokenizer(Tokenizer):
    """Id ``i`` is ``WORDS[i]``; 0 pads (and starts texts, as T5), 1 ends."""

    def __init__(self):
        super().__init__(path="words", vocab_size=len(WORDS), bos_id=None, eos_id=EOS,
                         pad_id=0)

    def _encode(self, text):
        return [WORDS.index(word) for word in text.split()]

    def _encode_with_offsets(self, text):
        raise NotImplementedError

    def _decode(self, ids):
        return " ".join(WORDS[i] for i in ids if i > 1)


def _ids(text: str) -> list[int]:
    return [WORDS.index(word) for word in text.split()]


def qa_batch(examples, *, padding: int = 0) -> dict[str, np.ndarray]:
    """A batch of ``examples`` ``(image_id, [(question, answer, generated), ...])`` (at most
    SLOTS slots used), then ``padding`` all-zero examples. The generated answer of slot s
    rides in ``gt_text_tokens[s]`` (no BOS), where :func:`laid_out_answers` reads it."""
    total = len(examples) + padding
    sizes = batch_lib.Sizes(canvas=CANVAS, slots=SLOTS, context_length=CONTEXT,
                            text_length=TEXT, points_per_token=2, objects=SLOTS)
    out = {key: np.zeros(shape, dtype)
           for key, (shape, dtype) in batch_lib.batch_spec(sizes, total).items()}
    out[batch_lib.IMAGE_ID] = np.zeros((total,), np.int64)
    out[batch_lib.ORIGINAL_WH] = np.zeros((total, 2), np.int32)
    for i, (image_id, slots) in enumerate(examples):
        out[batch_lib.IMAGE_ID][i] = image_id
        out[batch_lib.ORIGINAL_WH][i] = (40, 30)
        out[batch_lib.VALID_WH][i] = (CANVAS, CANVAS * 3 // 4)
        for s, (question, answer, generated) in enumerate(slots):
            out[batch_lib.SLOT_MASK][i, s] = True
            context = [*_ids(f"Question: {question} Answer:"), EOS]
            out[batch_lib.CONTEXT_TOKENS][i, s, :len(context)] = context
            out[batch_lib.CONTEXT_MASK][i, s, :len(context)] = True
            text = [0, *_ids(answer), EOS]
            out[batch_lib.TEXT_TOKENS][i, s, :len(text)] = text
            out[batch_lib.TEXT_MASK][i, s, :len(text)] = True
            out[batch_lib.GT_TEXT_TOKENS][i, s, 1:len(_ids(generated)) + 2] = [
                *_ids(generated), EOS]
    return out


def laid_out_answers(model, batch, settings):
    """Stands in for ``inference.caption``: slot s "generates" ``gt_text_tokens[s]``."""
    del model, settings
    return {"tokens": batch[batch_lib.GT_TEXT_TOKENS][:, :SLOTS, 1:]}


BATCHES = [
    qa_batch([(100, [("How many?", "2", "Two."),      # matches only after normalisation
                     ("Color?", "Red", "red.")]),     # case and period
              (101, [("Moving?", "Yes", "no")])],     # a miss; slot 1 unused
             padding=1),
    qa_batch([(100, [("How many?", "2", "Two."),      # the padding repeat of image 100
                     ("Color?", "Red", "red.")]),
              (102, [("Color?", "Blue", "Blue"),      # equal as typed
                     ("Who?", "the dog", "dog")])]),  # the article is dropped
]


@pytest.fixture
def metrics(tmp_path):
    rules = sharding.rules_from_config(pixelllm_config.get_config("tiny").sharding.rules)
    return TaskMetrics(lambda: {"held": BATCHES}, {"held": SOURCE},
                       tokenizer=WordListTokenizer(),
                       mesh=sharding.make_mesh((1, 1, 1), jax.devices()[:1]), rules=rules,
                       workdir=tmp_path, predictors={"question_answer": laid_out_answers})


def test_exact_match_is_the_hand_computed_accuracy(metrics, tmp_path):
    # The predictor never reads the model: any module stands in for it.
    scalars = metrics(nnx.Linear(1, 1, rngs=nnx.Rngs(0)), 3)
    # Five items (the repeated image 100 counts once, the padding example and the unused
    # slot not at all), four of them equal after normalisation; as typed, only "Blue" is.
    assert scalars["held/num_items"] == 5
    assert scalars["held/num_duplicates_skipped"] == 2
    assert scalars["held/exact_match"] == pytest.approx(4 / 5)
    written = json.loads((tmp_path / "eval" / "3" / "held.json").read_text())
    assert written["task"] == "question_answer" and written["split"] == "held_out"
    assert written["metrics"]["exact_match"] == pytest.approx(0.8)


def test_the_items_are_the_slot_questions_and_answers():
    class Recorder:
        def __init__(self):
            self.items = []

        def add(self, *, item_ids, predictions, answers):
            self.items += zip(item_ids, predictions, answers)

    recorder = Recorder()
    batch = BATCHES[0]
    evaluation._add_answers(recorder, batch, laid_out_answers(None, batch, None),
                            evaluation._Texts(WordListTokenizer()))
    assert recorder.items == [
        (json.dumps([100, "Question: How many? Answer:", "2"]), "Two.", "2"),
        (json.dumps([100, "Question: Color? Answer:", "Red"]), "red.", "Red"),
        (json.dumps([101, "Question: Moving? Answer:", "Yes"]), "no", "Yes")]


def test_the_task_generates_with_each_slot_question_and_has_a_headline():
    # inference.caption over every slot, each with its own context (the question).
    assert evaluation.PREDICTORS["question_answer"] is evaluation._predict_caption
    table = evaluation.format_table({"held": {"exact_match": 0.8, "num_items": 5.0}},
                                    {"held": SOURCE})
    assert table.splitlines()[1].split() == ["held", "exact_match", "80.0", "-"]
