"""LISA's evaluation driver end to end: a tiny ReasonSeg val split built with the real builder
from files in the public layout, the tiny LISA of configs/lisa.py, gIoU/cIoU against a direct
numpy computation from the same model's masks, and a model whose masks are the ground truth."""

import io
import json

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
import transformers
from flax import nnx
from PIL import Image

from configs import lisa as lisa_config
from data_pipelines import lisa_inputs
from data_pipelines.builders import reason_seg
from pixelllm.language.hf_tokenizer import HFTokenizer
from pixelllm.models.lisa import checkpoint, evaluation
from pixelllm.models.lisa.lisa import LisaOutput
from tests import llama_sentencepiece

SP_VOCAB = 360
CORPUS = ["What is the red apple in this image? Please output segmentation mask.",
          "A chat between a curious human and an artificial intelligence assistant.",
          "The assistant gives helpful, detailed, and polite answers to the human's questions.",
          "USER: ASSISTANT: the thing that keeps people dry in the rain"]
# name -> (height, width, query, is_sentence, shapes); distinct sizes (the oracle keys on them).
IMAGES = {
    "apple": (10, 14, "the red apple", False,
              [{"label": "target", "points": [[2, 1], [9, 1], [9, 6], [2, 6]]},
               {"label": "ignore", "points": [[3, 2], [5, 2], [5, 3], [3, 3]]}]),
    "rain": (12, 9, "What keeps people dry in the rain?", True,
             [{"label": "target", "points": [[0, 5], [8, 5], [8, 11], [0, 11]]}]),
    "empty": (7, 16, "nothing", False, []),
}
SIZES = lisa_inputs.LisaSizes(conversations=1, prompt_before=96, prompt_after=80, tokens=8,
                              max_masks=1, mask_hw=(12, 16), clip_image_size=8,
                              sam_image_size=40)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A Llama-style tokenizer with configs/lisa.py's added tokens after its 360 pieces."""
    root = tmp_path_factory.mktemp("lisa_eval_tokenizer")
    llama_sentencepiece.write_model(root / "sp", CORPUS, vocab_size=SP_VOCAB)
    hf = transformers.LlamaTokenizer.from_pretrained(str(root / "sp"), add_bos_token=True)
    hf.add_tokens(list(lisa_config.ADDED_TOKENS[:3]), special_tokens=True)
    hf.add_tokens(lisa_config.ADDED_TOKENS[3])
    hf.save_pretrained(str(root / "lisa"))
    return HFTokenizer(root / "lisa" / "tokenizer.json")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lisa_eval_data")
    folder = root / "manual" / "ReasonSeg" / "val"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (height, width, query, is_sentence, shapes) in IMAGES.items():
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
            buffer, format="PNG")
        (folder / f"{name}.jpg").write_bytes(buffer.getvalue())
        (folder / f"{name}.json").write_text(json.dumps(
            {"text": [query], "is_sentence": is_sentence, "shapes": shapes}))
    reason_seg.ReasonSeg(data_dir=root / "tfds").download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=str(root / "manual")))
    return str(root / "tfds")


@pytest.fixture(scope="module")
def model():
    config = lisa_config.get_config("tiny")
    config.model.language_model.vocab_size = SP_VOCAB
    config.model.seg_token_id = SP_VOCAB + lisa_config.ADDED_TOKENS.index("[SEG]")
    return checkpoint.build(config.model, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def runner(model):
    """One jitted model for the module's tests (they share its static shape)."""
    return evaluation.MaskRunner(model)


def _samples(data_dir, tokenizer, seg_token_id):
    examples = evaluation.read_split("reason_seg", "val", data_dir=data_dir)
    return list(evaluation.validation_samples("reason_seg", examples, tokenizer=tokenizer,
                                              seg_token_id=seg_token_id, sizes=SIZES))


def _direct_metrics(pairs):
    """LISA's validate() by hand: per mask I, U over the non-255 pixels."""
    intersections, unions = [], []
    for pred, gt in pairs:
        counted = gt != 255
        intersections.append(np.sum(pred & (gt == 1) & counted))
        unions.append(np.sum((pred | (gt == 1)) & counted))
    i, u = np.array(intersections, float), np.array(unions, float)
    giou = np.sum(i / (u + 1e-5) + (u == 0)) / (len(i) + 1e-5)
    return giou, i.sum() / (u.sum() + 1e-10)


def test_driver_scores_the_models_masks(model, runner, tokenizer, data_dir):
    samples = _samples(data_dir, tokenizer, model.seg_token_id)
    assert sorted(s["image_id"] for s in samples) == ["apple", "empty", "rain"]
    result = evaluation.evaluate(runner, samples, split="reason_seg:val", batch_size=2)
    assert result["num_masks"] == 3 and result["num_duplicates_skipped"] == 0
    # Two batches (the second padded), one static shape: one compilation.
    assert runner.traces == 1
    # The same model's masks on batches of another composition, scored by hand.
    pairs = []
    for group, scored in (([samples[2], samples[0]], 2), ([samples[1], samples[1]], 1)):
        batch = lisa_inputs.collate(group)
        masks, valid = runner(lisa_inputs.lisa_inputs(batch), max_masks=1, mask_hw=(12, 16))
        assert valid[:, 0].all()
        for index, sample in enumerate(group[:scored]):
            height, width = sample["original_hw"]
            pairs.append((masks[index, 0, :height, :width] > 0,
                          sample["masks"][0, :height, :width]))
    assert runner.traces == 1
    giou, ciou = _direct_metrics(pairs)
    np.testing.assert_allclose(result["gIoU"], giou, rtol=1e-9)
    np.testing.assert_allclose(result["cIoU"], ciou, rtol=1e-9)
    table = evaluation.format_table({"reason_seg:val": result})
    assert "44.4" in table and "46.0" in table and f"{100 * result['gIoU']:.1f}" in table


class GroundTruthLisa(nnx.Module):
    """Mask logits +10 on the ground truth's target pixels and -10 elsewhere, found by the
    image's size (the test images' sizes are distinct)."""

    def __init__(self, samples):
        self.sizes = nnx.Variable(jnp.asarray([s["original_hw"] for s in samples]))
        self.targets = nnx.Variable(jnp.asarray([s["masks"][0] == 1 for s in samples]))

    def __call__(self, inputs, *, max_masks, mask_hw):
        match = jnp.all(inputs.original_hw[:, None] == self.sizes[...][None], axis=-1)
        target = jnp.einsum("bk,khw->bhw", match.astype(jnp.float32),
                            self.targets[...].astype(jnp.float32))
        masks = jnp.broadcast_to(jnp.where(target > 0.5, 10.0, -10.0)[:, None],
                                 (target.shape[0], max_masks, *mask_hw))
        valid = jnp.ones((target.shape[0], max_masks), bool)
        return LisaOutput(logits=None, seg_embeddings=None, mask_valid=valid,
                          low_res_masks=None, masks=masks)


def test_ground_truth_masks_score_one(model, tokenizer, data_dir):
    samples = _samples(data_dir, tokenizer, model.seg_token_id)
    result = evaluation.evaluate(evaluation.MaskRunner(GroundTruthLisa(samples)), samples,
                                 split="reason_seg:val", batch_size=2)
    assert result["num_empty_union"] == 1          # the image without a target
    np.testing.assert_allclose(result["gIoU"], 1.0, atol=1e-4)
    np.testing.assert_allclose(result["cIoU"], 1.0, atol=1e-9)


def test_a_seg_id_the_model_does_not_find_is_named(model, runner, tokenizer, data_dir):
    samples = _samples(data_dir, tokenizer, model.seg_token_id)
    # Tokens without [SEG]: the model fills no mask slot for the sample's mask.
    for sample in samples:
        sample["tokens"] = np.where(sample["tokens"] == model.seg_token_id, 5, sample["tokens"])
    with pytest.raises(ValueError, match="example .*: the model found 0 \\[SEG\\] for 1 masks"):
        evaluation.evaluate(runner, samples[:1], split="reason_seg:val", batch_size=2)
