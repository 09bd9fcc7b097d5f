"""PixelLLM: SAM (frozen) + EVA02 (trained) + a frozen language model with LoRA, and its heads.

  --config=configs/pixelllm.py:t5_xl         the paper's model: SAM ViT-H + EVA02-L + Flan-T5-XL
  --config=configs/pixelllm.py:gemma2_2b     SAM ViT-H + EVA02-L + Gemma 2 2B
  --config=configs/pixelllm.py:llama3_2_1b   SAM ViT-H + EVA02-L + Llama 3.2 1B
  --config=configs/pixelllm.py:tiny          tiny encoders + tiny T5 on a 32-pixel canvas (seconds)
  --config=configs/pixelllm.py:tiny_decoder  the same with a tiny Llama-style decoder

Both encoders run on the 384 canvas as the official PixelLLM (SAM: 24x24x256; EVA02-L/14: 27x27,
the last 6 pixels unseen); their maps are fused at 27x27x1280. Module sizes follow the official
code (scenic `projects/pixel_llm/modeling/prompt_adapter.py`, `point_predictor.py`,
`mask_adapter.py`): prompt adapter depth 6 / width 512 / 8 heads / MLP 2048 / 32 queries, point
MLP 3 x 512, mask adapter 2 layers of 256; the proposal head is the official CenterNet2
(`box_decoder.py`: a simple feature pyramid from the fused map, CenterNet proposals, one RoI
stage), or the light single-level head (`--config.model.proposal_head.kind=light`).

`dtype` is the compute dtype of the whole model ("bfloat16" on accelerators; parameters stay
float32), `remat` its rematerialization policy ("none" keeps every activation), and
`eva02.scan_layers` runs EVA02's blocks as one scanned layer. The config comes back locked: a
misspelt field (`config.loss.mask_dise = 5.0`) raises instead of adding a key nobody reads;
`--config.x=y` overrides existing fields as usual.
"""

import ml_collections

from configs import common
from configs import decoder_lm as decoder_lm_config
from configs import eva02 as eva02_config
from configs import sam as sam_config
from configs import t5 as t5_config
from pixelllm.models.pixel_llm import centernet2

_LANGUAGE_MODELS = {
    "t5_xl": ("t5", "flan_t5_xl"),
    "gemma2_2b": ("decoder", "gemma2_2b"),
    "llama3_2_1b": ("decoder", "llama3_2_1b"),
    "tiny": ("t5", "tiny"),
    "tiny_decoder": ("decoder", "tiny_llama"),
}


def _language_model(kind: str, variant: str) -> dict:
    source = t5_config if kind == "t5" else decoder_lm_config
    return {"kind": kind, "model": source.get_config(variant).model.to_dict()}


def _centernet2(tiny: bool) -> dict:
    """The official detector's settings (scenic ``configs/t5/pixel_llm_t5_densecap.py``
    ``box_decoder_args``); tiny: the same structure on a 32-pixel canvas, strides and sizes / 4."""
    if tiny:
        return dict(width=32, upsample_features=16, num_convs=1, roi_hidden=(32, 32),
                    strides=(2.0, 4.0, 8.0, 16.0, 32.0),
                    size_ranges=((0.0, 10.0), (8.0, 20.0), (16.0, 40.0), (32.0, 80.0),
                                 (64.0, 12500.0)),
                    min_radius=1.0, pre_nms_train=64, post_nms_train=16, pre_nms_test=32,
                    post_nms_test=16, proposal_nms_iou=0.9, roi_iou=0.6, roi_samples=16,
                    roi_positive_fraction=0.25, roi_size=7, roi_sampling_ratio=2,
                    mult_proposal_score=True, detection_score_threshold=0.05,
                    detection_nms_iou=0.5, num_detections=8)
    return dict(width=256, upsample_features=384, num_convs=4, roi_hidden=(1024, 1024),
                strides=centernet2.OFFICIAL_STRIDES, size_ranges=centernet2.OFFICIAL_SIZE_RANGES,
                min_radius=4.0, pre_nms_train=2000, post_nms_train=1000, pre_nms_test=1000,
                post_nms_test=256, proposal_nms_iou=0.9, roi_iou=0.6, roi_samples=512,
                roi_positive_fraction=0.25, roi_size=7, roi_sampling_ratio=2,
                mult_proposal_score=True, detection_score_threshold=0.05, detection_nms_iou=0.5,
                num_detections=100)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "t5_xl"
    if variant not in _LANGUAGE_MODELS:
        raise ValueError(f"unknown PixelLLM variant {variant!r}; choose from "
                         f"{sorted(_LANGUAGE_MODELS)}")
    tiny = variant.startswith("tiny")
    canvas = 32 if tiny else 384
    sam = sam_config.get_config("tiny" if tiny else "vit_h").model.to_dict()
    sam["image_encoder"]["img_size"] = canvas
    # The official runs its frozen SAM in training mode: drop path 0.5 (last block) while
    # training (scenic configs/t5/*.py `sam_backbone_args.drop_path_rate`).
    sam["image_encoder"]["drop_path_rate"] = 0.0 if tiny else 0.5
    eva02 = eva02_config.get_config("tiny" if tiny else "large").model.to_dict()
    eva02.update(img_size=canvas, drop_path_rate=0.0 if tiny else 0.1, scan_layers=False)

    config = ml_collections.ConfigDict()
    config.variant = variant
    config.model_class = "pixelllm.models.pixel_llm.pixel_llm.PixelLLM"
    config.model = ml_collections.ConfigDict({
        "canvas_size": canvas,
        "dtype": "float32",
        "remat": "none",
        "sam": sam,
        "eva02": eva02,
        "language_model": _language_model(*_LANGUAGE_MODELS[variant]),
        # style "official": per-query output layers, N(0, 1) queries, one prompt projection;
        # "shared_output": our lighter variant (one shared output layer, 16M fewer parameters).
        # box_pad_tokens: no_mask_embed copies after a box's 2 corner tokens (official 3; 0 ours).
        "prompt_adapter": dict(style="official", box_pad_tokens=3, **(
            dict(dim=32, depth=2, num_heads=4, mlp_dim=64, num_queries=4, visual_features=32)
            if tiny else
            dict(dim=512, depth=6, num_heads=8, mlp_dim=2048, num_queries=32,
                 visual_features=1024))),
        # box_source "points" (official): the referring box is the min/max of the EOS-emitting
        # token's points; "box_out" (extension) gives it its own output layer.
        "point_head": dict(num_points=2, hidden_features=32 if tiny else 512, depth=3,
                           box_source="points"),
        "mask_adapter": (dict(num_queries=2, depth=1, num_heads=4, mlp_dim=64) if tiny else
                         dict(num_queries=2, depth=2, num_heads=8, mlp_dim=2048)),
        # kind "centernet2" (official detector) or "light" (one CenterNet level, no RoI stage).
        "proposal_head": dict(kind="centernet2", centernet2=_centernet2(tiny), light=dict(
            hidden=16 if tiny else 256, num_convs=2 if tiny else 4, num_levels=1,
            top_k=8 if tiny else 100, iou_threshold=0.6, min_radius=4.0)),
        # Caption slots per dense-captioning image in training (official 32 in the densecap
        # stage, 16 in multi-task); mult_caption_score: rank detections by sqrt(detector score x
        # caption likelihood) instead of the detector's score (official False).
        "dense_captioning": dict(num_text_proposals=2 if tiny else 16, mult_caption_score=False),
        "frozen": ("sam",),
    })
    # Loss weights (pixelllm/models/pixel_llm/objective.py). Pixel L1 terms: the official 0.1.
    config.loss = ml_collections.ConfigDict({
        "text": 1.0, "label_smoothing": 0.1,
        # Official referring loss: L1 on the box corners only (GIoU weight 0; our extension:
        # 1.0) and no text loss on referring slots (text_on_referring False; extension: True).
        "point": 0.1, "box_l1": 0.1, "box_giou": 0.0, "text_on_referring": False,
        # Official sam_mask_loss: dice and the IoU target over the whole canvas (padding
        # included); mask_overlap_valid_only True takes them over the valid area.
        "mask_focal": 20.0, "mask_dice": 1.0, "mask_iou_mse": 1.0,
        "mask_overlap_valid_only": False,
        # CenterNet2's det_loss (det_loss_weight 1): heatmap focal 0.5, GIoU 1, RoI class and
        # box 1 (the light head has no RoI terms).
        "proposal_heatmap": 0.5, "proposal_giou": 1.0, "proposal_roi_class": 1.0,
        "proposal_roi_box": 1.0,
    })
    config.sharding = common.sharding_config()
    config.lock()
    return config
