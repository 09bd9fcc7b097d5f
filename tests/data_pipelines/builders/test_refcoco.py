"""Tests for data_pipelines/builders/refcoco.py on tiny hand-made refer-toolkit and TFDS layouts."""

import io
import json
import re
import struct

import numpy as np
import pytest
from PIL import Image

from data_pipelines.builders import refcoco
from data_pipelines.skips import BadRecordError, SkipCounter


def _py2_pickle(value) -> bytes:
    """``value`` as Python 2's pickler writes it with protocol 2: ``bytes`` are Python 2 ``str``
    (SHORT_BINSTRING / BINSTRING), ``str`` is ``unicode`` (BINUNICODE)."""
    out = bytearray(b"\x80\x02")

    def write(item):
        if isinstance(item, bytes):
            out.extend(b"U" + bytes([len(item)]) + item if len(item) < 256
                       else b"T" + struct.pack("<i", len(item)) + item)
        elif isinstance(item, str):
            encoded = item.encode("utf-8")
            out.extend(b"X" + struct.pack("<I", len(encoded)) + encoded)
        elif item is None:
            out.extend(b"N")
        elif isinstance(item, int):
            out.extend(b"J" + struct.pack("<i", item))
        elif isinstance(item, float):
            out.extend(b"G" + struct.pack(">d", item))
        elif isinstance(item, dict):
            out.extend(b"}(")  # EMPTY_DICT, MARK, key, value, ..., SETITEMS
            for key, element in item.items():
                write(key)
                write(element)
            out.extend(b"u")
        elif isinstance(item, list):
            out.extend(b"](")  # EMPTY_LIST, MARK, items, APPENDS
            for element in item:
                write(element)
            out.extend(b"e")
        else:
            raise TypeError(type(item))

    write(value)
    return bytes(out + b".")


def _py2(value):
    """Text of ``value`` as Python 2 byte strings (UTF-8), as the refer toolkit's pickles hold."""
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, dict):
        return {_py2(k): _py2(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_py2(v) for v in value]
    return value


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# Images: id -> (height, width) in instances.json.
IMAGES = {11: (5, 6), 12: (4, 4), 13: (4, 4), 14: (3, 3), 15: (3, 3), 17: (2, 3)}
PIXELS = {11: np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3),
          12: np.full((4, 4, 3), 40, np.uint8),
          13: np.zeros((3, 3, 3), np.uint8),  # instances.json says 4x4
          17: np.full((2, 3, 3), 7, np.uint8)}
# An L (rows 1-3) and a square (rows 3-4, column 5), both with integer corners: pycocotools
# marks exactly the pixels whose centres lie inside.
L_POLYGONS = [[1, 1, 4, 1, 4, 2, 2, 2, 2, 4, 1, 4], [5, 3, 6, 3, 6, 5, 5, 5]]
L_MASK = np.array([[0, 0, 0, 0, 0, 0],
                   [0, 1, 1, 1, 0, 0],
                   [0, 1, 0, 0, 0, 0],
                   [0, 1, 0, 0, 0, 1],
                   [0, 0, 0, 0, 0, 1]], np.uint8)
# Column-major runs: 3 off, 2 on (column 0, rows 3-4), 25 off.
CROWD_RLE = {"size": [5, 6], "counts": [3, 2, 25]}
CROWD_MASK = np.zeros((5, 6), np.uint8)
CROWD_MASK[3:5, 0] = 1
# pycocotools' compressed string of rows 0-1, columns 4-5.
CORNER_RLE = {"size": [5, 6], "counts": "d02300"}
CORNER_MASK = np.zeros((5, 6), np.uint8)
CORNER_MASK[0:2, 4:6] = 1
SQUARE_MASK = np.zeros((4, 4), np.uint8)
SQUARE_MASK[0:2, 0:2] = 1


def _ann(ann_id, image_id, bbox, segmentation, category=1, iscrowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": category, "bbox": bbox,
            "segmentation": segmentation, "area": 1.0, "iscrowd": iscrowd}


ANNOTATIONS = [
    _ann(101, 11, [1, 1, 5, 4], L_POLYGONS, category=18),
    _ann(102, 11, [0.5, -0.5, 2, 2], CROWD_RLE, iscrowd=1),  # top edge outside: clipped
    _ann(103, 11, [4, 0, 2, 2], CORNER_RLE, category=3),
    _ann(104, 11, [2, 2, 0, 3], L_POLYGONS),  # zero width
    _ann(105, 12, [0, 0, 2, 2], [[0, 0, 2, 0, 2, 2, 0, 2]], category=44),
    _ann(106, 11, [1, 1, 1, 1], [[1, 1, 2, 2]]),  # a 2-point "polygon"
    _ann(107, 13, [0, 0, 1, 1], [[0, 0, 1, 0, 1, 1]]),
    _ann(108, 14, [0, 0, 1, 1], [[0, 0, 1, 0, 1, 1]]),
    _ann(109, 15, [0, 0, 1, 1], [[0, 0, 1, 0, 1, 1]]),
    _ann(110, 12, [10, 10, 2, 2], [[0, 0, 2, 0, 2, 2, 0, 2]]),  # outside the image
    _ann(111, 17, [0, 0, 3, 2], [[0, 0, 3, 0, 3, 2, 0, 2]], category=90),
]


def _sentence(sent_id, raw):
    """As the refer files have it: ``tokens`` the lower-cased words of ``raw`` without
    punctuation, ``sent`` those tokens joined."""
    tokens = re.findall(r"\w+", raw.lower())
    return {"tokens": tokens, "raw": raw, "sent_id": sent_id, "sent": " ".join(tokens)}


def _ref(ref_id, ann_id, image_id, split, sentences):
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "category_id": 1,
            "split": split, "sent_ids": [s for s, _ in sentences],
            "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
            "sentences": [_sentence(s, raw) for s, raw in sentences]}


REFS = [
    _ref(0, 101, 11, "train", [(1000, "The L-shape, left! "), (1001, "  "),
                               (1002, "caf\u00e9 sign")]),
    _ref(1, 102, 11, "train", [(1003, "crowd")]),
    _ref(2, 103, 11, "train", [(1004, "corner")]),
    _ref(3, 104, 11, "train", [(1005, "flat")]),          # degenerate box
    _ref(4, 999, 11, "train", [(1006, "ghost")]),         # missing annotation
    _ref(5, 105, 12, "testA", [(1007, "square")]),
    _ref(6, 106, 11, "train", [(1008, "line")]),          # unreadable segmentation
    _ref(7, 107, 13, "train", [(1009, "small")]),         # image size mismatch
    _ref(8, 108, 14, "val", [(1010, "missing")]),         # image file missing
    _ref(9, 109, 15, "val", [(1011, "corrupt")]),         # image file corrupt
    _ref(10, 101, 16, "val", [(1012, "nowhere")]),        # image not in instances.json
    _ref(11, 105, 12, "testA", [(1013, ""), (1014, " ")]),  # no usable sentence
    _ref(12, 110, 12, "testA", [(1015, "outside")]),      # box outside the image
    _ref(13, 105, 12, None, [(1016, "unsplit")]),         # no split
    _ref(14, 111, 17, "val", [(1017, "whole image")]),
]
EXPECTED_SKIPS = {
    "train": {refcoco.DEGENERATE_BOX: 1, refcoco.MISSING_ANNOTATION: 1,
              refcoco.BAD_SEGMENTATION: 1, refcoco.EMPTY_SENTENCE: 1, refcoco.SIZE_MISMATCH: 1},
    "testA": {refcoco.EMPTY_SENTENCE: 2, refcoco.NO_SENTENCES: 1, refcoco.DEGENERATE_BOX: 1},
    "val": {refcoco.MISSING_IMAGE: 2, refcoco.CORRUPT_IMAGE: 1},
    refcoco.UNASSIGNED: {refcoco.BAD_FIELD: 1},
}


def _instances():
    return {"images": [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "height": h,
                        "width": w} for i, (h, w) in IMAGES.items()],
            "annotations": ANNOTATIONS,
            "categories": [{"id": c, "name": f"c{c}"} for c in (1, 3, 18, 44, 90)]}


def _write_images(image_dir):
    image_dir.mkdir(parents=True)
    for image_id, pixels in PIXELS.items():
        (image_dir / f"COCO_train2014_{image_id:012d}.jpg").write_bytes(_png(pixels))
    (image_dir / "COCO_train2014_000000000015.jpg").write_bytes(_png(PIXELS[17])[:40])


def _refer_manual_dir(tmp_path):
    manual = tmp_path / "refer_manual"
    (manual / "refcoco").mkdir(parents=True)
    (manual / "refcoco" / "refs(unc).p").write_bytes(_py2_pickle(_py2(REFS)))
    (manual / "refcoco" / "instances.json").write_text(json.dumps(_instances()))
    _write_images(manual / "train2014")
    return manual


def _tfds_manual_dir(tmp_path, plus_refs=()):
    """refcoco.json as TFDS's manual_download_process.py writes it from the same refs (it can
    only take refs whose annotation and image exist), plus RefCOCO+ refs."""
    manual = tmp_path / "tfds_manual"
    annotations = {ann["id"]: ann for ann in ANNOTATIONS}
    all_refs = []
    for dataset, refs in (("refcoco", REFS), ("refcoco+", plus_refs)):
        for ref in refs:
            if ref["ann_id"] in annotations and ref["image_id"] in IMAGES:
                all_refs.append({**ref, "ann": annotations[ref["ann_id"]], "dataset": dataset,
                                 "dataset_partition": "unc"})
    instances = _instances()
    coco_anns = {
        str(image["id"]): {"info": image, "anns": [a for a in ANNOTATIONS
                                                   if a["image_id"] == image["id"]]}
        for image in instances["images"] if any(r["image_id"] == image["id"] for r in all_refs)}
    manual.mkdir()
    (manual / "refcoco.json").write_text(json.dumps({"ref": all_refs, "coco_anns": coco_anns}))
    _write_images(manual / "coco_train2014")
    return manual


def _texts(values):
    return [v.decode("utf-8") for v in values]


@pytest.fixture(scope="module")
def refer_build(tmp_path_factory, build_dataset):
    tmp_path = tmp_path_factory.mktemp("refer")
    return build_dataset(refcoco.ReferCoco, manual_dir=_refer_manual_dir(tmp_path),
                         data_dir=tmp_path / "data", config="refcoco_unc")


def test_splits_come_from_the_refs(refer_build, examples_by_id):
    assert set(refer_build.info.splits) == {"train", "val", "testA"}
    assert {split: set(examples_by_id(refer_build, split)) for split in ("train", "val", "testA")} \
        == {"train": {"11"}, "val": {"17"}, "testA": {"12"}}


def test_objects_boxes_and_expressions_of_an_image(refer_build, examples_by_id):
    example = examples_by_id(refer_build, "train")["11"]
    np.testing.assert_array_equal(example["image"], PIXELS[11])
    assert example["image/filename"].decode() == "COCO_train2014_000000000011.jpg"
    assert (example["image/height"], example["image/width"]) == (5, 6)

    objects = example["objects"]
    assert list(objects["ref_id"]) == [0, 1, 2]
    assert list(objects["id"]) == [101, 102, 103]
    assert list(objects["category"]) == [18, 1, 3]
    # xywh / (W=6, H=5); ann 102's y0 = -0.5 is clipped to 0.
    expected_boxes = [[1 / 6, 1 / 5, 6 / 6, 5 / 5],
                      [0.5 / 6, 0.0, 2.5 / 6, 1.5 / 5],
                      [4 / 6, 0 / 5, 6 / 6, 2 / 5]]
    np.testing.assert_allclose(np.stack(objects["box"]), expected_boxes, rtol=0, atol=1e-7)
    assert all(box.dtype == np.float32 for box in objects["box"])

    expressions = example["expressions"]
    assert list(expressions["object"]) == [0, 0, 1, 2]
    assert list(expressions["id"]) == [1000, 1002, 1003, 1004]
    # The referring text is the refs' sent, as the official configs read it; the Python 2
    # UTF-8 bytes decoded; the empty one left out. raw, sent and tokens are kept as they are.
    assert _texts(expressions["text"]) == ["the l shape left", "caf\u00e9 sign", "crowd",
                                           "corner"]
    assert _texts(expressions["raw"]) == ["The L-shape, left! ", "caf\u00e9 sign", "crowd",
                                          "corner"]
    assert _texts(expressions["sent"]) == _texts(expressions["text"])
    assert [t.split() for t in _texts(expressions["tokens"])][0] == ["the", "l", "shape", "left"]


def test_masks_are_pixel_exact_for_polygons_and_both_rle_forms(refer_build, examples_by_id):
    masks = examples_by_id(refer_build, "train")["11"]["objects"]["mask"]
    assert [m.shape for m in masks] == [(5, 6, 1)] * 3
    assert all(m.dtype == np.uint8 for m in masks)
    np.testing.assert_array_equal(masks[0][..., 0], L_MASK * 255)
    np.testing.assert_array_equal(masks[1][..., 0], CROWD_MASK * 255)
    np.testing.assert_array_equal(masks[2][..., 0], CORNER_MASK * 255)

    square = examples_by_id(refer_build, "testA")["12"]["objects"]
    np.testing.assert_array_equal(square["mask"][0][..., 0], SQUARE_MASK * 255)
    np.testing.assert_allclose(square["box"][0], [0, 0, 0.5, 0.5])


def test_bad_records_are_counted_per_split(refer_build):
    assert refer_build.skip_counts == EXPECTED_SKIPS


def test_fail_policy_raises_naming_file_and_record(tmp_path, build_dataset):
    manual = _refer_manual_dir(tmp_path)
    with pytest.raises(BadRecordError) as raised:
        build_dataset(refcoco.ReferCoco, manual_dir=manual, data_dir=tmp_path / "data",
                      config="refcoco_unc", skip_policy="fail")
    message = str(raised.value)
    assert str(manual / "refcoco" / "refs(unc).p") in message
    assert "ref 13" in message and "split" in message


def _corrupt_image_only(tmp_path):
    manual = tmp_path / "manual"
    (manual / "refcoco").mkdir(parents=True)
    refs = [_ref(9, 109, 15, "val", [(1011, "corrupt")])]
    (manual / "refcoco" / "refs(unc).p").write_bytes(_py2_pickle(_py2(refs)))
    (manual / "refcoco" / "instances.json").write_text(json.dumps(_instances()))
    _write_images(manual / "train2014")
    return manual


def test_fail_policy_names_a_corrupt_image(tmp_path, build_dataset):
    manual = _corrupt_image_only(tmp_path)
    with pytest.raises(BadRecordError) as raised:
        build_dataset(refcoco.ReferCoco, manual_dir=manual, data_dir=tmp_path / "data",
                      config="refcoco_unc", skip_policy="fail")
    assert str(manual / "train2014" / "COCO_train2014_000000000015.jpg") in str(raised.value)
    assert "image 15" in str(raised.value)


def test_a_split_left_empty_by_skips_is_an_error_saying_why(tmp_path, build_dataset):
    with pytest.raises(ValueError, match=r"(?s)split 'val': all 1 image\(s\).*corrupt image\s+1"):
        build_dataset(refcoco.ReferCoco, manual_dir=_corrupt_image_only(tmp_path),
                      data_dir=tmp_path / "data", config="refcoco_unc")


def test_tfds_refcoco_json_gives_the_same_examples(tmp_path, refer_build, build_dataset,
                                                   examples_by_id):
    # Input format auto-detected: no refs pickle there.
    builder = build_dataset(refcoco.ReferCoco, manual_dir=_tfds_manual_dir(tmp_path),
                            data_dir=tmp_path / "data", config="refcoco_unc")
    for split in ("train", "val", "testA"):
        from_json = examples_by_id(builder, split)
        from_refer = examples_by_id(refer_build, split)
        assert from_json.keys() == from_refer.keys()
        for image_id, example in from_json.items():
            _assert_examples_equal(example, from_refer[image_id])


def test_tfds_json_config_selects_its_data_set(tmp_path, build_dataset, examples_by_id):
    plus_refs = [_ref(50, 105, 12, "testB", [(2000, "plus square")]),
                 _ref(51, 111, 17, "train", [(2001, "plus whole")])]
    manual = _tfds_manual_dir(tmp_path, plus_refs=plus_refs)
    builder = build_dataset(refcoco.ReferCoco, manual_dir=manual, data_dir=tmp_path / "data",
                            config="refcocoplus_unc", input_format="tfds")
    assert set(builder.info.splits) == {"train", "testB"}
    example = examples_by_id(builder, "testB")["12"]
    assert list(example["objects"]["ref_id"]) == [50]
    assert _texts(example["expressions"]["text"]) == ["plus square"]
    whole = examples_by_id(builder, "train")["17"]["objects"]
    np.testing.assert_allclose(whole["box"][0], [0, 0, 1, 1])
    assert whole["category"][0] == 90
    assert builder.skip_counts == {"train": {}, "testB": {}}


def test_explicit_refer_format_without_its_files_is_an_error(tmp_path, build_dataset):
    manual = _tfds_manual_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"refs\(unc\)\.p"):
        build_dataset(refcoco.ReferCoco, manual_dir=manual, data_dir=tmp_path / "data",
                      config="refcoco_unc", input_format="refer")


def _assert_examples_equal(a, b):
    assert a.keys() == b.keys()
    for key in ("objects", "expressions"):
        assert a[key].keys() == b[key].keys()
        for field in a[key]:
            assert len(a[key][field]) == len(b[key][field])
            for x, y in zip(a[key][field], b[key][field]):
                np.testing.assert_array_equal(x, y)
    for key in ("image", "image/id", "image/filename", "image/height", "image/width"):
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("segmentation, message", [
    ([], "empty list"),
    ([[1, 1, 2, 2]], ">= 3"),
    ([[0, 0, 1, 0, float("nan"), 1]], ">= 3"),
    ({"size": [4, 6], "counts": [30]}, "size"),
    ("not a mask", "not a polygon"),
])
def test_render_mask_refuses_what_annToMask_would_misread(segmentation, message):
    with pytest.raises(ValueError, match=message):
        refcoco.render_mask(segmentation, height=5, width=6)


def test_render_mask_and_normalized_box_by_hand():
    np.testing.assert_array_equal(refcoco.render_mask(L_POLYGONS, height=5, width=6), L_MASK)
    np.testing.assert_array_equal(refcoco.render_mask(CROWD_RLE, height=5, width=6), CROWD_MASK)
    np.testing.assert_array_equal(refcoco.render_mask(CORNER_RLE, height=5, width=6),
                                  CORNER_MASK)
    np.testing.assert_allclose(refcoco.normalized_box([3, 1, 6, 2], height=4, width=8),
                               [3 / 8, 1 / 4, 1.0, 3 / 4])
    with pytest.raises(refcoco.BadReferRecordError) as raised:
        refcoco.normalized_box([3, 1, 6, -2], height=4, width=8)
    assert raised.value.reason == refcoco.DEGENERATE_BOX


def test_sentences_without_their_text_fields_are_counted():
    data = refcoco.ReferData(
        refs=[], annotations={ann["id"]: ann for ann in ANNOTATIONS},
        images={12: {"id": 12, "height": 4, "width": 4}},
        refs_file="refs(unc).p", annotations_file="instances.json", image_dir="")
    good = _sentence(1, "Big square.")
    sentences = [good, {**good, "sent_id": 2, "tokens": "big square"},
                 {**good, "sent_id": 3, "tokens": ["big square"]},
                 {k: v for k, v in good.items() if k != "sent"} | {"sent_id": 4},
                 {**good, "sent_id": 5, "sent": "", "tokens": []}]
    skips = SkipCounter(policy="skip")
    ref = {**_ref(5, 105, 12, "train", []), "sentences": sentences}
    obj = refcoco.parse_ref(ref, data, skips)
    assert [(s.sent_id, s.raw, s.sent, s.tokens) for s in obj.sentences] == [
        (1, "Big square.", "big square", ("big", "square"))]
    assert skips.counts() == {refcoco.BAD_FIELD: 3, refcoco.EMPTY_SENTENCE: 1}
