"""F-LMM's released checkpoints -> :class:`~pixelllm.models.flmm.flmm.FlmmHead`, and the whole
published model (frozen LLaVA-1.5 + trained head) from its three files.

The LLaVA-1.5-7B release is ``frozen_llava_1_5_vicuna_7b_unet_sam_l_refcoco_png.pth`` (F-LMM's
README, "Checkpoints"; its config is ``configs/llava/`` of the same name, ``.py``).
F-LMM reads it with xtuner's ``guess_load_checkpoint`` (``torch.load``, then the ``state_dict``
entry if there is one) and ``model.load_state_dict(state_dict, strict=False)`` onto a
``FrozenLlavaSAM`` whose LLaVA comes from ``llava-hf/llava-1.5-7b-hf`` and whose SAM from
``sam_vit_l_0b3195.pth`` (``scripts/multiprocess_eval_refcoco.py``). xtuner trains it with
DeepSpeed and ``exclude_frozen_parameters``, and ``scripts/deepspeed2torch_state_dict.py``
writes the ZeRO checkpoint's trained parameters and persistent buffers as a plain dict: the
frozen LLaVA and SAM image encoder are not in it. Its keys, and where they go:

======================================================  ==========================================
``mask_head.*`` (mmseg ``UNet`` + ``conv_seg``)         ``mask_head`` (:func:`mask_head.key_rules`)
``text_layer_weights`` ``[L]`` (32)                     ``refiner.text_projection.layer_weights``
``text_proj.{weight,bias}`` ``[256, D]``, ``[256]``     ``refiner.text_projection.proj``
``sam.model.prompt_encoder.*`` (with the Fourier        ``refiner.sam.prompt_encoder``
buffer ``pe_layer.positional_encoding_gaussian_matrix``)
``sam.model.mask_decoder.*``                            ``refiner.sam.mask_decoder``
``sam.model.image_encoder.*`` (frozen, not released)    ``refiner.sam.image_encoder``, from the SAM
                                                        file (``image_encoder.*``)
``llava.*`` (frozen, not released)                      ignored: the LMM is its own module,
                                                        loaded from llava-hf (:mod:`.llava`)
======================================================  ==========================================

Any other key, a missing one or another shape raises
:class:`~pixelllm.checkpoints.assign.CheckpointMismatchError` naming the file and the keys, and
leaves the head unchanged. The file is read by the project's restricted unpickler
(:func:`~pixelllm.checkpoints.state_dict.read_state_dict`), which builds tensors and plain
containers only and never runs what a pickle names.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelllm.checkpoints import key_map
from pixelllm.checkpoints.assign import (WEIGHTS, CheckpointMismatchError, assign,
                                         param_shapes, stack_depth, stored_shape)
from pixelllm.checkpoints.key_map import TRANSPOSE, Rule
from pixelllm.checkpoints.state_dict import checkpoint_file, state_dict_and_source
from pixelllm.encoders.sam import image_encoder as image_encoder_lib
from pixelllm.encoders.sam import mask_decoder as mask_decoder_lib
from pixelllm.encoders.sam import prompt_encoder as prompt_encoder_lib
from pixelllm.encoders.sam import sam as sam_lib
from pixelllm.models.flmm import llava as llava_lib
from pixelllm.models.flmm import mask_head as mask_head_lib
from pixelllm.models.flmm.flmm import FlmmHead
from pixelllm.models.flmm.mask_head import UNetMaskHead
from pixelllm.models.flmm.refiner import SamRefiner

_log = logging.getLogger(__name__)

Checkpoint = str | os.PathLike | Mapping[str, np.ndarray]

RELEASED_CHECKPOINT = "frozen_llava_1_5_vicuna_7b_unet_sam_l_refcoco_png.pth"
SAM_CHECKPOINT = "sam_vit_l_0b3195.pth"
# F-LMM's config: `upsample_input=64` (not recorded in the weights).
UPSAMPLE_INPUT = 64

# FrozenLlavaSAM's attribute names (flmm/models/frozen_llava.py) and SAMWrapper's `model`.
_MASK_HEAD, _LAYER_WEIGHTS, _TEXT_PROJ = "mask_head.", "text_layer_weights", "text_proj."
_SAM = "sam.model."
_FROZEN_IMAGE_ENCODER, _FROZEN_LLAVA = _SAM + "image_encoder.", "llava."
# mmengine checkpoints wrap the model's dict; guess_load_checkpoint unwraps it.
_WRAPPER = "state_dict."
# segment_anything builds the mask decoder's block LayerNorms with torch's default eps.
_MASK_DECODER_EPS = 1e-5
_IMAGE_ENCODER = "refiner/sam/image_encoder/"

_TEXT_RULES = [Rule(_LAYER_WEIGHTS, "refiner/text_projection/layer_weights"),
               Rule(_TEXT_PROJ + "weight", "refiner/text_projection/proj/kernel", TRANSPOSE),
               Rule(_TEXT_PROJ + "bias", "refiner/text_projection/proj/bias")]


def unwrap(state_dict: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """The model's tensors of a release (a plain dict) or of an mmengine checkpoint, whose
    ``{"state_dict": ..., "meta": ...}`` the reader flattens to ``state_dict.<key>``."""
    if any(key.startswith(_WRAPPER) for key in state_dict):
        return {k[len(_WRAPPER):]: v for k, v in state_dict.items() if k.startswith(_WRAPPER)}
    return state_dict


def key_rules(head: FlmmHead) -> list[Rule]:
    """The key map of ``head``'s trained parameters (everything but SAM's image encoder) from a
    released file's keys (module docstring)."""
    iou_depth = len(head.refiner.sam.mask_decoder.iou_prediction_head.layers)
    return (key_map.prefixed(mask_head_lib.key_rules(), source=_MASK_HEAD, target="mask_head/")
            + _TEXT_RULES
            + key_map.prefixed(prompt_encoder_lib.key_rules("segment_anything"),
                               source=_SAM + "prompt_encoder.",
                               target="refiner/sam/prompt_encoder/")
            + key_map.prefixed(mask_decoder_lib.key_rules("segment_anything",
                                                          iou_head_depth=iou_depth),
                               source=_SAM + "mask_decoder.", target="refiner/sam/mask_decoder/"))


def _image_encoder_rules(prefix: str, layout: str) -> list[Rule]:
    return key_map.prefixed(image_encoder_lib.key_rules(layout), source=prefix,
                            target=_IMAGE_ENCODER)


def _is_image_encoder(path: tuple, _) -> bool:
    return "/".join(str(p) for p in path).startswith(_IMAGE_ENCODER)


def load(head: FlmmHead, state_dict: Mapping[str, np.ndarray], *, source: str,
         sam_state_dict: Mapping[str, np.ndarray] | None = None,
         sam_source: str = "SAM state dict") -> FlmmHead:
    """Fills ``head`` (in place, strictly, all or nothing) from a released F-LMM state dict
    (module docstring) and SAM's image encoder from ``sam_state_dict`` (a segment_anything
    file's ``image_encoder.*`` or a Hugging Face ``SamModel``'s ``vision_encoder.*``; its prompt
    encoder and mask decoder are the pretrained ones F-LMM's file replaces, so they are not
    read), or from the F-LMM file's own
    ``sam.model.image_encoder.*`` when that is None. Returns ``head``.

    Every trained tensor and image-encoder weight is converted and checked before anything is
    assigned; a mismatch raises :class:`CheckpointMismatchError` naming the file (``source`` or
    ``sam_source``) and the keys.
    """
    state_dict = unwrap(state_dict)
    frozen = [key for key in state_dict if key.startswith(_FROZEN_LLAVA)]
    if frozen:
        _log.info("%s: its %d frozen LLaVA keys (%s*) are ignored; the LMM is loaded from "
                  "llava-hf", source, len(frozen), _FROZEN_LLAVA)
    own_encoder = {k: v for k, v in state_dict.items() if k.startswith(_FROZEN_IMAGE_ENCODER)}
    if sam_state_dict is None and not own_encoder:
        raise CheckpointMismatchError(
            f"{source}: holds no SAM image encoder keys ({_FROZEN_IMAGE_ENCODER}*), as F-LMM's "
            f"released files do not; pass the SAM checkpoint ({SAM_CHECKPOINT})")
    trained = nnx.All(WEIGHTS, nnx.Not(_is_image_encoder))
    params, _ = key_map.apply_key_map(
        state_dict, key_rules(head), source=source, expected=param_shapes(head, trained),
        drop=(_FROZEN_LLAVA + "*", _FROZEN_IMAGE_ENCODER + "*"))
    if sam_state_dict is not None:
        if own_encoder:
            _log.info("%s: its %d SAM image encoder keys are ignored; the encoder comes from %s",
                      source, len(own_encoder), sam_source)
        layout = sam_lib.detect_layout(sam_state_dict, source=sam_source)
        prefix = "image_encoder." if layout == "segment_anything" else "vision_encoder."
        encoder_keys = {k: v for k, v in sam_state_dict.items() if k.startswith(prefix)}
        encoder_rules, encoder_source = _image_encoder_rules(prefix, layout), sam_source
    else:
        encoder_keys, encoder_source = own_encoder, source
        encoder_rules = _image_encoder_rules(_FROZEN_IMAGE_ENCODER, "segment_anything")
    encoder_params, _ = key_map.apply_key_map(
        encoder_keys, encoder_rules, source=encoder_source,
        expected=param_shapes(head, nnx.All(WEIGHTS, _is_image_encoder)),
        hint=f"F-LMM's refiner uses SAM ViT-L ({SAM_CHECKPOINT})")
    assign(head, {**params, **encoder_params}, source=source)
    for layer in head.refiner.sam.mask_decoder.transformer.layers:
        for norm in (layer.norm1, layer.norm2, layer.norm3, layer.norm4):
            norm.epsilon = _MASK_DECODER_EPS
    return head


# ------------------------------------------------------------------------------------- build


def config_from_state_dict(state_dict: Mapping[str, np.ndarray], *, source: str
                           ) -> dict[str, dict[str, int]]:
    """The head's sizes read from a released file's shapes: ``{"mask_head": UNetMaskHead
    fields but upsample_input, "text": {"text_width", "num_text_layers", "prompt_width"}}``
    (LLaVA-1.5-7B: 1024 input channels, base 64, 4 stages, 2 convs; width 4096, 32 layers,
    256)."""
    state_dict = unwrap(state_dict)
    head = _MASK_HEAD + "encoder."
    out_channels, in_channels, _, _ = stored_shape(state_dict, head + "0.0.convs.0.conv.weight",
                                                  rank=4, source=source, family="F-LMM")
    prompt_width, text_width = stored_shape(state_dict, _TEXT_PROJ + "weight", rank=2,
                                             source=source, family="F-LMM")
    return {
        "mask_head": dict(
            in_channels=in_channels, base_channels=out_channels,
            num_stages=stack_depth(state_dict, head),
            convs_per_stage=stack_depth(state_dict, head + "0.0.convs.")),
        "text": dict(text_width=text_width, prompt_width=prompt_width,
                     num_text_layers=stored_shape(state_dict, _LAYER_WEIGHTS, rank=1,
                                                  source=source, family="F-LMM")[0]),
    }


def build_head(config: Mapping[str, Mapping[str, int]], sam_fields: Mapping[str, Any], *,
               rngs: nnx.Rngs, upsample_input: int = UPSAMPLE_INPUT,
               dtype: jnp.dtype = jnp.float32) -> FlmmHead:
    """An :class:`FlmmHead` of :func:`config_from_state_dict`'s sizes around a SAM of
    ``sam_fields`` (:func:`~pixelllm.encoders.sam.sam.config_from_state_dict`'s layout)."""
    sam = sam_lib.Sam(**sam_fields, dtype=dtype, rngs=rngs)
    text = config["text"]
    if text["prompt_width"] != sam.prompt_encoder.embed_dim:
        raise CheckpointMismatchError(
            f"F-LMM's text_proj gives {text['prompt_width']} features; the SAM's prompt width is "
            f"{sam.prompt_encoder.embed_dim}")
    refiner = SamRefiner(sam=sam, text_width=text["text_width"],
                         num_text_layers=text["num_text_layers"], rngs=rngs)
    unet = UNetMaskHead(**config["mask_head"], upsample_input=upsample_input, rngs=rngs,
                        dtype=dtype)
    return FlmmHead(mask_head=unet, refiner=refiner)


def load_head(flmm: Checkpoint, *, sam: Checkpoint, sam_config: Mapping | None = None,
              dtype: jnp.dtype = jnp.float32, upsample_input: int = UPSAMPLE_INPUT) -> FlmmHead:
    """The trained head of a released F-LMM: built from ``flmm``'s shapes and ``sam``'s (the
    ``sam_vit_l_0b3195.pth`` file, or a state dict) at SAM's pretraining input size (F-LMM
    resizes to the image encoder's ``img_size``, 1024), then filled by :func:`load`.
    ``sam_config``: SAM's model fields (``configs/sam.py``'s ``model``) instead of the file's
    shapes, which do not hold the decoder's head count (8 in every released SAM)."""
    state_dict, source = state_dict_and_source(flmm, what="F-LMM")
    return _head(state_dict, source, sam=sam, sam_config=sam_config, dtype=dtype,
                 upsample_input=upsample_input)


def _head(state_dict: Mapping[str, np.ndarray], source: str, *, sam: Checkpoint,
          sam_config: Mapping | None, dtype: jnp.dtype, upsample_input: int) -> FlmmHead:
    """:func:`load_head` of a read F-LMM file named ``source``."""
    sam_state_dict, sam_source = state_dict_and_source(sam, what="SAM")
    config = config_from_state_dict(state_dict, source=source)
    sam_fields = sam_lib.model_fields(sam_state_dict, source=sam_source, config=sam_config)
    head = nnx.eval_shape(lambda: build_head(config, sam_fields, rngs=nnx.Rngs(0), dtype=dtype,
                                             upsample_input=upsample_input))
    return load(head, state_dict, source=source, sam_state_dict=sam_state_dict,
                sam_source=sam_source)


def check_lmm(head: FlmmHead, *, num_layers: int, num_heads: int, hidden_size: int,
              source: str) -> None:
    """Raises :class:`CheckpointMismatchError` naming ``source`` unless ``head`` reads an LMM of
    these sizes: ``num_layers x num_heads`` attention channels and ``num_layers`` hidden states of
    ``hidden_size`` (F-LMM sizes both from the LLaVA config, ``frozen_llava.py``)."""
    channels = head.mask_head.encoder[0][0].conv.kernel.get_value().shape[2]
    text = head.refiner.text_projection
    layers = text.layer_weights.get_value().shape[0]
    if (channels, layers, text.width) != (num_layers * num_heads, num_layers, hidden_size):
        raise CheckpointMismatchError(
            f"{source}: the head reads {channels} attention channels and {layers} hidden layers "
            f"of width {text.width}; the LMM gives {num_layers * num_heads} ({num_layers} layers "
            f"x {num_heads} heads) and {num_layers} layers of width {hidden_size}")


def load_released(*, flmm: Checkpoint, sam: Checkpoint, llava: str | os.PathLike,
                  sam_config: Mapping | None = None, dtype: jnp.dtype = jnp.float32
                  ) -> tuple[llava_lib.Llava, FlmmHead]:
    """The published F-LMM: ``(frozen LLaVA, trained head)`` from the released ``flmm`` file,
    ``sam`` (``sam_vit_l_0b3195.pth``) and ``llava`` (the ``llava-hf/llava-1.5-7b-hf`` folder,
    read by :func:`~pixelllm.models.flmm.llava.load_llava`). The head is checked against the
    LLaVA's ``config.json`` (:func:`check_lmm`) before the LLaVA's weights are read;
    ``sam_config`` as in :func:`load_head`."""
    state_dict, source = state_dict_and_source(flmm, what="F-LMM")
    head = _head(state_dict, source, sam=sam, sam_config=sam_config, dtype=dtype,
                 upsample_input=UPSAMPLE_INPUT)
    config_path = Path(checkpoint_file(llava)).parent / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: no config.json beside {checkpoint_file(llava)}")
    lmm = llava_lib.config_from_hf(json.loads(config_path.read_text()),
                                   source=str(config_path))["language_model"]
    check_lmm(head, num_layers=lmm["num_layers"], num_heads=lmm["num_heads"],
              hidden_size=lmm["hidden_size"], source=f"{source} with {config_path}")
    return llava_lib.load_llava(llava, dtype=dtype), head
