"""Caption evaluation against every reference caption of an image (the official COCO caption
evaluation): the ``slot`` op lays an evaluation image's captions out as its ground truth, and the
task metrics score the image's caption against all of them, with the same numbers as
pycocoevalcap on those references. The PTB tokenizer needs Java; METEOR is a fake (no JVM
start-up of the paraphrase table)."""

import json
import shutil

import jax
import numpy as np
import pytest
from configs import data as data_config
from configs import pixelllm as pixelllm_config
from flax import nnx
from PIL import Image
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from data_pipelines import pipeline
from data_pipelines.ops import fields
from data_pipelines.ops.slot import GT_TEXT, SLOT_TEXT, slot
from data_pipelines.synthetic import tokenizer as word_tokenizer
from pixelllm import batch as batch_lib
from pixelllm import sharding
from pixelllm.evaluators.captioning import CaptioningEvaluator
from pixelllm.language.tokenizer import load_tokenizer
from pixelllm.train.evaluation import EvalSource, TaskMetrics

needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="java is not on PATH: the PTB tokenizer needs it")

# Two images with three captions each; the generated caption of each equals its second one.
REFERENCES = {
    31: ["a dog runs on the grass", "a brown dog on a green field", "the dog plays outside"],
    32: ["a red car on the street", "a car parked by the road", "the red car on the left"],
}


class FakeMeteor:
    """METEOR without Java: 1 for a candidate equal to one of its references, else 0."""

    def score(self, candidates, references):
        scores = np.asarray([float(c in refs) for c, refs in zip(candidates, references)])
        return float(scores.mean()), scores

    def score_pairs(self, candidates, references):
        return self.score(candidates, references)[1]

    def close(self):
        pass


def pycocoevalcap_scores(candidates: dict, references: dict) -> dict[str, float]:
    """BLEU-4, CIDEr-D and ROUGE-L as the COCO caption toolkit computes them (its own PTB
    tokenizer and scorers, no code of this repository)."""
    tokenizer = PTBTokenizer()
    hypotheses = tokenizer.tokenize({k: [{"caption": c}] for k, c in candidates.items()})
    refs = tokenizer.tokenize({k: [{"caption": r} for r in rs] for k, rs in references.items()})
    bleu, _ = Bleu(4).compute_score(refs, hypotheses, verbose=0)
    cider, _ = Cider().compute_score(refs, hypotheses)
    rouge, _ = Rouge().compute_score(refs, hypotheses)
    return {"BLEU-4": bleu[3], "BLEU-1": bleu[0], "CIDEr": cider, "ROUGE-L": rouge}


@needs_java
def test_a_caption_equal_to_one_reference_scores_as_pycocoevalcap():
    candidates = {image_id: refs[1] for image_id, refs in REFERENCES.items()}
    evaluator = CaptioningEvaluator(split="coco:karpathy_val", meteor=FakeMeteor())
    evaluator.add(item_ids=list(REFERENCES), candidates=list(candidates.values()),
                  references=list(REFERENCES.values()))
    result = evaluator.result()
    expected = pycocoevalcap_scores(candidates, REFERENCES)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-9), key
    # Against all references the candidate matches one exactly: every n-gram is found.
    assert result["BLEU-4"] == pytest.approx(1.0) and result["METEOR"] == 1.0
    # Against the first reference alone (what a single-reference slot text gave) it does not.
    alone = pycocoevalcap_scores(candidates, {k: refs[:1] for k, refs in REFERENCES.items()})
    assert alone["BLEU-4"] < 0.5


def _narrative_example(captions):
    narratives = [{fields.CAPTION: caption} for caption in captions]
    return {fields.IMAGE: np.zeros((8, 8, 3), np.uint8),
            fields.VALID_WH: np.asarray([8.0, 6.0], np.float32), fields.IMAGE_ID: "5",
            fields.CONTEXT: "A photo of ", fields.NARRATIVES: narratives}


def test_evaluation_slots_carry_every_caption_as_ground_truth():
    example = _narrative_example(["first", "second", "third"])
    out = slot(task="caption", slots=2, objects=4, train=False)(example,
                                                               np.random.default_rng(0))
    assert out[SLOT_TEXT] == ["first", ""]
    assert out[GT_TEXT] == ["first", "second", "third", ""]
    np.testing.assert_array_equal(out["gt_mask"], [True, True, True, False])
    np.testing.assert_allclose(out["gt_boxes"][:3], [[0, 0, 8, 6]] * 3)
    assert out["task_proposals"] == 0  # no loss reads them
    # Up to G references; training leaves the ground truth empty, as before.
    limited = slot(task="caption", slots=1, objects=2, train=False)(example,
                                                                    np.random.default_rng(0))
    assert limited[GT_TEXT] == ["first", "second"]
    trained = slot(task="caption", slots=1, objects=4)(example, np.random.default_rng(0))
    assert not trained["gt_mask"].any() and trained[GT_TEXT] == [""] * 4


# ------------------------------------------------------------------ end to end

def _build_coco_karpathy_val(root):
    """``(tfds data_dir, tokenizer)``: Karpathy's split file with the two images of
    :data:`REFERENCES` in ``val`` (files in val2014/, 12 x 20 pixels), built by the COCO
    Captions builder. A word-level tokenizer keeps every caption within the smoke text length
    (16 tokens), so the decoded references are the captions themselves."""
    from data_pipelines.builders.coco_captions import CocoCaptions
    import tensorflow_datasets as tfds

    texts = [text for refs in REFERENCES.values() for text in refs]
    tokenizer = root / "spiece.model"
    tokenizer.write_bytes(word_tokenizer.train(texts * 20, vocab_size=60))
    manual = root / "manual"
    (manual / "val2014").mkdir(parents=True)
    images, sentence_id = [], 0
    for cocoid, refs in REFERENCES.items():
        filename = f"COCO_val2014_{cocoid:012d}.jpg"
        pixels = np.random.default_rng(cocoid).integers(0, 255, (12, 20, 3), np.uint8)
        Image.fromarray(pixels).save(manual / "val2014" / filename, quality=95)
        sentences = []
        for ref in refs:
            sentences.append({"raw": ref, "tokens": ref.split(), "sentid": sentence_id,
                              "imgid": len(images)})
            sentence_id += 1
        images.append({"filepath": "val2014", "filename": filename, "imgid": len(images),
                       "split": "val", "cocoid": cocoid,
                       "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
    (manual / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": images}))
    CocoCaptions(config="coco", data_dir=str(root / "tfds"),
                 splits=["karpathy_val"]).download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    return str(root / "tfds"), str(tokenizer)


@needs_java
def test_coco_evaluation_scores_each_image_against_all_its_captions(tmp_path):
    data_dir, tokenizer = _build_coco_karpathy_val(tmp_path)
    config = data_config.get_config("smoke_multitask")
    config.data_dir, config.tokenizer, config.num_threads = data_dir, tokenizer, 1
    config.eval = [entry for entry in config.eval
                   if entry["name"] == "coco_captions_karpathy_val"]
    batches = list(pipeline.eval_from_config(config, evaluation_keys=True)
                   ["coco_captions_karpathy_val"])
    assert len(batches) == 1
    np.testing.assert_array_equal(batches[0][batch_lib.GT_MASK][:, :3].all(axis=1),
                                  [True, True, False, False])  # 2 images, then padding

    def second_reference(model, batch, settings):
        """The generated caption of slot s is the image's reference s + 1 (no BOS)."""
        del model, settings
        slots = batch[batch_lib.TEXT_TOKENS].shape[1]
        return {"tokens": batch[batch_lib.GT_TEXT_TOKENS][:, 1:1 + slots, 1:]}

    source = EvalSource(task="caption", builder="coco_captions_manual/coco",
                        split="karpathy_val")
    rules = sharding.rules_from_config(pixelllm_config.get_config("tiny").sharding.rules)
    metrics = TaskMetrics(lambda: {"coco": batches}, {"coco": source},
                          tokenizer=load_tokenizer(tokenizer),
                          mesh=sharding.make_mesh((1, 1, 1), jax.devices()[:1]), rules=rules,
                          workdir=tmp_path / "run", meteor=FakeMeteor,
                          predictors={"caption": second_reference})
    # The predictor never reads the model: any module stands in for it.
    scalars = metrics(nnx.Linear(1, 1, rngs=nnx.Rngs(0)), 0)
    assert scalars["coco/num_items"] == 2  # one item per image, padding left out
    expected = pycocoevalcap_scores({k: refs[1] for k, refs in REFERENCES.items()}, REFERENCES)
    for key, value in expected.items():
        assert scalars[f"coco/{key}"] == pytest.approx(value, abs=1e-9), key
    assert scalars["coco/BLEU-4"] == pytest.approx(1.0) and scalars["coco/METEOR"] == 1.0
