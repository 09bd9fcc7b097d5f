"""Token rows added to a pretrained vocabulary (e.g. LISA's ``<SEG>``), kept apart from it.

The pretrained embedding (and output projection) stay ``FrozenParam`` and are never copied or
resized; the new rows are :class:`~pixelllm.nn.lora.AddedTokenParam` s, so an optimizer over
``nnx.Param`` trains them and nothing else of the vocabulary. Token ``V + i`` (``V`` the
pretrained vocabulary) embeds as row ``i``; logits gain one column per added row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pixelllm.nn import lora


class AddedTokens(nnx.Module):
    """``embedding: [n, D]``; ``head: [D, n]`` when the model's output projection is untied (tied
    models reuse ``embedding`` as they reuse their pretrained embedding)."""

    def __init__(self, embedding: jax.Array, head: jax.Array | None):
        self.embedding = lora.AddedTokenParam(embedding, logical_axes=(None, "embed"))
        self.head = None if head is None else lora.AddedTokenParam(head,
                                                                   logical_axes=("embed", None))

    @classmethod
    def extend(cls, existing: AddedTokens | None, count: int, *, base_embedding: jax.Array,
               base_head: jax.Array | None) -> AddedTokens:
        """``existing`` rows plus ``count`` new ones, initialised to the mean of the pretrained
        rows (``base_embedding [V, D]``, ``base_head [D, V]`` when untied) as transformers'
        ``resize_token_embeddings`` centres them, so a new token starts as an average word."""
        if count < 1:
            raise ValueError(f"add_token_rows needs count >= 1, got {count}")
        rows = jnp.repeat(base_embedding.mean(axis=0, keepdims=True), count, axis=0)
        columns = None if base_head is None else jnp.repeat(
            base_head.mean(axis=1, keepdims=True), count, axis=1)
        if existing is not None:
            rows = jnp.concatenate([existing.embedding.get_value(), rows], axis=0)
            if columns is not None:
                columns = jnp.concatenate([existing.head.get_value(), columns], axis=1)
        return cls(rows, columns)

    @property
    def count(self) -> int:
        return self.embedding.get_value().shape[0]

    def embed(self, base: jax.Array, tokens: jax.Array) -> jax.Array:
        """Rows of ``base [V, D]`` for ids ``< V`` and of the added rows above: ``[..., D]``."""
        vocab = base.shape[0]
        is_added = tokens >= vocab
        from_base = jnp.take(base, jnp.where(is_added, 0, tokens), axis=0)
        from_added = jnp.take(self.embedding.get_value(), jnp.where(is_added, tokens - vocab, 0),
                              axis=0)
        return jnp.where(is_added[..., None], from_added.astype(from_base.dtype), from_base)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits ``[..., n]`` of the added tokens for ``hidden [..., D]``."""
        kernel = (self.embedding.get_value().T if self.head is None else self.head.get_value())
        return jnp.einsum("...d,dn->...n", hidden, kernel.astype(hidden.dtype),
                          preferred_element_type=jnp.float32)


class AddedTokenRows:
    """``vocab_size`` and ``add_token_rows`` of the :class:`~pixelllm.language.interface.
    LanguageModel` interface, for a model with ``config.vocab_size``, a pretrained ``embedding``
    ``[V, D]``, an ``lm_head`` ``[D, V]`` (None when tied) and ``added_tokens`` (None at first)."""

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size + (self.added_tokens.count if self.added_tokens else 0)

    def add_token_rows(self, count: int) -> int:
        """``count`` new trainable token rows (and output columns when untied); returns the first
        new id. The pretrained embedding and head are left as they are."""
        first = self.vocab_size
        self.added_tokens = AddedTokens.extend(
            self.added_tokens, count, base_embedding=self.embedding.get_value(),
            base_head=None if self.lm_head is None else self.lm_head.get_value())
        return first

