"""Tests for data_pipelines/pipeline.py on in-memory records in the builders' schema, with a
tiny SentencePiece model trained here: field values end to end, mixing, host sharding, seeds,
resuming from saved iterator state, counted bad records, the contract check, and the data
configs."""

import dataclasses
import io
import itertools
import json

import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image

from configs import data as data_config
from data_pipelines import pipeline
from data_pipelines.pipeline import CORRUPT_IMAGE, UNREADABLE_RECORD, InputPipeline, Source
from data_pipelines.skips import BadRecordError
from pixelllm import batch as batch_lib
from pixelllm.batch import Sizes
from pixelllm.language.tokenizer import load_tokenizer

SIZES = Sizes(canvas=16, slots=2, context_length=24, text_length=24, points_per_token=2,
              objects=3)
CORPUS = ["the dog on the left", "the cat on the right", "a dog on the grass",
          "where is the dog", "an object of a red car", "A long image caption: "]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 20), model_writer=model,
                                   minloglevel=2, num_threads=1, character_coverage=1.0,
                                   model_type="unigram", vocab_size=40, hard_vocab_limit=False,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    path = tmp_path_factory.mktemp("spm") / "spiece.model"
    path.write_bytes(model.getvalue())
    return str(path)


def _png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _refer_record(index, *, width=32, height=16, encode=False):
    """An image whose pixels all equal ``index + 1`` (so it can be recognized on the canvas)
    with a dog in its left quarter and a cat at the right."""
    image = np.full((height, width, 3), index + 1, np.uint8)
    return {
        "image": _png(image) if encode else image, "image/id": str(index).encode(),
        "image/filename": f"{index}.jpg".encode(),
        "objects": {"id": [np.int64(1), np.int64(2)], "ref_id": [1, 2],
                    "box": [np.asarray([0, 0, 0.25, 0.5], np.float32),
                            np.asarray([0.75, 0.5, 1, 1], np.float32)],
                    "category": [1, 2]},
        "expressions": {"object": [np.int32(0), np.int32(1)],
                        "text": [b"the dog on the left", b"the cat on the right"],
                        "id": [np.int64(1), np.int64(2)]},
    }


def _ln_record(index):
    box = np.asarray([0, 0, 0.5, 1], np.float32)
    return {
        "image": np.full((8, 16, 3), index + 1, np.uint8), "image/id": str(index).encode(),
        "narratives": {"caption": [b"a dog on the grass"], "annotator_id": [np.int32(1)]},
        "utterances": {"narrative": [np.int32(0), np.int32(0)],
                       "text": [b"a dog", b"on the grass"],
                       "start_time": [np.float32(0), np.float32(1)],
                       "end_time": [np.float32(1), np.float32(2)],
                       "box": [box, np.asarray([0.5, 0, 1, 1], np.float32)],
                       "points": [np.full((16, 2), 0.25, np.float32),
                                  np.full((16, 2), 0.75, np.float32)],
                       "valid": [np.True_, np.True_]},
        # The raw points in each window span its box.
        "trace": {"narrative": [np.int32(0)] * 4,
                  "xy": [np.asarray(xy, np.float32) for xy in ([0, 0], [0.5, 1], [0.5, 0],
                                                               [1, 1])],
                  "t": [np.float64(t) for t in (0, 0.9, 1.1, 2)]},
    }


def _vg_record(index):
    return {"image": np.full((16, 16, 3), index + 1, np.uint8), "image/id": str(index).encode(),
            "objects": {"id": [np.int64(5), np.int64(6)],
                        "box": [np.asarray([0, 0, 0.5, 0.5], np.float32),
                                np.asarray([0.5, 0.5, 1, 1], np.float32)],
                        "phrase": [b"a red car", b"the dog"]}}


def _ops(task, tokenizer_path, *, train=False, augment="none", alignment="official"):
    return pipeline.with_tokenizer(
        data_config.source_ops(task=task, train=train, augment=augment, alignment=alignment,
                               sizes=dataclasses.asdict(SIZES)), tokenizer_path)


def _image_ids(batch):
    """Each example's record index (its pixel value - 1), -1 for an all-zero filler."""
    return [int(image[0, 0, 0]) - 1 for image in batch["image"]]


def _eval_pipeline(sources, **kwargs):
    defaults = dict(batch_size=2, sizes=SIZES, seed=0, shuffle=False, num_epochs=1,
                    drop_remainder=False, process_index=0, process_count=1)
    return InputPipeline(sources, **{**defaults, **kwargs})


def test_refer_values_end_to_end_and_a_flip_swaps_sides_and_mirrors_boxes(tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    records = [_refer_record(0, encode=True)]
    [batch] = list(_eval_pipeline([Source("refer", records, _ops("refer", tokenizer_path))]))
    assert set(batch) == set(batch_lib.example_spec(SIZES))
    # 32x16 -> 16x8 on the 16x16 canvas: the dog (0, 0, 8, 8) px -> (0, 0, 4, 4).
    np.testing.assert_array_equal(batch["valid_wh"][0], [16, 8])
    np.testing.assert_allclose(batch["target_boxes"][0], [[0, 0, 4, 4], [12, 4, 16, 8]])
    np.testing.assert_allclose(batch["prompt_boxes"][0], [[0, 0, 16, 8]] * 2)
    assert (batch["image"][0, :8] == 1).all() and not batch["image"][0, 8:].any()
    assert tok.decode(batch["text_tokens"][0, 0, 1:]) == "the dog on the left"
    assert tok.decode(batch["context_tokens"][0, 1]) == "where is the cat on the right"
    np.testing.assert_array_equal(batch["task_box"][0], [1, 1])
    np.testing.assert_array_equal(batch["task_points"][0], [0, 0])
    # The filler second example: nothing on.
    assert not batch["slot_mask"][1].any() and not batch["image"][1].any()

    flip_ops = _ops("refer", tokenizer_path)
    flip_ops.insert(2, {"op": "horizontal_flip", "probability": 1.0, "mode": "swap"})
    [flipped] = list(_eval_pipeline([Source("refer", records, flip_ops)]))
    assert tok.decode(flipped["text_tokens"][0, 0, 1:]) == "the dog on the right"
    assert tok.decode(flipped["context_tokens"][0, 0]) == "where is the dog on the right"
    assert tok.decode(flipped["text_tokens"][0, 1, 1:]) == "the cat on the left"
    np.testing.assert_allclose(flipped["target_boxes"][0], [[12, 0, 16, 4], [0, 4, 4, 8]])


def test_trace_and_densecap_values(tokenizer_path):
    sources = [Source("ln", [_ln_record(0)], _ops("trace", tokenizer_path)),
               Source("vg", [_vg_record(1)], _ops("densecap", tokenizer_path))]
    batch = next(iter(_eval_pipeline(sources)))
    ids = _image_ids(batch)
    trace, dense = ids.index(0), ids.index(1)
    # The LN image 16x8 -> 16x8: utterance boxes (0, 0, 8, 8) and (8, 0, 16, 8).
    points, mask = batch["token_points"][trace, 0], batch["token_points_mask"][trace, 0]
    assert mask.sum() >= 4 and not mask[0]
    corners = {tuple(p.ravel()) for p in points[mask]}
    assert corners == {(0, 0, 8, 8), (8, 0, 16, 8)}
    np.testing.assert_array_equal(batch["task_points"][trace], [1, 0])
    assert batch["task_proposals"][trace] == 0 and batch["task_proposals"][dense] == 1
    np.testing.assert_allclose(batch["gt_boxes"][dense], [[0, 0, 8, 8], [8, 8, 16, 16],
                                                          [0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["gt_mask"][dense], [True, True, False])
    assert load_tokenizer(tokenizer_path).decode(batch["gt_text_tokens"][dense, 1, 1:]) == (
        "the dog")
    assert not batch["slot_mask"][dense].any()


def _training_pipeline(tokenizer_path, *, seed=0, process_index=0, process_count=1,
                       weights=(1.0, 3.0), size=8, batch_size=4):
    sources = [
        Source("refer", [_refer_record(i) for i in range(size)],
               _ops("refer", tokenizer_path, train=True, augment="crop"), weights[0]),
        Source("vg", [_vg_record(100 + i) for i in range(size)],
               _ops("densecap", tokenizer_path, train=True, augment="flip_crop"), weights[1]),
    ]
    return InputPipeline(sources, batch_size=batch_size, sizes=SIZES, seed=seed,
                         process_index=process_index, process_count=process_count)


def _batches(iterator, count):
    return [next(iterator) for _ in range(count)]


def _assert_same_batches(first, second):
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_mixture_weights_task_masks_per_example_and_seeds(tokenizer_path):
    batches = _batches(iter(_training_pipeline(tokenizer_path)), 4)
    proposals = np.concatenate([b["task_proposals"] for b in batches])
    # Weights 1 : 3 interleave deterministically: exactly a quarter of the examples refer.
    assert (proposals == 0).sum() == 4 and (proposals == 1).sum() == 12
    for batch in batches:
        refer = batch["task_proposals"] == 0
        assert (batch["task_box"][refer].sum(axis=1) > 0).all()
        assert not batch["task_box"][~refer].any() and batch["gt_mask"][~refer].any()
    _assert_same_batches(batches, _batches(iter(_training_pipeline(tokenizer_path)), 4))
    other = _batches(iter(_training_pipeline(tokenizer_path, seed=1)), 4)
    assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(batches, other))


def test_resuming_from_saved_state_gives_the_same_next_batches(tokenizer_path):
    iterator = iter(_training_pipeline(tokenizer_path))
    _batches(iterator, 3)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = _batches(iterator, 3)
    resumed = iter(_training_pipeline(tokenizer_path))
    resumed.set_state(state)
    _assert_same_batches(_batches(resumed, 3), expected)


def test_one_host_and_two_hosts_give_the_same_global_batches(tokenizer_path):
    """Global batch k (host 0's rows, then host 1's) holds the same examples, shuffled and
    augmented alike, whatever the number of hosts."""
    one = _batches(iter(_training_pipeline(tokenizer_path, batch_size=4)), 3)
    hosts = [_batches(iter(_training_pipeline(tokenizer_path, batch_size=2, process_index=index,
                                              process_count=2)), 3) for index in range(2)]
    joined = [{key: np.concatenate([hosts[0][k][key], hosts[1][k][key]]) for key in batch}
              for k, batch in enumerate(one)]
    _assert_same_batches(joined, one)


def test_hosts_read_disjoint_records_that_cover_the_data(tokenizer_path):
    records = [_refer_record(i) for i in range(7)]

    def host(index):
        source = Source("refer", records, _ops("refer", tokenizer_path, train=True,
                                               augment="crop"))
        p = InputPipeline([source], batch_size=2, sizes=SIZES, seed=3, num_epochs=1,
                          drop_remainder=False, process_index=index, process_count=2)
        return [i for batch in p for i in _image_ids(batch) if i >= 0]

    first, second = host(0), host(1)
    # Global batches of 4: rows 0-1 on host 0, rows 2-3 on host 1; the last holds 3 records.
    assert (len(first), len(second)) == (4, 3)
    assert sorted(first + second) == list(range(7))
    with pytest.raises(ValueError, match="leave none for host 2"):
        InputPipeline([Source("refer", records[:2], _ops("refer", tokenizer_path))],
                      batch_size=1, sizes=SIZES, seed=0, num_epochs=1, process_index=2,
                      process_count=3)


class _Flaky:
    """Records of which one raises when read, as a TFDS source does on a corrupt record."""

    def __init__(self, records, bad):
        self._records, self._bad = records, bad

    def __len__(self):
        return len(self._records)

    def __getitem__(self, index):
        if index == self._bad:
            raise OSError("image file is truncated")
        return self._records[index]


def test_bad_records_are_counted_and_skipped_or_refused(tokenizer_path):
    records = [_refer_record(i, encode=True) for i in range(5)]
    records[1] = {**records[1], "image": records[1]["image"][:40]}
    source = Source("refer", _Flaky(records, bad=3), _ops("refer", tokenizer_path))
    p = _eval_pipeline([source])
    seen = [i for batch in p for i in _image_ids(batch) if i >= 0]
    assert seen == [0, 2, 4]
    assert p.skips.counts() == {CORRUPT_IMAGE: 1, UNREADABLE_RECORD: 1}
    failing = _eval_pipeline([source], skip_policy="fail")
    with pytest.raises(BadRecordError, match="refer: image 1: 1.jpg"):
        list(failing)


@pytest.mark.parametrize("good_every", [None, 4])
def test_a_stream_of_bad_records_stops_instead_of_hanging(tokenizer_path, good_every):
    # Training repeats forever: with every record bad it would never yield a batch.
    records = [_refer_record(i, encode=True) for i in range(8)]
    records = [record if good_every and i % good_every == 0
               else {**record, "image": record["image"][:40]} for i, record in enumerate(records)]
    p = _eval_pipeline([Source("refer", records, _ops("refer", tokenizer_path))],
                       num_epochs=None, num_threads=1, max_consecutive_skips=5)
    iterator = iter(p)
    if good_every:  # runs of 3 bad records stay under the limit
        assert all(_image_ids(next(iterator)) == [0, 4] for _ in range(3))
        return
    with pytest.raises(pipeline.ConsecutiveSkipsError,
                       match=r"(?s)5 records in a row were skipped, the last refer: image \d: "
                             r".*corrupt image\s+5"):
        next(iterator)


def test_contract_mismatches_raise_naming_the_key(tokenizer_path):
    no_tokens = _ops("refer", tokenizer_path)[:-1]
    with pytest.raises(ValueError, match="missing .*'context_mask'"):
        list(_eval_pipeline([Source("refer", [_refer_record(0)], no_tokens)]))
    wrong_canvas = _ops("refer", tokenizer_path)
    wrong_canvas[2] = {"op": "resize_and_pad", "canvas": 8}
    with pytest.raises(ValueError, match="'image' is float32 \\(8, 8, 3\\), the contract says "
                                         "float32 \\(16, 16, 3\\)"):
        list(_eval_pipeline([Source("refer", [_refer_record(0)], wrong_canvas)]))


@pytest.mark.parametrize("variant", ["pixelllm", "trace", "ref", "refseg", "densecap", "smoke"])
def test_data_configs_build_their_ops(variant, tokenizer_path):
    config = data_config.get_config(variant)
    assert config.sizes["canvas"] == (32 if variant == "smoke" else 384)
    for entry in itertools.chain(config.train, config.eval):
        assert entry["weight"] > 0 and entry["builder"].count("/") == 1
        ops = pipeline.registry.parse(pipeline.with_tokenizer(entry["ops"], tokenizer_path))
        assert len(ops) == len(entry["ops"])
        sizes = entry["sizes"] if entry in config.eval else config.sizes
        [slot_op] = [op for op in entry["ops"] if op["op"] == "slot"]
        assert slot_op["slots"] == sizes["slots"] and slot_op["objects"] == sizes["objects"]
        [canvas_op] = [op for op in entry["ops"] if "canvas" in op]
        assert canvas_op["canvas"] == sizes["canvas"]
    for entry in config.eval:
        assert entry["batch_size"] >= 1 and not any(op.get("train") for op in entry["ops"])
    with pytest.raises(ValueError, match="set config.tokenizer"):
        pipeline.with_tokenizer(config.train[0]["ops"], config.tokenizer)


def _first_smoke_batch(config, tokenizer_path, batch_size: int) -> dict:
    """The first batch of the smoke mixture over three records of each task."""
    records = {"trace": [_ln_record(i) for i in range(3)],
               "refer": [_refer_record(i) for i in range(3)],
               "densecap": [_vg_record(i) for i in range(3)]}
    sources = [Source(entry["name"], records[entry["task"]],
                      pipeline.with_tokenizer(entry["ops"], tokenizer_path), entry["weight"])
               for entry in config.train]
    return next(iter(InputPipeline(sources, batch_size=batch_size, sizes=Sizes(**config.sizes),
                                   seed=config.seed, process_index=0, process_count=1)))


def test_smoke_config_runs_on_records(tokenizer_path):
    config = data_config.get_config("smoke")
    batch = _first_smoke_batch(config, tokenizer_path, config.batch_size)
    for key, (shape, dtype) in batch_lib.example_spec(Sizes(**config.sizes)).items():
        assert batch[key].shape == (config.batch_size, *shape) and batch[key].dtype == dtype
    # What the model checks on its side of the contract.
    sizes = batch_lib.validate(batch)
    assert sizes["B"] == config.batch_size and sizes["S"] == config.sizes.slots


def test_a_pipeline_batch_passes_the_step_checker_and_the_tiny_models_loss(tokenizer_path):
    """The data side and the model side of the contract meet: a smoke-mixture batch passes the
    train-step check for the tiny model and gives a finite loss with every task's terms on."""
    from flax import nnx

    from configs import pixelllm as pixelllm_config
    from pixelllm.models.pixel_llm import objective
    from pixelllm.models.pixel_llm.pixel_llm import PixelLLM

    config = data_config.get_config("smoke")
    batch = _first_smoke_batch(config, tokenizer_path, 8)
    proposals = batch["task_proposals"] > 0
    assert proposals.any() and not proposals.all()
    # Dense-captioning slots are empty in the data but carry the task prompt for the model.
    tok = load_tokenizer(tokenizer_path)
    assert not batch["slot_mask"][proposals].any()
    prompt = tok.decode(batch["context_tokens"][proposals][0, 0])  # cut to Lc = 8 tokens
    assert prompt and "an object of".startswith(prompt)

    model_config = pixelllm_config.get_config("tiny")
    checker = batch_lib.BatchChecker(
        vocab_size=model_config.model.language_model.model.vocab_size,
        sizes=Sizes(**config.sizes))
    checker(batch)
    model = PixelLLM.from_config(model_config.model, rngs=nnx.Rngs(0))

    @nnx.jit
    def loss(model, batch):
        outputs = model(batch)
        return objective.compute(outputs, batch, model_config.loss), outputs

    (total, terms), outputs = loss(model, batch)
    assert np.isfinite(float(total))
    for name in ("text", "box_l1", "proposal_giou"):
        assert float(terms[name].normalizer) > 0, name
    # The dense images' text loss runs on slots built from their ground truth and proposals.
    assert np.asarray(outputs.slot_inputs["task_text"])[proposals].any()
    with pytest.raises(batch_lib.BatchError, match="text_tokens"):
        checker({**batch, "text_tokens": np.full_like(batch["text_tokens"], 128)})


def _ln_line(image_id, caption, timed, trace):
    return json.dumps({
        "dataset_id": "mscoco", "image_id": image_id, "annotator_id": 1, "caption": caption,
        "voice_recording": "x.ogg",
        "timed_caption": [{"utterance": u, "start_time": s, "end_time": e} for u, s, e in timed],
        "traces": [[{"x": x, "y": y, "t": t} for x, y, t in trace]]})


def test_config_pipelines_read_a_built_localized_narratives_data_set(tmp_path, tokenizer_path):
    """From jsonl + JPEG through the TFDS builder to batches: the trace of "a dog" stays in the
    left half of a 32x16 image, "on the grass" in the right half."""
    manual = tmp_path / "manual"
    caption = "a dog on the grass"
    timed = [("a dog", 0.0, 1.0), ("on the grass", 1.1, 2.0)]
    # The mouse moves down the left half, jumps right, moves down the right half.
    trace = [(0.1, 0.2, 0.0), (0.4, 0.8, 1.0), (0.6, 0.2, 1.1), (0.9, 0.8, 2.0)]
    for folder, name, image_id in (("val2017", "coco_val_localized_narratives.jsonl", "5"),
                                   ("train2017",
                                    "coco_train_localized_narratives-00000-of-00004.jsonl", "6")):
        (manual / folder).mkdir(parents=True)
        Image.fromarray(np.full((16, 32, 3), 77, np.uint8)).save(
            manual / folder / f"{int(image_id):012d}.jpg", quality=95)
        (manual / name).write_text(_ln_line(image_id, caption, timed, trace) + "\n")
    import tensorflow_datasets as tfds

    from data_pipelines.builders.localized_narratives import LocalizedNarratives
    LocalizedNarratives(config="coco", data_dir=str(tmp_path / "tfds")).download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))

    config = data_config.get_config("trace")
    config.data_dir, config.tokenizer = str(tmp_path / "tfds"), tokenizer_path
    config.sizes = dataclasses.asdict(SIZES)
    config.batch_size, config.num_threads = 2, 1
    config.train = [{**config.train[0], "ops": _ops("trace", tokenizer_path, train=True)}]
    config.eval = [{**config.eval[0], "ops": _ops("trace", tokenizer_path, alignment="exact"),
                    "sizes": dataclasses.asdict(SIZES), "batch_size": 1}]
    evaluation = pipeline.eval_from_config(config, process_index=0, process_count=1)
    [batch] = list(evaluation["ln_coco_trace_val"])
    # 32x16 -> 16x8 on the canvas. The trace boxes, normalized (0.1, 0.2, 0.4, 0.8) and
    # (0.6, 0.2, 0.9, 0.8), times (16, 8).
    np.testing.assert_array_equal(batch["valid_wh"][0], [16, 8])
    tok = load_tokenizer(tokenizer_path)
    _, words = tok.encode_with_alignment(caption)
    assert tok.decode(batch["text_tokens"][0, 0, 1:]) == caption
    points = batch["token_points"][0, 0]
    for position, word in enumerate(words, start=1):
        expected = [[1.6, 1.6], [6.4, 6.4]] if word <= 1 else [[9.6, 1.6], [14.4, 6.4]]
        np.testing.assert_allclose(points[position], expected, atol=0.02)
    np.testing.assert_array_equal(batch["token_points_mask"][0, 0],
                                  (np.arange(24) >= 1) & (np.arange(24) <= len(words)))
    train = next(iter(pipeline.from_config(config, process_index=0, process_count=1)))
    assert train["image"].shape == (2, 16, 16, 3) and train["slot_mask"][:, 0].all()


def test_refseg_evaluation_batches_carry_the_original_size_masks(tokenizer_path):
    record = _refer_record(0)
    masks = np.zeros((2, 16, 32, 1), np.uint8)
    masks[0, 1:7, 2:5] = 255  # the dog's, at the original 32 x 16
    masks[1, 9:, 25:31] = 255
    record["objects"]["mask"] = list(masks)
    ops, sizes = data_config.evaluation_chain(_ops("refseg", tokenizer_path), task="refseg",
                                              sizes=dataclasses.asdict(SIZES))
    side = data_config.ORIGINAL_MASKS_SIDE
    [batch] = list(_eval_pipeline([Source("refseg", [record], ops)], sizes=Sizes(**sizes),
                                  evaluation_keys=True))
    assert batch["original_masks"].shape == (2, SIZES.slots, side, side)
    np.testing.assert_array_equal(batch["original_wh"][0], [32, 16])
    # Slot s holds expression s's object, in the top-left 32 x 16 of the frame.
    np.testing.assert_array_equal(batch["original_masks"][0, :2, :16, :32], masks[:, :, :, 0] > 0)
    assert not batch["original_masks"][0, :, 16:].any()
    assert not batch["original_masks"][1].any()  # the all-zero filler example
    assert batch["target_masks"][0, 0, 1:3, 1:2].all()  # the canvas masks are still made


def _random_pixels(record, seed):
    """``record`` with random pixels of its image's shape (crops then differ visibly)."""
    shape = record["image"].shape
    return {**record, "image": np.random.default_rng(seed).integers(0, 256, shape, np.uint8)}


def test_the_sam_feature_cache_switch_adds_each_canvas_features(tmp_path, tokenizer_path,
                                                                monkeypatch):
    from data_pipelines import sam_feature_store
    from tests.data_pipelines.ops.test_sam_features import (CHANNELS, fill_store, records_from,
                                                            synthetic_features)

    records_from({"trace": [_random_pixels(_ln_record(i), i) for i in range(3)],
                  "refer": [_random_pixels(_refer_record(i), 10 + i) for i in range(3)],
                  "densecap": [_random_pixels(_vg_record(i), 20 + i) for i in range(3)]},
                 monkeypatch)
    config = data_config.get_config("smoke")
    config.tokenizer, config.batch_size = tokenizer_path, 8
    assert not pipeline.sam_feature_cache(config)  # off by default
    config.sam_feature_cache.directory = str(tmp_path)
    config.sam_feature_cache.augmentations = 2
    planned = fill_store(config)[0]
    # 3 trace images once (resize_and_pad draws nothing), 3 referring images x 2 (the three
    # referring sources share their images and crop settings), 3 dense-captioning images x 2.
    assert len(planned) == 15
    batches = pipeline.from_config(config, process_index=0, process_count=1)
    assert batches.sizes.sam_grid == 2 and batches.sizes.sam_channels == CHANNELS
    batch = next(iter(batches))
    assert batch["sam_features"].shape == (8, 2, 2, CHANNELS)
    assert batch_lib.validate(batch)["F"] == 2
    store = sam_feature_store.FeatureStore.open(tmp_path)
    canvases = {key: canvas for key, canvas, _ in planned}
    for image, features in zip(batch["image"], batch["sam_features"], strict=True):
        # Each example's canvas is a planned one, and its features are that canvas's row.
        keys = [key for key, canvas in canvases.items() if np.array_equal(canvas, image)]
        assert any(np.array_equal(features, store.get(key)) for key in keys)
        np.testing.assert_allclose(features, synthetic_features(image), rtol=1e-3)

    config.train = [*config.train, {**config.train[0], "name": "no_geometry",
                                    "ops": [{"op": "decode"}]}]
    with pytest.raises(ValueError, match="source no_geometry: no geometry op"):
        pipeline.from_config(config, process_index=0, process_count=1)
