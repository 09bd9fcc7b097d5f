"""SAM's prompt encoder: points, boxes and masks -> sparse tokens and a dense map.

Numerically segment_anything's ``PromptEncoder`` and Hugging Face's ``SamPromptEncoder`` (plus
``SamModel.get_image_wide_positional_embeddings`` for :meth:`SamPromptEncoder.dense_pe`).

**Coordinates** are SAM's: absolute ``(x, y)`` in pixels of the model's input canvas (the
resized, zero-padded image of ``input_image_size = (H, W)``), x to the right, y down. A point at
integer pixel index ``i`` means that pixel, whose centre is ``i + 0.5``: the encoder adds 0.5 to
every coordinate before dividing by ``(W, H)``. Boxes are ``(x0, y0, x1, y1)`` in the same frame,
encoded as two corner points.

**Positions** use random Fourier features: ``c -> 2c - 1``, ``@ G`` (``G: [2, C/2]``, loaded from
the checkpoint), ``* 2 pi``, ``[sin, cos]``.

**Static shapes.** Points are ``[B, N, 2]`` with labels ``[B, N]``: ``1`` positive, ``0``
negative, ``-1`` "not a point" (padding: SAM's own pad token, its encoding replaced by
``not_a_point_embed``; such tokens still take part in the decoder's attention, exactly as in
SAM). As in SAM, points given without a box get one extra padding token, so ``N' = N + 1``;
with a box ``[B, 4]``, ``N' = N + 2`` (or 2 for a box alone).
"""

from __future__ import annotations

import math
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelllm.checkpoints.key_map import CONV, VECTOR, Rule
from pixelllm.encoders.sam.two_way_transformer import LAYOUTS
from pixelllm.nn.layers import conv, gelu, layer_norm, param


class RandomFourierEncoding(nnx.Module):
    """``[..., 2]`` coordinates in [0, 1] (x, y) -> ``[..., 2 * num_pos_feats]`` features."""

    def __init__(self, *, num_pos_feats: int, rngs: nnx.Rngs):
        self.positional_encoding_gaussian_matrix = param(
            jax.random.normal(rngs.params(), (2, num_pos_feats), jnp.float32), (None, None))

    def __call__(self, coords: jax.Array) -> jax.Array:
        coords = 2.0 * jnp.asarray(coords, jnp.float32) - 1.0
        gaussian = self.positional_encoding_gaussian_matrix[...].astype(jnp.float32)
        # Two multiply-adds instead of a matmul: accelerators' default matmul precision
        # (bf16 passes / TF32) would perturb the phases, which then get multiplied by 2 pi.
        phase = 2.0 * math.pi * (coords[..., :1] * gaussian[0] + coords[..., 1:] * gaussian[1])
        return jnp.concatenate([jnp.sin(phase), jnp.cos(phase)], axis=-1)


class MaskDownscaling(nnx.Module):
    """``[B, 4h, 4w, 1]`` mask logits -> ``[B, h, w, C]``: two k2s2 convs with LayerNorm2d and
    GELU, then a 1x1 conv."""

    def __init__(self, *, mask_in_chans: int, embed_dim: int, layer_norm_eps: float,
                 dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hidden = mask_in_chans // 4
        self.conv1 = conv(1, hidden, (2, 2), strides=(2, 2), **common)
        self.norm1 = layer_norm(hidden, eps=layer_norm_eps, axis="conv_out", **common)
        self.conv2 = conv(hidden, mask_in_chans, (2, 2), strides=(2, 2), **common)
        self.norm2 = layer_norm(mask_in_chans, eps=layer_norm_eps, axis="conv_out", **common)
        self.conv3 = conv(mask_in_chans, embed_dim, (1, 1), **common)

    def __call__(self, masks: jax.Array) -> jax.Array:
        x = gelu(self.norm1(self.conv1(masks)))
        x = gelu(self.norm2(self.conv2(x)))
        return self.conv3(x)


class SamPromptEncoder(nnx.Module):
    """Embeds SAM prompts (see the module docstring for coordinates and padding).

    Args:
      embed_dim: token / dense channels C (256 in SAM).
      image_embedding_size: ``(h, w)`` of the image embedding.
      input_image_size: ``(H, W)`` of the padded input canvas the coordinates refer to.
      mask_in_chans: hidden channels of the mask path (16 in SAM).
      layer_norm_eps: eps of the mask path's LayerNorm2d (1e-6 in both releases).
      dtype: dtype of the outputs and the mask path; positions are always computed in float32.

    Parameters: ``pe_layer/positional_encoding_gaussian_matrix [2, C/2]``,
    ``point_embeddings/{0,1,2,3} [C]`` (negative, positive, box corner 1, box corner 2),
    ``not_a_point_embed [C]``, ``no_mask_embed [C]``, ``mask_downscaling/...``.
    """

    def __init__(self, *, embed_dim: int, image_embedding_size: tuple[int, int],
                 input_image_size: tuple[int, int], mask_in_chans: int,
                 layer_norm_eps: float = 1e-6, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        if embed_dim % 2:
            raise ValueError(f"embed_dim must be even (sin and cos halves), got {embed_dim}")
        if mask_in_chans % 4:
            raise ValueError(f"mask_in_chans must be a multiple of 4, got {mask_in_chans}")
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.dtype = dtype
        self.pe_layer = RandomFourierEncoding(num_pos_feats=embed_dim // 2, rngs=rngs)

        def token():
            return param(jax.random.normal(rngs.params(), (embed_dim,), param_dtype), ("embed",))

        self.point_embeddings = nnx.List([token() for _ in range(4)])
        self.not_a_point_embed = token()
        self.no_mask_embed = token()
        self.mask_downscaling = MaskDownscaling(
            mask_in_chans=mask_in_chans, embed_dim=embed_dim, layer_norm_eps=layer_norm_eps,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    @property
    def mask_input_size(self) -> tuple[int, int]:
        """``(4h, 4w)``: the spatial size of mask prompts."""
        return 4 * self.image_embedding_size[0], 4 * self.image_embedding_size[1]

    def _encode_pixels(self, coords: jax.Array) -> jax.Array:
        height, width = self.input_image_size
        coords = jnp.asarray(coords, jnp.float32) + 0.5  # pixel index -> pixel centre
        return self.pe_layer(coords / jnp.array([width, height], jnp.float32))

    def embed_points(self, points: jax.Array, labels: jax.Array, *, pad: bool) -> jax.Array:
        """``points [B, N, 2]`` (x, y), ``labels [B, N]`` -> ``[B, N (+1 if pad), C]``.

        ``pad`` appends SAM's "not a point" token (SAM does when no box is given).
        """
        points, labels = self._check_points(points, labels)
        if pad:
            batch = points.shape[0]
            points = jnp.concatenate([points, jnp.zeros((batch, 1, 2), points.dtype)], axis=1)
            labels = jnp.concatenate([labels, jnp.full((batch, 1), -1, labels.dtype)], axis=1)
        labels = labels[..., None]
        embedding = self._encode_pixels(points)
        embedding = jnp.where(labels == -1, self.not_a_point_embed[...], embedding)
        embedding = embedding + jnp.where(labels == 0, self.point_embeddings[0][...], 0.0)
        embedding = embedding + jnp.where(labels == 1, self.point_embeddings[1][...], 0.0)
        return embedding.astype(self.dtype)

    def embed_boxes(self, boxes: jax.Array) -> jax.Array:
        """``boxes [B, 4]`` (x0, y0, x1, y1) -> two corner tokens ``[B, 2, C]``."""
        boxes = self._check_boxes(boxes)
        corners = self._encode_pixels(boxes.reshape(boxes.shape[0], 2, 2))
        corner_embeddings = jnp.stack([self.point_embeddings[2][...],
                                       self.point_embeddings[3][...]])
        return (corners + corner_embeddings).astype(self.dtype)

    def embed_masks(self, masks: jax.Array) -> jax.Array:
        """``masks [B, 4h, 4w, 1]`` (low-res mask logits) -> ``[B, h, w, C]``."""
        masks = jnp.asarray(masks)
        if masks.ndim != 4 or masks.shape[1:] != (*self.mask_input_size, 1):
            raise ValueError(f"masks must be [B, {self.mask_input_size[0]}, "
                             f"{self.mask_input_size[1]}, 1], got {masks.shape}")
        return self.mask_downscaling(masks.astype(self.dtype))

    def dense_pe(self, grid_size: tuple[int, int] | None = None) -> jax.Array:
        """Positional encoding of the cell centres of the image embedding (or of another
        ``grid_size`` covering the same input, e.g. PixelLLM's fused map), ``[h, w, C]``."""
        height, width = grid_size or self.image_embedding_size
        y = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height
        x = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width
        grid = jnp.stack(jnp.meshgrid(x, y, indexing="xy"), axis=-1)  # [h, w, (x, y)]
        return self.pe_layer(grid).astype(self.dtype)

    def __call__(self, points: jax.Array | None = None, labels: jax.Array | None = None,
                 boxes: jax.Array | None = None,
                 masks: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Embeds any combination of prompts.

        Args:
          points: ``[B, N, 2]`` (x, y) canvas pixels, with ``labels [B, N]`` (1 / 0 / -1).
          boxes: ``[B, 4]`` (x0, y0, x1, y1) canvas pixels.
          masks: ``[B, 4h, 4w, 1]`` mask logits.

        Returns:
          ``sparse [B, N', C]`` (points, then box corners; ``N' = 0`` without either) and
          ``dense [B, h, w, C]`` (the embedded mask, else ``no_mask_embed`` everywhere).
        """
        if (points is None) != (labels is None):
            raise ValueError("points and labels must be given together")
        batches = {name: np.shape(x)[0] for name, x in
                   (("points", points), ("boxes", boxes), ("masks", masks))
                   if x is not None and np.ndim(x) > 0}
        if len(set(batches.values())) > 1:
            raise ValueError(f"prompt batch sizes differ: {batches}")
        batch = next(iter(batches.values()), 1)

        sparse = [jnp.zeros((batch, 0, self.embed_dim), self.dtype)]
        if points is not None:
            sparse.append(self.embed_points(points, labels, pad=boxes is None))
        if boxes is not None:
            sparse.append(self.embed_boxes(boxes))
        if masks is not None:
            dense = self.embed_masks(masks)
        else:
            dense = jnp.broadcast_to(self.no_mask_embed[...].astype(self.dtype),
                                     (batch, *self.image_embedding_size, self.embed_dim))
        return jnp.concatenate(sparse, axis=1), dense

    @staticmethod
    def _check_points(points, labels):
        points, labels = jnp.asarray(points), jnp.asarray(labels)
        if points.ndim != 3 or points.shape[-1] != 2:
            raise ValueError(f"points must be [B, N, 2] (x, y), got {points.shape}")
        if labels.shape != points.shape[:2]:
            raise ValueError(f"labels must be [B, N] = {points.shape[:2]} to match points "
                             f"{points.shape}, got {labels.shape}")
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            labels = labels.astype(jnp.int32)
        return points, labels

    @staticmethod
    def _check_boxes(boxes):
        boxes = jnp.asarray(boxes)
        if boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"boxes must be [B, 4] (x0, y0, x1, y1), got {boxes.shape}")
        return boxes


# ----------------------------------------------------------------------------- checkpoints

# HF ties the prompt encoder's Fourier matrix to SamModel's top-level copy; save_pretrained may keep
# only that one. Whoever loads a whole HF SamModel adds this rule (a tied second source).
HF_SHARED_EMBEDDING_RULE = Rule("shared_image_embedding.positional_embedding",
                                "pe_layer/positional_encoding_gaussian_matrix")


def key_rules(layout: str) -> list[Rule]:
    """The key map of a :class:`SamPromptEncoder` for :mod:`pixelllm.checkpoints.key_map`.

    ``layout="segment_anything"``: keys with ``prompt_encoder.`` stripped
    (``pe_layer.positional_encoding_gaussian_matrix``, ``point_embeddings.0.weight``,
    ``mask_downscaling.0.weight``, ...). ``layout="transformers"``: HF keys with
    ``prompt_encoder.`` stripped (``shared_embedding.positional_embedding``,
    ``point_embed.0.weight``, ``mask_embed.conv1.weight``, ...); see ``HF_SHARED_EMBEDDING_RULE``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; choose one of {LAYOUTS}")
    if layout == "segment_anything":
        gaussian = "pe_layer.positional_encoding_gaussian_matrix"
        point = "point_embeddings.{i}.weight"
        mask = dict(conv1="mask_downscaling.0", norm1="mask_downscaling.1",
                    conv2="mask_downscaling.3", norm2="mask_downscaling.4",
                    conv3="mask_downscaling.6")
    else:
        gaussian = "shared_embedding.positional_embedding"
        point = "point_embed.{i}.weight"
        mask = {name: f"mask_embed.{name.replace('norm', 'layer_norm')}"
                for name in ("conv1", "norm1", "conv2", "norm2", "conv3")}
    rules = [
        Rule(gaussian, "pe_layer/positional_encoding_gaussian_matrix"),
        Rule("not_a_point_embed.weight", "not_a_point_embed", VECTOR),
        Rule("no_mask_embed.weight", "no_mask_embed", VECTOR),
        Rule(point, "point_embeddings/{i}", VECTOR),
    ]
    for name, source in mask.items():
        target = f"mask_downscaling/{name}"
        if name.startswith("conv"):
            rules.append(Rule(f"{source}.weight", f"{target}/kernel", CONV))
        else:
            rules.append(Rule(f"{source}.weight", f"{target}/scale"))
        rules.append(Rule(f"{source}.bias", f"{target}/bias"))
    return rules
