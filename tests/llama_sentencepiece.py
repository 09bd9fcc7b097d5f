"""A tiny Llama-style SentencePiece model for the tests of the Llama-based families (LISA,
F-LMM): BPE with byte fallback, ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, no padding piece, the
dummy-prefix space and no whitespace normalisation, as LLaMA's ``tokenizer.model``."""

import io
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm


def write_model(folder: Path, corpus: Sequence[str], *, vocab_size: int,
                hard_vocab_limit: bool = True) -> Path:
    """Trains on ``corpus`` (repeated 20 times) and writes ``folder/tokenizer.model`` (the name
    ``transformers.LlamaTokenizer.from_pretrained(folder)`` reads); returns the file."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(corpus) * 20), model_writer=model, minloglevel=2,
        num_threads=1, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=hard_vocab_limit, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path
