"""Activation functions by the names language-model configs use (Hugging Face's ``ACT2FN``)."""

from __future__ import annotations

from collections.abc import Callable

import jax

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    # transformers' "gelu": the exact erf form.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    # The tanh approximation: transformers' "gelu_new" (T5's gated-gelu) and
    # "gelu_pytorch_tanh" (Gemma) compute the same function.
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


def activation(name: str, *, field: str = "activation") -> Callable[[jax.Array], jax.Array]:
    """The function called ``name``; an unknown name raises naming the config ``field``."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{field}={name!r} is not an activation; choose from {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]
