"""LISA's evaluation: gIoU and cIoU of a :class:`~pixelllm.models.lisa.lisa.Lisa` on ReasonSeg or
RefCOCO, as LISA's ``train_ds.py`` ``validate()`` computes them.

Each validation sample (:mod:`data_pipelines.lisa_inputs`, LISA's ``ValDataset``) holds the
question teacher-forced with the answer ``[SEG].``; the model's mask logits, post-processed to
the original resolution (:func:`~pixelllm.encoders.sam.sam.postprocess_masks`), are thresholded
at ``> 0`` and scored by :class:`~pixelllm.evaluators.reason_seg.ReasonSegEvaluator` (255 pixels
of the ground truth ignored; mask ids ``"<image id>/<query index>"``, RefCOCO
``"<image id>/<expression id>"``).

The model runs under one ``jax.jit`` over its split state (:class:`MaskRunner`), which compiles
once per static shape: samples of the same :class:`~data_pipelines.lisa_inputs.LisaSizes` in
batches of ``batch_size`` (the last batch padded with copies of its last sample, whose masks are
not scored).

Command line (a released LISA checkpoint on built data sets)::

    python -m pixelllm.models.lisa.evaluation --config=configs/lisa.py:lisa_7b \\
        --lisa=LISA-7B-v1/ --clip=clip-vit-large-patch14/ --tokenizer=LISA-7B-v1/ \\
        --data_dir=~/tensorflow_datasets --splits=reason_seg:val,refer_coco/refcoco_unc:val

prints our numbers beside LISA-7B's published ones (:data:`PUBLISHED`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from data_pipelines import lisa_inputs
from pixelllm.evaluators.reason_seg import ReasonSegEvaluator
from pixelllm.language.tokenizer import Tokenizer, load_tokenizer
from pixelllm.models.lisa import checkpoint
from pixelllm.models.lisa.lisa import LisaInputs

# LISA-7B's numbers in the paper (Lai et al., CVPR 2024): ReasonSeg val (Table 1, LISA-7B without
# fine-tuning on ReasonSeg train) and RefCOCO val cIoU (Table 3).
PUBLISHED = {
    "reason_seg:val": {"gIoU": 0.444, "cIoU": 0.460},
    "refer_coco/refcoco_unc:val": {"cIoU": 0.741},
}


class MaskRunner:
    """The teacher-forced model under one ``jax.jit``: ``(inputs) -> (mask logits [B, M, H, W],
    mask_valid [B, M])`` as numpy. ``traces`` counts compilations (one per static shape)."""

    def __init__(self, model: nnx.Module):
        graphdef, self._state = nnx.split(model)
        self.traces = 0

        def forward(state, inputs: LisaInputs, max_masks: int, mask_hw: tuple[int, int]):
            self.traces += 1
            out = nnx.merge(graphdef, state)(inputs, max_masks=max_masks, mask_hw=mask_hw)
            return out.masks, out.mask_valid

        self._forward = jax.jit(forward, static_argnums=(2, 3))

    def __call__(self, inputs: LisaInputs, *, max_masks: int, mask_hw: tuple[int, int]
                 ) -> tuple[np.ndarray, np.ndarray]:
        masks, valid = self._forward(self._state, inputs, max_masks, tuple(mask_hw))
        return np.asarray(masks), np.asarray(valid)


def _batches(samples: Iterable[Mapping[str, Any]], size: int) -> Iterator[list]:
    iterator = iter(samples)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def evaluate(runner: MaskRunner, samples: Iterable[Mapping[str, Any]], *, split: str,
             batch_size: int) -> dict[str, float]:
    """Scores ``samples`` (validation samples of one split, same sizes) with ``runner``; returns
    :meth:`ReasonSegEvaluator.result` (``gIoU``, ``cIoU``, ``num_masks`` ...).

    Raises ``ValueError`` naming the image when the model's ``[SEG]`` slots do not cover the
    sample's masks (the tokens and the model disagree on the ``[SEG]`` id)."""
    evaluator = ReasonSegEvaluator(split=split)
    for chunk in _batches(samples, batch_size):
        batch = lisa_inputs.collate(chunk + [chunk[-1]] * (batch_size - len(chunk)))
        masks, valid = runner(lisa_inputs.lisa_inputs(batch), max_masks=batch["masks"].shape[1],
                              mask_hw=batch["masks"].shape[2:])
        for index in range(len(chunk)):
            ids = batch["mask_ids"][index]
            height, width = (int(v) for v in batch["original_hw"][index])
            if not valid[index, :len(ids)].all():
                raise ValueError(f"{split}: example {batch['image_id'][index]}: the model found "
                                 f"{int(valid[index].sum())} [SEG] for {len(ids)} masks")
            evaluator.add(mask_ids=ids,
                          pred_masks=masks[index, :len(ids), :height, :width] > 0,
                          gt_masks=batch["masks"][index, :len(ids), :height, :width])
    return evaluator.result()


# ---------------------------------------------------------------------------------- data


def read_split(builder_name: str, split: str, *, data_dir: str) -> Iterator[Mapping[str, Any]]:
    """The examples of a built TFDS split, read from its array_record files without TensorFlow
    (``builder.as_data_source()``)."""
    # Imported here: only reading built data needs TFDS and the builders (registration).
    import tensorflow_datasets as tfds

    from data_pipelines.builders import reason_seg, refcoco  # noqa: F401

    source = tfds.builder(builder_name, data_dir=data_dir).as_data_source()[split]
    for index in range(len(source)):
        yield source[index]


def validation_samples(builder_name: str, examples: Iterable[Mapping[str, Any]], *,
                       tokenizer: Tokenizer, seg_token_id: int,
                       sizes: lisa_inputs.LisaSizes) -> Iterator[dict[str, Any]]:
    """LISA's validation samples of ``reason_seg`` (the first query per image) or
    ``refer_coco/*`` (every sentence) examples."""
    common = dict(tokenizer=tokenizer, seg_token_id=seg_token_id, sizes=sizes)
    name = builder_name.split("/")[0]
    if name not in ("reason_seg", "refer_coco"):
        raise ValueError(f"no LISA validation samples for builder {builder_name!r}; "
                         "reason_seg or refer_coco/<config>")
    for example in examples:
        if name == "reason_seg":
            yield lisa_inputs.reason_seg_val_sample(example, **common)
        else:
            yield from lisa_inputs.refcoco_val_samples(example, **common)


def format_table(results: Mapping[str, Mapping[str, float]],
                 published: Mapping[str, Mapping[str, float]] = PUBLISHED) -> str:
    """``split  metric  ours  LISA-7B (paper)`` rows, percentages."""
    rows = [f"{'split':<28} {'metric':<6} {'ours':>7} {'LISA-7B':>8}"]
    for split, metrics in results.items():
        for metric in ("gIoU", "cIoU"):
            paper = published.get(split, {}).get(metric)
            paper_text = f"{100 * paper:8.1f}" if paper is not None else f"{'-':>8}"
            rows.append(f"{split:<28} {metric:<6} {100 * metrics[metric]:7.1f} {paper_text}")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------- main

_LISA = flags.DEFINE_string("lisa", None, "LISA checkpoint folder, shard index or file.")
_CLIP = flags.DEFINE_string("clip", None, "CLIP checkpoint (openai/clip-vit-large-patch14).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "LISA's tokenizer file or folder.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS folder the builders wrote.")
_SPLITS = flags.DEFINE_list("splits", ["reason_seg:val"], "builder:split entries.")
_BATCH = flags.DEFINE_integer("batch_size", 1, "Images per step.")
_MASK_SIDE = flags.DEFINE_integer("mask_side", 2560, "Masks are padded to this square side.")
_LENGTHS = flags.DEFINE_list("lengths", ["64", "256", "8"],
                             "Token slots: prompt before the image, after it, answer.")
_CONVERSATIONS = flags.DEFINE_integer("conversations", 8,
                                      "Sentences per sample for RefCOCO (ReasonSeg uses 1).")


def run(config, *, lisa: str, clip: str | None, tokenizer_path: str, data_dir: str,
        splits: Iterable[str], batch_size: int, mask_side: int, lengths: Iterable[int],
        conversations: int, log: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    """Builds ``config.model`` (a ``configs/lisa.py`` config), loads the checkpoints and scores
    each ``builder:split``; logs and returns ``{split: metrics}``."""
    tokenizer = load_tokenizer(tokenizer_path)
    model = checkpoint.build(config.model, rngs=nnx.Rngs(0))
    checkpoint.load_pretrained(model, lisa=lisa, clip=clip, tokenizer=tokenizer)
    runner = MaskRunner(model)
    before, after, answer = lengths
    results = {}
    for entry in splits:
        builder_name, split = entry.rsplit(":", 1)
        count = 1 if builder_name == "reason_seg" else conversations
        sizes = lisa_inputs.LisaSizes(
            conversations=count, prompt_before=before, prompt_after=after, tokens=answer,
            max_masks=count, mask_hw=(mask_side, mask_side),
            clip_image_size=config.sizes.clip_image_size,
            sam_image_size=config.sizes.sam_image_size)
        samples = validation_samples(builder_name,
                                     read_split(builder_name, split, data_dir=data_dir),
                                     tokenizer=tokenizer, seg_token_id=model.seg_token_id,
                                     sizes=sizes)
        results[entry] = evaluate(runner, samples, split=entry, batch_size=batch_size)
        log(f"{entry}: {results[entry]}")
    log(format_table(results))
    return results


def main(argv):
    del argv
    # `--config` is the flag pixelllm.tools.param_table defines (imported by checkpoint).
    run(flags.FLAGS.config, lisa=_LISA.value, clip=_CLIP.value, tokenizer_path=_TOKENIZER.value,
        data_dir=_DATA_DIR.value, splits=_SPLITS.value, batch_size=_BATCH.value,
        mask_side=_MASK_SIDE.value, lengths=[int(v) for v in _LENGTHS.value],
        conversations=_CONVERSATIONS.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "lisa", "tokenizer", "data_dir"])
    app.run(main)
