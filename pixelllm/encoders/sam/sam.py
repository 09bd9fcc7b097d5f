"""Segment Anything as one module: image encoder + prompt encoder + mask decoder, and its loader.

PixelLLM keeps all three frozen: the image encoder gives half of the fused visual features, the
prompt encoder embeds location prompts, and the mask decoder turns a predicted box into a mask.

``load_sam`` reads the public files: the original ``sam_vit_{h,l,b}_*.pth`` (flat keys
``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``) or a Hugging Face ``SamModel``
(``vision_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``, ``shared_image_embedding.*``),
as a ``.pth``/``.bin``/``.safetensors`` file, a sharded index or a folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from pixelllm.checkpoints import assign as assign_lib
from pixelllm.checkpoints.state_dict import read_state_dict
from pixelllm.encoders.sam import image_encoder as image_encoder_lib
from pixelllm.encoders.sam import mask_decoder as mask_decoder_lib
from pixelllm.encoders.sam import prompt_encoder as prompt_encoder_lib

# SAM normalizes 0-255 RGB with these (segment_anything's Sam.pixel_mean / pixel_std).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

# Top-level key prefixes of each checkpoint layout: (image encoder, prompt encoder, mask decoder).
_PREFIXES = {
    "segment_anything": ("image_encoder.", "prompt_encoder.", "mask_decoder."),
    "transformers": ("vision_encoder.", "prompt_encoder.", "mask_decoder."),
}
_HF_SHARED_EMBEDDING = "shared_image_embedding.positional_embedding"
# The Hugging Face mask decoder's LayerNorms use 1e-6 where the original release uses torch's 1e-5.
_HF_MASK_DECODER_EPS = 1e-6


def normalize(images: jax.Array, padding_mask: jax.Array | None = None) -> jax.Array:
    """``images: [B, H, W, 3]`` RGB in 0-255 -> SAM's normalized input.

    ``padding_mask: [B, H, W]`` (True on real pixels) zeroes the padding after normalizing, as
    SAM pads normalized images with zeros.
    """
    out = (images - jnp.asarray(PIXEL_MEAN)) / jnp.asarray(PIXEL_STD)
    if padding_mask is not None:
        out = jnp.where(padding_mask[..., None], out, 0.0)
    return out


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
    raise assign_lib.CheckpointMismatchError(
        f"{source}: not a SAM checkpoint: expected keys under 'image_encoder.' (segment_anything) "
        f"or 'vision_encoder.' (transformers), found top-level names {tops[:10]}")


def convert_state_dict(state_dict: Mapping[str, np.ndarray], *, layout: str | None = None,
                       source: str = "SAM state dict") -> dict[str, np.ndarray]:
    """A whole SAM state dict (either layout) -> ``{"nnx/path": array}`` for :class:`Sam`."""
    layout = layout or detect_layout(state_dict, source=source)
    prefixes = _PREFIXES[layout]
    parts: list[dict[str, np.ndarray]] = [{}, {}, {}]
    stray = []
    for key, value in state_dict.items():
        for part, prefix in zip(parts, prefixes):
            if key.startswith(prefix):
                part[key[len(prefix):]] = value
                break
        else:
            if layout == "transformers" and key == _HF_SHARED_EMBEDDING:
                parts[1][key] = value  # the prompt encoder checks it against its own copy
            else:
                stray.append(key)
    if stray:
        raise assign_lib.CheckpointMismatchError(
            f"{source}: {len(stray)} keys belong to no SAM part: {', '.join(sorted(stray)[:20])}")
    converters = (image_encoder_lib.convert_state_dict, prompt_encoder_lib.convert_state_dict,
                  mask_decoder_lib.convert_state_dict)
    out = {}
    for name, part, convert in zip(("image_encoder", "prompt_encoder", "mask_decoder"), parts,
                                   converters):
        for path, value in convert(part, layout=layout).items():
            out[f"{name}/{path}"] = value
    return out


def load_sam(checkpoint: str | Path | Mapping[str, np.ndarray], *, variant: str = "vit_h",
             img_size: int | None = None, dtype: jnp.dtype = jnp.float32) -> Sam:
    """Builds the ``configs/sam.py`` variant and fills it from a public checkpoint.

    ``img_size`` (e.g. 384 as PixelLLM) changes the input size only; weights keep their pretrained
    shapes. A checkpoint of another variant fails with the mismatched keys named.
    """
    from configs import sam as sam_config  # configs is a top-level package beside pixelllm

    config = sam_config.get_config(variant)
    source = str(checkpoint) if not isinstance(checkpoint, Mapping) else f"SAM {variant} state dict"
    state_dict = read_state_dict(checkpoint) if not isinstance(checkpoint, Mapping) else checkpoint
    layout = detect_layout(state_dict, source=source)
    if img_size is not None:
        config.model.image_encoder.img_size = img_size
    if layout == "transformers":
        config.model.mask_decoder.layer_norm_eps = _HF_MASK_DECODER_EPS
    params = convert_state_dict(state_dict, layout=layout, source=source)
    model = nnx.eval_shape(lambda: Sam.from_config(config.model, rngs=nnx.Rngs(0), dtype=dtype))
    return assign_lib.assign(model, params, source=source)
