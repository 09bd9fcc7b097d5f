"""Tests for data_pipelines/builders/coco_captions.py on tiny COCO 2017 and Karpathy layouts, and
the built examples through the data config's caption op chain."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from configs import data as data_config
from data_pipelines.builders import coco_captions as cc
from data_pipelines.ops import registry, slot
from data_pipelines.skips import BadRecordError
from pixelllm import tasks


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels(image_id, height=4, width=6):
    return np.full((height, width, 3), image_id, np.uint8)


def _image(image_id, height=4, width=6):
    return {"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": height,
            "width": width, "license": 1, "coco_url": "", "date_captured": ""}


def _caption(caption_id, image_id, text):
    return {"id": caption_id, "image_id": image_id, "caption": text}


TRAIN_JSON = {
    "info": {}, "licenses": [],
    "images": [_image(1), _image(2), _image(3), _image(4), _image(5), _image(6, height=5)],
    "annotations": [
        _caption(13, 1, "A dog on the grass.\n"),      # trailing newline
        _caption(11, 1, "  two dogs play "),           # spaces at both ends
        _caption(12, 1, "A dog runs"),
        _caption(20, 2, " "),                           # empty: image 2 keeps no caption
        _caption(30, 3, "a lost picture"),              # image file missing
        _caption(40, 99, "an image not in the json"),   # unlisted image
        _caption(50, 5, "a broken file"),               # corrupt image
        _caption(60, 6, "a wrong size"),                # the file is 4x6, the json says 5x6
        {"id": 70, "image_id": 1, "caption": None},     # no caption text
        # image 4 has no caption at all
    ],
}
EXPECTED_TRAIN_SKIPS = {cc.EMPTY_CAPTION: 1, cc.NO_CAPTIONS: 2, cc.MISSING_IMAGE: 1,
                        cc.UNLISTED_IMAGE: 1, cc.CORRUPT_IMAGE: 1, cc.SIZE_MISMATCH: 1,
                        cc.BAD_FIELD: 1}


def _sentence(sentence_id, raw):
    return {"raw": raw, "tokens": raw.lower().strip(" .").split(), "sentid": sentence_id,
            "imgid": 0}


def _karpathy_image(cocoid, split, sentences, folder="val2014"):
    return {"filepath": folder, "filename": f"COCO_{folder}_{cocoid:012d}.jpg", "imgid": 0,
            "split": split, "cocoid": cocoid, "sentids": [s["sentid"] for s in sentences],
            "sentences": sentences}


KARPATHY_JSON = {"dataset": "coco", "images": [
    _karpathy_image(1, "train", [_sentence(101, "A dog on the grass. "),
                                 _sentence(100, "A dog runs")], folder="train2014"),
    _karpathy_image(7, "restval", [_sentence(700, "A red bus")]),        # only in val2017/
    _karpathy_image(8, "val", [_sentence(800, "A cat on a mat")]),       # in val2014/
    _karpathy_image(9, "test", [_sentence(900, "A boat\n")]),            # in val2017/
    _karpathy_image(10, "test", [_sentence(1000, "lost")]),              # nowhere
    _karpathy_image(11, "holdout", [_sentence(1100, "no such split")]),  # unassigned
]}


def _manual_dir(tmp_path, *, karpathy=True, train=True):
    manual = tmp_path / "manual"
    (manual / "annotations").mkdir(parents=True)
    for folder in ("train2017", "val2017", "val2014"):
        (manual / folder).mkdir()
    if train:
        (manual / "annotations" / "captions_train2017.json").write_text(json.dumps(TRAIN_JSON))
    (manual / "annotations" / "captions_val2017.json").write_text(json.dumps({
        "images": [_image(7, 3, 3)], "annotations": [_caption(71, 7, "A red bus")]}))
    for image_id in (1, 2, 4, 6):
        (manual / "train2017" / f"{image_id:012d}.jpg").write_bytes(_png(_pixels(image_id)))
    (manual / "train2017" / f"{5:012d}.jpg").write_bytes(_png(_pixels(5))[:30])
    for image_id in (7, 9):
        (manual / "val2017" / f"{image_id:012d}.jpg").write_bytes(
            _png(_pixels(image_id, 3, 3)))
    (manual / "val2014" / "COCO_val2014_000000000008.jpg").write_bytes(_png(_pixels(8, 2, 2)))
    if karpathy:
        (manual / "dataset_coco.json").write_text(json.dumps(KARPATHY_JSON))
    return manual


@pytest.fixture(scope="module")
def built(tmp_path_factory, build_dataset):
    tmp_path = tmp_path_factory.mktemp("coco_captions")
    return build_dataset(cc.CocoCaptions, manual_dir=_manual_dir(tmp_path),
                         data_dir=tmp_path / "data", config="coco")


def _captions(example):
    return [t.decode() for t in example["captions"]["text"]], list(example["captions"]["id"])


def test_one_example_per_image_with_all_its_captions_stripped(built, examples_by_id):
    train = examples_by_id(built, "train")
    assert set(train) == {"1"}
    example = train["1"]
    np.testing.assert_array_equal(example["image"], _pixels(1))
    assert example["image/filename"].decode() == "train2017/000000000001.jpg"
    assert (example["image/height"], example["image/width"]) == (4, 6)
    assert _captions(example) == (["two dogs play", "A dog runs", "A dog on the grass."],
                                  [11, 12, 13])
    assert _captions(examples_by_id(built, "val")["7"]) == (["A red bus"], [71])


def test_bad_records_are_counted_per_split(built):
    assert built.skip_counts["train"] == EXPECTED_TRAIN_SKIPS
    assert built.skip_counts["val"] == {}
    assert built.skip_counts[cc.UNASSIGNED] == {cc.BAD_FIELD: 1}
    assert built.skip_counts["karpathy_test"] == {cc.MISSING_IMAGE: 1}


def test_karpathy_splits_find_2014_and_2017_files(built, examples_by_id):
    assert set(built.info.splits) == {"train", "val", "karpathy_train", "karpathy_val",
                                      "karpathy_test"}
    karpathy_train = examples_by_id(built, "karpathy_train")
    assert set(karpathy_train) == {"1", "7"}  # train + restval
    # No train2014/ folder: image 1 is read from train2017/ under its 2017 name.
    assert karpathy_train["1"]["image/filename"].decode() == "train2017/000000000001.jpg"
    assert _captions(karpathy_train["1"]) == (["A dog runs", "A dog on the grass."], [100, 101])
    assert karpathy_train["7"]["image/filename"].decode() == "val2017/000000000007.jpg"
    val = examples_by_id(built, "karpathy_val")["8"]
    assert val["image/filename"].decode() == "val2014/COCO_val2014_000000000008.jpg"
    np.testing.assert_array_equal(val["image"], _pixels(8, 2, 2))
    assert _captions(examples_by_id(built, "karpathy_test")["9"]) == (["A boat"], [900])


def test_fail_policy_names_file_and_record(tmp_path, build_dataset):
    manual = _manual_dir(tmp_path, karpathy=False)
    # The json is read first: the caption of the unlisted image is the first bad record.
    with pytest.raises(BadRecordError, match=r"captions_train2017\.json: image 99: 1 "
                                             r"caption\(s\) of an image not in 'images'"):
        build_dataset(cc.CocoCaptions, manual_dir=manual, data_dir=tmp_path / "data",
                      config="coco", skip_policy="fail", splits=["train"])


def test_missing_split_files_are_announced_and_requested_ones_refused(tmp_path, build_dataset,
                                                                     examples_by_id, capsys):
    manual = _manual_dir(tmp_path, karpathy=False, train=False)
    builder = build_dataset(cc.CocoCaptions, manual_dir=manual, data_dir=tmp_path / "data",
                            config="coco")
    assert set(builder.info.splits) == {"val"}
    warning = capsys.readouterr().err
    assert "split 'karpathy_val' is NOT built" in warning and "dataset_coco.json" in warning
    with pytest.raises(FileNotFoundError, match="requested split.*captions_train2017.json"):
        build_dataset(cc.CocoCaptions, manual_dir=manual, data_dir=tmp_path / "data2",
                      config="coco", splits=["train"])


def _entry(config, name):
    return next(entry for entry in (*config.train, *config.eval) if entry["name"] == name)


def _through_slots(entry, record, seed=0):
    """The entry's op chain up to the slots (tokenizing needs no checking here)."""
    ops = [op for op in entry["ops"] if op["op"] != "tokenize"]
    return registry.compose(registry.parse(ops))(record, np.random.default_rng(seed))


def test_built_examples_go_through_the_caption_op_chain(built, examples_by_id):
    record = examples_by_id(built, "karpathy_train")["1"]
    config = data_config.get_config("trace_coco")
    entry = _entry(config, "coco_captions")
    assert (entry["builder"], entry["split"], entry["task"], entry["weight"]) == (
        "coco_captions_manual/coco", "karpathy_train", "caption", 1.0)
    ops = {op["op"]: op for op in entry["ops"]}
    assert (ops["random_scale_crop"]["min_scale"], ops["random_scale_crop"]["max_scale"]) == (
        0.75, 1.25)
    seen_texts, seen_contexts = set(), set()
    for seed in range(60):
        out = _through_slots(entry, record, seed)
        assert out["slot_mask"].tolist() == [True]
        assert out["task_text"].tolist() == [1.0] and out["task_points"].tolist() == [0.0]
        seen_texts.add(out[slot.SLOT_TEXT][0])
        seen_contexts.add(out[slot.SLOT_CONTEXT][0])
    assert seen_texts == {"A dog runs", "A dog on the grass."}
    # Text length 128 >= 32: the 13 short-caption prompts.
    assert seen_contexts <= set(tasks.SHORT_CAPTION_PROMPTS) and len(seen_contexts) > 5

    evaluation = _through_slots(_entry(config, "coco_captions_karpathy_val"),
                                built.as_data_source()["karpathy_val"][0])
    assert evaluation[slot.SLOT_CONTEXT] == ["A photo of "]
    assert evaluation[slot.SLOT_TEXT] == ["A cat on a mat"]


def test_short_texts_train_on_a_photo_of_alone(built):
    # The smoke sizes have a 16-token text, below the official 32.
    entry = _entry(data_config.get_config("smoke_multitask"), "coco_captions")
    record = built.as_data_source()["train"][0]
    contexts = {c for seed in range(20)
                for c in _through_slots(entry, record, seed)[slot.SLOT_CONTEXT] if c}
    assert contexts == {"A photo of "}
    assert tasks.caption_training_prompts(31) == ("A photo of ",)
    assert tasks.caption_training_prompts(32) == tasks.SHORT_CAPTION_PROMPTS


@pytest.mark.parametrize("variant, weights", [
    # pixel_llm_t5_trace.py: COCO captions 1, LN 2.
    ("trace_coco", {"coco_captions": 1.0, "ln_coco_trace": 2.0}),
    # pixel_llm_t5_trace_ref_densecap_llava.py, with the RefCOCO family for UNINEXT's mixture.
    ("multitask", {"coco_captions": 3.0, "ln_coco_trace": 1.0, "refcoco_unc": 2.0,
                   "refcocoplus_unc": 2.0, "refcocog_umd": 3.0, "vg_densecap": 5.0,
                   "sharegpt4v_mix665k": 5.0}),
])
def test_mixtures_with_the_new_sources_have_the_official_weights(variant, weights):
    config = data_config.get_config(variant)
    assert {entry["name"]: entry["weight"] for entry in config.train} == weights
    assert _entry(config, "coco_captions_karpathy_val")["split"] == "karpathy_val"
    for entry in (*config.train, *config.eval):
        registry.parse([op for op in entry["ops"] if op["op"] != "tokenize"])
    if variant == "multitask":  # the tiny variant mixes the same sources
        smoke = data_config.get_config("smoke_multitask")
        assert {entry["name"]: entry["weight"] for entry in smoke.train} == weights
