"""LLaVA-1.5 (Liu et al., "Improved Baselines with Visual Instruction Tuning"): the frozen
multimodal model F-LMM grounds, on this project's CLIP tower and decoder LM.

Data flow, N images each with one prompt and one caption::

    pixels [N, 336, 336, 3] --CLIP ViT-L/14-336, hidden state -2, CLS dropped--> [N, 576, 1024]
        --projector: linear_1 (1024 -> 4096) -> GELU (erf) -> linear_2 (4096 -> 4096)--> [N, 576, D]
    prefix [N, Pb + 576 + Pa] = embed(prompt before <image>) | image tokens | embed(prompt after
        <image>, without its last token)
    tokens [N, L] = [last prompt token, caption...] --language model--> logits, hidden, attention

**Splicing.** transformers' ``LlavaForConditionalGeneration`` expands the ``<image>`` placeholder
(``image_token_index`` 32000 in llava-hf's vocabulary of 32064) to 576 tokens and overwrites their
embeddings with the projected features. Here the prompt is cut at the placeholder instead
(:func:`split_prompt`): positions count valid inputs, so every input sits at the position
transformers gives it. The prompt's last token (``:`` of ``ASSISTANT:``) opens the text, as in
LISA: text position ``t`` then predicts text token ``t + 1``, so the logits at the caption's
positions predict the caption's next tokens, caption token ``i`` is text position
``CAPTION_START + i``, and :meth:`~pixelllm.language.interface.LanguageModel.prefill` with that
token as ``bos_id`` starts captioning from the prompt. The text rows of the attention then equal
transformers' rows from that token on, and the image tokens are key columns
``Pb .. Pb + 576`` (:meth:`Llava.image_columns`).

**Images** (F-LMM's ``CustomLlavaImageProcessor``, :func:`preprocess`): the longest side resized
to 336 (PIL bicubic on uint8, the other side ``int(side * 336 / longest)``), centred padding to a
square with CLIP's mean colour in 0-255 (``int(mean * 255)``: 122, 116, 104), no crop, then CLIP's
rescale and normalization; :class:`PadGeometry` says where the image lies so masks over the
canvas can be cropped back (:func:`pixelllm.models.flmm.mask_head.crop_to_image`).

**Checkpoints** (:func:`load`): the ``llava-hf/llava-1.5-7b-hf`` layout, under the names
transformers 5.x uses (``model.vision_tower.*``, ``model.multi_modal_projector.*``,
``model.language_model.*``, ``lm_head.weight``) or 4.x (``vision_tower.vision_model.*``,
``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head.weight``), one
strict key map over the whole model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from pixelllm.checkpoints import key_map
from pixelllm.checkpoints.assign import CheckpointMismatchError
from pixelllm.checkpoints.key_map import TRANSPOSE, Rule
from pixelllm.checkpoints.state_dict import checkpoint_file, read_state_dict
from pixelllm.encoders import clip
from pixelllm.language import decoder, hf_config
from pixelllm.language.interface import LanguageModel, TextOutput
from pixelllm.nn import layers, lora

IMAGE_TOKEN_INDEX = 32000  # llava-hf's "<image>"
# F-LMM's prompt: xtuner's vicuna template around "<image>\nPlease give me a description of the
# image.", BOS first (the tokenizer's special tokens), the caption's tokens right after.
PROMPT = "USER: <image>\nPlease give me a description of the image. ASSISTANT:"
CAPTION_START = 1  # text position of caption token 0 (text token 0 is the prompt's last token)
# F-LMM pads with int(x * 255) of CLIP's mean, before rescaling.
PAD_COLOUR = tuple(int(m * 255) for m in clip.PIXEL_MEAN)

# Vicuna-7B v1.5 as llava-hf/llava-1.5-7b-hf's text_config (LLaMA-2 layout, <image> and <pad>
# added to its 32000 tokens, rounded to 32064).
VICUNA_7B_V15 = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_layers=32,
                     num_heads=32, num_kv_heads=32, head_dim=128, norm_eps=1e-5,
                     rope_theta=10_000.0, max_position_embeddings=4096)
NAMED_CONFIGS = {
    "llava_1_5_7b": dict(vision=clip.NAMED_CONFIGS["vit_l14_336"], language_model=VICUNA_7B_V15),
}


class Projector(nnx.Module):
    """LLaVA-1.5's ``multi_modal_projector``: ``linear_2(gelu(linear_1(x)))`` (erf GELU).
    ``[..., vision_width] -> [..., width]``."""

    def __init__(self, *, vision_width: int, width: int, rngs: nnx.Rngs,
                 dtype: jnp.dtype | None = None, param_dtype: jnp.dtype = jnp.float32):
        common = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear_1 = layers.linear(vision_width, width, axes=(None, "mlp"), **common)
        self.linear_2 = layers.linear(width, width, axes=("mlp", "embed"), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=False))


class PadGeometry(NamedTuple):
    """Where the resized image lies in the square canvas the model sees, in canvas pixels
    (``(height, width)`` pairs): ``original_hw`` the input image, ``image_hw`` after resizing,
    ``pad_before`` the padding above and left of it, ``padded_size`` the canvas."""
    original_hw: tuple[int, int]
    image_hw: tuple[int, int]
    pad_before: tuple[int, int]
    padded_size: tuple[int, int]


def preprocess(image: np.ndarray, *, image_size: int = 336) -> tuple[np.ndarray, PadGeometry]:
    """``image [H, W, 3]`` uint8 RGB -> (``[image_size, image_size, 3]`` float32 CLIP input, its
    :class:`PadGeometry`), as F-LMM's ``CustomLlavaImageProcessor``."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"preprocess expects a uint8 RGB image [H, W, 3], received "
                         f"{image.dtype} {image.shape}")
    height, width = image.shape[:2]
    if height > width:
        resized_hw = (image_size, int(width * image_size / height))
    else:
        resized_hw = (int(height * image_size / width), image_size)
    resized = np.asarray(Image.fromarray(image).resize(resized_hw[::-1], Image.BICUBIC))
    canvas = np.empty((image_size, image_size, 3), np.uint8)
    canvas[:] = PAD_COLOUR
    top, left = (image_size - resized_hw[0]) // 2, (image_size - resized_hw[1]) // 2
    canvas[top:top + resized_hw[0], left:left + resized_hw[1]] = resized
    # transformers rescales in float64 and casts to float32 before normalizing in float32.
    scaled = (canvas.astype(np.float64) / 255.0).astype(np.float32)
    pixels = (scaled - np.asarray(clip.PIXEL_MEAN, np.float32)) / np.asarray(clip.PIXEL_STD,
                                                                               np.float32)
    return pixels, PadGeometry(original_hw=(height, width), image_hw=resized_hw,
                               pad_before=(top, left), padded_size=(image_size, image_size))


class PromptPieces(NamedTuple):
    """A prompt's token ids cut at its one ``<image>``: ``before`` it, ``after`` it up to the last
    token, and the ``last`` token (text token 0)."""
    before: list[int]
    after: list[int]
    last: int


def split_prompt(prompt_ids: Sequence[int], *, image_token_id: int = IMAGE_TOKEN_INDEX
                 ) -> PromptPieces:
    """Cuts tokenized ``prompt_ids`` (BOS first) at its single image placeholder."""
    ids = [int(i) for i in prompt_ids]
    count = ids.count(image_token_id)
    if count != 1:
        raise ValueError(f"the prompt holds {count} image tokens (id {image_token_id}); expected "
                         f"exactly one: {ids}")
    index = ids.index(image_token_id)
    if index == len(ids) - 1:
        raise ValueError(f"the prompt ends with its image token; a text token must follow: {ids}")
    return PromptPieces(before=ids[:index], after=ids[index + 1:-1], last=ids[-1])


class LlavaInputs(NamedTuple):
    """N images with one prompt and caption each.

    ``pixels [N, S, S, 3]``: :func:`preprocess`'s output.
    ``prompt_before [N, Pb]`` / ``prompt_before_mask``: BOS ... up to the image placeholder.
    ``prompt_after [N, Pa]`` / ``prompt_after_mask``: after the placeholder, without the last token.
    ``tokens [N, L]`` / ``token_mask``: the prompt's last token, then the caption (right-padded).
    """
    pixels: jax.Array
    prompt_before: jax.Array
    prompt_before_mask: jax.Array
    prompt_after: jax.Array
    prompt_after_mask: jax.Array
    tokens: jax.Array
    token_mask: jax.Array


def pack_inputs(pixels: np.ndarray, prompt: PromptPieces, captions: Sequence[Sequence[int]], *,
                max_caption_tokens: int) -> LlavaInputs:
    """One prompt for every image, ``captions`` (token ids, no BOS) right-padded to
    ``max_caption_tokens``. ``pixels [N, S, S, 3]``."""
    count = len(captions)
    if count != len(pixels):
        raise ValueError(f"{len(pixels)} images for {count} captions")
    too_long = [i for i, c in enumerate(captions) if len(c) > max_caption_tokens]
    if too_long:
        raise ValueError(f"captions {too_long} are longer than max_caption_tokens="
                         f"{max_caption_tokens}")
    tokens = np.zeros((count, 1 + max_caption_tokens), np.int32)
    token_mask = np.zeros(tokens.shape, bool)
    for i, caption in enumerate(captions):
        tokens[i, :1 + len(caption)] = [prompt.last, *caption]
        token_mask[i, :1 + len(caption)] = True
    repeat = lambda ids: np.tile(np.asarray(ids, np.int32)[None], (count, 1))
    return LlavaInputs(pixels=np.asarray(pixels, np.float32), prompt_before=repeat(prompt.before),
                       prompt_before_mask=np.ones((count, len(prompt.before)), bool),
                       prompt_after=repeat(prompt.after),
                       prompt_after_mask=np.ones((count, len(prompt.after)), bool),
                       tokens=tokens, token_mask=token_mask)


class Llava(nnx.Module):
    """LLaVA-1.5: see the module docstring.

    Args:
      vision_tower: a :class:`~pixelllm.encoders.clip.ClipVision` (LLaVA-1.5: ViT-L/14 at 336).
      language_model: a :class:`~pixelllm.language.interface.LanguageModel` (LLaVA-1.5: Vicuna
        v1.5, a :class:`~pixelllm.language.decoder.DecoderLM`; :func:`load` needs one).
      vision_layer: the tower's hidden state read (``vision_feature_layer``), CLS dropped.
    """

    def __init__(self, *, vision_tower: clip.ClipVision, language_model: LanguageModel,
                 vision_layer: int = -2, rngs: nnx.Rngs, dtype: jnp.dtype | None = None,
                 param_dtype: jnp.dtype = jnp.float32):
        self.vision_tower = vision_tower
        self.multi_modal_projector = Projector(
            vision_width=vision_tower.class_embedding.get_value().shape[0],
            width=language_model.width, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.language_model = language_model
        self.vision_layer = vision_layer

    @property
    def grid(self) -> tuple[int, int]:
        """The image tokens' ``(rows, columns)``: 24 x 24 for ViT-L/14 at 336."""
        return self.vision_tower.grid, self.vision_tower.grid

    @property
    def num_image_tokens(self) -> int:
        return self.vision_tower.grid ** 2

    def image_tokens(self, pixels: jax.Array) -> jax.Array:
        """``pixels [N, S, S, 3]`` -> projected image tokens ``[N, T, D]``."""
        return self.multi_modal_projector(
            self.vision_tower.patch_features(pixels, layer=self.vision_layer))

    def prefix(self, inputs: LlavaInputs) -> tuple[jax.Array, jax.Array]:
        """``(prefix [N, Pb + T + Pa, D], mask)``: the prompt with the image tokens spliced in."""
        before = self.language_model.embed(inputs.prompt_before)
        after = self.language_model.embed(inputs.prompt_after)
        image = self.image_tokens(inputs.pixels).astype(before.dtype)
        prefix = jnp.concatenate([before, image, after], axis=1)
        mask = jnp.concatenate([inputs.prompt_before_mask.astype(bool),
                                jnp.ones(image.shape[:2], bool),
                                inputs.prompt_after_mask.astype(bool)], axis=1)
        return prefix, mask

    def image_columns(self, inputs: LlavaInputs) -> tuple[int, int]:
        """``(start, stop)``: the image tokens' key columns in the attention (static)."""
        start = inputs.prompt_before.shape[1]
        return start, start + self.num_image_tokens

    @property
    def flmm_hidden_layers(self) -> range:
        """The ``hidden_layers`` F-LMM reads: transformers' ``hidden_states[-num_layers:]``,
        indices ``1 .. num_layers`` (every block's output, the last one after the final norm;
        :func:`~pixelllm.language.decoder.hidden_state_indices`)."""
        return range(1, self.language_model.config.num_layers + 1)

    def __call__(self, inputs: LlavaInputs, *, attention_layers: Sequence[int] = (),
                 hidden_layers: Sequence[int] = ()) -> TextOutput:
        """Teacher forcing of ``inputs.tokens`` after the image prompt: logits ``[N, L, V]``,
        final hidden ``[N, L, D]``, the requested layers' attention ``[N, H, L, K]`` over
        ``K = Pb + T + Pa + L`` keys, and the requested hidden states ``{index: [N, L, D]}`` at
        the text positions (``hidden_layers`` needs a
        :class:`~pixelllm.language.decoder.DecoderLM`; :func:`stack_hidden_states` lays them out
        for F-LMM's head)."""
        prefix, prefix_mask = self.prefix(inputs)
        # Only DecoderLM's forward takes hidden_layers; without them any LanguageModel serves.
        hidden = {"hidden_layers": hidden_layers} if hidden_layers else {}
        return self.language_model.forward(prefix=prefix, prefix_mask=prefix_mask,
                                           tokens=inputs.tokens, token_mask=inputs.token_mask,
                                           attention_layers=attention_layers, **hidden)


def stack_hidden_states(hidden_states: Mapping[int, jax.Array]) -> jax.Array:
    """``{index: [N, L, D]}`` (:attr:`TextOutput.hidden_states`) -> ``[N, L, layers, D]``, the
    layers in increasing index order: per text position the layer axis F-LMM's text projection
    mixes (:class:`~pixelllm.models.flmm.flmm.FlmmHeadInputs`' ``text_hidden [B, P, T, L, D]``
    once the phrase tokens are gathered)."""
    if not hidden_states:
        raise ValueError("no hidden states to stack: call the model with hidden_layers")
    return jnp.stack([hidden_states[i] for i in sorted(hidden_states)], axis=2)


def build(config: Mapping[str, Any], *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32,
          param_dtype: jnp.dtype = jnp.float32) -> Llava:
    """A :class:`Llava` from ``{"vision": ClipVision fields, "language_model": DecoderConfig
    fields}`` (e.g. ``NAMED_CONFIGS["llava_1_5_7b"]``); the decoder's own dtype fields apply
    to it."""
    tower = clip.ClipVision(**config["vision"], dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    language_model = decoder.DecoderLM(dict(config["language_model"]), rngs=rngs)
    return Llava(vision_tower=tower, language_model=language_model, rngs=rngs, dtype=dtype,
                 param_dtype=param_dtype)


def config_from_hf(config: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """``{"vision", "language_model", "image_token_index"}`` from a llava-hf ``config.json``.
    Settings this model does not follow raise naming ``source`` and the key."""
    for key, value in (("vision_feature_layer", -2), ("vision_feature_select_strategy", "default"),
                       ("projector_hidden_act", "gelu"), ("multimodal_projector_bias", True)):
        if config.get(key, value) != value:
            raise ValueError(f"{source}: {key}={config[key]!r} is not implemented; LLaVA-1.5 "
                             f"uses {value!r}")
    if "text_config" not in config or "vision_config" not in config:
        raise ValueError(f"{source}: a LLaVA config.json needs text_config and vision_config")
    text = {"model_type": "llama", **config["text_config"]}
    language = hf_config.language_model_config(text)
    if language["family"] != "llama":
        raise ValueError(f"{source}: text_config.model_type={text['model_type']!r}; LLaVA-1.5's "
                         "language model is a llama")
    return {"vision": clip.config_from_hf(config["vision_config"],
                                          source=f"{source}: vision_config"),
            "language_model": language["model"],
            "image_token_index": config.get("image_token_index", IMAGE_TOKEN_INDEX)}


# ----------------------------------------------------------------------------- checkpoints

# Where the vision tower's and projector's keys sit: transformers 5.x names first, then 4.x.
_TOWER_PREFIXES = ("model.vision_tower.", "model.vision_tower.vision_model.",
                   "vision_tower.vision_model.", "vision_tower.")
_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
# Buffers older transformers saved beside the weights.
_DROPPED = ("*embeddings.position_ids",)


def _find_prefix(state_dict: Mapping[str, np.ndarray], prefixes: Sequence[str], probe: str,
                 what: str, source: str) -> str:
    for prefix in prefixes:
        if prefix + probe in state_dict:
            return prefix
    tops = sorted({".".join(key.split(".")[:2]) for key in state_dict})
    raise CheckpointMismatchError(
        f"{source}: not a LLaVA checkpoint: no {what} key "
        f"({', '.join(p + probe for p in prefixes)}); names found: {tops[:10]}")


def key_rules(model: Llava, state_dict: Mapping[str, np.ndarray], *, source: str) -> list[Rule]:
    """The key map of a :class:`Llava` (with a :class:`~pixelllm.language.decoder.DecoderLM`)
    from a llava-hf state dict of either transformers layout."""
    tower = _find_prefix(state_dict, _TOWER_PREFIXES, "embeddings.patch_embedding.weight",
                         "vision tower", source)
    projector = _find_prefix(state_dict, _PROJECTOR_PREFIXES, "linear_1.weight", "projector",
                             source)
    text_rules, _ = decoder.key_rules(model.language_model.config, state_dict)
    projector_rules = [Rule(f"{projector}{name}.weight", f"multi_modal_projector/{name}/kernel",
                            TRANSPOSE) for name in ("linear_1", "linear_2")]
    projector_rules += [Rule(f"{projector}{name}.bias", f"multi_modal_projector/{name}/bias")
                        for name in ("linear_1", "linear_2")]
    return (key_map.prefixed(clip.key_rules(tower), target="vision_tower/") + projector_rules
            + key_map.prefixed(text_rules, target="language_model/"))


def load(model: Llava, state_dict: Mapping[str, np.ndarray], *, source: str) -> Llava:
    """Fills ``model``'s vision tower, projector and language-model base weights from a llava-hf
    state dict (in place, strictly: any key no rule takes, any weight the file lacks or of another
    shape raises :class:`CheckpointMismatchError` naming ``source`` and the file's keys, and
    nothing changes); returns it. LoRA factors and added token rows keep their values."""
    scan = model.language_model.config.scan_layers
    return key_map.load(model, state_dict, key_rules(model, state_dict, source=source),
                        source=source, drop=_DROPPED, wrt=lora.BASE_WEIGHTS,
                        stacked=("language_model/layers",) if scan else ())


def load_llava(checkpoint: str | Path, *, dtype: jnp.dtype = jnp.float32,
               param_dtype: jnp.dtype = jnp.float32) -> Llava:
    """A :class:`Llava` built from the ``config.json`` beside ``checkpoint`` (a file, folder or
    shard index, e.g. the ``llava-hf/llava-1.5-7b-hf`` folder) and filled from it."""
    source = str(checkpoint_file(checkpoint))
    config_path = Path(source).parent / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: no config.json beside {source}")
    config = config_from_hf(json.loads(config_path.read_text()), source=str(config_path))
    language = {**config["language_model"], "dtype": jnp.dtype(dtype).name,
                "param_dtype": jnp.dtype(param_dtype).name}
    model = nnx.eval_shape(lambda: build({**config, "language_model": language}, rngs=nnx.Rngs(0),
                                         dtype=dtype, param_dtype=param_dtype))
    return load(model, read_state_dict(checkpoint), source=source)
