"""A SentencePiece tokenizer for the synthetic scenes' language, trained on their own texts.

No public tokenizer can be downloaded here, and the scenes speak a small closed language
(shapes, colours, sizes, positions, relations), so the demo trains its own: a SentencePiece
unigram model (the format of T5's ``spiece.model``, read by
:class:`pixelllm.language.sentencepiece_tokenizer.SentencePieceTokenizer`) on every text a
scene's files hold (narratives, referring expressions, region phrases) plus every task prompt
of the task table, so that prompts and targets tokenize into whole words or common pieces.
Special ids follow T5: pad 0 (also the decoder start), EOS 1, unk 2, no BOS.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

import sentencepiece as spm

from data_pipelines.synthetic.dataset import SyntheticImage
from data_pipelines.synthetic.language import region_phrase
from pixelllm import tasks

TOKENIZER_FILE = "spiece.model"
# Enough for every word of the language as one piece (about 110 words and prompts' words);
# SentencePiece lowers it when the texts hold fewer distinct pieces (hard_vocab_limit off).
DEFAULT_VOCAB_SIZE = 256


def texts(images: Sequence[SyntheticImage]) -> list[str]:
    """Every text the scenes' files hold, and every task prompt (templates without their
    ``{expression}`` / ``{question}`` fields)."""
    prompts = [task_prompt.format(expression="", question="")
               for task in tasks.TASKS.values() for task_prompt in task.prompts]
    corpus = list(prompts)
    for image in images:
        corpus.append(image.narration.caption)
        corpus.extend(expression for per_object in image.expressions for expression in per_object)
        corpus.extend(region_phrase(obj) for obj in image.scene.objects)
    return corpus


def train(corpus: Iterable[str], *, vocab_size: int = DEFAULT_VOCAB_SIZE) -> bytes:
    """The serialized SentencePiece model trained on ``corpus`` (deterministic: one thread)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(corpus)), model_writer=model, model_type="word",
        vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=1.0,
        num_threads=1, minloglevel=2, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        # Narratives are long; SentencePiece skips training sentences above this many bytes.
        max_sentence_length=16384)
    return model.getvalue()
