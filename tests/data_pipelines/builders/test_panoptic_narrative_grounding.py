"""Panoptic Narrative Grounding builder on small files in F-LMM's layout (annotations/png_coco_*,
annotations/panoptic_*.json + PNG folders, <split>2017/ images)."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from data_pipelines.builders import panoptic_narrative_grounding as png
from data_pipelines.skips import BadRecordError


def _png_bytes(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels(height, width, seed):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _id_rgb(ids):
    """Segment ids [H, W] -> the panoptic PNG's colours (R + 256 G + 256^2 B)."""
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


# Image 1 (4 x 6): a person (thing, id 300 = (44, 1, 0): exercises G), a second person whose id
# uses the blue channel (65537 + 5), and the sky (stuff, id 7).
PERSON, PERSON2, SKY = 300, 65542, 7
IDS_1 = np.full((4, 6), SKY, np.int64)
IDS_1[2:, 0:2] = PERSON
IDS_1[1:, 4:6] = PERSON2
# Image 2 (3 x 5): one dog (thing, id 9) on grass (stuff, id 11).
DOG, GRASS = 9, 11
IDS_2 = np.full((3, 5), GRASS, np.int64)
IDS_2[0:2, 1:3] = DOG
PIXELS = {1: _pixels(4, 6, 0), 2: _pixels(3, 5, 1), 3: _pixels(3, 5, 2)}
CATEGORIES = [{"id": 1, "name": "person", "isthing": 1}, {"id": 18, "name": "dog", "isthing": 1},
              {"id": 187, "name": "sky", "isthing": 0}, {"id": 193, "name": "grass",
                                                         "isthing": 0}]


def _segment(utterance, ids=(), plural=False):
    return {"utterance": utterance, "segment_ids": [str(i) for i in ids], "plural": plural,
            "noun": bool(ids)}


NARRATIVES = [
    {"image_id": "1", "caption": "In this picture two people under the sky.", "segments": [
        _segment("In this picture"), _segment("two people", (PERSON, PERSON2), plural=True),
        _segment("under"), _segment("the sky", (SKY,))]},
    {"image_id": "2", "caption": "a dog on grass", "segments": [
        _segment("a dog", (DOG,)), _segment("on"), _segment("grass", (GRASS,)),
        # Unknown segment id and singular with two ids: left out of the narrative.
        _segment("a cat", (12345,)), _segment("the animal", (DOG, GRASS))]},
    {"image_id": "2", "caption": "nothing", "segments": [_segment("nothing at all")]},
    {"image_id": "3", "caption": "x", "segments": [_segment("a thing", (DOG,))]},  # corrupt png
    {"image_id": "99", "caption": "x", "segments": [_segment("a thing", (DOG,))]},
    {"image_id": "2", "segments": [{"utterance": "a dog", "segment_ids": [9], "plural": "no"}]},
]
EXPECTED_SKIPS = {png.UNKNOWN_SEGMENT: 1, png.SINGULAR_WITH_SEVERAL: 1, png.NO_PHRASES: 1,
                  png.CORRUPT_PANOPTIC: 1, png.UNKNOWN_IMAGE: 1, png.BAD_FIELD: 1}


def _panoptic_json():
    def segments_info(ids, categories):
        return [{"id": i, "category_id": c, "iscrowd": 0} for i, c in zip(ids, categories)]
    return {
        "images": [{"id": 1, "file_name": "000000000001.jpg", "height": 4, "width": 6},
                   {"id": 2, "file_name": "000000000002.jpg", "height": 3, "width": 5},
                   {"id": 3, "file_name": "000000000003.jpg", "height": 3, "width": 5}],
        "annotations": [
            {"image_id": 1, "file_name": "000000000001.png",
             "segments_info": segments_info([PERSON, PERSON2, SKY], [1, 1, 187])},
            {"image_id": 2, "file_name": "000000000002.png",
             "segments_info": segments_info([DOG, GRASS], [18, 193])},
            {"image_id": 3, "file_name": "000000000003.png",
             "segments_info": segments_info([DOG], [18])}],
        "categories": CATEGORIES,
    }


def _manual_dir(tmp_path, narratives=NARRATIVES, split="val"):
    manual = tmp_path / "manual"
    annotations = manual / "annotations"
    panoptic_dir = annotations / f"panoptic_{split}2017"
    image_dir = manual / f"{split}2017"
    for folder in (panoptic_dir, image_dir):
        folder.mkdir(parents=True)
    (annotations / f"png_coco_{split}2017.json").write_text(json.dumps(narratives))
    (annotations / f"panoptic_{split}2017.json").write_text(json.dumps(_panoptic_json()))
    for image_id, pixels in PIXELS.items():
        (image_dir / f"{image_id:012d}.jpg").write_bytes(_png_bytes(pixels))
    (panoptic_dir / "000000000001.png").write_bytes(_png_bytes(_id_rgb(IDS_1)))
    (panoptic_dir / "000000000002.png").write_bytes(_png_bytes(_id_rgb(IDS_2)))
    (panoptic_dir / "000000000003.png").write_bytes(_png_bytes(_id_rgb(IDS_2))[:30])
    return manual


def _texts(values):
    return [v.decode("utf-8") for v in values]


@pytest.fixture(scope="module")
def built(tmp_path_factory, build_dataset):
    tmp_path = tmp_path_factory.mktemp("png")
    return build_dataset(png.PanopticNarrativeGrounding, manual_dir=_manual_dir(tmp_path),
                         data_dir=tmp_path / "data")


def test_segment_ids_decode_from_rgb():
    ids = np.array([[0, 300], [65542, 16777215]], np.int64)
    np.testing.assert_array_equal(png.panoptic_ids(_id_rgb(ids)), ids)


def test_plural_phrase_is_the_union_of_its_segments(built, examples_by_id):
    assert set(built.info.splits) == {"val"}  # no train files: announced and left out
    example = examples_by_id(built, "val")["1"]
    np.testing.assert_array_equal(example["image"], PIXELS[1])
    assert example["image/filename"].decode() == "000000000001.jpg"
    assert int(example["narrative_index"]) == 0
    assert example["narrative"].decode() == "In this picture two people under the sky"
    assert example["caption"].decode() == "In this picture two people under the sky."
    assert _texts(example["segments"]["utterance"]) == ["In this picture", "two people",
                                                        "under", "the sky"]
    assert list(example["segments"]["phrase"]) == [-1, 0, -1, 1]
    phrases = example["phrases"]
    assert _texts(phrases["text"]) == ["two people", "the sky"]
    narrative = example["narrative"].decode()
    spans = [narrative[s:e] for s, e in zip(phrases["char_start"], phrases["char_end"])]
    assert spans == ["two people", "the sky"]
    assert list(phrases["segment"]) == [1, 3]
    assert list(phrases["plural"]) == [True, False]
    assert list(phrases["num_segments"]) == [2, 1]
    masks = [mask[..., 0] for mask in phrases["mask"]]  # a list: masks vary in size
    np.testing.assert_array_equal(masks[0], np.where(np.isin(IDS_1, [PERSON, PERSON2]), 255, 0))
    np.testing.assert_array_equal(masks[1], np.where(IDS_1 == SKY, 255, 0))


def test_things_and_stuff(built, examples_by_id):
    # A plural phrase counts as a thing (as F-LMM counts it); the sky is stuff.
    assert list(examples_by_id(built, "val")["1"]["phrases"]["is_thing"]) == [True, False]
    example = examples_by_id(built, "val")["2"]
    phrases = example["phrases"]
    # "a cat" (unknown id) and "the animal" (singular, two ids) keep their text, not a mask.
    assert _texts(phrases["text"]) == ["a dog", "grass"]
    assert list(example["segments"]["phrase"]) == [0, -1, 1, -1, -1]
    assert list(phrases["is_thing"]) == [True, False]
    np.testing.assert_array_equal(phrases["mask"][0][..., 0], np.where(IDS_2 == DOG, 255, 0))
    np.testing.assert_array_equal(phrases["mask"][1][..., 0], np.where(IDS_2 == GRASS, 255, 0))


def test_bad_records_are_counted(built, examples_by_id):
    assert built.skip_counts == {"val": EXPECTED_SKIPS}
    assert set(examples_by_id(built, "val")) == {"1", "2"}


def test_corrupt_panoptic_png_fails_naming_the_file(tmp_path, build_dataset):
    manual = _manual_dir(tmp_path, narratives=NARRATIVES[3:4])
    with pytest.raises(BadRecordError) as raised:
        build_dataset(png.PanopticNarrativeGrounding, manual_dir=manual,
                      data_dir=tmp_path / "data", skip_policy="fail")
    message = str(raised.value)
    assert str(manual / "annotations" / "panoptic_val2017" / "000000000003.png") in message
    assert "narrative 0 (image 3)" in message


@pytest.mark.parametrize("segments, message", [
    ({"utterance": "x"}, "not a list"),
    ([{"segment_ids": [], "plural": False}], r"segments\[0\]: 'utterance'"),
    ([_segment("a"), {"utterance": "b", "segment_ids": ["x1"], "plural": True}],
     r"segments\[1\]: 'segment_ids'"),
])
def test_malformed_segments_are_named(segments, message):
    with pytest.raises(png.BadNarrativeError, match=message) as raised:
        png.parse_segments(segments)
    assert raised.value.reason == png.BAD_FIELD
