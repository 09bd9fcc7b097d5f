"""F-LMM's trained head: attention maps -> U-Net coarse mask -> SAM refiner -> mask per phrase.

F-LMM (``FrozenLlavaSAM``) keeps the multimodal model frozen; what trains is this head. Data
flow, B images with up to P phrases each (``phrase_valid [B, P]``)::

    attention [B, P, h, w, L*H]   the phrase's post-softmax attention over the LMM's image
                                  tokens (mean over its tokens; every layer and head a channel)
        --UNetMaskHead--> coarse logits [B, P, Hc, Wc] over the LMM's padded canvas
        (Hc x Wc = the grid upsampled to a longest side >= 64)
    coarse_window [B, 4]          the image's (top, left, height, width) on that grid, with
                                  F-LMM's rounding (:func:`coarse_window`, as ``crop_to_image``)
    text_hidden [B, P, T, L, D]   the LMM's last L hidden states at each phrase token
    sam_pixels [B, S, S, 3] --SAM image encoder (frozen, stop_gradient)--> [B, h, w, C]
    coarse (window) -> box prompt (thresholded, no gradient) + dense prompt (with gradient)
    text_hidden --softmax(layer weights) mix, Linear D -> C--> one sparse token per phrase token
        --SAM mask decoder, single mask--> masks [B, P, Hm, Wm] at the original size

The loss (:mod:`.objective`) supervises both the coarse logits inside the window and SAM's
masks, so SAM's loss reaches the U-Net through the dense prompt.

**What trains** (:meth:`FlmmHead.trainable`): the U-Net, the layer weights and text projection,
SAM's prompt encoder and mask decoder. SAM's image encoder is frozen (F-LMM sets
``requires_grad_(False)`` on it and encodes under ``torch.no_grad``); the LMM is not part of
this module.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pixelllm.models.flmm.mask_head import UNetMaskHead
from pixelllm.models.flmm.refiner import SamRefiner


class FlmmHeadInputs(NamedTuple):
    """One batch of B images with P phrase slots each.

    ``attention [B, P, h, w, L*H]``: each phrase's attention maps (channels last).
    ``text_hidden [B, P, T, L, D]`` / ``text_valid [B, P, T]``: the phrase tokens' hidden states
    of the LMM's last L layers, padded to T tokens.
    ``phrase_valid [B, P]``: False on padding phrases.
    ``lmm_image_hw [B, 2]``, ``lmm_pad_before [B, 2]``: the resized image's size and its
    (top, left) padding inside the LMM's padded canvas, in pixels.
    ``sam_pixels [B, S, S, 3]``: SAM-normalized, resized to longest side S, zero-padded.
    ``resized_hw [B, 2]``: the image's size inside SAM's canvas; ``original_hw [B, 2]``: the
    original size (the masks' resolution).
    """
    attention: jax.Array
    text_hidden: jax.Array
    text_valid: jax.Array
    phrase_valid: jax.Array
    lmm_image_hw: jax.Array
    lmm_pad_before: jax.Array
    sam_pixels: jax.Array
    resized_hw: jax.Array
    original_hw: jax.Array


class FlmmHeadOutput(NamedTuple):
    """``coarse [B, P, Hc, Wc]`` float32 logits over the padded canvas, valid inside
    ``coarse_window [B, 4]`` (top, left, height, width); ``masks [B, P, Hm, Wm]`` SAM's logits
    at the original size, valid on ``[:H0, :W0]``; ``boxes [B, P, 4]`` the box prompts in
    original pixels."""
    coarse: jax.Array
    coarse_window: jax.Array
    masks: jax.Array
    boxes: jax.Array


def coarse_window(lmm_image_hw: jax.Array, lmm_pad_before: jax.Array, *,
                  lmm_canvas_hw: tuple[int, int], coarse_hw: tuple[int, int]) -> jax.Array:
    """int32 ``[B, 4]`` (top, left, height, width) of the image on the coarse grid, as F-LMM's
    crop (:func:`~pixelllm.models.flmm.mask_head.crop_to_image`): ``int(pad * Hc / ph)`` and
    ``int(size * Hc / ph + 0.5)``, here in exact integer arithmetic on traced sizes."""
    canvas = jnp.asarray(lmm_canvas_hw, jnp.int32)
    grid = jnp.asarray(coarse_hw, jnp.int32)
    start = (lmm_pad_before.astype(jnp.int32) * grid) // canvas
    size = (2 * lmm_image_hw.astype(jnp.int32) * grid + canvas) // (2 * canvas)
    return jnp.concatenate([start, size], axis=-1)


class FlmmHead(nnx.Module):
    """The U-Net mask head and the SAM refiner (module docstring).

    Args:
      mask_head: the U-Net (``in_channels`` = the LMM's layers x heads).
      refiner: SAM with its text projection.
    """

    def __init__(self, *, mask_head: UNetMaskHead, refiner: SamRefiner):
        self.mask_head = mask_head
        self.refiner = refiner

    def trainable(self) -> nnx.filterlib.Filter:
        """Every parameter but SAM's image encoder."""
        return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("image_encoder")))

    def coarse_masks(self, attention: jax.Array) -> jax.Array:
        """``[B, P, h, w, C] -> [B, P, Hc, Wc]`` the U-Net's logits (F-LMM's ``pred_masks``
        before the crop)."""
        batch, phrases = attention.shape[:2]
        logits = self.mask_head(attention.reshape(batch * phrases, *attention.shape[2:]))
        return logits.reshape(batch, phrases, *logits.shape[1:])

    def __call__(self, inputs: FlmmHeadInputs, *, lmm_canvas_hw: tuple[int, int],
                 mask_hw: tuple[int, int]) -> FlmmHeadOutput:
        """``lmm_canvas_hw`` (static): the LMM's padded input size (336 x 336 for LLaVA-1.5);
        ``mask_hw`` (static): the padded original resolution of the output masks."""
        coarse = self.coarse_masks(inputs.attention)
        window = coarse_window(inputs.lmm_image_hw, inputs.lmm_pad_before,
                               lmm_canvas_hw=lmm_canvas_hw, coarse_hw=coarse.shape[-2:])
        refined = self.refiner(coarse, coarse_window=window, text_hidden=inputs.text_hidden,
                               text_valid=inputs.text_valid, phrase_valid=inputs.phrase_valid,
                               sam_pixels=inputs.sam_pixels, resized_hw=inputs.resized_hw,
                               original_hw=inputs.original_hw, mask_hw=mask_hw)
        return FlmmHeadOutput(coarse=coarse, coarse_window=window, masks=refined.masks,
                              boxes=refined.boxes)
