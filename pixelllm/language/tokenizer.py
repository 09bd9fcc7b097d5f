"""One interface over the language models' tokenizers, with word-to-token alignment.

Two backends implement :class:`Tokenizer`:

* :class:`~pixelllm.language.sentencepiece_tokenizer.SentencePieceTokenizer` reads SentencePiece
  ``.model`` files (T5 ``spiece.model``, Gemma and Llama 2 ``tokenizer.model``).
* :class:`~pixelllm.language.hf_tokenizer.HFTokenizer` reads Hugging Face ``tokenizer.json``
  files (Llama 3, Gemma 3) with the ``tokenizers`` library.

:func:`load_tokenizer` picks one from the file name. Special-token ids come from the files, so
each family keeps its own conventions (T5: pad 0 = decoder start, eos 1, no bos; Gemma: pad 0,
eos 1, bos 2; Llama 3: bos ``<|begin_of_text|>``, eos ``<|end_of_text|>`` or ``<|eot_id|>``).

Word alignment
--------------
PixelLLM ties every word of a Localized Narratives caption (and so its mouse-trace segment) to the
tokens of that word. Words are the whitespace-separated words of the text, exactly
``text.split()``. Token-to-word indices come from the character span in the original text that
each token was produced from (SentencePiece offset mapping, ``tokenizers`` offsets), never from
tokenizing words one at a time, which would change the tokens at word boundaries. The rule:

* a token belongs to the word holding the first non-whitespace character of its span;
* a token whose span holds no such character belongs to the next word. Such tokens are a lone
  space piece (``"▁"``, ``"Ġ"``, a byte-fallback ``<0x09>`` for a tab), SentencePiece's
  dummy-prefix ``"▁"`` (empty span), and the leading byte-fallback pieces of a character, which
  SentencePiece gives an empty span at the character's start. Both SentencePiece and byte-level
  BPE attach the space before a word to that word's first token, so a lone space token goes with
  the word it introduces;
* whitespace after the last word goes to the last word;
* a token spanning several words (only possible with pieces that cross whitespace) belongs to the
  first of them, and the words it swallows get no token of their own;
* special tokens (bos/eos added on request, special tokens matched in the text) get ``-1``, as
  does every token of a text without words.

The result is non-decreasing, and when no token crosses whitespace every word gets at least one
token.
"""

from __future__ import annotations

import abc
import bisect
import os
import re
from collections.abc import Iterable, Sequence

# `\S` in a str pattern is the complement of `str.isspace`, the same split as `str.split()`.
_WORD = re.compile(r"\S+")


class TokenizerFileError(ValueError):
    """A tokenizer file that cannot be read or lacks what the models need; names the file."""


def word_spans(text: str) -> list[tuple[int, int]]:
    """``[(begin, end)]`` character spans of ``text.split()``'s words."""
    return [m.span() for m in _WORD.finditer(text)]


def align_to_words(text: str, offsets: Sequence[tuple[int, int]],
                   special: Sequence[bool]) -> list[int]:
    """Word index of each token (see the module docstring for the rule).

    Args:
      text: the text that was tokenized.
      offsets: per token, its ``(begin, end)`` character span in ``text``.
      special: per token, whether it is a special token (which gets ``-1``).
    """
    spans = word_spans(text)
    ends = [end for _, end in spans]
    words = []
    for (begin, end), is_special in zip(offsets, special, strict=True):
        if is_special or not spans:
            words.append(-1)
            continue
        first_char = _WORD.search(text, begin, max(begin, end))
        anchor = first_char.start() if first_char else end
        words.append(min(bisect.bisect_right(ends, anchor), len(spans) - 1))
    return words


class Tokenizer(abc.ABC):
    """Text <-> token ids for one language model.

    Attributes:
      path: the file it was read from.
      vocab_size: one more than the largest id it can produce, special and added tokens included.
      bos_id: beginning-of-sequence id, ``None`` where the family has none (T5).
      eos_id: end-of-sequence id.
      pad_id: padding id; the file's pad token, else ``eos_id`` (padded positions are masked,
        so any id works, and eos always exists).
      stop_ids: ids at which :meth:`decode` stops: ``eos_id`` plus the extra end ids the files
        name (e.g. Llama 3's ``<|eot_id|>`` in ``generation_config.json``).
    """

    def __init__(self, *, path: str, vocab_size: int, bos_id: int | None, eos_id: int,
                 pad_id: int, stop_ids: Iterable[int] = ()):
        self.path = path
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.stop_ids = frozenset({eos_id, *stop_ids})

    @abc.abstractmethod
    def _encode(self, text: str) -> list[int]:
        """Ids of ``text`` without bos/eos."""

    @abc.abstractmethod
    def _encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]],
                                                       list[bool]]:
        """Ids of ``text`` without bos/eos, each token's character span and special flag."""

    @abc.abstractmethod
    def _decode(self, ids: list[int]) -> str:
        """Text of in-range ``ids``, special tokens left out."""

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``, optionally with bos first and eos last."""
        return self._wrap(self._encode(text), add_bos=add_bos, add_eos=add_eos)

    def encode_with_alignment(self, text: str, *, add_bos: bool = False,
                              add_eos: bool = False) -> tuple[list[int], list[int]]:
        """``(ids, word_index)``: ``ids == encode(text, ...)`` and ``word_index[j]`` is the index
        in ``text.split()`` of the word token ``j`` came from, ``-1`` for special tokens."""
        ids, offsets, special = self._encode_with_offsets(text)
        words = align_to_words(text, offsets, special)
        return (self._wrap(ids, add_bos=add_bos, add_eos=add_eos),
                self._wrap(words, add_bos=add_bos, add_eos=add_eos, marker=-1))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` up to the first stop id, special tokens left out.

        ``ids`` may be any iterable of integers (a list, a numpy row).
        """
        kept = []
        for token in ids:
            token = int(token)
            if token in self.stop_ids:
                break
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"token id {token} is outside the vocabulary "
                                 f"[0, {self.vocab_size}) of {self.path}")
            kept.append(token)
        return self._decode(kept)

    def decode_generated(self, ids: Iterable[int]) -> str:
        """:meth:`decode` of a model's output: ids past the tokenizer's vocabulary (the padding
        rows of the model's, e.g. T5's 32,100 ids of 32,128 rows, which an untrained model may
        pick) have no text."""
        return self.decode([token for token in ids if int(token) < self.vocab_size])

    def _wrap(self, seq: list[int], *, add_bos: bool, add_eos: bool,
              marker: int | None = None) -> list[int]:
        if add_bos and self.bos_id is None:
            raise ValueError(f"{self.path} defines no beginning-of-sequence token; "
                             "encode with add_bos=False")
        bos = self.bos_id if marker is None else marker
        eos = self.eos_id if marker is None else marker
        return [bos] * add_bos + list(seq) + [eos] * add_eos


# Original SentencePiece files first: a repository's tokenizer.json is converted from them.
_DIRECTORY_FILES = ("tokenizer.model", "spiece.model", "tokenizer.json")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer in ``path``: a SentencePiece ``*.model``, a Hugging Face ``*.json``, or a
    directory holding ``tokenizer.model``, ``spiece.model`` or ``tokenizer.json`` (first found)."""
    # Imported here because both backends import this module.
    from pixelllm.language.hf_tokenizer import HFTokenizer
    from pixelllm.language.sentencepiece_tokenizer import SentencePieceTokenizer

    path = os.fspath(path)
    if os.path.isdir(path):
        found = [name for name in _DIRECTORY_FILES if os.path.isfile(os.path.join(path, name))]
        if not found:
            raise FileNotFoundError(
                f"{path}: directory holds none of {', '.join(_DIRECTORY_FILES)}")
        path = os.path.join(path, found[0])
    if path.endswith(".model"):
        return SentencePieceTokenizer(path)
    if path.endswith(".json"):
        return HFTokenizer(path)
    raise ValueError(f"{path}: unknown tokenizer file type; expected a SentencePiece '.model' "
                     "or a Hugging Face 'tokenizer.json'")
