"""Tests for data_pipelines/builders/referring_mixture.py on tiny SeqTR (instances.json) and MDETR
(merge_coco_img_safe_train.json) files, read back through the real referring op chains."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from configs import data as data_config
from data_pipelines import pipeline
from data_pipelines.builders import referring_mixture as rm
from data_pipelines.ops import registry, slot
from data_pipelines.skips import BadRecordError


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels(height, width, value):
    return np.full((height, width, 3), value, np.uint8)


# --- SeqTR layout: flickr30k/instances.json and mixed/instances.json ------------------------

def _seqtr(image_id, bbox, expressions, size=(4, 5), **extra):
    return {"image_id": image_id, "height": size[0], "width": size[1], "bbox": bbox,
            "expressions": expressions, **extra}


FLICKR = {
    "train": [
        # Image 501 referred to by three records (one with two expressions, one with an empty
        # expression), plus records that cannot be used.
        _seqtr(501, [0, 0, 2, 2], ["a man", " the man in red "]),
        _seqtr(501, [2, 1, 2, 3], ["a dog", ""]),
        _seqtr(502, [0, 0, 1, 1], ["lost"], size=(3, 3)),      # image file missing
        _seqtr(501, [1, 1, 0, 2], ["flat"]),                    # box without width
        _seqtr(501, [0, 0, 1, 1], ["resized"], size=(9, 9)),    # 501 listed with two sizes
        _seqtr(501, [0, 0, 1, 1], []),                          # no expression
        _seqtr(501, [3, 2, 2, 2], ["a cat"], category_id=7),
    ],
    "val": [_seqtr(503, [1, 1, 1, 1], ["a hat"], size=(2, 3))],
}
FLICKR_SKIPS = {"train": {rm.MISSING_IMAGE: 1, rm.DEGENERATE_BOX: 1, rm.BAD_FIELD: 1,
                          rm.NO_EXPRESSIONS: 1, rm.EMPTY_SENTENCE: 1},
                "val": {}}

MIXED = {"train": [
    _seqtr(11, [1, 1, 2, 2], ["left shape"], size=(5, 6), data_source="coco",
           mask=[[1, 1, 3, 1, 3, 3]]),
    _seqtr(77, [0, 0, 3, 3], ["big tree"], size=(3, 4), data_source="vg"),
    # The same COCO image again, from another RefCOCO data set.
    _seqtr(11, [0, 0, 6, 5], ["whole thing", "everything"], size=(5, 6), data_source="coco"),
    _seqtr(12, [0, 0, 1, 1], ["unplaced"]),  # no data_source in a mixed file
]}


def _seqtr_manual_dir(root):
    (root / "flickr30k").mkdir(parents=True)
    (root / "flickr30k" / "instances.json").write_text(json.dumps(FLICKR))
    (root / "mixed").mkdir()
    (root / "mixed" / "instances.json").write_text(json.dumps(MIXED))
    (root / "flickr30k-images").mkdir()
    (root / "flickr30k-images" / "501.jpg").write_bytes(_png(_pixels(4, 5, 50)))
    (root / "flickr30k-images" / "503.jpg").write_bytes(_png(_pixels(2, 3, 60)))
    (root / "train2014").mkdir()
    (root / "train2014" / "COCO_train2014_000000000011.jpg").write_bytes(
        _png(_pixels(5, 6, 70)))
    # VG images in the second of the VG folders.
    (root / "VG_100K_2").mkdir()
    (root / "VG_100K_2" / "77.jpg").write_bytes(_png(_pixels(3, 4, 80)))
    return root


# --- MDETR layout: merge_coco_img_safe_train.json -------------------------------------------

# Image 11 (5 x 6): an L of two polygons, a crowd RLE (uncompressed), a compressed RLE corner.
L_POLYGONS = [[1, 1, 4, 1, 4, 2, 2, 2, 2, 4, 1, 4], [5, 3, 6, 3, 6, 5, 5, 5]]
L_MASK = np.array([[0, 0, 0, 0, 0, 0],
                   [0, 1, 1, 1, 0, 0],
                   [0, 1, 0, 0, 0, 0],
                   [0, 1, 0, 0, 0, 1],
                   [0, 0, 0, 0, 0, 1]], np.uint8)
CROWD_RLE = {"size": [5, 6], "counts": [3, 2, 25]}  # column 0, rows 3-4
CROWD_MASK = np.zeros((5, 6), np.uint8)
CROWD_MASK[3:5, 0] = 1
CORNER_RLE = {"size": [5, 6], "counts": "d02300"}   # rows 0-1, columns 4-5
CORNER_MASK = np.zeros((5, 6), np.uint8)
CORNER_MASK[0:2, 4:6] = 1


def _entry(entry_id, original_id, caption, *, size=(5, 6), val=False, **extra):
    folder = "val2014" if val else "train2014"
    return {"id": entry_id, "original_id": original_id, "caption": caption,
            "file_name": f"COCO_{folder}_{original_id:012d}.jpg", "height": size[0],
            "width": size[1], "dataset_name": "refcoco", "tokens_negative": [], **extra}


def _annotation(ann_id, entry_id, original_id, bbox, segmentation, iscrowd=0, category=1):
    return {"id": ann_id, "image_id": entry_id, "original_id": original_id, "bbox": bbox,
            "segmentation": segmentation, "area": 1.0, "iscrowd": iscrowd,
            "category_id": category, "tokens_positive": [[0, 3]]}


MDETR = {
    "info": {}, "licenses": [], "categories": [{"id": 1, "name": "person"}],
    "images": [
        _entry(0, 11, "the l shape", raw="The L-shape!"),
        _entry(1, 11, "left thing"),                 # the same object, a second expression
        _entry(2, 11, "the crowd", refexp_id=900),
        _entry(3, 11, "a corner"),
        _entry(4, 12, "nothing here", size=(4, 4)),  # its box annotation is missing
        _entry(5, 13, "grey square", size=(2, 3), val=True),
        _entry(6, 14, "missing picture", size=(2, 2)),
        _entry(7, 11, "a line"),
    ],
    "annotations": [
        _annotation(100, 0, 101, [1, 1, 5, 4], L_POLYGONS, category=18),
        _annotation(101, 1, 101, [1, 1, 5, 4], L_POLYGONS, category=18),
        _annotation(102, 2, 102, [0, 3, 1, 2], CROWD_RLE, iscrowd=1),
        _annotation(103, 3, 103, [4, 0, 2, 2], CORNER_RLE),
        _annotation(105, 5, 105, [0, 0, 3, 2], [[0, 0, 3, 0, 3, 2, 0, 2]]),
        _annotation(106, 6, 106, [0, 0, 1, 1], [[0, 0, 1, 0, 1, 1]]),
        _annotation(107, 7, 107, [1, 1, 1, 1], [[1, 1, 2, 2]]),  # a 2-point "polygon"
        _annotation(108, 99, 108, [0, 0, 1, 1], [[0, 0, 1, 0, 1, 1]]),  # no entry 99
    ],
}
MDETR_SKIPS = {"train": {rm.NO_BOX: 1, rm.UNLISTED_ENTRY: 1, rm.BAD_SEGMENTATION: 1,
                         rm.MISSING_IMAGE: 1}}


def _mdetr_manual_dir(root):
    root.mkdir(parents=True)
    (root / "merge_coco_img_safe_train.json").write_text(json.dumps(MDETR))
    (root / "train2014").mkdir()
    (root / "train2014" / "COCO_train2014_000000000011.jpg").write_bytes(
        _png(np.arange(90, dtype=np.uint8).reshape(5, 6, 3)))
    (root / "val2014").mkdir()
    (root / "val2014" / "COCO_val2014_000000000013.jpg").write_bytes(_png(_pixels(2, 3, 9)))
    return root


@pytest.fixture(scope="module")
def seqtr_builds(tmp_path_factory, build_dataset):
    root = tmp_path_factory.mktemp("seqtr")
    manual = _seqtr_manual_dir(root / "manual")
    return {config: build_dataset(rm.ReferringMixture, manual_dir=manual,
                                  data_dir=root / "data", config=config)
            for config in ("uni_flickr", "uni_mixed_coco", "uni_mixed_vg")}


@pytest.fixture(scope="module")
def mdetr_build(tmp_path_factory, build_dataset):
    root = tmp_path_factory.mktemp("mdetr")
    return build_dataset(rm.ReferringMixture, manual_dir=_mdetr_manual_dir(root / "manual"),
                         data_dir=root / "data", config="merge_coco_img_safe")


def _texts(values):
    return [v.decode("utf-8") for v in values]


def test_flickr_records_of_one_image_become_its_objects(seqtr_builds, examples_by_id):
    builder = seqtr_builds["uni_flickr"]
    assert set(builder.info.splits) == {"train", "val"}
    assert set(examples_by_id(builder, "train")) == {"501"}
    example = examples_by_id(builder, "train")["501"]
    np.testing.assert_array_equal(example["image"], _pixels(4, 5, 50))
    assert example["image/filename"].decode() == "flickr30k-images/501.jpg"
    objects = example["objects"]
    # Record positions in the split; the cat's category from the record, else 1.
    assert list(objects["id"]) == [0, 1, 6] and list(objects["ref_id"]) == [0, 1, 6]
    assert list(objects["category"]) == [1, 1, 7]
    np.testing.assert_allclose(np.stack(objects["box"]),
                               [[0, 0, 2 / 5, 2 / 4], [2 / 5, 1 / 4, 4 / 5, 1.0],
                                [3 / 5, 2 / 4, 1.0, 1.0]], atol=1e-7)
    assert "mask" not in objects
    expressions = example["expressions"]
    assert list(expressions["object"]) == [0, 0, 1, 2]
    assert _texts(expressions["text"]) == ["a man", "the man in red", "a dog", "a cat"]
    assert _texts(expressions["raw"])[1] == " the man in red "
    assert _texts(expressions["tokens"])[1] == "the man in red"
    # Ids number every expression of the split in file order, skipped ones included.
    assert list(expressions["id"]) == [0, 1, 2, 7]


def test_flickr_bad_records_are_counted_per_split(seqtr_builds):
    assert seqtr_builds["uni_flickr"].skip_counts == FLICKR_SKIPS


def test_mixed_file_is_split_by_data_source(seqtr_builds, examples_by_id):
    coco = examples_by_id(seqtr_builds["uni_mixed_coco"], "train")
    assert set(coco) == {"11"}
    assert coco["11"]["image/filename"].decode() == "train2014/COCO_train2014_000000000011.jpg"
    assert _texts(coco["11"]["expressions"]["text"]) == ["left shape", "whole thing",
                                                         "everything"]
    assert list(coco["11"]["expressions"]["object"]) == [0, 1, 1]
    assert list(coco["11"]["objects"]["id"]) == [0, 1]
    vg = examples_by_id(seqtr_builds["uni_mixed_vg"], "train")
    assert set(vg) == {"77"}
    assert vg["77"]["image/filename"].decode() == "VG_100K_2/77.jpg"
    np.testing.assert_allclose(vg["77"]["objects"]["box"][0], [0, 0, 0.75, 1.0])
    # The record without data_source is counted by both configs, taken by neither.
    for config in ("uni_mixed_coco", "uni_mixed_vg"):
        assert seqtr_builds[config].skip_counts == {"train": {rm.BAD_FIELD: 1}}


def test_mdetr_entries_group_by_coco_image_and_annotation(mdetr_build, examples_by_id):
    assert set(mdetr_build.info.splits) == {"train"}
    examples = examples_by_id(mdetr_build, "train")
    assert set(examples) == {"11", "13"}
    example = examples["11"]
    objects = example["objects"]
    assert list(objects["id"]) == [101, 102, 103]
    assert list(objects["category"]) == [18, 1, 1]
    np.testing.assert_allclose(np.stack(objects["box"]),
                               [[1 / 6, 1 / 5, 1.0, 1.0], [0, 3 / 5, 1 / 6, 1.0],
                                [4 / 6, 0, 1.0, 2 / 5]], atol=1e-7)
    expressions = example["expressions"]
    assert list(expressions["object"]) == [0, 0, 1, 2]
    assert _texts(expressions["text"]) == ["the l shape", "left thing", "the crowd",
                                           "a corner"]
    assert _texts(expressions["raw"]) == ["The L-shape!", "left thing", "the crowd",
                                          "a corner"]
    # refexp_id where given, else the annotation id.
    assert list(expressions["id"]) == [100, 101, 900, 103]
    # Polygons, a crowd's uncompressed RLE and a compressed RLE, pixel for pixel.
    masks = objects["mask"]
    for mask, expected in zip(masks, (L_MASK, CROWD_MASK, CORNER_MASK)):
        np.testing.assert_array_equal(mask[..., 0], expected * 255)
    assert examples["13"]["image/filename"].decode() == "val2014/COCO_val2014_000000000013.jpg"


def test_mdetr_bad_records_are_counted(mdetr_build):
    assert mdetr_build.skip_counts == MDETR_SKIPS


def test_fail_policy_names_file_and_record(tmp_path, build_dataset):
    manual = _mdetr_manual_dir(tmp_path / "manual")
    with pytest.raises(BadRecordError, match=r"merge_coco_img_safe_train\.json.*"
                       r"annotation 108: its image_id 99 is not in 'images'"):
        build_dataset(rm.ReferringMixture, manual_dir=manual, data_dir=tmp_path / "data",
                      config="merge_coco_img_safe", skip_policy="fail")


def test_missing_files_are_named(tmp_path, build_dataset):
    (tmp_path / "empty" / "train2014").mkdir(parents=True)  # images, no annotations
    (tmp_path / "empty" / "train2014" / "COCO_train2014_000000000011.jpg").write_bytes(
        _png(_pixels(5, 6, 70)))
    with pytest.raises(FileNotFoundError, match=r"mixed/instances\.json"):
        build_dataset(rm.ReferringMixture, manual_dir=tmp_path / "empty",
                      data_dir=tmp_path / "data", config="uni_mixed_vg")
    with pytest.raises(FileNotFoundError, match=r"merge_coco_img_safe_train\.json"):
        build_dataset(rm.ReferringMixture, manual_dir=tmp_path / "empty",
                      data_dir=tmp_path / "data", config="merge_coco_img_safe")


def _through_slots(entry, record, seed=0):
    """The entry's op chain up to the slots (tokenizing needs no checking here)."""
    ops = [op for op in entry["ops"] if op["op"] != "tokenize"]
    return registry.compose(registry.parse(ops))(record, np.random.default_rng(seed))


def _entry_named(config, name):
    return next(entry for entry in config.train if entry["name"] == name)


def test_official_mixture_weights_and_builders():
    train = data_config.get_config("ref_official").train
    assert [(e["name"], e["builder"], e["split"], e["task"], e["weight"]) for e in train] == [
        ("uni_flickr", "referring_mixture/uni_flickr", "train", "refer", 1.0),
        ("uni_mixed_coco", "referring_mixture/uni_mixed_coco", "train", "refer", 5.0),
        ("uni_mixed_vg", "referring_mixture/uni_mixed_vg", "train", "refer", 1.0)]
    (refseg,) = data_config.get_config("refseg_official").train
    assert (refseg["builder"], refseg["task"]) == ("referring_mixture/merge_coco_img_safe",
                                                   "refseg")


def test_built_examples_go_through_the_referring_op_chains(seqtr_builds, mdetr_build,
                                                            examples_by_id):
    flickr = seqtr_builds["uni_flickr"].as_data_source()["train"][0]
    entry = _entry_named(data_config.get_config("ref_official"), "uni_flickr")
    seen = set()
    for seed in range(10):
        out = _through_slots(entry, flickr, seed)
        used = out["slot_mask"]
        # The crop may drop objects with their expressions, never add any.
        texts = {out[slot.SLOT_TEXT][s] for s in np.flatnonzero(used)}
        assert texts <= {"a man", "the man in red", "a dog", "a cat"}
        assert out["task_box"][used].tolist() == [1.0] * int(used.sum())
        assert not out["task_mask"].any()
        seen |= texts
    assert len(seen) >= 3

    record = examples_by_id(mdetr_build, "train")["11"]
    entry = _entry_named(data_config.get_config("refseg_official"), "merge_coco_img_safe")
    out = _through_slots(entry, record, 0)
    used = np.flatnonzero(out["slot_mask"])
    assert {out[slot.SLOT_TEXT][s] for s in used} <= {"the l shape", "left thing", "the crowd",
                                                      "a corner"}
    assert used.size and any(out["target_masks"][s].any() for s in used)
    assert out["task_mask"][used].tolist() == [1.0] * used.size


def test_the_pipeline_finds_the_built_sources_by_name(seqtr_builds):
    config = data_config.get_config("ref_official")
    assert config.sizes == data_config.get_config("ref").sizes and config.batch_size == 64
    data_dir = seqtr_builds["uni_flickr"].data_dir_root
    sources = pipeline.sources_from_config(config.train, data_dir=data_dir,
                                           tokenizer="tokenizer.model")
    assert [(source.name, len(source.records), source.weight) for source in sources] == [
        ("referring_mixture/uni_flickr:train", 1, 1.0),
        ("referring_mixture/uni_mixed_coco:train", 1, 5.0),
        ("referring_mixture/uni_mixed_vg:train", 1, 1.0)]
