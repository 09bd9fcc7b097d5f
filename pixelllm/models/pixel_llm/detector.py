"""The detector interface of dense captioning: what PixelLLM asks of its proposal head.

Two implementations serve it, chosen by ``config.model.proposal_head.kind``:

* ``"centernet2"`` -- :class:`~pixelllm.models.pixel_llm.centernet2.CenterNet2`, the official
  detector (simple feature pyramid, CenterNet proposals, one RoI stage); the paper configs'
  default.
* ``"light"`` -- :class:`~pixelllm.models.pixel_llm.proposal_head.ProposalHead`, one
  CenterNet head on the fused map, peaks without NMS and no RoI stage; faster, lower mAP.

In training a detector returns its loss terms and the **caption candidates**: boxes in the
order in which they take the image's caption slots, each with its best ground truth and whether
it matches it (:func:`~pixelllm.models.pixel_llm.dense_captioning.assign_dense_caption_slots`
gives the first ``num_text_proposals`` matched ones a caption). In inference it returns a fixed
number of detections, ranked by its own score. Boxes are canvas pixels (README, Conventions).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple, Protocol

import jax

from pixelllm.nn import losses


class Detections(NamedTuple):
    """``boxes [B, N, 4]`` canvas pixels, ``scores [B, N]`` (descending over the valid ones),
    ``valid [B, N]`` bool (False: padding, fewer than ``N`` boxes survived)."""
    boxes: jax.Array
    scores: jax.Array
    valid: jax.Array


class CaptionCandidates(NamedTuple):
    """Training boxes in caption order: ``boxes [B, R, 4]`` canvas pixels (no gradient),
    ``gt_index [B, R]`` int32 (their best real ground truth) and ``matched [B, R]`` bool (IoU with
    it at or above the detector's threshold, and a real candidate)."""
    boxes: jax.Array
    gt_index: jax.Array
    matched: jax.Array


class DetectorTraining(NamedTuple):
    """A detector's training forward: its :class:`CaptionCandidates` and its loss terms (names
    without the objective's ``proposal_`` prefix, e.g. ``heatmap_pos``, ``giou``, ``roi_class``)."""
    candidates: CaptionCandidates
    terms: Mapping[str, losses.LossValue]


class Detector(Protocol):
    """What PixelLLM calls on its proposal head (both implementations are ``nnx.Module``s built
    with ``in_features``, ``canvas_size`` and their own settings)."""

    def forward_train(self, features: jax.Array, *, gt_boxes: jax.Array, gt_mask: jax.Array,
              image_weight: jax.Array, valid_wh: jax.Array, key: jax.Array
              ) -> DetectorTraining:
        """``features [B, h, w, C]`` (the fused map), ground truth ``gt_boxes [B, G, 4]`` and
        ``gt_mask [B, G]``, ``image_weight [B]`` (0: the image does not train detection, its
        ground truth is ignored), ``valid_wh [B, 2]``; ``key`` draws the training samples."""
        ...

    def detect(self, features: jax.Array, *, valid_wh: jax.Array) -> Detections:
        """Inference detections of ``features [B, h, w, C]``, a fixed number per image."""
        ...
