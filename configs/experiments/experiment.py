"""An experiment: a PixelLLM model config and an input-pipeline config that agree on their sizes.

The data variant (``configs/data.py``) declares the batch contract sizes once, in
``config.data.sizes``: canvas, points per token, slots, context and text lengths, objects; its op
chains are built from them. :func:`build` writes the sizes the model also needs from there
(``model.canvas_size`` and both encoders' input size, ``model.point_head.num_points``) and
:func:`check` (:mod:`pixelllm.config_sizes`) refuses any disagreement left, naming both
fields. ``build`` runs the check, and the trainer runs it again after ``--config.x=y``
overrides.
"""

from __future__ import annotations

import ml_collections

from configs import data as data_config
from configs import pixelllm as pixelllm_config
from pixelllm.config_sizes import check


def build(*, model_variant: str, data_variant: str) -> ml_collections.ConfigDict:
    """``configs/pixelllm.py:<model_variant>`` + ``configs/data.py:<data_variant>``, tied and
    checked; returned locked (fields may change, none may be added)."""
    model = pixelllm_config.get_config(model_variant)
    data = data_config.get_config(data_variant)
    config = ml_collections.ConfigDict()
    config.model_variant = model_variant
    config.data_variant = data_variant
    config.model_class = model.model_class
    config.model = model.model
    config.loss = model.loss
    config.sharding = model.sharding
    config.data = data
    canvas = data.sizes.canvas
    config.model.canvas_size = canvas
    config.model.sam.image_encoder.img_size = canvas
    config.model.eva02.img_size = canvas
    config.model.point_head.num_points = data.sizes.points_per_token
    # Dense captioning writes its caption candidates into the batch's slots: at most as many.
    config.model.dense_captioning.num_text_proposals = min(
        config.model.dense_captioning.num_text_proposals, data.sizes.slots)
    config.lock()
    check(config)
    return config


__all__ = ["build", "check"]
