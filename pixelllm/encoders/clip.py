"""CLIP ViT vision tower (LLaVA's and LISA's image encoder) and its checkpoint converter.

The architecture is Hugging Face transformers' ``CLIPVisionModel`` (OpenAI CLIP): a patch
embedding convolution without bias, a class embedding, a learned position embedding over the
model's grid, ``pre_layrnorm``, pre-LN encoder layers of

* multi-head self-attention with biased ``q``, ``k``, ``v`` and output projections, scores
  scaled by ``head_dim ** -0.5``;
* an MLP ``fc1 -> quick_gelu -> fc2`` (``x * sigmoid(1.702 x)``);

and ``post_layernorm``, applied only to the pooled class token. LLaVA and LISA read the output of
the second-to-last layer without the class token (``mm_vision_select_layer=-2``,
``select_feature="patch"``): :meth:`ClipVision.patch_features` is that entry, and it runs only
the layers it needs. ``post_layernorm`` serves :meth:`ClipVision.__call__`'s pooled output and
is kept so released files load strictly.

Inputs are images of exactly ``image_size`` pixels, normalized with :func:`normalize`. Sizing
the image is the caller's: ``CLIPImageProcessor`` (what LISA uses) resizes the shortest side to
the model's size (PIL bicubic on uint8) and center-crops; :func:`preprocess` does the same steps
with torch-exact float resizing, so its pixels may differ from the processor's by rounding.

Checkpoints: :func:`load` reads a ``CLIPVisionModel`` or ``CLIPVisionModelWithProjection`` file
(keys ``vision_model.embeddings.patch_embedding.weight`` ... as transformers 4.x writes them, or
without the ``vision_model.`` prefix as transformers 5.x does) and a whole ``CLIPModel`` file
such as ``openai/clip-vit-large-patch14`` (its text tower, projections and ``logit_scale`` are
ignored). :func:`config_from_hf` turns a ``config.json`` into :class:`ClipVision` fields and
:func:`load_clip` reads a file or folder and builds the model.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pixelllm import sharding
from pixelllm.checkpoints import key_map
from pixelllm.checkpoints.assign import CheckpointMismatchError, assign, param_shapes
from pixelllm.checkpoints.key_map import CONV, TRANSPOSE, Rule
from pixelllm.checkpoints.state_dict import checkpoint_file, read_state_dict
from pixelllm.nn.layers import conv, layer_norm, linear, param
from pixelllm.nn.resize import resize_2d

_log = logging.getLogger(__name__)

# OpenAI CLIP's normalization of 0-1 RGB (CLIPImageProcessor's image_mean / image_std).
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)

# The released OpenAI ViT-L/14 towers: openai/clip-vit-large-patch14 and its -336 sibling.
NAMED_CONFIGS = {
    "vit_l14_224": dict(width=1024, depth=24, heads=16, mlp_dim=4096, patch_size=14,
                        image_size=224, layer_norm_eps=1e-5),
    "vit_l14_336": dict(width=1024, depth=24, heads=16, mlp_dim=4096, patch_size=14,
                        image_size=336, layer_norm_eps=1e-5),
}
# The released towers by (width, depth), to say which one a file of another size looks like.
_RELEASED = {(1024, 24): "ViT-L", (768, 12): "ViT-B", (1280, 32): "ViT-H"}

# transformers' CLIPVisionConfig defaults, which a config.json may leave out.
_HF_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                    hidden_act="quick_gelu", layer_norm_eps=1e-5)

# transformers initializes every Linear and embedding from normal(0.02)-like tables.
_INIT_STD = 0.02


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's GELU approximation ``x * sigmoid(1.702 x)`` (transformers' ``quick_gelu``)."""
    return x * jax.nn.sigmoid(1.702 * x)


def normalize(images: jax.Array) -> jax.Array:
    """``images: [N, H, W, 3]`` RGB in 0-255 -> CLIP's input (rescaled to 0-1, then
    standardized with :data:`PIXEL_MEAN` / :data:`PIXEL_STD`, as ``CLIPImageProcessor``)."""
    return (jnp.asarray(images, jnp.float32) / 255.0 - jnp.asarray(PIXEL_MEAN)) / jnp.asarray(
        PIXEL_STD)


def preprocess(images: jax.Array, *, image_size: int) -> jax.Array:
    """``images: [N, H, W, 3]`` RGB in 0-255 -> ``[N, image_size, image_size, 3]`` CLIP input.

    ``CLIPImageProcessor``'s steps: the shortest side resized to ``image_size`` (bicubic with
    antialias, the longer side ``int(image_size * long / short)``), a center crop, then
    :func:`normalize`. The resize is torch's float kernel, not PIL's on uint8, so pixels may
    differ from the processor's by its rounding.
    """
    _, h, w, _ = images.shape
    short, long = min(h, w), max(h, w)
    resized_long = int(image_size * long / short)
    out_hw = (image_size, resized_long) if h <= w else (resized_long, image_size)
    resized = resize_2d(jnp.asarray(images, jnp.float32), out_hw, mode="cubic", antialias=True)
    top, left = (out_hw[0] - image_size) // 2, (out_hw[1] - image_size) // 2
    return normalize(resized[:, top:top + image_size, left:left + image_size])


class Attention(nnx.Module):
    """Multi-head self-attention with biased ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``."""

    def __init__(self, *, width: int, heads: int, dtype: jnp.dtype | None,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.heads = heads
        init = nnx.initializers.normal(_INIT_STD)
        common = dict(kernel_init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = linear(width, width, axes=("embed", "heads"), **common)
        self.k_proj = linear(width, width, axes=("embed", "heads"), **common)
        self.v_proj = linear(width, width, axes=("embed", "heads"), **common)
        self.out_proj = linear(width, width, axes=("heads", "embed"), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x: [N, L, C]`` -> ``[N, L, C]``; scores scaled by ``head_dim ** -0.5``."""
        n, length, c = x.shape
        split = lambda y: y.reshape(n, length, self.heads, c // self.heads)
        out = jax.nn.dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)),
                                           split(self.v_proj(x)))
        return self.out_proj(out.reshape(n, length, c))


class Mlp(nnx.Module):
    """``fc2(quick_gelu(fc1 x))``."""

    def __init__(self, *, width: int, mlp_dim: int, dtype: jnp.dtype | None,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs):
        common = dict(kernel_init=nnx.initializers.normal(_INIT_STD), dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)
        self.fc1 = linear(width, mlp_dim, axes=("embed", "mlp"), **common)
        self.fc2 = linear(mlp_dim, width, axes=("mlp", "embed"), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(quick_gelu(self.fc1(x)))


class EncoderLayer(nnx.Module):
    """Pre-LN block: ``x + self_attn(layer_norm1 x)``, then ``x + mlp(layer_norm2 x)``."""

    def __init__(self, *, width: int, heads: int, mlp_dim: int, eps: float,
                 dtype: jnp.dtype | None, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm1 = layer_norm(width, eps=eps, **common)
        self.self_attn = Attention(width=width, heads=heads, **common)
        self.layer_norm2 = layer_norm(width, eps=eps, **common)
        self.mlp = Mlp(width=width, mlp_dim=mlp_dim, **common)

    def __call__(self, x: jax.Array, constrain) -> jax.Array:
        """``x: [N, L, C]``; ``constrain`` pins the residual stream's sharding."""
        x = constrain(x + self.self_attn(self.layer_norm1(x)))
        return constrain(x + self.mlp(self.layer_norm2(x)))


class ClipVisionOutput(NamedTuple):
    """What transformers' ``CLIPVisionModel`` returns: ``last_hidden_state: [N, 1+T, C]`` (class
    token first, no final norm) and ``pooled: [N, C]`` (``post_layernorm`` of the class token)."""
    last_hidden_state: jax.Array
    pooled: jax.Array


class ClipVision(nnx.Module):
    """CLIP ViT vision tower. ``pixels: [N, image_size, image_size, 3]`` normalized
    (:func:`normalize`); ``T = (image_size // patch_size) ** 2`` patch tokens.

    ``dtype`` is the compute dtype (bfloat16 on accelerators), ``param_dtype`` the storage
    dtype; LayerNorm statistics and the attention softmax run in float32 either way. With a
    ``mesh``, the residual stream is constrained to ``('batch', 'length', 'embed')`` under
    ``rules`` after the embedding and after every residual addition (as :class:`~pixelllm.
    encoders.eva02.Eva02`, which explains why).
    """

    def __init__(self, *, width: int, depth: int, heads: int, mlp_dim: int, patch_size: int,
                 image_size: int, layer_norm_eps: float = 1e-5,
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
                 mesh: Mesh | None = None, rules: sharding.Rules = sharding.DEFAULT_RULES,
                 rngs: nnx.Rngs):
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size "
                             f"{patch_size}")
        self.image_size, self.patch_size, self.depth = image_size, patch_size, depth
        self.grid = image_size // patch_size
        self.dtype = dtype
        self.mesh = mesh
        self.rules = sharding.rules_from_config(rules)
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        init = nnx.initializers.normal(_INIT_STD)
        self.patch_embedding = conv(3, width, (patch_size, patch_size),
                                    strides=(patch_size, patch_size), padding="VALID",
                                    use_bias=False, **common)
        self.class_embedding = param(init(rngs.params(), (width,), param_dtype), ("embed",))
        self.position_embedding = param(
            init(rngs.params(), (1 + self.grid * self.grid, width), param_dtype), (None, "embed"))
        self.pre_layernorm = layer_norm(width, eps=layer_norm_eps, **common)
        self.layers = nnx.List([
            EncoderLayer(width=width, heads=heads, mlp_dim=mlp_dim, eps=layer_norm_eps, **common)
            for _ in range(depth)])
        self.post_layernorm = layer_norm(width, eps=layer_norm_eps, **common)

    def _check_pixels(self, pixels: jax.Array) -> None:
        expected = (self.image_size, self.image_size, 3)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"ClipVision expects pixels [N, {self.image_size}, {self.image_size}, "
                             f"3] (NHWC, the model's image_size), received shape "
                             f"{tuple(pixels.shape)}")

    def _layer_count(self, layer: int) -> int:
        """How many encoder layers hidden state ``layer`` (transformers' ``hidden_states``
        index: 0 the embeddings, ``i`` layer ``i``'s output, negative from the end) has run."""
        if not -(self.depth + 1) <= layer <= self.depth:
            raise ValueError(f"layer={layer} is not a hidden state of a {self.depth}-layer "
                             f"tower; choose from {-(self.depth + 1)} to {self.depth}")
        return layer % (self.depth + 1)

    def hidden_state(self, pixels: jax.Array, *, layer: int) -> jax.Array:
        """``pixels: [N, H, W, 3]`` -> transformers' ``hidden_states[layer]``, ``[N, 1+T, C]``
        (class token first); runs only the layers up to ``layer``."""
        self._check_pixels(pixels)
        count = self._layer_count(layer)
        x = self.patch_embedding(jnp.asarray(pixels, self.dtype))
        n, _, _, c = x.shape
        x = x.reshape(n, -1, c)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (n, 1, c))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(x.dtype)
        constrain = functools.partial(sharding.constrain, logical_axes=("batch", "length", "embed"),
                                      mesh=self.mesh, rules=self.rules)
        x = constrain(self.pre_layernorm(x))
        for i in range(count):
            x = self.layers[i](x, constrain)
        return x

    def patch_features(self, pixels: jax.Array, *, layer: int = -2) -> jax.Array:
        """``pixels: [N, H, W, 3]`` -> ``[N, T, C]``: hidden state ``layer`` without the class
        token, LLaVA's ``select_feature="patch"`` (``layer=-2``: its ``mm_vision_select_layer``;
        the last layer is not run)."""
        return self.hidden_state(pixels, layer=layer)[:, 1:]

    def __call__(self, pixels: jax.Array) -> ClipVisionOutput:
        """``pixels: [N, H, W, 3]`` -> the whole tower's output (all layers, pooled class token)."""
        x = self.hidden_state(pixels, layer=-1)
        return ClipVisionOutput(last_hidden_state=x, pooled=self.post_layernorm(x[:, 0]))


# ----------------------------------------------------------------------------- converter

_TOWER = "vision_model."  # CLIPModel's and transformers 4.x CLIPVisionModel's prefix
# Layer-relative transformers name -> (nnx path relative to the layer, transform).
_LAYER_RULES = tuple(
    [(f"self_attn.{p}.weight", f"self_attn/{p}/kernel", TRANSPOSE)
     for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
    + [(f"self_attn.{p}.bias", f"self_attn/{p}/bias", key_map.KEEP)
       for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
    + [(f"mlp.{p}.weight", f"mlp/{p}/kernel", TRANSPOSE) for p in ("fc1", "fc2")]
    + [(f"mlp.{p}.bias", f"mlp/{p}/bias", key_map.KEEP) for p in ("fc1", "fc2")]
    + [(f"{n}.weight", f"{n}/scale", key_map.KEEP) for n in ("layer_norm1", "layer_norm2")]
    + [(f"{n}.bias", f"{n}/bias", key_map.KEEP) for n in ("layer_norm1", "layer_norm2")])
# What a CLIP file holds beside the vision tower: CLIPModel's text tower, both projections and
# the temperature; position_ids buffers older transformers saved.
_DROPPED = ("text_model.*", "text_projection.*", "visual_projection.*", "logit_scale",
            "*embeddings.position_ids")


def tower_prefix(state_dict: Mapping[str, np.ndarray], *, source: str) -> str:
    """``"vision_model."`` or ``""``: where the tower's keys sit in ``state_dict``."""
    for prefix in (_TOWER, ""):
        if prefix + "embeddings.patch_embedding.weight" in state_dict:
            return prefix
    tops = sorted({key.split(".", 1)[0] for key in state_dict})
    raise CheckpointMismatchError(
        f"{source}: not a CLIP vision checkpoint: no 'vision_model.embeddings.patch_embedding."
        f"weight' (CLIPModel, transformers 4.x) or 'embeddings.patch_embedding.weight' "
        f"(transformers 5.x CLIPVisionModel); top-level names {tops[:10]}")


def key_rules(prefix: str = _TOWER) -> list[Rule]:
    """The key map of a :class:`ClipVision` from tower keys under ``prefix``."""
    rules = [
        Rule("embeddings.patch_embedding.weight", "patch_embedding/kernel", CONV),
        Rule("embeddings.class_embedding", "class_embedding"),
        Rule("embeddings.position_embedding.weight", "position_embedding"),
        Rule("pre_layrnorm.weight", "pre_layernorm/scale"),
        Rule("pre_layrnorm.bias", "pre_layernorm/bias"),
        Rule("post_layernorm.weight", "post_layernorm/scale"),
        Rule("post_layernorm.bias", "post_layernorm/bias"),
    ]
    rules += [Rule(f"encoder.layers.{{i}}.{name}", f"layers/{{i}}/{path}", transform)
              for name, path, transform in _LAYER_RULES]
    return key_map.prefixed(rules, source=prefix)


def _size(width: int, depth: int, grid: int, patch: int) -> str:
    size = f"width {width}, depth {depth}, {grid}x{grid} positions"
    name = _RELEASED.get((width, depth))
    return f"{name}/{patch} at {grid * patch} ({size})" if name else f"a CLIP tower of {size}"


def _variant_hint(module: ClipVision, state_dict: Mapping[str, np.ndarray], prefix: str
                  ) -> str | None:
    """What the file looks like (e.g. ViT-L/14 at 224) when its width, depth or position grid
    differs from the model's."""
    patch = state_dict[prefix + "embeddings.patch_embedding.weight"]
    positions = state_dict.get(prefix + "embeddings.position_embedding.weight")
    if np.ndim(patch) != 4 or np.ndim(positions) != 2:  # the key listing says what is wrong
        return None
    layer = prefix + "encoder.layers."
    depth = 1 + max((int(k[len(layer):].split(".", 1)[0]) for k in state_dict
                     if k.startswith(layer) and k[len(layer):].split(".", 1)[0].isdigit()),
                    default=-1)
    grid = math.isqrt(np.shape(positions)[0] - 1)
    file_size = _size(np.shape(patch)[0], depth, grid, np.shape(patch)[-1])
    model_size = _size(module.class_embedding.get_value().shape[0], module.depth, module.grid,
                       module.patch_size)
    if file_size == model_size:
        return None
    return f"this looks like {file_size}; the model is {model_size}"


def load(module: ClipVision, state_dict: Mapping[str, np.ndarray], *, source: str) -> ClipVision:
    """Fills ``module`` (in place, strictly) from a CLIP vision or whole CLIP state dict; returns
    it. Text-tower tensors, projections and ``logit_scale`` are ignored (and logged). A mismatch
    names ``source``, the file's keys and, when sizes differ, what the file looks like."""
    prefix = tower_prefix(state_dict, source=source)
    params, dropped = key_map.apply_key_map(
        state_dict, key_rules(prefix), source=source, expected=param_shapes(module),
        drop=_DROPPED, hint=_variant_hint(module, state_dict, prefix))
    if dropped:
        _log.info("%s: ignored %d tensors not used by ClipVision: %s", source, len(dropped),
                  ", ".join(sorted(dropped)[:5]) + (", ..." if len(dropped) > 5 else ""))
    return assign(module, params, source=source)


def config_from_hf(config: Mapping, *, source: str) -> dict:
    """:class:`ClipVision` fields from a transformers ``config.json``: a ``CLIPModel``'s (its
    ``vision_config``) or a ``CLIPVisionConfig``'s; absent fields take transformers' defaults.
    A field this tower cannot follow (another activation, channel count, a non-square image)
    raises naming ``source`` and the field."""
    is_clip_model = "vision_config" in config
    vision = {**_HF_DEFAULTS, **((config["vision_config"] or {}) if is_clip_model else config)}
    where = f"{source}: " + ("vision_config." if is_clip_model else "")
    if vision["hidden_act"] != "quick_gelu":
        raise ValueError(f"{where}hidden_act={vision['hidden_act']!r}: ClipVision implements "
                         "OpenAI CLIP's 'quick_gelu' only")
    if vision["num_channels"] != 3:
        raise ValueError(f"{where}num_channels={vision['num_channels']}: ClipVision reads RGB (3)")
    sizes = {}
    for field in ("image_size", "patch_size"):
        value = vision[field]
        pair = tuple(value) if isinstance(value, (list, tuple)) else (value, value)
        if len(pair) != 2 or pair[0] != pair[1]:
            raise ValueError(f"{where}{field}={value!r}: ClipVision is square")
        sizes[field] = int(pair[0])
    return dict(width=vision["hidden_size"], depth=vision["num_hidden_layers"],
                heads=vision["num_attention_heads"], mlp_dim=vision["intermediate_size"],
                layer_norm_eps=float(vision["layer_norm_eps"]), **sizes)


def load_clip(checkpoint: str | Path | Mapping[str, np.ndarray], *,
              config: Mapping | None = None, dtype: jnp.dtype = jnp.float32,
              param_dtype: jnp.dtype = jnp.float32) -> ClipVision:
    """A :class:`ClipVision` filled from a public checkpoint (file, folder, shard index or state
    dict), e.g. the ``openai/clip-vit-large-patch14`` folder.

    ``config``: the model fields (e.g. ``NAMED_CONFIGS["vit_l14_224"]``); None reads the
    ``config.json`` beside the checkpoint (:func:`config_from_hf`).
    """
    is_dict = isinstance(checkpoint, Mapping)
    source = "CLIP state dict" if is_dict else str(checkpoint_file(checkpoint))
    if config is None:
        if is_dict:
            raise ValueError(f"{source}: pass config= (e.g. NAMED_CONFIGS['vit_l14_224']); a "
                             "state dict has no config.json")
        config_path = Path(source).parent / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: no config.json beside {source}; pass config= "
                                    f"(e.g. NAMED_CONFIGS['vit_l14_224'])")
        config = config_from_hf(json.loads(config_path.read_text()), source=str(config_path))
    state_dict = checkpoint if is_dict else read_state_dict(checkpoint)
    try:
        model = nnx.eval_shape(lambda: ClipVision(**config, dtype=dtype, param_dtype=param_dtype,
                                                  rngs=nnx.Rngs(0)))
    except ValueError as e:  # sizes meant for the file that build no model
        raise CheckpointMismatchError(f"{source}: no ClipVision of these sizes: {e}") from e
    return load(model, state_dict, source=source)
