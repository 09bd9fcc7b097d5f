"""F-LMM's SAM refiner: a coarse mask and its phrase's text prompt SAM, which returns the mask.

Per phrase (F-LMM's ``SAMWrapper.forward`` with ``use_text``, ``use_mask``, ``use_box``, one
mask output), with the coarse logits ``X`` over the image's window ``hc x wc`` of the U-Net grid,
the original image ``H0 x W0`` and SAM's resized image ``h1 x w1`` (longest side ``S``):

* **Box prompt**: ``sigmoid(X)`` (no gradient) bilinearly resized to ``H0 x W0``, thresholded at
  0.5; the box ``(x0, y0, x1 + 1, y1 + 1)`` of the positive pixels in original pixels, the whole
  image ``(0, 0, W0, H0)`` when none is positive; then scaled to SAM's canvas by ``w1 / W0``,
  ``h1 / H0`` (``ResizeLongestSide.apply_boxes``).
* **Dense prompt**: ``X`` itself (gradients flow back to the U-Net) resized bilinearly to
  ``h1 x w1``, padded bottom-right to ``S x S`` with ``min(-1, min X)`` (the minimum over all of
  the image's phrases, a constant), resized bilinearly to SAM's mask-input size ``4h x 4w``.
* **Sparse prompt**: the two box-corner tokens, then one token per phrase token: the LMM's hidden
  states of the last ``L`` layers mixed with ``softmax(layer_weights)`` (one learned scalar per
  layer, initialized to 1) and projected to SAM's width by one Linear (``text_proj``).
* SAM's mask decoder, single-mask output, on the frozen image encoder's embedding; the low-res
  logits postprocessed to the original size (bilinear to ``S``, crop to ``h1 x w1``, bilinear to
  ``H0 x W0``).

Every resize is torch's ``F.interpolate(mode="bilinear", align_corners=False)`` with the sizes as
traced values, so one compiled program serves every image size. Phrases carry a variable number
of text tokens: they are padded to ``T`` with ``text_valid`` and the padding tokens are masked out
of the decoder's attention, which then equals SAM's on the unpadded tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pixelllm.encoders.sam.sam import Sam, postprocess_masks
from pixelllm.nn import layers
from pixelllm.nn.resize import resize_matrix, window_resize_matrix

# F-LMM thresholds the upsampled coarse probabilities at this to read the box.
BOX_THRESHOLD = 0.5
# The dense prompt's padding is at most this logit (F-LMM: `min(-1.0, masks.min())`).
MAX_PAD_LOGIT = -1.0

_HIGHEST = jax.lax.Precision.HIGHEST


def _window_matrices(window: jax.Array, out_hw: jax.Array, *, in_hw: tuple[int, int],
                     out_size: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """Row and column matrices ``[B, out, in]`` resizing each image's window
    ``(top, left, height, width) [B, 4]`` of an ``in_hw`` grid onto ``out_hw [B, 2]``."""
    def one(window, out_hw):
        return tuple(window_resize_matrix(window[axis], window[2 + axis], out_hw[axis],
                                          in_size=in_hw[axis], out_size=out_size[axis])
                     for axis in (0, 1))
    return jax.vmap(one)(window, out_hw)


def box_from_mask(mask: jax.Array, original_hw: jax.Array) -> jax.Array:
    """F-LMM's ``mask2box``: ``mask [N, H, W]`` bool -> ``[N, 4]`` float32
    ``(x0, y0, x1 + 1, y1 + 1)`` of its True pixels (right and bottom edges exclusive, so a single
    pixel has a non-empty box); ``(0, 0, W0, H0)`` from ``original_hw [N, 2]`` when it is empty."""
    rows, cols = jnp.any(mask, axis=2), jnp.any(mask, axis=1)

    def extent(hit: jax.Array) -> tuple[jax.Array, jax.Array]:
        index = jnp.arange(hit.shape[-1])
        first = jnp.min(jnp.where(hit, index, hit.shape[-1]), axis=-1)
        last = jnp.max(jnp.where(hit, index, -1), axis=-1)
        return first, last + 1

    y0, y1 = extent(rows)
    x0, x1 = extent(cols)
    found = jnp.stack([x0, y0, x1, y1], axis=-1).astype(jnp.float32)
    whole = jnp.stack([jnp.zeros_like(original_hw[:, 0]), jnp.zeros_like(original_hw[:, 0]),
                       original_hw[:, 1], original_hw[:, 0]], axis=-1).astype(jnp.float32)
    return jnp.where(jnp.any(rows, axis=-1)[:, None], found, whole)


class TextProjection(nnx.Module):
    """F-LMM's ``text_layer_weights`` (softmax over ``num_layers`` scalars, initialized to 1) and
    ``text_proj`` (Linear ``width -> out_features``):
    ``hidden [..., num_layers, width] -> [..., out_features]``."""

    def __init__(self, *, num_layers: int, width: int, out_features: int, rngs: nnx.Rngs):
        self.layer_weights = nnx.Param(jnp.ones((num_layers,), jnp.float32),
                                       logical_axes=(None,))
        self.width = width
        self.proj = layers.linear(width, out_features, axes=("embed", None), rngs=rngs)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        weights = jax.nn.softmax(self.layer_weights[...])
        mixed = jnp.einsum("...ld,l->...d", hidden.astype(jnp.float32), weights,
                           precision=_HIGHEST)
        return self.proj(mixed)


class RefinerOutput(NamedTuple):
    """``masks [B, P, Hm, Wm]`` float32 logits at the original size, valid on
    ``[:H0, :W0]`` (zero past it); ``boxes [B, P, 4]`` the box prompts in original pixels;
    ``low_res_masks [B, P, 4h, 4w]`` the decoder's logits."""
    masks: jax.Array
    boxes: jax.Array
    low_res_masks: jax.Array


class SamRefiner(nnx.Module):
    """SAM prompted by a coarse mask, its box and the phrase's text (module docstring).

    Args:
      sam: SAM's three parts (F-LMM: ViT-L); the image encoder stays frozen.
      text_width: the LMM's hidden width ``D``.
      num_text_layers: ``L``, the LMM's hidden layers mixed into the text prompt (F-LMM: all of
        its decoder layers' outputs, ``hidden_states[-num_hidden_layers:]``).
    """

    def __init__(self, *, sam: Sam, text_width: int, num_text_layers: int, rngs: nnx.Rngs):
        self.sam = sam
        self.text_projection = TextProjection(num_layers=num_text_layers, width=text_width,
                                              out_features=sam.prompt_encoder.embed_dim,
                                              rngs=rngs)

    def image_embeddings(self, sam_pixels: jax.Array) -> jax.Array:
        """SAM's frozen image encoder ``[B, S, S, 3] -> [B, h, w, C]``; no gradient flows through
        it (F-LMM encodes under ``torch.no_grad``)."""
        return jax.lax.stop_gradient(self.sam.image_encoder(sam_pixels))

    def dense_prompt(self, coarse: jax.Array, coarse_window: jax.Array, resized_hw: jax.Array,
                     phrase_valid: jax.Array) -> jax.Array:
        """F-LMM's ``generate_prompt_masks``: ``coarse [B, P, Hc, Wc]`` logits, the image's window
        ``(top, left, height, width) [B, 4]`` on that grid, ``resized_hw [B, 2]`` ->
        ``[B, P, 4h, 4w]`` mask prompts.

        Resize to ``resized_hw`` (matrices ``A``, ``B``), pad to ``S x S`` with ``p``, resize to
        ``4h x 4w`` (``D``, ``E``, rows summing to 1) is
        ``(DA) X (EB)^T + p (1 - (D r)(E c)^T)`` with ``r``, ``c`` the unpadded rows and columns.
        """
        canvas = self.sam.prompt_encoder.input_image_size
        mask_in = self.sam.prompt_encoder.mask_input_size
        rows, cols = _window_matrices(coarse_window, resized_hw, in_hw=coarse.shape[-2:],
                                      out_size=canvas)
        down = [jnp.asarray(resize_matrix(canvas[axis], mask_in[axis], "linear", False),
                            jnp.float32) for axis in (0, 1)]
        rows = jnp.einsum("oi,bic->boc", down[0], rows, precision=_HIGHEST)
        cols = jnp.einsum("oi,bic->boc", down[1], cols, precision=_HIGHEST)
        unpadded = [jnp.einsum("oi,bi->bo", down[axis],
                               (jnp.arange(canvas[axis])[None] < resized_hw[:, axis, None])
                               .astype(jnp.float32), precision=_HIGHEST) for axis in (0, 1)]
        pad = self.pad_logit(coarse, coarse_window, phrase_valid)
        resized = jnp.einsum("bYh,bphw,bXw->bpYX", rows, coarse.astype(jnp.float32), cols,
                             precision=_HIGHEST)
        outside = 1.0 - unpadded[0][:, :, None] * unpadded[1][:, None, :]
        return resized + pad[:, None, None, None] * outside[:, None]

    @staticmethod
    def pad_logit(coarse: jax.Array, coarse_window: jax.Array,
                  phrase_valid: jax.Array) -> jax.Array:
        """``[B]``: ``min(-1, min X)`` over each image's valid phrases inside its window, a
        constant (F-LMM reads it with ``.item()``)."""
        height, width = coarse.shape[-2:]
        top, left, h, w = (coarse_window[:, i, None, None] for i in range(4))
        y = jnp.arange(height)[None, :, None]
        x = jnp.arange(width)[None, None, :]
        inside = (y >= top) & (y < top + h) & (x >= left) & (x < left + w)
        inside = inside[:, None] & phrase_valid.astype(bool)[:, :, None, None]
        smallest = jnp.min(jnp.where(inside, coarse.astype(jnp.float32), jnp.inf), axis=(1, 2, 3))
        return jax.lax.stop_gradient(jnp.minimum(MAX_PAD_LOGIT, smallest))

    def box_prompt(self, coarse: jax.Array, coarse_window: jax.Array, original_hw: jax.Array,
                   mask_hw: tuple[int, int]) -> jax.Array:
        """``[B, P, 4]`` boxes in original pixels from the thresholded, upsampled coarse mask
        (computed without gradient, as F-LMM's ``pred_masks.detach()``)."""
        probs = jax.nn.sigmoid(jax.lax.stop_gradient(coarse).astype(jnp.float32))
        rows, cols = _window_matrices(coarse_window, original_hw, in_hw=coarse.shape[-2:],
                                      out_size=mask_hw)
        upsampled = jnp.einsum("bYh,bphw,bXw->bpYX", rows, probs, cols, precision=_HIGHEST)
        batch, phrases = coarse.shape[:2]
        boxes = box_from_mask((upsampled > BOX_THRESHOLD).reshape(batch * phrases, *mask_hw),
                              jnp.repeat(original_hw, phrases, axis=0))
        return boxes.reshape(batch, phrases, 4)

    def __call__(self, coarse: jax.Array, *, coarse_window: jax.Array, text_hidden: jax.Array,
                 text_valid: jax.Array, phrase_valid: jax.Array, sam_pixels: jax.Array,
                 resized_hw: jax.Array, original_hw: jax.Array,
                 mask_hw: tuple[int, int]) -> RefinerOutput:
        """Refines B images' P phrases each.

        Args:
          coarse: ``[B, P, Hc, Wc]`` the U-Net's logits over the LMM's padded canvas.
          coarse_window: int ``[B, 4]`` ``(top, left, height, width)`` of the image on that grid.
          text_hidden: ``[B, P, T, L, D]`` the LMM's last ``L`` hidden states at each phrase
            token (padded to ``T``).
          text_valid: bool ``[B, P, T]``, False on padding tokens.
          phrase_valid: bool ``[B, P]``, False on padding phrases.
          sam_pixels: ``[B, S, S, 3]`` SAM-normalized, resized to longest side ``S``, padded.
          resized_hw: int ``[B, 2]`` the image's size inside SAM's canvas.
          original_hw: int ``[B, 2]`` the original size (the output masks' resolution).
          mask_hw: static ``(Hm, Wm)``, at least every ``original_hw``.
        """
        batch, phrases = coarse.shape[:2]
        text_layers = self.text_projection.layer_weights.shape[0]
        width = self.text_projection.width
        if (text_hidden.shape[:2] != (batch, phrases)
                or text_hidden.shape[3:] != (text_layers, width)):
            raise ValueError(f"text_hidden must be [B={batch}, P={phrases}, T, L={text_layers}, "
                             f"D={width}] to match coarse {coarse.shape}, got {text_hidden.shape}")
        if text_valid.shape != text_hidden.shape[:3] or phrase_valid.shape != (batch, phrases):
            raise ValueError(f"text_valid {text_valid.shape} / phrase_valid {phrase_valid.shape} "
                             f"must be {text_hidden.shape[:3]} / {(batch, phrases)}")
        encoder = self.sam.prompt_encoder
        canvas = encoder.input_image_size
        boxes = self.box_prompt(coarse, coarse_window, original_hw, mask_hw)
        # ResizeLongestSide.apply_boxes: x by w1 / W0, y by h1 / H0.
        scale = (resized_hw.astype(jnp.float32) / original_hw.astype(jnp.float32))[:, ::-1]
        sam_boxes = boxes * jnp.tile(scale, (1, 2))[:, None, :]
        flat = lambda x: x.reshape(batch * phrases, *x.shape[2:])
        box_tokens = encoder.embed_boxes(flat(sam_boxes))
        dense_prompt = self.dense_prompt(coarse, coarse_window, resized_hw, phrase_valid)
        dense = encoder.embed_masks(flat(dense_prompt)[..., None])
        text_tokens = self.text_projection(flat(text_hidden)).astype(box_tokens.dtype)
        sparse = jnp.concatenate([box_tokens, text_tokens], axis=1)
        sparse_mask = jnp.concatenate([jnp.ones(box_tokens.shape[:2], bool),
                                       flat(text_valid).astype(bool)], axis=1)
        image = jnp.repeat(self.image_embeddings(sam_pixels), phrases, axis=0)
        low_res, _ = self.sam.mask_decoder(image, encoder.dense_pe(), sparse, dense,
                                           multimask_output=False, sparse_mask=sparse_mask)
        low_res = low_res[:, 0].reshape(batch, phrases, *low_res.shape[-2:])
        masks = postprocess_masks(low_res, input_size=canvas[0], resized_hw=resized_hw,
                                  original_hw=original_hw, out_hw=mask_hw)
        return RefinerOutput(masks=masks, boxes=boxes, low_res_masks=low_res)
