"""Does a tokenizer fit a language model's vocabulary? Checked where the two meet.

A tokenizer whose ids reach past the model's embedding rows trains on garbage without an error:
the decoder's ``jnp.take`` fills NaN, T5 clamps to the last row. The batch contract refuses such
ids once they arrive (:func:`pixelllm.batch.check_token_ids`); :func:`check_vocabulary` refuses the
pair before any batch is built, naming both files.

The rule is one-sided: every id the tokenizer can produce must be a row of the model, i.e.
``tokenizer.vocab_size <= model_vocab_size``. A model whose vocabulary is larger than its
tokenizer's is normal and passes: T5's tokenizer has 32,100 ids (32,000 pieces and 100
``<extra_id_*>``) while its embedding has 32,128 rows, padded to a multiple of 128. Only the other
direction is an error, e.g. a Gemma tokenizer (256,000 ids) on a Llama 3 model (128,256 rows), or
a tokenizer with an added ``[SEG]`` token on a model that has not added the row for it
(``lm.add_token_rows``). (A smaller tokenizer of another family still passes: this check cannot
tell two vocabularies apart, only that one fits in the other.)
"""

from __future__ import annotations

from pixelllm.language.tokenizer import Tokenizer


def check_vocabulary(tokenizer: Tokenizer, model_vocab_size: int, *,
                     model_source: str, tokenizer_source: str | None = None) -> None:
    """Raises ``ValueError`` naming both sides when ``tokenizer`` can produce an id
    ``>= model_vocab_size``; returns ``None`` otherwise.

    A tokenizer smaller than the model's (padded) vocabulary is fine and does not raise (e.g.
    T5: 32,100 tokenizer ids, 32,128 embedding rows): see the module docstring.

    Args:
      tokenizer: the tokenizer the input pipeline encodes with; ``tokenizer.vocab_size`` is one
        more than its largest id, special and added tokens (``[SEG]``, ``<extra_id_0>``) included.
      model_vocab_size: the ids the model embeds: ``lm.vocab_size`` of the
        :class:`~pixelllm.language.interface.LanguageModel` (the config's ``vocab_size``, which
        the loaders check against the checkpoint's embedding rows, plus added token rows).
      model_source: where ``model_vocab_size`` comes from, for the message (the checkpoint file
        or ``config.json``, the config field).
      tokenizer_source: the tokenizer's file for the message; default ``tokenizer.path``.
    """
    if tokenizer.vocab_size <= model_vocab_size:
        return
    source = tokenizer_source or tokenizer.path
    beyond = tokenizer.vocab_size - model_vocab_size
    raise ValueError(
        f"tokenizer {source} does not fit the language model: it has {tokenizer.vocab_size} ids "
        f"(special and added tokens included), the model embeds {model_vocab_size} "
        f"({model_source}); the {beyond} id(s) {model_vocab_size}..{tokenizer.vocab_size - 1} "
        "would index past the embedding. Use the model's own tokenizer, or give the model the "
        f"rows of the tokens added to the tokenizer (lm.add_token_rows({beyond}))")
