"""Frozen pretrained weights and LoRA adapters.

PixelLLM keeps its language model frozen and trains low-rank adapters (Hu et al., 2021):
``y = x W + scale * (x A) B`` with ``A: [in, r]`` random, ``B: [r, out]`` zero, so step 0 equals
the base model.

LoRA dropout (``LoRASettings.dropout``, PEFT's ``lora_dropout``; LISA trains with 0.05) drops the
adapter branch's input only, as PEFT's ``lora.Linear.forward``:
``y = x W + scale * (dropout(x) A) B``, inverted dropout with an independent mask per element and
per call. It is active only when the caller passes ``rngs`` (training); without it, or at rate 0,
the layer is deterministic. The frozen base branch never sees the mask.

Variable types decide what trains:

* :class:`FrozenParam` holds pretrained weights. It subclasses ``nnx.Variable`` and **not**
  ``nnx.Param``, so ``nnx.Optimizer(model, tx, wrt=nnx.Param)``, ``nnx.grad(..., wrt=nnx.Param)``
  or ``nnx.state(model, nnx.Param)`` never see it: no gradient, no optimizer state, no update.
* LoRA factors are ``nnx.LoRAParam`` (a subclass of ``nnx.Param``): trainable by default.
  Select them alone with ``nnx.state(model, nnx.LoRAParam)``.
* :class:`AddedTokenParam` holds embedding (and output) rows of tokens added after pretraining
  (e.g. LISA's ``<SEG>``): trainable ``nnx.Param`` s that no pretrained file provides.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from pixelllm.checkpoints import assign as assign_lib
from pixelllm.checkpoints.safetensors_file import read_safetensors
from pixelllm.nn.dropout import inverted_dropout


class FrozenParam(nnx.Variable):
    """A pretrained weight that never trains (deliberately not an ``nnx.Param``)."""


class AddedTokenParam(nnx.Param):
    """Embedding or output rows of tokens added to a pretrained vocabulary; trained."""


# What a pretrained base-model file provides: every weight except the adapters and added tokens.
BASE_WEIGHTS = nnx.All(assign_lib.WEIGHTS, nnx.Not(nnx.Any(nnx.LoRAParam, AddedTokenParam)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRASettings:
    """Adapters on the projections named in ``targets``; ``rank`` 0 means none; the update is
    scaled by ``alpha / rank`` (PEFT convention); ``dropout`` is the rate of the adapters' input
    dropout (PEFT's ``lora_dropout``, applied only when ``rngs`` is passed). Each model checks
    ``targets`` against the projections it has (:meth:`check_targets`)."""
    rank: int = 0
    alpha: float = 1.0
    targets: tuple[str, ...] = ("q", "v")
    dropout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 0:
            raise ValueError(f"lora.rank must be >= 0, got {self.rank}")
        check_dropout(self.dropout, field="lora.dropout")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, object] | LoRASettings | None) -> LoRASettings:
        """From a config's ``lora`` sub-dict (``rank``, ``alpha``, ``targets``, ``dropout``);
        None: no adapters."""
        if isinstance(mapping, cls):
            return mapping
        values = dict(mapping.to_dict() if hasattr(mapping, "to_dict") else mapping or {})
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"unknown lora settings {unknown}; expected {', '.join(fields)}")
        return cls(**values)

    def check_targets(self, allowed: Sequence[str]) -> None:
        unknown = sorted(set(self.targets) - set(allowed))
        if unknown:
            raise ValueError(f"unknown LoRA targets {unknown}; choose from {tuple(allowed)}")

    def rank_of(self, name: str) -> int:
        return self.rank if name in self.targets else 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


def check_dropout(rate: float, *, field: str = "dropout") -> float:
    """Returns ``rate`` if it is a dropout rate in ``[0, 1)``; otherwise raises naming ``field``."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{field} must be in [0, 1), got {rate}")
    return rate


def weight(value: jax.Array, axes: tuple[str | None, ...], *, frozen: bool) -> nnx.Variable:
    """A ``FrozenParam`` or a trainable ``nnx.Param`` carrying logical axes."""
    if len(axes) != value.ndim:
        raise ValueError(f"logical axes {axes} do not match shape {value.shape}")
    return (FrozenParam if frozen else nnx.Param)(value, logical_axes=tuple(axes))


class LoRALinear(nnx.Module):
    """A dense layer ``x @ kernel (+ bias)`` with an optional rank-``rank`` adapter.

    Shapes: ``x: [..., in_features] -> [..., out_features]``; ``kernel: [in, out]``,
    ``lora_a: [in, rank]``, ``lora_b: [rank, out]``. ``scale`` multiplies the adapter output
    (PEFT uses ``alpha / rank``; the official PixelLLM uses a plain 2.0). ``dropout`` is the rate
    of the adapter's input dropout (see the module docstring), used when a call passes ``rngs``.
    """

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
                 rngs: nnx.Rngs, rank: int = 0, scale: float = 1.0, dropout: float = 0.0,
                 use_bias: bool = False, frozen: bool = True, dtype: jnp.dtype | None = None,
                 param_dtype: jnp.dtype = jnp.float32,
                 kernel_init: nnx.Initializer = nnx.initializers.lecun_normal()):
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.scale, self.dtype = rank, scale, dtype
        self.dropout = check_dropout(dropout)
        self.kernel = weight(kernel_init(rngs.params(), (in_features, out_features), param_dtype),
                             axes, frozen=frozen)
        self.bias = (weight(jnp.zeros((out_features,), param_dtype), (axes[1],), frozen=frozen)
                     if use_bias else None)
        if rank > 0:
            # PEFT's default: kaiming_uniform(a=sqrt(5)) on A, i.e. U(-1/sqrt(in), 1/sqrt(in)).
            bound = 1.0 / math.sqrt(in_features)
            self.lora_a = nnx.LoRAParam(
                jax.random.uniform(rngs.params(), (in_features, rank), param_dtype, -bound, bound),
                logical_axes=(axes[0], None))
            self.lora_b = nnx.LoRAParam(jnp.zeros((rank, out_features), param_dtype),
                                        logical_axes=(None, axes[1]))
        else:
            self.lora_a = self.lora_b = None

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """``x: [..., in]`` -> ``[..., out]``; ``rngs`` (training) enables the adapter's input
        dropout: a layer with an adapter and a nonzero rate draws one key from
        ``rngs.dropout()`` per call, others draw none."""
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        y = x @ self.kernel.get_value().astype(dtype)
        if self.lora_a is not None:
            y = y + self.scale * ((self._dropout(x, rngs) @ self.lora_a.get_value().astype(dtype))
                                  @ self.lora_b.get_value().astype(dtype))
        if self.bias is not None:
            y = y + self.bias.get_value().astype(dtype)
        return y

    def _dropout(self, x: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        """Inverted dropout of the adapter's input (``x`` as given to the base branch, which
        keeps the undropped ``x``): each element kept with probability ``1 - dropout`` and
        scaled by ``1 / (1 - dropout)``, as ``torch.nn.Dropout`` in PEFT's ``lora_dropout``."""
        if rngs is None or self.dropout == 0.0:
            return x
        return inverted_dropout(x, self.dropout, rngs.dropout())


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Folds every adapter into its base kernel (in place) and resets ``lora_b`` to zero, so the
    model computes the same function and its base weights can be exported alone."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, LoRALinear) and module.lora_a is not None:
            kernel = module.kernel.get_value()
            delta = module.scale * (module.lora_a.get_value() @ module.lora_b.get_value())
            module.kernel.set_value((kernel + delta).astype(kernel.dtype))
            module.lora_b.set_value(jnp.zeros_like(module.lora_b.get_value()))
    return model


def lora_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
    """The adapter weights alone, ``{"nnx/path": array}`` (a few MB even for a 3B model)."""
    return {"/".join(map(str, path)): np.asarray(v.get_value())
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}


def save_lora(model: nnx.Module, path: str | Path) -> None:
    """Writes the adapter weights alone to a ``.safetensors`` file."""
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in lora_arrays(model).items()},
                                str(path))


def load_lora(model: nnx.Module, path: str | Path) -> None:
    """Reads adapters written by :func:`save_lora` into ``model``; keys and shapes must match."""
    load_lora_arrays(model, read_safetensors(path), source=str(path))


def load_lora_arrays(model: nnx.Module, arrays: Mapping[str, np.ndarray], *, source: str) -> None:
    """Loads adapter weights saved by :func:`lora_arrays`; keys and shapes must match exactly."""
    assign_lib.assign(model, arrays, source=source, wrt=nnx.LoRAParam)
