"""SentencePiece ``.model`` files (T5 ``spiece.model``, Gemma and Llama 2 ``tokenizer.model``).

Encoding is SentencePiece's own, the reference for these families. Special ids come from the
model's trainer spec: T5 pad 0 / eos 1 / unk 2 / no bos, Gemma pad 0 / eos 1 / bos 2 / unk 3,
Llama 2 unk 0 / bos 1 / eos 2 / no pad. Token spans come from SentencePiece's offset mapping
(``return_type='offset_mapping'``, sentencepiece >= 0.2.3), Unicode character offsets into the
original text, so normalization (T5's NFKC, whitespace folding) never shifts word alignment.
User-defined pieces (e.g. Gemma's ``<start_of_turn>``) are text to SentencePiece: they are matched
in the text and kept by ``decode``; only control pieces (pad, bos, eos) are special.
"""

from __future__ import annotations

import os

import sentencepiece as spm

from pixelllm.language.tokenizer import Tokenizer, TokenizerFileError


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file behind the :class:`Tokenizer` interface."""

    def __init__(self, model_path: str | os.PathLike):
        path = os.fspath(model_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"SentencePiece model not found: {path}")
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromFile(path)
        except (RuntimeError, OSError) as e:
            raise TokenizerFileError(
                f"{path}: not a SentencePiece model ({e}). Llama 3's original/tokenizer.model is "
                "a tiktoken file: load its tokenizer.json instead") from e
        if processor.eos_id() < 0:
            raise TokenizerFileError(f"{path}: the SentencePiece model defines no eos piece")
        self._processor = processor
        bos, eos, pad = processor.bos_id(), processor.eos_id(), processor.pad_id()
        super().__init__(path=path, vocab_size=processor.get_piece_size(),
                         bos_id=bos if bos >= 0 else None, eos_id=eos,
                         pad_id=pad if pad >= 0 else eos)

    def _encode(self, text: str) -> list[int]:
        return list(self._processor.encode(text))

    def _encode_with_offsets(self, text):
        mapping = self._processor.encode(text, return_type="offset_mapping")
        ids = list(mapping["ids"])
        return ids, list(mapping["offsets"]), [self._processor.is_control(i) for i in ids]

    def _decode(self, ids: list[int]) -> str:
        return self._processor.decode(ids)
