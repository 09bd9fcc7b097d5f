"""CenterNet2 dense-captioning detector on the fused feature map (the official PixelLLM proposal
head: scenic ``projects/pixel_llm/modeling/box_decoder.py`` ``FpnCenterNet2``, built on
``projects/baselines/centernet``), with static shapes throughout so that it jits.

**Structure** (official sizes at the paper config: fused map 27x27x1280):

1. *Simple feature pyramid* (ViTDet): from the one fused map, a 2x2 stride-2 transposed conv to
   ``upsample_features`` channels (scale 2), the map itself (scale 1) and a 2x2 max pool (scale
   0.5), each then 1x1 conv, LayerNorm, 3x3 conv, LayerNorm (convs without bias, LN epsilon 1e-6)
   to ``width``; then P6 = 3x3 stride-2 conv of the last level, P7 = the same on ReLU(P6). Grids
   54, 27, 13, 7, 4.
2. *CenterNet head*, class-agnostic: one tower shared by all levels of ``num_convs`` x (3x3 conv,
   GroupNorm(32), ReLU), then a 3x3 conv to one heatmap logit and a 3x3 conv to the four
   distances ``(l, t, r, b)`` (ReLU of a per-level learned scale times the conv), in units of the
   level's stride.
3. *Proposals*: the ``pre_nms`` highest heatmap probabilities over all cells of all levels (no
   peak extraction), as boxes; greedy NMS at IoU 0.9 keeps ``post_nms`` (2000 -> 1000 in training,
   1000 -> 256 in inference), clipped to the image. The official config sets ``score_thresh =
   1e-4``, but nothing reads it: there is no proposal score threshold.
4. *One RoI stage*: RoIAlign 7x7 (sampling ratio 2) of each box on its FPN level (FPN paper's
   ``floor(4 + log2(sqrt(area) / 224))``), flatten, FC 1024, ReLU, FC 1024, ReLU, then 2 class
   logits (background, object) and 4 box deltas (class-agnostic, weights 10, 10, 5, 5).
   Inference: score ``sqrt(softmax_object * proposal_score)`` (``mult_proposal_score``), boxes
   decoded and clipped, score > 0.05, NMS 0.5, 100 detections.

**Geometry.** Canvas pixels as the rest of the project. Level ``l`` has the *labelled* stride
``strides[l]`` (official: 8, 16, ..., 128) and cell ``(i, j)`` the centre ``(j s + s // 2, i s + s
// 2)``. The official labels are not the true strides of a 27x27 map on a 384 canvas (54 cells of 8
cover 432 pixels): the official detector works in a frame stretched by 432/384 anchored at the
top-left corner; pass the true strides to align the frame with the canvas.

**Training** (official): heatmap targets ``exp(-d^2 / r^2)`` from each box centre (max over
boxes), exactly 1 at the cell containing the centre on the box's level, ``r^2 = max(2 delta^2 area,
min_radius^2)``, ``delta = (1 - 0.8) / (1 + 0.8)``; regression at the cells of the 3x3 neighbourhood
of the centre cell inside the box, on the levels whose size range holds the box's half diagonal
(official ``fpn_range`` halved); a cell claimed by several boxes regresses the one of smallest
``d^2 / r^2``. RoIs: proposals + ground truth, labelled positive at IoU >= 0.6 with their best
ground truth, 512 sampled per image with at most 25% positives (seeded, the official sampler),
positives first: the official ``last_proposals`` whose first ones get captions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pixelllm.models.pixel_llm.detector import (CaptionCandidates, Detections,
                                                 DetectorTraining)
from pixelllm.nn import box_ops, layers, losses
from pixelllm.nn.nms import non_max_suppression
from pixelllm.nn.roi_align import multilevel_roi_align

LevelOutput = tuple[jax.Array, jax.Array]

OFFICIAL_STRIDES = (8.0, 16.0, 32.0, 64.0, 128.0)
# CenterNet2's ranges of box half diagonals per level, halved by the PixelLLM configs.
OFFICIAL_SIZE_RANGES = ((0.0, 40.0), (32.0, 80.0), (64.0, 160.0), (128.0, 320.0),
                        (256.0, 50000.0))
# The official det_loss: hm_weight 0.5 on both focal terms, reg_weight 1.0 on GIoU, and the RoI
# stage's classification and box terms at 1 (one cascade stage).
OFFICIAL_LOSS_WEIGHTS = {"heatmap_pos": 0.5, "heatmap_neg": 0.5, "giou": 1.0, "roi_class": 1.0,
                         "roi_box": 1.0}

# Faster R-CNN box-delta weights of the first cascade stage, on (dx, dy, dw, dh).
_DELTA_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# Largest log size change a delta may decode to (detectron2's scale clamp).
_DELTA_LOG_CLIP = math.log(1000.0 / 16.0)
_HEATMAP_INIT_BIAS = -4.6  # sigmoid(-4.6) = 0.01, the official constant
_DISTANCE_INIT_BIAS = 8.0
_GROUP_NORM_GROUPS = 32
_NORM_EPS = 1e-6  # Flax defaults, which the official GroupNorm and LayerNorm use
_FAR = 1e8  # the official INF: "no box" in distance comparisons
_ROI_CANONICAL_SIZE, _ROI_CANONICAL_LEVEL = 224.0, 4  # FPN paper, Eq. 1


class RoiSamples(NamedTuple):
    """The RoIs trained in one step, ``R`` per image, positives first (official
    ``last_proposals``): ``boxes [B, R, 4]``, ``gt_index [B, R]`` (best ground truth), ``positive
    [B, R]`` (IoU >= threshold), ``valid [B, R]`` (sampled; False only when too few
    candidates)."""
    boxes: jax.Array
    gt_index: jax.Array
    positive: jax.Array
    valid: jax.Array


class TrainOutputs(NamedTuple):
    """``levels``: head outputs per level; ``samples``: the RoIs; ``class_logits [B, R, 2]``
    (background, object); ``box_deltas [B, R, 4]``."""
    levels: list[LevelOutput]
    samples: RoiSamples
    class_logits: jax.Array
    box_deltas: jax.Array


def _conv_transpose_2x2(in_features: int, out_features: int, **common) -> nnx.ConvTranspose:
    return nnx.ConvTranspose(in_features, out_features, (2, 2), strides=(2, 2), **common,
                             kernel_metadata={"logical_axes": (None, None, "conv_in", "conv_out")},
                             bias_metadata={"logical_axes": ("conv_out",)})


def _set_normal(conv: nnx.Conv | nnx.Linear, stddev: float, bias: float, key: jax.Array) -> None:
    kernel = conv.kernel.get_value()
    conv.kernel.set_value(stddev * jax.random.normal(key, kernel.shape, kernel.dtype))
    conv.bias.set_value(jnp.full_like(conv.bias.get_value(), bias))


class _PyramidBranch(nnx.Module):
    """1x1 conv, LayerNorm, 3x3 conv, LayerNorm (no conv biases)."""

    def __init__(self, *, in_features: int, width: int, dtype, param_dtype, rngs: nnx.Rngs):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.reduce = layers.conv(in_features, width, 1, use_bias=False, **common)
        self.reduce_norm = layers.layer_norm(width, eps=_NORM_EPS, axis="conv_out", **common)
        self.mix = layers.conv(width, width, 3, padding=1, use_bias=False, **common)
        self.mix_norm = layers.layer_norm(width, eps=_NORM_EPS, axis="conv_out", **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.mix_norm(self.mix(self.reduce_norm(self.reduce(x))))


class SimpleFeaturePyramid(nnx.Module):
    """``features [B, h, w, C]`` -> 5 maps ``[B, h_l, w_l, width]``: ``2h``, ``h``, ``floor(h /
    2)``, then two stride-2 3x3 convs (see the module docstring).

    Args:
      in_features: channels ``C``.
      width: output channels.
      upsample_features: channels of the transposed conv (official: 384, half of the ViTDet
        default ``in_dim`` 768 that the PixelLLM config leaves unchanged).
    """

    def __init__(self, *, in_features: int, width: int = 256, upsample_features: int = 384,
                 dtype: jnp.dtype | None = None, param_dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.upsample = _conv_transpose_2x2(in_features, upsample_features, **common)
        self.branches = nnx.List([
            _PyramidBranch(in_features=upsample_features, width=width, **common),
            _PyramidBranch(in_features=in_features, width=width, **common),
            _PyramidBranch(in_features=in_features, width=width, **common)])
        self.p6 = layers.conv(width, width, 3, strides=2, padding=1, **common)
        self.p7 = layers.conv(width, width, 3, strides=2, padding=1, **common)

    def __call__(self, features: jax.Array) -> list[jax.Array]:
        pooled = nnx.max_pool(features, (2, 2), strides=(2, 2))
        inputs = (self.upsample(features), features, pooled)
        maps = [branch(x) for branch, x in zip(self.branches, inputs)]
        p6 = self.p6(maps[-1])
        return maps + [p6, self.p7(jax.nn.relu(p6))]


class CenterNetHead(nnx.Module):
    """Pyramid maps -> per level ``(heatmap_logits [B, h, w], ltrb [B, h, w, 4])``, distances in
    units of the level's stride (see the module docstring). Tower convs start N(0, 0.01) with
    zero bias; heatmap bias -4.6, distance bias 8 (official)."""

    def __init__(self, *, width: int = 256, num_convs: int = 4, num_levels: int = 5,
                 dtype: jnp.dtype | None = None, param_dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        if width % _GROUP_NORM_GROUPS:
            raise ValueError(f"CenterNetHead width {width} must be a multiple of the "
                             f"{_GROUP_NORM_GROUPS} GroupNorm groups")
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.tower = nnx.List([layers.conv(width, width, 3, padding=1, **common)
                               for _ in range(num_convs)])
        self.tower_norms = nnx.List([
            nnx.GroupNorm(width, num_groups=_GROUP_NORM_GROUPS, epsilon=_NORM_EPS,
                          use_fast_variance=False, **common,
                          scale_metadata={"logical_axes": ("conv_out",)},
                          bias_metadata={"logical_axes": ("conv_out",)})
            for _ in range(num_convs)])
        self.heatmap = layers.conv(width, 1, 3, padding=1, **common)
        self.ltrb = layers.conv(width, 4, 3, padding=1, **common)
        for conv in self.tower:
            _set_normal(conv, 0.01, 0.0, rngs.params())
        _set_normal(self.heatmap, 0.01, _HEATMAP_INIT_BIAS, rngs.params())
        _set_normal(self.ltrb, 0.01, _DISTANCE_INIT_BIAS, rngs.params())
        self.scales = layers.param(jnp.ones((num_levels,), param_dtype), (None,))

    def __call__(self, pyramid: Sequence[jax.Array]) -> list[LevelOutput]:
        if len(pyramid) != self.scales.shape[0]:
            raise ValueError(f"CenterNetHead has {self.scales.shape[0]} level scales, got "
                             f"{len(pyramid)} maps")
        outputs = []
        for index, x in enumerate(pyramid):
            for conv, norm in zip(self.tower, self.tower_norms):
                x = jax.nn.relu(norm(conv(x)))
            outputs.append((self.heatmap(x)[..., 0],
                            jax.nn.relu(self.scales[index] * self.ltrb(x))))
        return outputs


class RoiBoxHead(nnx.Module):
    """``roi_features [B, T, s, s, C]`` -> ``class_logits [B, T, 2]``, ``box_deltas [B, T, 4]``:
    flatten, FCs with ReLU, then class-agnostic outputs (official inits: FCs variance scaling 1
    fan-in uniform; class N(0, 0.01); deltas N(0, 0.001); zero biases)."""

    def __init__(self, *, in_features: int, hidden: Sequence[int] = (1024, 1024),
                 dtype: jnp.dtype | None = None, param_dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        fan_in_uniform = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform")
        widths = [in_features, *hidden]
        self.fcs = nnx.List([
            layers.linear(i, o, axes=("embed", "mlp") if index % 2 == 0 else ("mlp", "embed"),
                          kernel_init=fan_in_uniform, **common)
            for index, (i, o) in enumerate(zip(widths[:-1], widths[1:]))])
        out_axis = "mlp" if len(hidden) % 2 else "embed"
        self.classes = layers.linear(widths[-1], 2, axes=(out_axis, None), **common)
        self.deltas = layers.linear(widths[-1], 4, axes=(out_axis, None), **common)
        _set_normal(self.classes, 0.01, 0.0, rngs.params())
        _set_normal(self.deltas, 0.001, 0.0, rngs.params())

    def __call__(self, roi_features: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = roi_features.reshape(*roi_features.shape[:2], -1)
        for fc in self.fcs:
            x = jax.nn.relu(fc(x))
        return self.classes(x), self.deltas(x)


# ---------------------------------------------------------------------- geometry


def cell_centres(grids: Sequence[Sequence[int]], strides: Sequence[float]
                 ) -> tuple[jax.Array, jax.Array]:
    """All cells of all levels, row-major per level: ``centres [m, 2]`` (x, y) canvas pixels
    (official ``j s + s // 2``) and ``cell_strides [m]``."""
    centres, cell_strides = [], []
    for (height, width), stride in zip(grids, strides):
        x, y = jnp.meshgrid(jnp.arange(width, dtype=jnp.float32) * stride + stride // 2,
                            jnp.arange(height, dtype=jnp.float32) * stride + stride // 2)
        centres.append(jnp.stack([x.reshape(-1), y.reshape(-1)], axis=-1))
        cell_strides.append(jnp.full((height * width,), stride, jnp.float32))
    return jnp.concatenate(centres), jnp.concatenate(cell_strides)


def _flatten_levels(levels: Sequence[LevelOutput]) -> tuple[jax.Array, jax.Array]:
    """``heatmap_logits [B, m]`` and ``ltrb [B, m, 4]`` (stride units) over all cells."""
    batch = levels[0][0].shape[0]
    return (jnp.concatenate([h.reshape(batch, -1) for h, _ in levels], axis=1),
            jnp.concatenate([d.reshape(batch, -1, 4) for _, d in levels], axis=1))


def encode_deltas(boxes: jax.Array, anchors: jax.Array) -> jax.Array:
    """Faster R-CNN deltas ``(10 dx, 10 dy, 5 log dw, 5 log dh)`` of ``boxes`` relative to
    ``anchors`` (both ``[..., 4]`` xyxy). Degenerate boxes give non-finite values."""
    size, anchor_size = boxes[..., 2:] - boxes[..., :2], anchors[..., 2:] - anchors[..., :2]
    centre = boxes[..., :2] + 0.5 * size
    anchor_centre = anchors[..., :2] + 0.5 * anchor_size
    weights = jnp.asarray(_DELTA_WEIGHTS, jnp.float32)
    return jnp.concatenate([(centre - anchor_centre) / anchor_size,
                            jnp.log(size / anchor_size)], axis=-1) * weights


def decode_deltas(deltas: jax.Array, anchors: jax.Array) -> jax.Array:
    """Inverse of :func:`encode_deltas`; log size changes clipped at ``log(1000 / 16)``."""
    deltas = deltas.astype(jnp.float32) / jnp.asarray(_DELTA_WEIGHTS, jnp.float32)
    anchor_size = anchors[..., 2:] - anchors[..., :2]
    centre = deltas[..., :2] * anchor_size + anchors[..., :2] + 0.5 * anchor_size
    size = jnp.exp(jnp.minimum(deltas[..., 2:], _DELTA_LOG_CLIP)) * anchor_size
    low = centre - 0.5 * size
    return jnp.concatenate([low, low + size], axis=-1)


def _clip(boxes: jax.Array, image_wh: jax.Array) -> jax.Array:
    return box_ops.clip(boxes, jnp.asarray(image_wh, jnp.float32)[:, None, :])


# ---------------------------------------------------------------------- training targets


def targets(gt_boxes: jax.Array, gt_mask: jax.Array, *, grids: Sequence[Sequence[int]],
            strides: Sequence[float], size_ranges: Sequence[Sequence[float]],
            min_radius: float = 4.0, min_overlap: float = 0.8
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The official CenterNet targets over all cells of all levels (module docstring).

    Args:
      gt_boxes: ``[B, G, 4]`` canvas pixels; ``gt_mask [B, G]`` bool. Boxes of zero area take no
        part (the official validity test).
      grids, strides, size_ranges: per level.
      min_radius: smallest Gaussian radius, pixels. min_overlap: CenterNet's ``hm_min_overlap``.

    Returns ``heatmap [B, m]``, ``ltrb [B, m, 4]`` in stride units and ``regress [B, m]`` bool.
    """
    if gt_boxes.shape[1] == 0:
        raise ValueError("centernet2.targets needs at least one ground-truth slot (G >= 1)")
    centres, cell_strides = cell_centres(grids, strides)
    cell_ranges = jnp.concatenate([jnp.broadcast_to(jnp.asarray(r, jnp.float32), (h * w, 2))
                                   for (h, w), r in zip(grids, size_ranges)])
    delta = (1.0 - min_overlap) / (1.0 + min_overlap)
    stride = cell_strides[:, None]                                                   # [m, 1]

    def one_image(boxes, mask):
        area = jnp.prod(boxes[:, 2:] - boxes[:, :2], axis=-1)                         # [n]
        valid = mask & (area > 0)
        gx, gy = centres[:, 0:1], centres[:, 1:2]                                     # [m, 1]
        ltrb = jnp.stack([gx - boxes[:, 0], gy - boxes[:, 1], boxes[:, 2] - gx,
                          boxes[:, 3] - gy], axis=-1)                                 # [m, n, 4]
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2.0                                  # [n, 2]
        # Truncation as the official int32 cast.
        discrete = jnp.trunc(centre[None] / stride[..., None]) * stride[..., None] \
            + stride[..., None] / 2.0                                                 # [m, n, 2]
        offset = centres[:, None, :] - discrete
        is_peak = jnp.sum(offset ** 2, axis=-1) == 0
        near = jnp.all(jnp.abs(offset) <= stride[..., None], axis=-1)
        inside = jnp.min(ltrb, axis=-1) > 0
        half_diagonal = jnp.sqrt(jnp.sum((ltrb[..., :2] + ltrb[..., 2:]) ** 2, axis=-1)) / 2.0
        in_level = ((half_diagonal >= cell_ranges[:, None, 0])
                    & (half_diagonal <= cell_ranges[:, None, 1]))
        regress_pair = near & inside & in_level & valid[None]
        peak = is_peak & in_level
        distance2 = jnp.sum((centres[:, None, :] - centre[None]) ** 2, axis=-1)
        radius2 = jnp.maximum(delta ** 2 * 2.0 * area, min_radius ** 2)
        scaled = jnp.maximum(distance2 / radius2, 1e-6) * (1.0 - peak)
        scaled = jnp.where(valid[None], scaled, _FAR)
        heatmap = jnp.max(jnp.exp(-scaled), axis=-1)
        claim = jnp.where(regress_pair, scaled, _FAR)
        owner = jnp.argmin(claim, axis=-1)
        regress = jnp.min(claim, axis=-1) < _FAR
        target = jnp.take_along_axis(ltrb, owner[:, None, None], axis=1)[:, 0] / stride
        return heatmap, jnp.where(regress[:, None], target, 0.0), regress

    return jax.vmap(one_image)(gt_boxes.astype(jnp.float32), gt_mask.astype(bool))


def proposal_loss(levels: Sequence[LevelOutput], gt_boxes: jax.Array, gt_mask: jax.Array,
                  image_weight: jax.Array, *, strides: Sequence[float],
                  size_ranges: Sequence[Sequence[float]], min_radius: float = 4.0,
                  focal_alpha: float = 0.25, focal_gamma: float = 2.0, focal_beta: float = 4.0,
                  sigmoid_clamp: float = 1e-4) -> dict[str, losses.LossValue]:
    """The official CenterNet losses over all levels.

    Args:
      levels: :class:`CenterNetHead` outputs.
      gt_boxes, gt_mask: see :func:`targets`.
      image_weight: ``[B]``, e.g. the proposal task mask; 0 drops an image.

    Returns ``heatmap_pos`` (``-alpha log(p) (1 - p)^gamma`` at peaks), ``heatmap_neg``
    (``-(1 - alpha) log(1 - p) p^gamma (1 - y)^beta`` at every cell), both normalized by
    ``sum_b max(#peaks_b, 1)``, and ``giou`` (``1 - GIoU`` of predicted and target distances at
    the regressed cells, normalized by ``sum_b max(#regressed_b, 1)``): the official per-image
    ``max(., 1)`` averaged over the batch, with sums and normalizers apart.
    """
    grids = [heatmap.shape[1:3] for heatmap, _ in levels]
    if not len(grids) == len(strides) == len(size_ranges):
        raise ValueError(f"proposal_loss: {len(grids)} levels, {len(strides)} strides, "
                         f"{len(size_ranges)} size ranges")
    heatmap, ltrb_target, regress = targets(gt_boxes, gt_mask, grids=grids, strides=strides,
                                            size_ranges=size_ranges, min_radius=min_radius)
    logits, ltrb = _flatten_levels(levels)
    weight = jnp.asarray(image_weight, jnp.float32)[:, None]
    prob = jnp.clip(jax.nn.sigmoid(logits.astype(jnp.float32)), sigmoid_clamp, 1 - sigmoid_clamp)
    positive = heatmap == 1.0
    positive_loss = -focal_alpha * jnp.log(prob) * (1.0 - prob) ** focal_gamma
    negative_loss = (-(1.0 - focal_alpha) * jnp.log(1.0 - prob) * prob ** focal_gamma
                     * (1.0 - heatmap) ** focal_beta)
    heatmap_norm = jnp.sum(weight[:, 0] * jnp.maximum(jnp.sum(positive, axis=1), 1))

    def relative(distances):
        return jnp.concatenate([-distances[..., :2], distances[..., 2:]], axis=-1)

    giou = 1.0 - box_ops.generalized_iou(relative(ltrb.astype(jnp.float32)),
                                         relative(ltrb_target))
    giou_weight = regress * weight
    giou_norm = jnp.sum(weight[:, 0] * jnp.maximum(jnp.sum(regress, axis=1), 1))
    return {
        "heatmap_pos": losses.LossValue(jnp.sum(jnp.where(positive, positive_loss, 0.0) * weight),
                                        heatmap_norm),
        "heatmap_neg": losses.LossValue(jnp.sum(negative_loss * weight), heatmap_norm),
        "giou": losses.LossValue(jnp.sum(jnp.where(giou_weight > 0, giou * giou_weight, 0.0)),
                                 giou_norm),
    }


def _random_top_k(values: jax.Array, count: int, key: jax.Array) -> jax.Array:
    """``[N]`` bool: the ``count`` largest values, ties broken at random (official sampler)."""
    permutation = jax.random.permutation(key, values.shape[0])
    _, top = jax.lax.top_k(values[permutation], count)
    return jnp.zeros(values.shape, bool).at[permutation[top]].set(True)


def sample_rois(candidates: jax.Array, candidate_valid: jax.Array, gt_boxes: jax.Array,
                gt_mask: jax.Array, *, iou_threshold: float, num_samples: int,
                positive_fraction: float, key: jax.Array) -> RoiSamples:
    """The official RoI sampling (``label_and_sample_proposals``), per image.

    Each valid candidate ``[B, N, 4]`` takes its best-IoU real ground truth and is positive at IoU
    >= ``iou_threshold``; at most ``int(num_samples * positive_fraction)`` positives are drawn at
    random, negatives fill up to ``num_samples`` at random; the samples are returned positives
    first, each group in candidate order. ``key`` is split per image.
    """
    num_candidates = candidates.shape[1]
    num_positive = int(num_samples * positive_fraction)

    def one_image(boxes, valid, gt, real, image_key):
        overlap = jnp.where(real[None, :], box_ops.pairwise_iou(boxes, gt), -1.0)   # [N, G]
        gt_index = jnp.argmax(overlap, axis=1).astype(jnp.int32)
        # Official labels: -1 ignore, 0 negative, 1 positive.
        label = jnp.where(jnp.max(overlap, axis=1) >= iou_threshold, 1, 0)
        label = jnp.where(valid, label, -1).astype(jnp.int32)
        is_positive = label == 1
        drawn = _random_top_k(is_positive.astype(jnp.int32), min(num_positive, num_candidates),
                              image_key) & is_positive
        label = jnp.where(is_positive & ~drawn, -1, label)
        drawn = _random_top_k(label, min(num_samples, num_candidates), image_key)
        label = jnp.where(drawn, label, -1)
        order = jnp.argsort(-label, stable=True)[:num_samples]
        return boxes[order], gt_index[order], label[order] == 1, label[order] >= 0

    if num_candidates < num_samples:
        raise ValueError(f"sample_rois: {num_candidates} candidates for {num_samples} samples")
    keys = jax.random.split(key, candidates.shape[0])
    return RoiSamples(*jax.vmap(one_image)(candidates.astype(jnp.float32),
                                           candidate_valid.astype(bool),
                                           gt_boxes.astype(jnp.float32), gt_mask.astype(bool),
                                           keys))


def roi_loss(outputs: TrainOutputs, gt_boxes: jax.Array, image_weight: jax.Array
             ) -> dict[str, losses.LossValue]:
    """The official RoI-stage losses.

    ``roi_class``: softmax cross-entropy (object = positive) over sampled RoIs of positive area,
    normalized by their number. ``roi_box``: L1 of the deltas against the encoded matched ground
    truth (non-finite targets read 0), summed over the 4 deltas, at positive RoIs, normalized by
    the number of RoI slots (``R`` per image with weight): the official ``/ size(fg_mask)``.
    """
    samples = outputs.samples
    weight = jnp.asarray(image_weight, jnp.float32)[:, None]
    area_positive = box_ops.area(samples.boxes) > 0
    class_weight = (samples.valid & area_positive) * weight
    log_probs = jax.nn.log_softmax(outputs.class_logits.astype(jnp.float32), axis=-1)
    cross_entropy = -jnp.take_along_axis(log_probs, samples.positive[..., None].astype(jnp.int32),
                                         axis=-1)[..., 0]
    matched = jnp.take_along_axis(gt_boxes.astype(jnp.float32), samples.gt_index[..., None],
                                  axis=1)
    target = encode_deltas(matched, samples.boxes)
    target = jnp.where(jnp.isfinite(target), target, 0.0)
    l1 = jnp.sum(jnp.abs(outputs.box_deltas.astype(jnp.float32) - target), axis=-1)
    box_weight = (samples.positive & samples.valid & area_positive) * weight
    return {
        "roi_class": losses.LossValue(jnp.sum(cross_entropy * class_weight),
                                      jnp.sum(class_weight)),
        "roi_box": losses.LossValue(jnp.sum(jnp.where(box_weight > 0, l1 * box_weight, 0.0)),
                                    jnp.sum(weight) * samples.boxes.shape[1]),
    }


# ---------------------------------------------------------------------- the detector


class CenterNet2(nnx.Module):
    """The official dense-captioning detector (module docstring) on ``features [B, h, w, C]``;
    implements :class:`~pixelllm.models.pixel_llm.detector.Detector`.

    Args:
      in_features: channels ``C`` of the fused map.
      canvas_size: the square canvas side; proposals and detections are clipped to the canvas
        (the official clips to the padded image, not the valid area).
      width: FPN and head channels. upsample_features: see :class:`SimpleFeaturePyramid`.
      num_convs: head tower depth. roi_hidden: RoI FC widths.
      strides, size_ranges: per level (official labels, see Geometry).
      min_radius: smallest heatmap Gaussian radius, pixels.
      pre_nms_train, post_nms_train, pre_nms_test, post_nms_test, proposal_nms_iou: proposals.
      roi_iou, roi_samples, roi_positive_fraction: RoI labelling and sampling (training).
      roi_size, roi_sampling_ratio: RoIAlign.
      mult_proposal_score, detection_score_threshold, detection_nms_iou, num_detections: final
        detections.
    """

    def __init__(self, *, in_features: int, canvas_size: int, width: int = 256,
                 upsample_features: int = 384, num_convs: int = 4, roi_hidden: Sequence[int] = (1024, 1024),
                 strides: Sequence[float] = OFFICIAL_STRIDES,
                 size_ranges: Sequence[Sequence[float]] = OFFICIAL_SIZE_RANGES,
                 min_radius: float = 4.0, pre_nms_train: int = 2000, post_nms_train: int = 1000,
                 pre_nms_test: int = 1000, post_nms_test: int = 256,
                 proposal_nms_iou: float = 0.9, roi_iou: float = 0.6, roi_samples: int = 512,
                 roi_positive_fraction: float = 0.25, roi_size: int = 7,
                 roi_sampling_ratio: int = 2, mult_proposal_score: bool = True,
                 detection_score_threshold: float = 0.05, detection_nms_iou: float = 0.5,
                 num_detections: int = 100, dtype: jnp.dtype | None = None,
                 param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        if len(strides) != 5 or len(size_ranges) != 5:
            raise ValueError(f"CenterNet2 has 5 pyramid levels: got {len(strides)} strides and "
                             f"{len(size_ranges)} size ranges")
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.canvas_size = canvas_size
        self.strides = tuple(float(s) for s in strides)
        self.size_ranges = tuple(tuple(float(v) for v in r) for r in size_ranges)
        self.min_radius = min_radius
        self.pre_nms_train, self.post_nms_train = pre_nms_train, post_nms_train
        self.pre_nms_test, self.post_nms_test = pre_nms_test, post_nms_test
        self.proposal_nms_iou = proposal_nms_iou
        self.roi_iou, self.roi_samples = roi_iou, roi_samples
        self.roi_positive_fraction = roi_positive_fraction
        self.roi_size, self.roi_sampling_ratio = roi_size, roi_sampling_ratio
        self.mult_proposal_score = mult_proposal_score
        self.detection_score_threshold = detection_score_threshold
        self.detection_nms_iou, self.num_detections = detection_nms_iou, num_detections
        self.pyramid = SimpleFeaturePyramid(in_features=in_features, width=width,
                                            upsample_features=upsample_features, **common)
        self.head = CenterNetHead(width=width, num_convs=num_convs, num_levels=5, **common)
        self.box_head = RoiBoxHead(in_features=roi_size * roi_size * width, hidden=roi_hidden,
                                   **common)

    def __call__(self, features: jax.Array) -> tuple[list[jax.Array], list[LevelOutput]]:
        """Pyramid maps and head outputs per level."""
        pyramid = self.pyramid(features)
        return pyramid, self.head(pyramid)

    def _canvas_wh(self, batch: int) -> jax.Array:
        return jnp.full((batch, 2), float(self.canvas_size), jnp.float32)

    def propose(self, levels: Sequence[LevelOutput], *, training: bool) -> Detections:
        """Top ``pre_nms`` cells as boxes, NMS to ``post_nms``, clipped to the canvas. No gradient
        flows into the boxes."""
        logits, ltrb = _flatten_levels(levels)
        centres, cell_strides = cell_centres([h.shape[1:3] for h, _ in levels], self.strides)
        pre_nms, post_nms = ((self.pre_nms_train, self.post_nms_train) if training
                             else (self.pre_nms_test, self.post_nms_test))
        count = min(pre_nms, logits.shape[1] - 1)  # the official bound
        scores, index = jax.lax.top_k(jax.nn.sigmoid(logits.astype(jnp.float32)), count)
        distances = (jnp.take_along_axis(ltrb.astype(jnp.float32), index[..., None], axis=1)
                     * cell_strides[index][..., None])
        points = centres[index]
        boxes = jax.lax.stop_gradient(jnp.concatenate([points - distances[..., :2],
                                                       points + distances[..., 2:]], axis=-1))
        keep, kept = jax.vmap(lambda b, s: non_max_suppression(
            b, s, iou_threshold=self.proposal_nms_iou,
            max_output=post_nms))(boxes, scores)
        boxes = _clip(jnp.take_along_axis(boxes, keep[..., None], axis=1),
                      self._canvas_wh(boxes.shape[0]))
        scores = jnp.where(kept, jnp.take_along_axis(scores, keep, axis=1), 0.0)
        return Detections(boxes, jax.lax.stop_gradient(scores), kept)

    def classify(self, pyramid: Sequence[jax.Array], boxes: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
        """RoI stage on ``boxes [B, T, 4]``: ``class_logits [B, T, 2]``, ``box_deltas [B, T,
        4]``."""
        first_level = round(math.log2(self.strides[0]))
        size = jnp.sqrt(jnp.maximum(box_ops.area(boxes), 0.0))
        level = jnp.floor(_ROI_CANONICAL_LEVEL + jnp.log2(size / _ROI_CANONICAL_SIZE + 1e-8))
        level = jnp.clip(level - first_level, 0, len(pyramid) - 1).astype(jnp.int32)
        pooled = multilevel_roi_align(pyramid, boxes, level, strides=self.strides,
                                      output_size=self.roi_size,
                                      sampling_ratio=self.roi_sampling_ratio)
        return self.box_head(pooled)

    def detect(self, features: jax.Array, *, valid_wh: jax.Array) -> Detections:
        """Inference: ``num_detections`` per image, ``valid`` = kept by NMS with a score above
        the threshold. ``valid_wh`` is not read: the official clips to the padded canvas."""
        del valid_wh
        pyramid, levels = self(features)
        proposals = self.propose(levels, training=False)
        class_logits, box_deltas = self.classify(pyramid, proposals.boxes)
        scores = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[..., 1]
        if self.mult_proposal_score:
            scores = jnp.sqrt(scores * proposals.scores)
        boxes = _clip(decode_deltas(box_deltas, proposals.boxes),
                      self._canvas_wh(features.shape[0]))
        candidates = proposals.valid & (scores > self.detection_score_threshold)
        keep, kept = jax.vmap(lambda b, s, v: non_max_suppression(
            b, s, iou_threshold=self.detection_nms_iou, max_output=self.num_detections,
            valid=v))(boxes, scores, candidates)
        return Detections(jnp.take_along_axis(boxes, keep[..., None], axis=1),
                          jnp.where(kept, jnp.take_along_axis(scores, keep, axis=1), 0.0), kept)

    def train_outputs(self, features: jax.Array, gt_boxes: jax.Array, gt_mask: jax.Array, *,
                      key: jax.Array) -> TrainOutputs:
        """Training forward: head outputs, sampled RoIs (proposals + ground truth) and the RoI
        stage's outputs on them."""
        pyramid, levels = self(features)
        proposals = self.propose(levels, training=True)
        gt_mask = gt_mask.astype(bool)
        candidates = jnp.concatenate([proposals.boxes, gt_boxes.astype(jnp.float32)], axis=1)
        candidate_valid = jnp.concatenate([proposals.valid, gt_mask], axis=1)
        samples = sample_rois(candidates, candidate_valid, gt_boxes, gt_mask,
                              iou_threshold=self.roi_iou, num_samples=self.roi_samples,
                              positive_fraction=self.roi_positive_fraction, key=key)
        class_logits, box_deltas = self.classify(pyramid, samples.boxes)
        return TrainOutputs(levels, samples, class_logits, box_deltas)

    def loss(self, outputs: TrainOutputs, gt_boxes: jax.Array, gt_mask: jax.Array,
             image_weight: jax.Array) -> dict[str, losses.LossValue]:
        """All official detection terms (weights: :data:`OFFICIAL_LOSS_WEIGHTS`)."""
        terms = proposal_loss(outputs.levels, gt_boxes, gt_mask, image_weight,
                              strides=self.strides, size_ranges=self.size_ranges,
                              min_radius=self.min_radius)
        terms.update(roi_loss(outputs, gt_boxes, image_weight))
        return terms

    def forward_train(self, features: jax.Array, *, gt_boxes: jax.Array, gt_mask: jax.Array,
              image_weight: jax.Array, valid_wh: jax.Array, key: jax.Array
              ) -> DetectorTraining:
        """The official training forward of ``FpnCenterNet2`` inside PixelLLM: images with
        ``image_weight`` 0 have their ground truth dropped (official ``proposal_loss_valid_mask``)
        and add nothing to the losses. Caption candidates are the sampled RoIs, positives first
        (official ``last_proposals``), matched = positive (``match_gt_thresh`` = ``roi_iou`` =
        0.6 in the official configs). ``valid_wh`` is not read (the official uses the padded
        canvas)."""
        del valid_wh
        gt_mask = gt_mask.astype(bool) & (jnp.asarray(image_weight) > 0)[:, None]
        outputs = self.train_outputs(features, gt_boxes, gt_mask, key=key)
        samples = outputs.samples
        return DetectorTraining(
            CaptionCandidates(samples.boxes, samples.gt_index, samples.positive & samples.valid),
            self.loss(outputs, gt_boxes, gt_mask, image_weight))


def weighted_total(terms: Mapping[str, losses.LossValue],
                   weights: Mapping[str, float] = OFFICIAL_LOSS_WEIGHTS) -> jax.Array:
    """The official ``det_loss``: ``sum_k weights[k] * terms[k].mean()``."""
    return sum(weights[name] * value.mean() for name, value in terms.items())
