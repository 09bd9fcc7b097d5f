"""The light proposal head of dense captioning (``config.model.proposal_head.kind = "light"``):
a class-agnostic CenterNet head on the fused map, GRiT's first stage without its RoI stage.

GRiT proposes object boxes with CenterNet2's class-agnostic CenterNet head (Zhou et al. 2021):
per cell of a feature map, one heatmap logit (objectness, peaked at object centres) and four
distances ``(l, t, r, b)`` from the cell centre to the box sides. This module is that head, its
training targets and loss, its decoding, and GRiT's assignment of captions to proposals. Shapes
are static throughout (fixed numbers of levels, cells, proposals), so everything jits.

**Geometry.** Canvas pixels as the rest of the project (README, Conventions). A level of grid
``(h, w)`` on a canvas ``(H, W)`` has stride ``s = H / h = W / w``; cell ``(i, j)`` (row, column)
covers ``[j s, (j + 1) s) x [i s, (i + 1) s)`` and its centre, the point the distances are measured
from, is ``((j + 0.5) s, (i + 0.5) s)`` (CenterNet2's ``stride * j + stride // 2``). A box's centre
cell is ``floor(centre / s)``.

**Outputs** per level: ``heatmap_logits [B, h, w]`` and ``ltrb [B, h, w, 4]``, the distances in
units of the level's stride (CenterNet2: ReLU of a per-level learnable scale times the conv output;
non-negative; multiply by the stride for pixels). Level 0 is the input map; each further level is
a stride-2 conv of the previous one (RetinaNet's P6/P7), so level ``l`` has stride ``2^l s_0``.

**Targets** (CenterNet2, ``only_proposal``): heatmap ``exp(-d^2 / r^2)``, nearest box wins, with
``d`` the distance from the cell centre to the box centre (0 at the centre cell: the positive,
exactly 1) and ``r^2 = max(2 delta^2 area, min_radius^2)`` (pixels), ``delta = (1 - 0.8) / (1 +
0.8)``;
values below 1e-4 are 0. Boxes regress at the cells of the 3x3 neighbourhood of their centre cell
whose centre lies inside the box; a cell claimed by several boxes takes the one of smallest
``d^2 / r^2``. A box takes part in a level only if its half diagonal lies in the level's size
range (CenterNet2's FPN assignment); with several levels the default ranges are CenterNet2's
``[0, 80], [64, 160], [128, 320], ...`` at strides 8, 16, 32, ..., i.e. ``[4 s, 10 s]``, open-ended
at the first and last level.

**Against the official detector** (:mod:`~pixelllm.models.pixel_llm.centernet2`): one level by
default instead of a five-level pyramid, 3x3 peaks instead of NMS, no RoI stage; captions train
on the ground-truth boxes and the proposals that match one (not on sampled RoIs); detections are
ranked by heatmap score. The losses are CenterNet2's (focal alpha 0.25, radius 4 pixels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelllm.models.pixel_llm.detector import (CaptionCandidates, Detections,
                                                 DetectorTraining)
from pixelllm.nn import box_ops, layers, losses

LevelOutput = tuple[jax.Array, jax.Array]

# CenterNet2's HM_MIN_OVERLAP = 0.8 gives the Gaussian's scale relative to the box size.
_DELTA = (1.0 - 0.8) / (1.0 + 0.8)
# Heatmap targets below this are 0 (CenterNet2), so far cells are plain negatives.
_HEATMAP_FLOOR = 1e-4
# Prior probability 0.01 of an object at a cell (focal loss initialisation, Lin et al. 2017).
_HEATMAP_PRIOR_BIAS = -math.log((1.0 - 0.01) / 0.01)
# CenterNet2 starts every distance at 8 strides, so that the ReLU is active from the start.
_LTRB_INIT_BIAS = 8.0
# CenterNet2's per-level size ranges, in units of the level's stride.
_SIZE_RANGE_IN_STRIDES = (4.0, 10.0)


def _group_norm(features: int, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.GroupNorm:
    # The largest group count <= 32 that divides the channels.
    groups = next(g for g in range(min(32, features), 0, -1) if features % g == 0)
    return nnx.GroupNorm(features, num_groups=groups, epsilon=1e-5, use_fast_variance=False,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                         scale_metadata={"logical_axes": ("conv_out",)},
                         bias_metadata={"logical_axes": ("conv_out",)})


class ProposalHead(nnx.Module):
    """``features [B, h, w, C]`` -> per level ``(heatmap_logits [B, h_l, w_l], ltrb [B, h_l, w_l,
    4])``, ``h_l = h / 2^l`` (see the module docstring for units); implements
    :class:`~pixelllm.models.pixel_llm.detector.Detector`.

    Input 1x1 conv + GroupNorm to ``hidden`` channels; ``num_levels - 1`` extra levels, each
    ReLU, 3x3 stride-2 conv, GroupNorm; then a tower shared by all levels of ``num_convs`` x
    (3x3 conv, GroupNorm, ReLU) and two 3x3 output convs. GroupNorm uses the largest group count
    <= 32 dividing ``hidden``. Output convs start from N(0, 0.01) weights, heatmap bias
    ``-log(99)`` (prior 0.01), distance bias 8 (CenterNet2).

    Args:
      in_features: channels ``C`` of the input map.
      canvas_size: the square canvas side (gives each level's stride).
      top_k: proposals per image: caption candidates in training, detections in inference.
      iou_threshold: a candidate matches a ground truth at this IoU (GRiT's 0.6).
      min_radius: smallest heatmap Gaussian radius, pixels.
      hidden: tower channels.
      num_convs: tower depth.
      num_levels: pyramid levels; ``h`` and ``w`` must be divisible by ``2^(num_levels - 1)``.
      dtype: compute dtype of the convolutions (GroupNorm statistics stay float32; the outputs,
        heatmap logits and box distances, are float32); ``param_dtype``: storage dtype.
    """

    def __init__(self, *, in_features: int, canvas_size: int, top_k: int = 100,
                 iou_threshold: float = 0.6, min_radius: float = 4.0, hidden: int = 256,
                 num_convs: int = 4, num_levels: int = 1, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        self.canvas_size, self.top_k = canvas_size, top_k
        self.iou_threshold, self.min_radius = iou_threshold, min_radius
        self.num_levels = num_levels
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_proj = layers.conv(in_features, hidden, 1, **common)
        self.input_norm = _group_norm(hidden, **common)
        self.downsample = nnx.List([layers.conv(hidden, hidden, 3, strides=2, padding=1, **common)
                                    for _ in range(num_levels - 1)])
        self.downsample_norms = nnx.List([_group_norm(hidden, **common)
                                          for _ in range(num_levels - 1)])
        self.tower = nnx.List([layers.conv(hidden, hidden, 3, padding=1, **common)
                               for _ in range(num_convs)])
        self.tower_norms = nnx.List([_group_norm(hidden, **common) for _ in range(num_convs)])
        self.heatmap = layers.conv(hidden, 1, 3, padding=1, **common)
        self.ltrb = layers.conv(hidden, 4, 3, padding=1, **common)
        for output, bias in ((self.heatmap, _HEATMAP_PRIOR_BIAS), (self.ltrb, _LTRB_INIT_BIAS)):
            kernel = output.kernel.get_value()
            output.kernel.set_value(
                0.01 * jax.random.normal(rngs.params(), kernel.shape, kernel.dtype))
            output.bias.set_value(jnp.full_like(output.bias.get_value(), bias))
        self.scales = layers.param(jnp.ones((num_levels,), param_dtype), (None,))

    def __call__(self, features: jax.Array) -> list[LevelOutput]:
        _, height, width, _ = features.shape
        factor = 2 ** (self.num_levels - 1)
        if height % factor or width % factor:
            raise ValueError(f"ProposalHead with {self.num_levels} levels needs a feature map "
                             f"divisible by {factor}, got {height}x{width}")
        level = self.input_norm(self.input_proj(features))
        levels = [level]
        for conv, norm in zip(self.downsample, self.downsample_norms):
            level = norm(conv(jax.nn.relu(level)))
            levels.append(level)
        outputs = []
        for index, level in enumerate(levels):
            for conv, norm in zip(self.tower, self.tower_norms):
                level = jax.nn.relu(norm(conv(level)))
            heatmap_logits = self.heatmap(level)[..., 0].astype(jnp.float32)
            ltrb = jax.nn.relu(self.scales[index] * self.ltrb(level).astype(jnp.float32))
            outputs.append((heatmap_logits, ltrb))
        return outputs

    def _strides(self, levels: Sequence[LevelOutput]) -> list[float]:
        return level_strides(self.canvas_size, [heatmap.shape[1:3] for heatmap, _ in levels])

    def detect(self, features: jax.Array, *, valid_wh: jax.Array) -> Detections:
        """The ``top_k`` peaks (:func:`decode`), clipped to the valid area; all valid."""
        levels = self(features)
        boxes, scores = decode(levels, strides=self._strides(levels), top_k=self.top_k,
                               valid_wh=valid_wh)
        return Detections(boxes, scores, jnp.ones(scores.shape, bool))

    def forward_train(self, features: jax.Array, *, gt_boxes: jax.Array, gt_mask: jax.Array,
                      image_weight: jax.Array, valid_wh: jax.Array, key: jax.Array
                      ) -> DetectorTraining:
        """Caption candidates: the ground-truth boxes, then the ``top_k`` proposals (GRiT
        appends the ground truth, so captions train before proposals are good), each matched to
        its best ground truth at ``iou_threshold``; the loss on the valid area of images with
        ``image_weight > 0``. Draws nothing from ``key``."""
        del key
        levels = self(features)
        strides = self._strides(levels)
        gt_mask = gt_mask.astype(bool) & (jnp.asarray(image_weight) > 0)[:, None]
        proposals, _ = decode(levels, strides=strides, top_k=self.top_k, valid_wh=valid_wh)
        candidates = jnp.concatenate([gt_boxes.astype(jnp.float32),
                                      jax.lax.stop_gradient(proposals)], axis=1)
        gt_index, matched = assign_captions(candidates, gt_boxes, gt_mask,
                                            iou_threshold=self.iou_threshold)
        matched &= jnp.concatenate([gt_mask, jnp.ones(proposals.shape[:2], bool)], axis=1)
        grid = levels[0][0].shape[1:3]
        image_valid = (_valid_cells(valid_wh, grid, strides[0])
                       & (jnp.asarray(image_weight) > 0)[:, None, None])
        terms = loss(levels, gt_boxes, gt_mask, canvas_size=self.canvas_size,
                     image_valid=image_valid, min_radius=self.min_radius)
        return DetectorTraining(CaptionCandidates(candidates, gt_index, matched), terms)


def level_strides(canvas_size: int | Sequence[int],
                  grid_sizes: Sequence[Sequence[int]]) -> list[float]:
    """Stride in canvas pixels of each level: ``canvas / grid``.

    Args:
      canvas_size: ``H`` (square canvas) or ``(H, W)``.
      grid_sizes: ``(h, w)`` per level.
    """
    canvas_h, canvas_w = ((canvas_size, canvas_size) if np.ndim(canvas_size) == 0
                          else tuple(canvas_size))
    strides = []
    for grid_h, grid_w in grid_sizes:
        stride_h, stride_w = canvas_h / grid_h, canvas_w / grid_w
        if not math.isclose(stride_h, stride_w):
            raise ValueError(f"grid {grid_h}x{grid_w} on canvas {canvas_h}x{canvas_w} has "
                             f"different strides along y ({stride_h}) and x ({stride_w})")
        strides.append(stride_h)
    return strides


def default_size_ranges(strides: Sequence[float]) -> list[tuple[float, float] | None]:
    """CenterNet2's per-level ranges of box half diagonals, ``[4 s, 10 s]`` (see the module
    docstring); ``[None]`` (every box) for a single level."""
    if len(strides) == 1:
        return [None]
    low, high = _SIZE_RANGE_IN_STRIDES
    last = len(strides) - 1
    return [(0.0 if index == 0 else low * stride, math.inf if index == last else high * stride)
            for index, stride in enumerate(strides)]


def _cell_centres(grid: Sequence[int], stride: float) -> tuple[jax.Array, jax.Array]:
    """``x [w]`` and ``y [h]`` of the cell centres, canvas pixels."""
    height, width = grid
    return ((jnp.arange(width, dtype=jnp.float32) + 0.5) * stride,
            (jnp.arange(height, dtype=jnp.float32) + 0.5) * stride)


def targets(gt_boxes: jax.Array, gt_mask: jax.Array, *, grid: Sequence[int], stride: float,
            min_radius: float = 4.0,
            size_range: tuple[float, float] | None = None
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training targets of one level (see the module docstring).

    Args:
      gt_boxes: ``[B, G, 4]`` canvas pixels.
      gt_mask: ``[B, G]`` bool, True on real objects.
      grid: ``(h, w)`` of the level.
      stride: the level's stride in canvas pixels.
      min_radius: smallest Gaussian radius, pixels (CenterNet2's 4).
      size_range: ``(low, high)`` half diagonals (pixels) of the boxes this level handles; None
        for all.

    Returns ``heatmap [B, h, w]`` (1 exactly at centre cells), ``ltrb_target [B, h, w, 4]`` canvas
    pixels (0 where not regressed) and ``reg_mask [B, h, w]`` bool.
    """
    height, width = grid
    boxes = gt_boxes.astype(jnp.float32)
    active = gt_mask.astype(bool)
    if size_range is not None:
        half_diagonal = jnp.linalg.norm(boxes[..., 2:] - boxes[..., :2], axis=-1) / 2.0
        active &= (half_diagonal >= size_range[0]) & (half_diagonal <= size_range[1])
    centre = (boxes[..., :2] + boxes[..., 2:]) / 2.0                                   # [B, G, 2]
    centre_cell = jnp.clip(jnp.floor(centre / stride), 0,
                           jnp.array([width - 1, height - 1])).astype(jnp.int32)

    # Everything below is [B, h, w, G]: cells along h and w, boxes along G.
    def per_box(values):
        return values[:, None, None, :]

    cell_x, cell_y = _cell_centres(grid, stride)
    cell_x, cell_y = jnp.meshgrid(cell_x, cell_y)                                      # [h, w]
    cell_x, cell_y = cell_x[None, :, :, None], cell_y[None, :, :, None]
    ltrb = jnp.stack([cell_x - per_box(boxes[..., 0]), cell_y - per_box(boxes[..., 1]),
                      per_box(boxes[..., 2]) - cell_x, per_box(boxes[..., 3]) - cell_y], axis=-1)
    column_offset = jnp.arange(width)[None, None, :, None] - per_box(centre_cell[..., 0])
    row_offset = jnp.arange(height)[None, :, None, None] - per_box(centre_cell[..., 1])
    is_peak = (column_offset == 0) & (row_offset == 0)
    near_centre = (jnp.abs(column_offset) <= 1) & (jnp.abs(row_offset) <= 1)

    distance2 = ((cell_x - per_box(centre[..., 0])) ** 2 + (cell_y - per_box(centre[..., 1])) ** 2)
    distance2 = jnp.where(is_peak, 0.0, distance2)
    radius2 = jnp.maximum(2.0 * _DELTA ** 2 * box_ops.area(boxes), min_radius ** 2)
    scaled = jnp.where(per_box(active), distance2 / per_box(radius2), jnp.inf)
    heatmap = jnp.exp(-jnp.min(scaled, axis=-1))
    heatmap = jnp.where(heatmap < _HEATMAP_FLOOR, 0.0, heatmap)

    regress = near_centre & (jnp.min(ltrb, axis=-1) > 0) & per_box(active)
    owner = jnp.argmin(jnp.where(regress, scaled, jnp.inf), axis=-1)
    reg_mask = jnp.any(regress, axis=-1)
    ltrb_target = jnp.take_along_axis(ltrb, owner[..., None, None], axis=-2)[..., 0, :]
    ltrb_target = jnp.where(reg_mask[..., None], ltrb_target, 0.0)
    return heatmap, ltrb_target, reg_mask


def _ltrb_to_relative_boxes(ltrb: jax.Array) -> jax.Array:
    """Distances ``[..., 4]`` -> a box around the origin, for (scale- and shift-free) GIoU."""
    return jnp.concatenate([-ltrb[..., :2], ltrb[..., 2:]], axis=-1)


def _valid_cells(valid_wh: jax.Array, grid: Sequence[int], stride: float) -> jax.Array:
    """``valid_wh [B, 2]`` -> bool ``[B, h, w]``: cells that start inside the valid image area."""
    extent = jnp.asarray(valid_wh, jnp.float32) / stride
    rows = jnp.arange(grid[0], dtype=jnp.float32)[None, :, None]
    columns = jnp.arange(grid[1], dtype=jnp.float32)[None, None, :]
    return (columns < extent[:, 0, None, None]) & (rows < extent[:, 1, None, None])


def _coarsen(valid: jax.Array, factor: int) -> jax.Array:
    """``[B, h, w]`` -> ``[B, h / factor, w / factor]``: a coarse cell is valid if any of its
    fine cells is."""
    batch, height, width = valid.shape
    return valid.reshape(batch, height // factor, factor, width // factor, factor).any(axis=(2, 4))


def loss(outputs: Sequence[LevelOutput], gt_boxes: jax.Array, gt_mask: jax.Array, *,
         canvas_size: int | Sequence[int], image_valid: jax.Array | None = None,
         min_radius: float = 4.0,
         size_ranges: Sequence[tuple[float, float] | None] | None = None
         ) -> dict[str, losses.LossValue]:
    """CenterNet2's proposal losses over all levels.

    Args:
      outputs: :class:`ProposalHead` outputs.
      gt_boxes: ``[B, G, 4]`` canvas pixels; ``gt_mask: [B, G]`` bool.
      canvas_size: ``H`` or ``(H, W)`` of the canvas (gives each level's stride).
      image_valid: ``[B, h, w]`` bool on the first level's grid: cells that take part (the
        valid image area of images with the task); coarser levels take a cell if any of its
        first-level cells is valid. None: all cells.
      min_radius, size_ranges: see :func:`targets`; ``size_ranges`` defaults to
        :func:`default_size_ranges`.

    Returns ``heatmap_pos`` and ``heatmap_neg`` (:func:`losses.heatmap_focal_loss` over all levels
    at once, normalized by the number of positives) and ``giou`` (``1 - GIoU`` of predicted and
    target distance boxes at the regressed cells, normalized by their number: CenterNet2 with
    ``NOT_NORM_REG``).
    """
    grids = [heatmap_logits.shape[1:3] for heatmap_logits, _ in outputs]
    strides = level_strides(canvas_size, grids)
    if size_ranges is None:
        size_ranges = default_size_ranges(strides)
    if len(size_ranges) != len(outputs):
        raise ValueError(f"{len(size_ranges)} size ranges for {len(outputs)} levels")
    if image_valid is not None and tuple(image_valid.shape[1:]) != tuple(grids[0]):
        raise ValueError(f"image_valid has shape {image_valid.shape}, expected the first level's "
                         f"grid {tuple(grids[0])}")
    logits, heatmaps, heatmap_valid = [], [], []
    predicted_boxes, target_boxes, box_weights = [], [], []
    for (heatmap_logits, ltrb), grid, stride, size_range in zip(outputs, grids, strides,
                                                                size_ranges):
        heatmap, ltrb_target, reg_mask = targets(gt_boxes, gt_mask, grid=grid, stride=stride,
                                                 min_radius=min_radius, size_range=size_range)
        if image_valid is None:
            valid = jnp.ones(heatmap.shape, bool)
        else:
            factor = grids[0][0] // grid[0]
            if grid[0] * factor != grids[0][0] or grid[1] * factor != grids[0][1]:
                raise ValueError(f"level grid {tuple(grid)} does not divide the first level's "
                                 f"{tuple(grids[0])}")
            valid = _coarsen(image_valid.astype(bool), factor)
        batch = heatmap.shape[0]
        logits.append(heatmap_logits.reshape(batch, -1))
        heatmaps.append(heatmap.reshape(batch, -1))
        heatmap_valid.append(valid.reshape(batch, -1))
        predicted_boxes.append(_ltrb_to_relative_boxes(ltrb * stride).reshape(batch, -1, 4))
        target_boxes.append(_ltrb_to_relative_boxes(ltrb_target).reshape(batch, -1, 4))
        box_weights.append((reg_mask & valid).reshape(batch, -1))
    positive, negative = losses.heatmap_focal_loss(
        jnp.concatenate(logits, axis=1), jnp.concatenate(heatmaps, axis=1),
        jnp.concatenate(heatmap_valid, axis=1))
    giou = losses.giou_loss(jnp.concatenate(predicted_boxes, axis=1),
                            jnp.concatenate(target_boxes, axis=1),
                            jnp.concatenate(box_weights, axis=1).astype(jnp.float32))
    return {"heatmap_pos": positive, "heatmap_neg": negative, "giou": giou}


def decode(outputs: Sequence[LevelOutput], *, strides: Sequence[float], top_k: int,
           valid_wh: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The ``top_k`` highest heatmap peaks over all levels as boxes.

    A peak is a cell whose sigmoid score is the maximum of its 3x3 neighbourhood and whose centre
    lies inside the valid image area; other cells score 0, so they rank last (and fill the
    ``top_k`` when there are fewer peaks). No NMS.

    Args:
      outputs: :class:`ProposalHead` outputs; ``strides``: each level's stride (pixels).
      top_k: number of proposals, at most the total number of cells.
      valid_wh: ``[B, 2]`` (width, height) of the unpadded image area.

    Returns ``boxes [B, top_k, 4]`` canvas pixels clipped to the valid area, and ``scores [B,
    top_k]`` (heatmap probabilities, descending).
    """
    if len(strides) != len(outputs):
        raise ValueError(f"{len(strides)} strides for {len(outputs)} levels")
    num_cells = sum(heatmap_logits.shape[1] * heatmap_logits.shape[2]
                    for heatmap_logits, _ in outputs)
    if top_k > num_cells:
        raise ValueError(f"top_k {top_k} exceeds the {num_cells} cells of all levels")
    valid_wh = jnp.asarray(valid_wh, jnp.float32)
    all_boxes, all_scores = [], []
    for (heatmap_logits, ltrb), stride in zip(outputs, strides):
        batch, height, width = heatmap_logits.shape
        scores = jax.nn.sigmoid(heatmap_logits.astype(jnp.float32))
        neighbourhood_max = jax.lax.reduce_window(scores, -jnp.inf, jax.lax.max, (1, 3, 3),
                                                  (1, 1, 1), "SAME")
        cell_x, cell_y = _cell_centres((height, width), stride)
        cell_x, cell_y = cell_x[None, None, :], cell_y[None, :, None]
        inside = ((cell_x < valid_wh[:, 0, None, None]) & (cell_y < valid_wh[:, 1, None, None]))
        scores = jnp.where((scores == neighbourhood_max) & inside, scores, 0.0)
        distances = ltrb.astype(jnp.float32) * stride
        boxes = jnp.stack([cell_x - distances[..., 0], cell_y - distances[..., 1],
                           cell_x + distances[..., 2], cell_y + distances[..., 3]], axis=-1)
        all_boxes.append(boxes.reshape(batch, -1, 4))
        all_scores.append(scores.reshape(batch, -1))
    boxes = jnp.concatenate(all_boxes, axis=1)
    scores = jnp.concatenate(all_scores, axis=1)
    top_scores, top_index = jax.lax.top_k(scores, top_k)
    top_boxes = jnp.take_along_axis(boxes, top_index[..., None], axis=1)
    return box_ops.clip(top_boxes, valid_wh[:, None, :]), top_scores


def assign_captions(proposals: jax.Array, gt_boxes: jax.Array, gt_mask: jax.Array, *,
                    iou_threshold: float = 0.6) -> tuple[jax.Array, jax.Array]:
    """GRiT's caption assignment: each proposal takes its highest-IoU real ground truth.

    Args:
      proposals: ``[B, P, 4]``; ``gt_boxes: [B, G, 4]``; ``gt_mask: [B, G]`` bool.

    Returns ``gt_index [B, P]`` int32 (the best ground truth; 0 where none is real) and
    ``matched [B, P]`` bool (its IoU >= ``iou_threshold``).
    """
    if gt_boxes.shape[1] == 0:
        raise ValueError("assign_captions needs at least one ground-truth slot (G >= 1)")
    overlap = box_ops.pairwise_iou(proposals.astype(jnp.float32), gt_boxes.astype(jnp.float32))
    overlap = jnp.where(gt_mask.astype(bool)[:, None, :], overlap, -1.0)
    gt_index = jnp.argmax(overlap, axis=-1).astype(jnp.int32)
    matched = jnp.max(overlap, axis=-1) >= iou_threshold
    return gt_index, matched
