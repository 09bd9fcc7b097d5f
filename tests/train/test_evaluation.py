"""The task-metric evaluator (``pixelllm/train/evaluation.py``) on the tiny model (light proposal
head) and small synthetic evaluation batches: its RefCOCO result equals the evaluator fed by hand
with ``inference.refer``'s boxes in original pixels; perfect predictions (a fake inference
through the ``predictors`` seam) score 1; the trace L1 equals a hand computation; JSON files are
written; dense captioning runs the real inference with a fake METEOR; and the trainer's
``eval_only`` with ``eval_metrics`` logs the task metrics of a real Localized Narratives source.
"""

import io
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import sentencepiece as spm
from configs import pixelllm as pixelllm_config
from flax import nnx
from PIL import Image

from pixelllm import batch as batch_lib
from pixelllm import sharding
from pixelllm.evaluators.refcoco import (RefCocoEvaluator, canvas_boxes_to_original,
                                         mask_logits_to_original)
from pixelllm.language.tokenizer import Tokenizer
from pixelllm.models.pixel_llm import inference
from pixelllm.models.pixel_llm.pixel_llm import PixelLLM
from pixelllm.train import evaluation
from pixelllm.train.evaluation import EvalSource, TaskMetrics

# Module fixtures compile the tiny model: all of this module runs on one xdist worker
# (launch/test.sh uses --dist loadgroup), so they are built once.
pytestmark = pytest.mark.xdist_group("test_evaluation")

CANVAS, SLOTS, CONTEXT, TEXT, POINTS, OBJECTS, VOCAB, EOS = 32, 2, 4, 6, 2, 3, 128, 1
ORIGINAL = CANVAS * 5 // 2  # the originals' largest side: the original_masks frame
REFCOCO_VAL = EvalSource(task="refer", builder="refer_coco/refcoco_unc", split="val")


class WordTokenizer(Tokenizer):
    """Id ``i`` is the word ``w<i>``; 0 pads (and starts texts, as T5), 1 ends."""

    def __init__(self):
        super().__init__(path="words", vocab_size=VOCAB, bos_id=None, eos_id=EOS, pad_id=0)

    def _encode(self, text):
        return [int(word[1:]) for word in text.split()]

    def _encode_with_offsets(self, text):
        raise NotImplementedError

    def _decode(self, ids):
        return " ".join(f"w{i}" for i in ids if i > 1)


class FakeMeteor:
    """METEOR without Java: 1 for a candidate equal to one of its references, else 0."""

    def __init__(self):
        self.closed = False

    def score_pairs(self, candidates, references):
        return np.asarray([float(c in refs) for c, refs in zip(candidates, references)])

    def score(self, candidates, references):
        scores = self.score_pairs(candidates, references)
        return float(scores.mean()), scores

    def close(self):
        self.closed = True


def eval_batch(seed: int, *, batch: int = 2, padding: int = 0, first_id: int = 100,
               task: str = "refer") -> dict[str, np.ndarray]:
    """``batch`` examples (then ``padding`` all-zero ones) of the batch contract with the
    evaluation keys: one rectangle per image, every slot about it; originals 2.5x the canvas,
    where the rectangle's mask holds the pixels whose centre lies inside it."""
    rng = np.random.default_rng(seed)
    total = batch + padding
    out = {key: np.zeros(shape, dtype) for key, (shape, dtype) in batch_lib.batch_spec(
        batch_lib.Sizes(canvas=CANVAS, slots=SLOTS, context_length=CONTEXT, text_length=TEXT,
                        points_per_token=POINTS, objects=OBJECTS), total).items()}
    out[batch_lib.IMAGE_ID] = np.zeros((total,), np.int64)
    out[batch_lib.ORIGINAL_WH] = np.zeros((total, 2), np.int32)
    out[batch_lib.ORIGINAL_MASKS] = np.zeros((total, SLOTS, ORIGINAL, ORIGINAL), bool)
    words = TEXT - 2
    for i in range(batch):
        w, h = CANVAS, CANVAS - 8 * (i % 2)
        out["image"][i, :h, :w] = rng.uniform(0, 60, (h, w, 3))
        out["valid_wh"][i] = (w, h)
        out[batch_lib.ORIGINAL_WH][i] = (w * 5 // 2, h * 5 // 2)
        out[batch_lib.IMAGE_ID][i] = first_id + i
        x0, y0 = rng.integers(2, w // 2 - 2), rng.integers(2, h // 2 - 2)
        x1, y1 = x0 + rng.integers(6, w // 2), y0 + rng.integers(6, h // 2)
        out["image"][i, y0:y1, x0:x1] = (230.0, 40.0, 20.0)
        out["target_boxes"][i] = (x0, y0, x1, y1)
        out["target_masks"][i, :, y0:y1, x0:x1] = True
        centres = (np.arange(ORIGINAL) + 0.5) / 2.5
        inside_y = (centres >= y0) & (centres < y1) & (np.arange(ORIGINAL) < h * 5 // 2)
        inside_x = (centres >= x0) & (centres < x1)
        out[batch_lib.ORIGINAL_MASKS][i, :] = inside_y[:, None] & inside_x[None, :]
        out["prompt_boxes"][i] = (0, 0, w, h)
        out["slot_mask"][i] = True
        out["context_tokens"][i] = rng.integers(2, VOCAB, (SLOTS, CONTEXT))
        out["context_tokens"][i, :, -1] = EOS
        out["context_mask"][i] = True
        out["text_tokens"][i, :, 1:1 + words] = rng.integers(2, VOCAB, (SLOTS, words))
        out["text_tokens"][i, :, 1 + words] = EOS
        out["text_mask"][i] = True
        out["token_points_mask"][i, :, 1:1 + words] = True
        for j in range(words):
            top, bottom = y0 + (y1 - y0) * j / words, y0 + (y1 - y0) * (j + 1) / words
            out["token_points"][i, :, 1 + j] = [[x0, top], [x1, bottom]]
        out["gt_boxes"][i, 0] = (x0, y0, x1, y1)
        out["gt_boxes"][i, 1] = (1, 1, 5, 6)
        out["gt_mask"][i, :2] = True
        out["gt_text_tokens"][i, :2] = out["text_tokens"][i, :1]
        out["gt_text_tokens"][i, 1, 1] = 7  # the two regions have different captions
        out["gt_text_mask"][i, :2] = out["text_mask"][i, :1]
        for loss in ("text", "points", "box", "mask"):
            out[batch_lib.LOSS_MASKS[loss]][i] = 1.0
    return out


@pytest.fixture(scope="module")
def model():
    config = pixelllm_config.get_config("tiny")
    config.model.proposal_head.kind = "light"
    return PixelLLM.from_config(config.model, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh((1, 1, 1), jax.devices()[:1])


@pytest.fixture(scope="module")
def rules():
    return sharding.rules_from_config(pixelllm_config.get_config("tiny").sharding.rules)


def driver(batches, sources, *, mesh, rules, workdir, **kwargs):
    return TaskMetrics(lambda: batches, sources, tokenizer=WordTokenizer(), mesh=mesh,
                       rules=rules, workdir=workdir, meteor=kwargs.pop("meteor", FakeMeteor),
                       **kwargs)


@pytest.fixture(scope="module")
def refer_batches():
    return [eval_batch(0), eval_batch(1, batch=1, padding=1, first_id=200)]


TRACE_SOURCE = EvalSource(task="trace", builder="localized_narratives/coco", split="validation")


@pytest.fixture(scope="module")
def driven(model, mesh, rules, refer_batches, tmp_path_factory):
    """``(scalars, workdir)`` of one evaluation at step 7 of a referring and a trace source
    (the same batches: they carry both targets)."""
    workdir = tmp_path_factory.mktemp("driven")
    metrics = driver({"refcoco_unc_val": refer_batches, "ln": refer_batches},
                     {"refcoco_unc_val": REFCOCO_VAL, "ln": TRACE_SOURCE},
                     mesh=mesh, rules=rules, workdir=workdir)
    return metrics(model, 7), workdir


@pytest.fixture(scope="module")
def by_hand(model, refer_batches):
    """Per batch, ``inference.refer``'s boxes and the teacher-forced token points, computed
    outside the driver (one jit: eager dispatch of the tiny model is slower than compiling)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def compute(state, batch):
        model = nnx.merge(graphdef, state)
        texts = {key: batch[key] for key in ("context_tokens", "context_mask", "text_tokens",
                                             "text_mask")}
        boxes = inference.refer(model, batch["image"], batch["valid_wh"], **texts).boxes
        features = model.encode_image(batch["image"], batch["valid_wh"])
        points = model.run_slots(features, batch["valid_wh"], prompt_boxes=batch["prompt_boxes"],
                                 with_masks=False, **texts).token_points
        return boxes, points

    contract = [{key: batch[key] for key in batch_lib.SPEC} for batch in refer_batches]
    return [jax.device_get(compute(state, batch)) for batch in contract]


def test_refcoco_equals_the_evaluator_fed_by_hand_and_writes_json(driven, by_hand,
                                                                  refer_batches):
    scalars, workdir = driven
    hand = RefCocoEvaluator(split="by hand")
    for batch, (boxes, _) in zip(refer_batches, by_hand):
        for i in np.flatnonzero(batch["slot_mask"].any(axis=1)):
            size = {"valid_wh": batch["valid_wh"][i], "original_wh": batch["original_wh"][i]}
            hand.add(image_id=int(batch["image_id"][i]),
                     expression_ids=[f"{batch['image_id'][i]}:{s}" for s in range(SLOTS)],
                     pred_boxes=canvas_boxes_to_original(boxes[i], **size),
                     gt_boxes=canvas_boxes_to_original(batch["target_boxes"][i], **size))
    expected = hand.result()
    assert expected["num_expressions"] == 6 and expected["num_images"] == 3
    ours = {key.split("/", 1)[1]: value for key, value in scalars.items()
            if key.startswith("refcoco_unc_val/")}
    assert ours.keys() == expected.keys()
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key

    written = json.loads((workdir / "eval" / "7" / "refcoco_unc_val.json").read_text())
    assert written["task"] == "refer" and written["split"] == "val"
    assert written["metrics"]["box_P@0.5"] == ours["box_P@0.5"]
    assert written["paper_percent"] == {"box_P@0.5": 90.3}
    assert (workdir / "eval" / "7" / "ln.json").is_file()


def test_trace_point_l1_equals_a_hand_computation(driven, by_hand, refer_batches):
    scalars, _ = driven
    errors = []
    for batch, (_, predicted) in zip(refer_batches, by_hand):
        for i in np.flatnonzero(batch["original_wh"][:, 0] > 0):  # padding is not scored
            scale = batch["valid_wh"][i]
            total, count = 0.0, 0
            for s in range(SLOTS):
                for t in np.flatnonzero(batch["token_points_mask"][i, s]):
                    pred = predicted[i, s, t] / scale
                    gt = batch["token_points"][i, s, t] / scale
                    total += np.mean([min(np.abs(p - g).mean() for g in gt) for p in pred])
                    count += 1
            errors.append(total / count)
    assert scalars["ln/num_images"] == 3 == len(errors)
    assert scalars["ln/point_l1"] == pytest.approx(np.mean(errors), rel=1e-5)


def test_referring_segmentation_scores_original_size_masks(mesh, model, rules, refer_batches,
                                                           tmp_path):
    def perfect_boxes(model, batch, settings):
        """The target boxes, and logits on SAM's canvas / 4 grid: +1 inside the target."""
        del model, settings
        grid = batch["target_masks"][..., 2::4, 2::4]
        return {"boxes": batch["target_boxes"], "mask_logits": grid * 2.0 - 1.0}

    refseg = REFCOCO_VAL._replace(task="refseg")
    scalars = driver({"seg": refer_batches}, {"seg": refseg}, mesh=mesh, rules=rules,
                     workdir=tmp_path, predictors={"refseg": perfect_boxes})(model, 1)
    for key in ("box_P@0.5", "box_P@0.5_inclusive"):
        assert scalars[f"seg/{key}"] == 1.0, key
    # By hand: the logits cropped to the valid area, bilinear to the original size, against
    # the batch's original-size masks.
    hand = RefCocoEvaluator(split="by hand")
    for batch in refer_batches:
        for i in np.flatnonzero(batch["original_wh"][:, 0] > 0):
            width, height = batch["original_wh"][i]
            logits = batch["target_masks"][i, :, 2::4, 2::4] * 2.0 - 1.0
            size = {"valid_wh": batch["valid_wh"][i], "original_wh": batch["original_wh"][i]}
            hand.add(image_id=int(batch["image_id"][i]),
                     expression_ids=[f"{batch['image_id'][i]}:{s}" for s in range(SLOTS)],
                     pred_boxes=canvas_boxes_to_original(batch["target_boxes"][i], **size),
                     gt_boxes=canvas_boxes_to_original(batch["target_boxes"][i], **size),
                     pred_masks=mask_logits_to_original(logits, canvas=CANVAS, **size),
                     gt_masks=batch["original_masks"][i, :, :height, :width])
    expected = hand.result()
    assert 0.5 < expected["seg_cIoU"] < 1.0  # the coarse grid misses along the borders
    for key in ("seg_cIoU", "seg_gIoU", "seg_AP", "seg_box_P@0.5", "num_expressions"):
        assert scalars[f"seg/{key}"] == pytest.approx(expected[key], rel=1e-12), key

    without = [{k: v for k, v in b.items() if k != "original_masks"} for b in refer_batches]
    with pytest.raises(ValueError, match="original_masks"):
        driver({"seg": without}, {"seg": refseg}, mesh=mesh, rules=rules, workdir=tmp_path,
               predictors={"refseg": perfect_boxes})(model, 1)

    def shifted(model, batch, settings):  # half a box width off: IoU 1/3
        del model, settings
        boxes = batch["target_boxes"]
        half = (boxes[..., 2] - boxes[..., 0]) / 2
        return {"boxes": boxes.at[..., 0].add(half).at[..., 2].add(half)}

    scalars = driver({"val": refer_batches}, {"val": REFCOCO_VAL}, mesh=mesh, rules=rules,
                     workdir=tmp_path, predictors={"refer": shifted})(model, 1)
    assert scalars["val/box_P@0.5"] == 0.0


def test_dense_captioning_runs_the_detector_and_closes_meteor(model, mesh, rules, tmp_path):
    meteors = []

    def meteor():
        meteors.append(FakeMeteor())
        return meteors[-1]

    source = EvalSource(task="densecap", builder="vg_densecap/densecap", split="test")
    scalars = driver({"vg": [eval_batch(4)]}, {"vg": source}, mesh=mesh, rules=rules,
                     workdir=tmp_path, meteor=meteor)(model, 0)
    assert len(meteors) == 1 and meteors[0].closed
    assert scalars["vg/num_images"] == 2 and scalars["vg/num_ground_truth"] == 4
    assert 0 < scalars["vg/num_detections"] <= 2 * 8  # the light head's top_k
    assert 0.0 <= scalars["vg/mAP"] <= scalars["vg/mAP_detection"] <= 1.0

    def perfect(model, batch, settings):  # the ground truth, captions without their BOS
        del model, settings
        return {"boxes": batch["gt_boxes"], "scores": batch["gt_mask"].astype(float),
                "valid": batch["gt_mask"], "tokens": batch["gt_text_tokens"][..., 1:]}

    scalars = driver({"vg": [eval_batch(4)]}, {"vg": source}, mesh=mesh, rules=rules,
                     workdir=tmp_path, predictors={"densecap": perfect})(model, 0)
    assert scalars["vg/mAP"] == pytest.approx(1.0) and scalars["vg/mAP_detection"] == 1.0


def test_location_captions_are_scored_against_the_slot_texts(model, mesh, rules, tmp_path):
    """Perfect captions (the slot texts) through the caption metrics; the PTB tokenizer needs
    Java (a short JVM; METEOR is the fake)."""
    if shutil.which("java") is None:
        pytest.skip("java is not on PATH: the PTB tokenizer needs it")

    def perfect(model, batch, settings):
        del model, settings
        return {"tokens": batch["text_tokens"][..., 1:]}

    source = EvalSource(task="loca", builder="vg_densecap/densecap", split="test")
    scalars = driver({"loca": [eval_batch(5, padding=1)]}, {"loca": source}, mesh=mesh,
                     rules=rules, workdir=tmp_path, predictors={"loca": perfect})(model, 0)
    assert scalars["loca/num_items"] == 4  # 2 images x 2 slots; padding left out
    assert scalars["loca/METEOR"] == 1.0 and scalars["loca/ROUGE-L"] == pytest.approx(1.0)
    assert scalars["loca/BLEU-1"] == pytest.approx(1.0)


def test_location_captioning_and_captioning_run_greedy_decoding(model, mesh, rules, tmp_path):
    """The real inference of both generating caption tasks (random weights: any words)."""
    if shutil.which("java") is None:
        pytest.skip("java is not on PATH: the PTB tokenizer needs it")
    batches = [eval_batch(6, padding=1)]
    sources = {"loca": EvalSource(task="loca", builder="vg_densecap/densecap", split="test"),
               "coco": EvalSource(task="caption", builder="coco_captions_manual/coco",
                                  split="karpathy_val")}
    metrics = driver({"loca": batches, "coco": batches}, sources, mesh=mesh, rules=rules,
                     workdir=tmp_path)
    assert metrics.decode_settings(TEXT) == inference.DecodeSettings(
        bos_id=0, eos_id=EOS, pad_id=0, max_new_tokens=TEXT - 1)
    scalars = metrics(model, 0)
    for name, items in (("loca", 4), ("coco", 2)):  # per slot; per image (all references)
        assert scalars[f"{name}/num_items"] == items
        assert 0.0 <= scalars[f"{name}/METEOR"] <= 1.0
        assert 0.0 <= scalars[f"{name}/CIDEr"]


def test_a_task_without_a_metric_is_refused_naming_the_source(mesh, rules, tmp_path):
    with pytest.raises(ValueError, match="'llava'.*no_such_task"):
        driver({}, {"llava": EvalSource("no_such_task", "llava_instructions/x", "train")},
               mesh=mesh, rules=rules, workdir=tmp_path)


def test_a_task_the_model_cannot_run_is_refused_naming_the_source_and_the_module(
        mesh, rules, tmp_path):
    """A stage without a mask adapter (or proposal head) evaluating a refseg (densecap) source:
    refused when the trainer builds the metrics from the config, and by a call before any
    batch is read."""
    from configs import stages

    from pixelllm.nn import abstract

    config = stages.get_config("trace_tiny")  # no mask adapter, no proposal head
    config.data.tokenizer = "unused.model"  # refused before the tokenizer is read
    with pytest.raises(ValueError, match=r"evaluation source 'vg_densecap_test': task "
                                         r"'densecap' .*config\.model\.proposal_head is None"):
        TaskMetrics.from_config(config, mesh=mesh, rules=rules, workdir=tmp_path)

    def no_batches():
        raise AssertionError("the model was refused after the pipelines were built")

    model = abstract.build_abstract(lambda rngs: PixelLLM.from_config(config.model, rngs=rngs))
    metrics = TaskMetrics(no_batches, {"seg": EvalSource("refseg", "refer_coco/refcoco_unc",
                                                         "val")},
                          tokenizer=WordTokenizer(), mesh=mesh, rules=rules, workdir=tmp_path)
    with pytest.raises(ValueError, match=r"source 'seg': task 'refseg' .*"
                                         r"config\.model\.mask_adapter is None"):
        metrics(model, 0)


def test_batches_without_the_evaluation_keys_are_refused(model, mesh, rules, refer_batches,
                                                         tmp_path):
    plain = [{key: refer_batches[0][key] for key in batch_lib.SPEC}]
    with pytest.raises(ValueError, match="source val: batches lack .'image_id', 'original_wh'"):
        driver({"val": plain}, {"val": REFCOCO_VAL}, mesh=mesh, rules=rules,
               workdir=tmp_path)(model, 0)


def test_the_table_puts_the_paper_beside_ours():
    table = evaluation.format_table({"val": {"box_P@0.5": 0.5}}, {"val": REFCOCO_VAL})
    assert table.splitlines()[1].split() == ["val", "box_P@0.5", "50.0", "90.3"]


# ------------------------------------------------------------------ the trainer

def _ln_line(image_id: int, caption: str) -> str:
    words = caption.split()
    timed = [(" ".join(words[:2]), 0.0, 1.0), (" ".join(words[2:]), 1.1, 2.0)]
    trace = [(0.1, 0.2, 0.0), (0.4, 0.8, 1.0), (0.6, 0.2, 1.1), (0.9, 0.8, 2.0)]
    return json.dumps({
        "dataset_id": "mscoco", "image_id": str(image_id), "annotator_id": 1,
        "caption": caption, "voice_recording": "x.ogg",
        "timed_caption": [{"utterance": u, "start_time": s, "end_time": e} for u, s, e in timed],
        "traces": [[{"x": x, "y": y, "t": t} for x, y, t in trace]]})


def build_ln_validation(root: Path) -> tuple[str, str]:
    """``(tfds data_dir, tokenizer)``: Localized Narratives COCO validation, 2 images of
    48 x 20 pixels (ids 6 and 7), built by its TFDS builder."""
    captions = ["a dog on the grass", "the cat on the right"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(captions * 20), model_writer=model,
                                   minloglevel=2, num_threads=1, character_coverage=1.0,
                                   model_type="unigram", vocab_size=30, hard_vocab_limit=False,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    tokenizer = root / "spiece.model"
    tokenizer.write_bytes(model.getvalue())
    manual = root / "manual"
    (manual / "val2017").mkdir(parents=True)
    for image_id in (6, 7):
        pixels = np.random.default_rng(image_id).integers(0, 255, (20, 48, 3), np.uint8)
        Image.fromarray(pixels).save(manual / "val2017" / f"{image_id:012d}.jpg", quality=95)
    (manual / "coco_val_localized_narratives.jsonl").write_text(
        "\n".join(_ln_line(i, captions[i - 6]) for i in (6, 7)) + "\n")
    import tensorflow_datasets as tfds

    from data_pipelines.builders.localized_narratives import LocalizedNarratives
    LocalizedNarratives(config="coco", data_dir=str(root / "tfds"),
                        splits=["validation"]).download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    return str(root / "tfds"), str(tokenizer)


def test_eval_only_with_eval_metrics_logs_the_task_metrics(tmp_path):
    from configs import stages
    from data_pipelines import pipeline
    from pixelllm.train import trainer
    from pixelllm.train.metrics_writer import read_metrics

    data_dir, tokenizer = build_ln_validation(tmp_path)
    config = stages.get_config("trace_tiny")
    config.data.data_dir, config.data.tokenizer = data_dir, tokenizer
    config.data.num_threads = 1
    config.data.eval = [source for source in config.data.eval if source["task"] == "trace"]
    config.mesh_shape = (1, 1, 1)
    config.train.eval_only = True
    with config.unlocked():  # until configs/stages.py has the switch
        config.train.eval_metrics = True

    first = next(iter(pipeline.eval_from_config(config.data, evaluation_keys=True)
                      ["ln_coco_trace_val"]))
    assert sorted(first["image_id"][:2].tolist()) == [6, 7]  # in the builder's order
    assert first["image_id"][2:].tolist() == [0, 0]  # padding
    assert first["original_wh"].tolist() == [[48, 20], [48, 20], [0, 0], [0, 0]]
    assert "image_id" not in next(iter(pipeline.eval_from_config(config.data)
                                       ["ln_coco_trace_val"]))

    workdir = tmp_path / "run"
    assert trainer.train(config, workdir) == 0
    scalars = read_metrics(workdir)[0]
    assert scalars["eval/metrics/ln_coco_trace_val/num_images"] == 2
    assert 0 < scalars["eval/metrics/ln_coco_trace_val/point_l1"] < 1
    assert "eval/loss/ln_coco_trace_val/loss/total" in scalars
    written = json.loads((workdir / "eval" / "0" / "ln_coco_trace_val.json").read_text())
    assert written["metrics"]["point_l1"] == pytest.approx(
        scalars["eval/metrics/ln_coco_trace_val/point_l1"])


def test_evaluation_metadata_records_the_id_and_size_before_resizing():
    from data_pipelines.ops import evaluation_metadata, registry

    op = registry.build("evaluation_metadata")
    example = {"image": np.zeros((20, 48, 3), np.uint8), "image/id": "000000000139"}
    out = op(example, np.random.default_rng(0))
    assert out["image_id"] == 139 and out["original_wh"].tolist() == [48, 20]
    hashed = evaluation_metadata.integer_image_id("VG_100K/abc")
    assert hashed == evaluation_metadata.integer_image_id("VG_100K/abc") >= 0  # stable
    assert hashed != evaluation_metadata.integer_image_id("VG_100K/abd")
    with pytest.raises(ValueError, match="right after decode"):
        op({**out, "valid_wh": np.asarray([32, 13], np.float32)}, np.random.default_rng(0))


def test_evaluation_metadata_frames_the_original_masks():
    from data_pipelines.ops import evaluation_metadata, fields, registry

    masks = np.zeros((2, 20, 48), bool)
    masks[0, 3:5, 40:] = True
    masks[1, 19, 0] = True
    example = {"image": np.zeros((20, 48, 3), np.uint8), "image/id": "7",
               fields.OBJECT_MASKS: masks}
    out = registry.build("evaluation_metadata", original_masks=50)(
        example, np.random.default_rng(0))
    framed = out[fields.OBJECT_ORIGINAL_MASKS]
    assert framed.shape == (2, 50, 50) and framed.dtype == bool
    np.testing.assert_array_equal(framed[:, :20, :48], masks)
    assert not framed[:, 20:].any() and not framed[:, :, 48:].any()
    assert fields.OBJECT_ORIGINAL_MASKS not in registry.build("evaluation_metadata")(
        example, np.random.default_rng(0))
    with pytest.raises(ValueError, match="does not fit the original_masks frame of 40"):
        evaluation_metadata.evaluation_metadata(original_masks=40)(example, None)
    with pytest.raises(ValueError, match="needs object masks"):
        evaluation_metadata.evaluation_metadata(original_masks=50)(
            {"image": example["image"], "image/id": "7"}, None)
