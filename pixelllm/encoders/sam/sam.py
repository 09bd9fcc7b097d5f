"""Segment Anything as one module: image encoder + prompt encoder + mask decoder, and its loader.

PixelLLM keeps all three frozen: the image encoder gives half of the fused visual features, the
prompt encoder embeds location prompts, and the mask decoder turns a predicted box into a mask.

Checkpoints: the original ``sam_vit_{h,l,b}_*.pth`` (flat keys ``image_encoder.*``,
``prompt_encoder.*``, ``mask_decoder.*``) or a Hugging Face ``SamModel`` (``vision_encoder.*``,
``prompt_encoder.*``, ``mask_decoder.*``, ``shared_image_embedding.*``). :func:`load` fills a built
:class:`Sam` from such a state dict (the family loader convention ``load(module, state_dict, *,
source)``); :func:`load_sam` reads a ``.pth``/``.bin``/``.safetensors`` file, sharded index or
folder, builds the model from a config or from the file's own shapes, at any input size, and
loads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from pixelllm.checkpoints import key_map
from pixelllm.checkpoints.assign import CheckpointMismatchError, stack_depth, stored_shape
from pixelllm.checkpoints.state_dict import state_dict_and_source
from pixelllm.encoders.sam import image_encoder as image_encoder_lib
from pixelllm.encoders.sam import mask_decoder as mask_decoder_lib
from pixelllm.encoders.sam import prompt_encoder as prompt_encoder_lib
from pixelllm.nn.resize import resize_matrix, window_resize_matrix

# SAM normalizes 0-255 RGB with these (segment_anything's Sam.pixel_mean / pixel_std).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

# Top-level key prefixes of each checkpoint layout: (image encoder, prompt encoder, mask decoder).
_PREFIXES = {
    "segment_anything": ("image_encoder.", "prompt_encoder.", "mask_decoder."),
    "transformers": ("vision_encoder.", "prompt_encoder.", "mask_decoder."),
}
_BLOCKS = {"segment_anything": "blocks", "transformers": "layers"}
# The two-way blocks' LayerNorm eps of each release: torch's default in segment_anything, 1e-6 in
# the Hugging Face port. The one place the eps follows the file (see `load`).
_MASK_DECODER_EPS = {"segment_anything": 1e-5, "transformers": 1e-6}
# Both releases build the image encoder's LayerNorms with 1e-6.
_IMAGE_ENCODER_EPS = 1e-6
# The released image encoders, to say which one a file of another size looks like.
_RELEASED = {(768, 12): "vit_b", (1024, 24): "vit_l", (1280, 32): "vit_h"}


def normalize(images: jax.Array, padding_mask: jax.Array | None = None) -> jax.Array:
    """``images: [B, H, W, 3]`` RGB in 0-255 -> SAM's normalized input.

    ``padding_mask: [B, H, W]`` (True on real pixels) zeroes the padding after normalizing, as
    SAM pads normalized images with zeros.
    """
    out = (images - jnp.asarray(PIXEL_MEAN)) / jnp.asarray(PIXEL_STD)
    if padding_mask is not None:
        out = jnp.where(padding_mask[..., None], out, 0.0)
    return out


def postprocess_masks(low_res: jax.Array, *, input_size: int, resized_hw: jax.Array,
                      original_hw: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """LISA's (SAM's) ``postprocess_masks``: bilinear to ``input_size`` (SAM's canvas, 1024),
    crop to the resized image ``resized_hw``, bilinear to ``original_hw`` (torch
    ``F.interpolate``, ``align_corners=False``).

    ``low_res [B, M, h, w]``, ``resized_hw, original_hw: int [B, 2]`` -> float32
    ``[B, M, *out_hw]`` with the image on ``[:H0, :W0]`` and zeros past it (``out_hw`` static, at
    least every ``original_hw``). The three steps are linear per axis, so each axis is one
    ``[out, h]`` matrix per image.
    """
    low_res = low_res.astype(jnp.float32)
    height, width = low_res.shape[-2:]
    axes = []
    for axis, (low, out) in enumerate(((height, out_hw[0]), (width, out_hw[1]))):
        upscale = jnp.asarray(resize_matrix(low, input_size, "linear", False), jnp.float32)
        crop = jax.vmap(lambda valid, size: window_resize_matrix(
            0, valid, size, in_size=input_size, out_size=out))(
            resized_hw[:, axis], original_hw[:, axis])
        axes.append(jnp.einsum("boi,il->bol", crop, upscale, precision=jax.lax.Precision.HIGHEST))
    return jnp.einsum("bYh,bmhw,bXw->bmYX", axes[0], low_res, axes[1],
                      precision=jax.lax.Precision.HIGHEST)


class Sam(nnx.Module):
    """The three SAM parts; fields are the ``model`` sub-configs of ``configs/sam.py``."""

    def __init__(self, *, image_encoder: Mapping, prompt_encoder: Mapping, mask_decoder: Mapping,
                 dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.image_encoder = image_encoder_lib.SamImageEncoder(**image_encoder, dtype=dtype,
                                                               rngs=rngs)
        img_size, patch = image_encoder["img_size"], image_encoder["patch_size"]
        self.prompt_encoder = prompt_encoder_lib.SamPromptEncoder(
            **prompt_encoder, image_embedding_size=(img_size // patch, img_size // patch),
            input_image_size=(img_size, img_size), dtype=dtype, rngs=rngs)
        self.mask_decoder = mask_decoder_lib.SamMaskDecoder(**mask_decoder, dtype=dtype, rngs=rngs)

    @classmethod
    def from_config(cls, model_config: ml_collections.ConfigDict, *, rngs: nnx.Rngs,
                    dtype: jnp.dtype = jnp.float32) -> Sam:
        return cls(**model_config.to_dict(), dtype=dtype, rngs=rngs)

    def __call__(self, images: jax.Array, *, points: jax.Array | None = None,
                 labels: jax.Array | None = None, boxes: jax.Array | None = None,
                 masks: jax.Array | None = None, multimask_output: bool = False
                 ) -> tuple[jax.Array, jax.Array]:
        """Prompted segmentation, one prompt set per image.

        ``images: [B, S, S, 3]`` normalized (:func:`normalize`); ``points: [B, N, 2]`` with
        ``labels: [B, N]``, ``boxes: [B, 4]``, ``masks: [B, 4h, 4w, 1]`` low-res mask logits,
        coordinates in input pixels (see the prompt encoder). Returns mask logits
        ``[B, M, 4h, 4w]`` and predicted IoUs ``[B, M]``, ``M = 3`` if ``multimask_output`` else 1.
        """
        embeddings = self.image_encoder(images)
        sparse, dense = self.prompt_encoder(points, labels, boxes, masks)
        return self.mask_decoder(embeddings, self.prompt_encoder.dense_pe(), sparse, dense,
                                 multimask_output=multimask_output)


def detect_layout(state_dict: Mapping[str, np.ndarray], *, source: str) -> str:
    """``"segment_anything"`` or ``"transformers"``, from the top-level key prefixes."""
    for layout, prefixes in _PREFIXES.items():
        if any(key.startswith(prefixes[0]) for key in state_dict):
            return layout
    tops = sorted({key.split(".", 1)[0] for key in state_dict})
    raise CheckpointMismatchError(
        f"{source}: not a SAM checkpoint: expected keys under 'image_encoder.' (segment_anything) "
        f"or 'vision_encoder.' (transformers), found top-level names {tops[:10]}")


def key_rules(layout: str, *, iou_head_depth: int = 3) -> list[key_map.Rule]:
    """The key map of a whole :class:`Sam` in ``layout`` (see :func:`detect_layout`)."""
    image, prompt, mask = _PREFIXES[layout]
    rules = key_map.prefixed(image_encoder_lib.key_rules(layout), source=image,
                             target="image_encoder/")
    rules += key_map.prefixed(prompt_encoder_lib.key_rules(layout), source=prompt,
                              target="prompt_encoder/")
    if layout == "transformers":
        rules += key_map.prefixed([prompt_encoder_lib.HF_SHARED_EMBEDDING_RULE],
                                  target="prompt_encoder/")
    rules += key_map.prefixed(
        mask_decoder_lib.key_rules(layout, iou_head_depth=iou_head_depth), source=mask,
        target="mask_decoder/")
    return rules


def _image_encoder_size(embed_dim: int, depth: int) -> str:
    size = f"embed_dim {embed_dim}, depth {depth}"
    name = _RELEASED.get((embed_dim, depth))
    return f"{name} ({size})" if name else f"a SAM image encoder of {size}"


def _variant_hint(model: Sam, state_dict: Mapping[str, np.ndarray], layout: str) -> str | None:
    """What the file's image encoder looks like (e.g. vit_b) when it differs from the model's."""
    prefix = _PREFIXES[layout][0]
    pos_embed = state_dict.get(prefix + "pos_embed")
    if pos_embed is None or np.ndim(pos_embed) == 0:  # the key listing says what is wrong
        return None
    blocks = prefix + _BLOCKS[layout] + "."
    file_size = _image_encoder_size(np.shape(pos_embed)[-1], stack_depth(state_dict, blocks))
    model_size = _image_encoder_size(model.image_encoder.pos_embed.get_value().shape[-1],
                                     len(model.image_encoder.blocks))
    if file_size == model_size:
        return None
    return f"this looks like {file_size}; the model is {model_size}"


def _set_mask_decoder_eps(model: Sam, layout: str) -> None:
    """The file's release fixes the two-way blocks' LayerNorm eps (see ``_MASK_DECODER_EPS``)."""
    for layer in model.mask_decoder.transformer.layers:
        for norm in (layer.norm1, layer.norm2, layer.norm3, layer.norm4):
            norm.epsilon = _MASK_DECODER_EPS[layout]


def load(module: Sam, state_dict: Mapping[str, np.ndarray], *, source: str) -> Sam:
    """Fills ``module`` (in place, strictly) from a whole SAM state dict of either layout.

    The mask decoder's block LayerNorm eps is set to the file's release (1e-5
    segment_anything, 1e-6 transformers). A file of another size fails naming ``source``, the
    keys and, when the image encoders differ, what the file looks like ("... vit_b").
    """
    layout = detect_layout(state_dict, source=source)
    rules = key_rules(layout, iou_head_depth=len(module.mask_decoder.iou_prediction_head.layers))
    key_map.load(module, state_dict, rules, source=source,
                 hint=_variant_hint(module, state_dict, layout))
    _set_mask_decoder_eps(module, layout)
    return module


def config_from_state_dict(state_dict: Mapping[str, np.ndarray], *, source: str,
                           img_size: int | None = None, decoder_heads: int = 8) -> dict:
    """The :class:`Sam` fields (``configs/sam.py`` ``model`` layout) of a SAM state dict.

    Every size is read from the tensors' shapes; the mask decoder's head count is not in them
    (``decoder_heads``: 8 in every released SAM). ``img_size`` defaults to the pretraining size.
    """
    layout = detect_layout(state_dict, source=source)
    image, prompt, mask = _PREFIXES[layout]
    hf = layout == "transformers"

    def shape(key: str, rank: int) -> tuple[int, ...]:
        return stored_shape(state_dict, key, rank=rank, source=source, family="SAM")

    embed_dim, _, patch, _ = shape(image + ("patch_embed.projection" if hf else "patch_embed.proj")
                                   + ".weight", 4)
    grid = shape(image + "pos_embed", 4)[1]
    blocks = image + _BLOCKS[layout] + "."
    depth = stack_depth(state_dict, blocks)
    tables = [shape(f"{blocks}{i}.attn.rel_pos_h", 2) for i in range(depth)]
    windows = {n for n, _ in tables if n != 2 * grid - 1}
    if len(windows) > 1:
        raise CheckpointMismatchError(f"{source}: windowed blocks with relative-position tables "
                                      f"of several lengths {sorted(windows)}")
    mlp_dim = shape(f"{blocks}0.mlp.lin1.weight", 2)[0]
    neck_conv = image + ("neck.conv1" if hf else "neck.0") + ".weight"
    transformer_dim = shape(mask + "iou_token.weight", 2)[1]
    lin1 = shape(mask + "transformer.layers.0.mlp.lin1.weight", 2)
    cross_q = shape(mask + "transformer.layers.0.cross_attn_token_to_image.q_proj.weight", 2)
    iou_first = mask + "iou_prediction_head." + ("proj_in" if hf else "layers.0") + ".weight"
    iou_depth = stack_depth(state_dict, mask + "iou_prediction_head.layers.") + (2 if hf else 0)
    mask_conv3 = prompt + ("mask_embed.conv3" if hf else "mask_downscaling.6") + ".weight"
    return {
        "image_encoder": dict(
            img_size=img_size or grid * patch, pretrain_img_size=grid * patch, patch_size=patch,
            embed_dim=embed_dim, depth=depth, num_heads=embed_dim // tables[0][1],
            mlp_ratio=mlp_dim / embed_dim, out_chans=shape(neck_conv, 4)[0],
            window_size=(windows.pop() + 1) // 2 if windows else grid,
            global_attn_indexes=tuple(i for i, (n, _) in enumerate(tables) if n == 2 * grid - 1),
            layer_norm_eps=_IMAGE_ENCODER_EPS),
        "prompt_encoder": dict(embed_dim=transformer_dim, mask_in_chans=shape(mask_conv3, 4)[1]),
        "mask_decoder": dict(
            transformer_dim=transformer_dim,
            transformer_depth=stack_depth(state_dict, mask + "transformer.layers."),
            transformer_heads=decoder_heads, transformer_mlp_dim=lin1[0],
            attention_downsample_rate=transformer_dim // cross_q[0],
            num_multimask_outputs=shape(mask + "mask_tokens.weight", 2)[0] - 1,
            iou_head_depth=iou_depth, iou_head_hidden_dim=shape(iou_first, 2)[0],
            layer_norm_eps=_MASK_DECODER_EPS[layout]),
    }


def model_fields(state_dict: Mapping[str, np.ndarray], *, source: str,
                 config: Mapping | None = None) -> dict[str, dict]:
    """:class:`Sam`'s fields, per part (fresh dicts): ``config``'s (``configs/sam.py``'s
    ``model``), or, without it, the state dict's own shapes (:func:`config_from_state_dict`)."""
    if config is None:
        return config_from_state_dict(state_dict, source=source)
    return {part: dict(config[part])
            for part in ("image_encoder", "prompt_encoder", "mask_decoder")}


def load_sam(checkpoint: str | Path | Mapping[str, np.ndarray], *,
             config: Mapping | None = None, img_size: int | None = None,
             dtype: jnp.dtype = jnp.float32) -> Sam:
    """A :class:`Sam` filled from a public checkpoint (file, folder, index or state dict).

    ``config``: the model fields (``configs/sam.py``'s ``model``, any SAM-shaped sizes); None
    builds the model from the file's own shapes (:func:`config_from_state_dict`). ``img_size``
    (e.g. 384 as PixelLLM) overrides the input size only; weights keep their pretrained shapes.
    """
    state_dict, source = state_dict_and_source(checkpoint, what="SAM")
    fields = model_fields(state_dict, source=source, config=config)
    if img_size is not None:
        fields["image_encoder"]["img_size"] = img_size
    try:
        model = nnx.eval_shape(lambda: Sam(**fields, dtype=dtype, rngs=nnx.Rngs(0)))
    except ValueError as e:  # sizes read from (or meant for) the file that build no model
        raise CheckpointMismatchError(f"{source}: no SAM model of these sizes: {e}") from e
    return load(model, state_dict, source=source)
