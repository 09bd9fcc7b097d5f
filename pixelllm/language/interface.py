"""The interface every language model of the project implements (:class:`LanguageModel`).

PixelLLM and the model families built on it (LISA-style ``<SEG>`` tokens, F-LMM-style grounding
from word-image attention) talk to the language model only through this protocol; the two
implementations are :class:`~pixelllm.language.decoder.DecoderLM` (Llama, Gemma) and
:class:`~pixelllm.language.t5.T5` (Flan-T5).

The *prefix* is what conditions the text: e.g. visual tokens followed by the task prompt's token
embeddings, ``[N, P, D]`` with a mask ``[N, P]``. A decoder-only model reads ``[prefix | text]``
as one sequence whose positions count valid inputs only (``cumsum(mask) - 1``), so padding inside
the prefix leaves no gap and the KV-cached decoder sees the positions of teacher forcing. T5
encodes the prefix and decodes the text.

Text tokens are ``[BOS, w_1, ..., w_n, EOS, pad...]`` (T5's BOS is its decoder start id). At
position ``t`` the input is token ``t``: ``logits[:, t]`` predict token ``t + 1`` and
``hidden[:, t]`` is the state *of* token ``t``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import numpy as np
from flax import nnx


class TextOutput(NamedTuple):
    """Teacher-forced outputs over the text.

    ``logits``: float32 [N, L, V]; ``hidden``: [N, L, D] after the final norm, compute dtype;
    ``attention``: None, or ``{layer: float32 [N, H, L, K]}``, the post-softmax attention of the
    text queries over all K keys of that layer (decoder-only: self-attention over
    ``[prefix | text]``, K = P + L; T5: the decoder's cross-attention over the prefix, K = P).
    Masked keys get probability 0; every row sums to 1.
    ``hidden_states``: None, or ``{index: [N, L, D]}`` residual-stream states at the text
    positions, indexed as transformers' ``output_hidden_states`` (0 the input embeddings, the last
    after the final norm); only :class:`~pixelllm.language.decoder.DecoderLM` returns them, when
    its ``forward`` is given ``hidden_layers``.
    """
    logits: jax.Array
    hidden: jax.Array
    attention: dict[int, jax.Array] | None
    hidden_states: dict[int, jax.Array] | None = None


class DecodeStart(NamedTuple):
    """Where the loops of :mod:`pixelllm.language.decoding` start: the cache after the prefix and
    BOS, the logits for the first text token ``[N, V]``, that token's position ``[N]`` and BOS's
    hidden state ``[N, D]`` (what emits the first token, EOS included)."""
    cache: Any
    logits: jax.Array
    positions: jax.Array
    hidden: jax.Array


@runtime_checkable
class LanguageModel(Protocol):
    """A language model conditioned on a prefix of embeddings; see the module docstring."""

    @property
    def width(self) -> int:
        """The residual width D that prefix embeddings must have."""

    @property
    def vocab_size(self) -> int:
        """Tokens the model embeds and predicts, added token rows included."""

    def embed(self, tokens: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """``tokens: int [N, L]`` -> ``[N, L, D]`` in the compute dtype, ready for a prefix;
        ``rngs`` applies the model's input dropout where it has one."""

    def forward(self, *, prefix: jax.Array, prefix_mask: jax.Array, tokens: jax.Array,
                token_mask: jax.Array, rngs: nnx.Rngs | None = None,
                attention_layers: Sequence[int] = ()) -> TextOutput:
        """Teacher forcing of ``tokens [N, L]`` (``token_mask [N, L]``) after ``prefix [N, P, D]``
        (``prefix_mask [N, P]``); ``rngs`` enables dropout where the model has it;
        ``attention_layers`` selects the layers whose attention is returned."""

    def prefill(self, *, prefix: jax.Array, prefix_mask: jax.Array, bos_id: int,
                max_new_tokens: int) -> DecodeStart:
        """Runs the prefix and BOS into a cache with room for ``max_new_tokens`` more tokens."""

    def decode_step(self, tokens: jax.Array, positions: jax.Array,
                    cache: Any) -> tuple[jax.Array, jax.Array, Any]:
        """One token per sequence: ``tokens [N]`` at ``positions [N]`` -> (logits float32 [N, V],
        hidden [N, D], updated cache); :data:`pixelllm.language.decoding.StepFn`."""

    def add_token_rows(self, count: int) -> int:
        """Adds ``count`` trainable token rows after the vocabulary; returns the first new id."""

    def load_hf_weights(self, state_dict: Mapping[str, np.ndarray], *,
                        source: str) -> LanguageModel:
        """Loads a Hugging Face file's base weights in place, strictly; returns the model."""
