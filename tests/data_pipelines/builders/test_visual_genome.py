"""Tests for data_pipelines/builders/visual_genome.py on tiny DenseCap and GRiT layouts."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from data_pipelines.builders import visual_genome as vg
from data_pipelines.builders.common import EmptySplitError
from data_pipelines.skips import BadRecordError


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# id -> (folder, pixels); image 4's file is 5x5 while image_data.json says 10x10.
FILES = {1: ("VG_100K", np.arange(4 * 8 * 3, dtype=np.uint8).reshape(4, 8, 3)),
         2: ("VG_100K_2", np.full((3, 5, 3), 9, np.uint8)),
         4: ("VG_100K", np.zeros((5, 5, 3), np.uint8)),
         8: ("VG_100K_2", np.full((2, 2, 3), 200, np.uint8)),
         9: ("images", np.full((3, 3, 3), 60, np.uint8))}
# image_data.json: id -> (height, width); image 6 has no record; image 9 spells its id "id".
SIZES = {1: (4, 8), 2: (3, 5), 3: (2, 2), 4: (10, 10), 5: (3, 3), 8: (2, 2), 9: (3, 3),
         10: (2, 2)}
SPLITS = {"train": [1, 2, 10], "val": [3, 8], "test": [4, 5, 6, 9]}


def _region(region_id, image_id, x, y, w, h, phrase):
    return {"region_id": region_id, "image_id": image_id, "x": x, "y": y, "width": w,
            "height": h, "phrase": phrase}


REGIONS = {
    1: [_region(10, 1, 2, 1, 4, 2, " a red car "),
        _region(11, 1, 6, -1, 4, 3, "sky"),          # clipped at the top and right
        _region(12, 1, 0, 0, 2, 2, "   "),           # empty phrase
        _region(13, 1, 3, 1, 0, 2, "flat"),          # zero width
        _region(14, 1, 9, 0, 2, 2, "outside"),       # right of the image
        {"region_id": 15, "image_id": 1, "x": 0, "y": 0, "width": 1, "height": 1},  # no phrase
        _region(16, 2, 0, 0, 1, 1, "elsewhere")],    # listed under the wrong image
    2: [_region(20, 2, 0, 0, 5, 3, "caf\u00e9 window")],
    3: [_region(30, 3, 0, 0, 1, 1, "lost")],         # image file missing
    4: [_region(40, 4, 0, 0, 1, 1, "big")],          # image size mismatch
    5: [_region(50, 5, 0, 0, 1, 1, "broken")],       # image file corrupt
    6: [_region(60, 6, 0, 0, 1, 1, "unsized")],      # not in image_data.json
    7: [_region(70, 7, 0, 0, 1, 1, "unsplit")],      # in no split: ignored
    8: [_region(80, 8, 1, 1, 1, 1, "corner")],
    9: [_region(90, 9, 0, 0, 1.5, 3, "left strip")],
    10: [_region(100, 10, 0, 0, 1, 1, "")],          # no usable region
}
EXPECTED_DENSECAP_SKIPS = {
    "train": {vg.EMPTY_PHRASE: 2, vg.DEGENERATE_BOX: 2, vg.BAD_FIELD: 2, vg.NO_REGIONS: 1},
    "val": {vg.MISSING_IMAGE: 1},
    "test": {vg.SIZE_MISMATCH: 1, vg.CORRUPT_IMAGE: 1, vg.MISSING_IMAGE_RECORD: 1},
    vg.UNASSIGNED: {vg.BAD_FIELD: 1},
}


def _write_images(manual):
    for image_id, (folder, pixels) in FILES.items():
        (manual / folder).mkdir(parents=True, exist_ok=True)
        (manual / folder / f"{image_id}.jpg").write_bytes(_png(pixels))
    (manual / "VG_100K" / "5.jpg").write_bytes(_png(FILES[8][1])[:30])


def _densecap_manual_dir(tmp_path, malformed_item=True):
    manual = tmp_path / "densecap_manual"
    manual.mkdir()
    _write_images(manual)
    regions = [{"id": image_id, "regions": regions} for image_id, regions in REGIONS.items()]
    if malformed_item:
        regions.append({"regions": []})
    (manual / "region_descriptions.json").write_text(json.dumps(regions))
    image_data = [{("id" if image_id == 9 else "image_id"): image_id, "height": h, "width": w,
                   "url": f"https://example.org/{image_id}.jpg", "coco_id": None,
                   "flickr_id": None} for image_id, (h, w) in SIZES.items()]
    (manual / "image_data.json").write_text(json.dumps(image_data))
    (manual / "densecap_splits.json").write_text(json.dumps(SPLITS))
    return manual


def _grit_manual_dir(tmp_path):
    manual = tmp_path / "grit_manual"
    (manual / "annotations").mkdir(parents=True)
    _write_images(manual)
    categories = [{"id": 1, "name": "object"}]
    train = {
        "images": [{"id": 1, "file_name": "1.jpg", "height": 4, "width": 8},
                   {"id": 2, "file_name": "2.jpg", "height": 3, "width": 5}],
        "annotations": [
            {"id": 500, "image_id": 1, "bbox": [2, 1, 4, 2], "caption": "a red car",
             "category_id": 1},
            {"id": 501, "image_id": 2, "bbox": [0, 0, 5, 3], "caption": " whole ",
             "category_id": 1},
            {"id": 502, "image_id": 1, "bbox": [1, 1, 0, 1], "caption": "flat", "category_id": 1},
            {"id": 503, "image_id": 77, "bbox": [0, 0, 1, 1], "caption": "x", "category_id": 1},
            {"id": 504, "image_id": 1, "bbox": [6, -1, 4, 3], "caption": "sky", "category_id": 1},
        ],
        "categories": categories}
    test = {"images": [{"id": 9, "file_name": "9.jpg", "height": 3, "width": 3}],
            "annotations": [{"id": 600, "image_id": 9, "bbox": [0, 0, 1.5, 3],
                             "caption": "left strip", "category_id": 1}],
            "categories": categories}
    (manual / "annotations" / "train.json").write_text(json.dumps(train))
    (manual / "annotations" / "test.json").write_text(json.dumps(test))
    return manual


def _phrases(objects):
    return [p.decode("utf-8") for p in objects["phrase"]]


@pytest.fixture(scope="module")
def densecap_build(tmp_path_factory, build_dataset):
    tmp_path = tmp_path_factory.mktemp("densecap")
    return build_dataset(vg.VgDensecap, manual_dir=_densecap_manual_dir(tmp_path),
                         data_dir=tmp_path / "data", config="densecap")


def test_densecap_splits_follow_the_split_file(densecap_build, examples_by_id):
    assert set(densecap_build.info.splits) == {"train", "val", "test"}
    assert {split: set(examples_by_id(densecap_build, split)) for split in SPLITS} == \
        {"train": {"1", "2"}, "val": {"8"}, "test": {"9"}}


def test_densecap_boxes_phrases_and_images(densecap_build, examples_by_id):
    train = examples_by_id(densecap_build, "train")
    first = train["1"]
    np.testing.assert_array_equal(first["image"], FILES[1][1])
    assert first["image/filename"].decode() == "1.jpg"
    assert (first["image/height"], first["image/width"]) == (4, 8)
    assert list(first["objects"]["id"]) == [10, 11]
    assert _phrases(first["objects"]) == ["a red car", "sky"]
    # (x, y, x + w, y + h) / (W=8, H=4); region 11 clipped from (6, -1, 10, 2).
    np.testing.assert_allclose(np.stack(first["objects"]["box"]),
                               [[2 / 8, 1 / 4, 6 / 8, 3 / 4], [6 / 8, 0, 1, 2 / 4]], atol=1e-7)
    assert first["objects"]["box"][0].dtype == np.float32

    second = train["2"]
    np.testing.assert_array_equal(second["image"], FILES[2][1])
    assert _phrases(second["objects"]) == ["caf\u00e9 window"]
    np.testing.assert_allclose(second["objects"]["box"][0], [0, 0, 1, 1])

    corner = examples_by_id(densecap_build, "val")["8"]["objects"]
    np.testing.assert_allclose(corner["box"][0], [0.5, 0.5, 1, 1])
    # Found in images/, its image_data.json record keyed "id".
    strip = examples_by_id(densecap_build, "test")["9"]["objects"]
    np.testing.assert_allclose(strip["box"][0], [0, 0, 0.5, 1])


def test_densecap_bad_records_are_counted_per_split(densecap_build):
    assert densecap_build.skip_counts == EXPECTED_DENSECAP_SKIPS


def test_densecap_fail_policy_names_file_and_record(tmp_path, build_dataset):
    manual = _densecap_manual_dir(tmp_path, malformed_item=False)
    with pytest.raises(BadRecordError) as raised:
        build_dataset(vg.VgDensecap, manual_dir=manual, data_dir=tmp_path / "data",
                      config="densecap", skip_policy="fail")
    message = str(raised.value)
    assert str(manual / "region_descriptions.json") in message
    assert "image 1 region 2" in message and "empty" in message


def test_densecap_image_in_two_splits_is_an_error(tmp_path, build_dataset):
    manual = _densecap_manual_dir(tmp_path)
    (manual / "densecap_splits.json").write_text(
        json.dumps({"train": [1, 2], "val": [2], "test": [9]}))
    with pytest.raises(ValueError, match="image 2 is in both 'train' and 'val'"):
        build_dataset(vg.VgDensecap, manual_dir=manual, data_dir=tmp_path / "data",
                      config="densecap")


def test_grit_files(tmp_path, build_dataset, examples_by_id):
    builder = build_dataset(vg.VgDensecap, manual_dir=_grit_manual_dir(tmp_path),
                            data_dir=tmp_path / "data", config="grit")
    assert set(builder.info.splits) == {"train", "test"}
    train = examples_by_id(builder, "train")
    assert set(train) == {"1", "2"}
    first = train["1"]["objects"]
    assert list(first["id"]) == [500, 504]
    assert _phrases(first) == ["a red car", "sky"]
    np.testing.assert_allclose(np.stack(first["box"]),
                               [[2 / 8, 1 / 4, 6 / 8, 3 / 4], [6 / 8, 0, 1, 2 / 4]], atol=1e-7)
    assert _phrases(train["2"]["objects"]) == ["whole"]
    test = examples_by_id(builder, "test")["9"]
    np.testing.assert_array_equal(test["image"], FILES[9][1])
    np.testing.assert_allclose(test["objects"]["box"][0], [0, 0, 0.5, 1])
    assert builder.skip_counts == {"train": {vg.DEGENERATE_BOX: 1}, "test": {},
                                   vg.UNASSIGNED: {vg.MISSING_IMAGE_RECORD: 1}}


@pytest.mark.parametrize("region, reason", [
    (_region(1, 5, 0, 0, 1, 1, "\n\t "), vg.EMPTY_PHRASE),
    (_region(1, 5, 0, 0, 2, -1, "x"), vg.DEGENERATE_BOX),
    (_region(1, 5, 0, 0, float("inf"), 1, "x"), vg.BAD_FIELD),
    (_region(True, 5, 0, 0, 1, 1, "x"), vg.BAD_FIELD),
    (_region(1, 5, -3, 0, 3, 1, "x"), vg.DEGENERATE_BOX),  # ends at the left edge
])
def test_parse_region_rejects(region, reason):
    with pytest.raises(vg.BadRegionError) as raised:
        vg.parse_region(region, fields=vg.DENSECAP_FIELDS, height=4, width=4, image_id=5)
    assert raised.value.reason == reason


def _small_densecap_dir(tmp_path, *, splits, files=None, sizes=None, regions=None):
    """A DenseCap layout of 4x8 images 1..3 (one region each) unless ``files`` (id -> bytes),
    ``sizes`` (id -> (h, w)) or ``regions`` (id -> list) say otherwise."""
    manual = tmp_path / "small_manual"
    (manual / "VG_100K").mkdir(parents=True)
    files = {i: _png(np.full((4, 8, 3), 10 * i, np.uint8)) for i in (1, 2, 3)} | (files or {})
    sizes = {i: (4, 8) for i in files} | (sizes or {})
    regions = {i: [_region(10 * i, i, 0, 0, 2, 2, f"thing {i}")] for i in files} | (regions or {})
    for image_id, data in files.items():
        (manual / "VG_100K" / f"{image_id}.jpg").write_bytes(data)
    (manual / "region_descriptions.json").write_text(json.dumps(
        [{"id": image_id, "regions": listed} for image_id, listed in regions.items()]))
    (manual / "image_data.json").write_text(json.dumps(
        [{"image_id": image_id, "height": h, "width": w} for image_id, (h, w) in sizes.items()]))
    (manual / "densecap_splits.json").write_text(json.dumps(splits))
    return manual


def _exif_rotated_jpeg(height, width):
    """A JPEG stored ``height x width`` whose EXIF tag says: turn 90 degrees to display."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored = np.zeros((height, width, 3), np.uint8)
    stored[:, width // 2:] = 255
    Image.fromarray(stored).save(buffer, format="JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def test_images_are_read_in_the_stored_frame_of_the_boxes(tmp_path, build_dataset,
                                                          examples_by_id):
    # Visual Genome's sizes and boxes are those of the stored pixels (as TF decodes them).
    manual = _small_densecap_dir(tmp_path, splits={"train": [1], "val": [2], "test": [3]},
                                 files={1: _exif_rotated_jpeg(4, 8)})
    builder = build_dataset(vg.VgDensecap, manual_dir=manual, data_dir=tmp_path / "data",
                            config="densecap", skip_policy="fail")
    image = examples_by_id(builder, "train")["1"]["image"]
    assert image.shape == (4, 8, 3)
    assert image[:, :3].mean() < 10 and image[:, 5:].mean() > 245


def test_a_size_mismatch_names_the_file_that_gave_the_size(tmp_path, build_dataset):
    manual = _small_densecap_dir(tmp_path, splits={"train": [1], "val": [2], "test": [3]},
                                 sizes={2: (8, 4)})
    with pytest.raises(BadRecordError, match=r"2.jpg: image 2: image is 8x4, .*image_data.json "
                                             r"says 4x8"):
        build_dataset(vg.VgDensecap, manual_dir=manual, data_dir=tmp_path / "data",
                      config="densecap", skip_policy="fail")


def test_an_empty_split_is_left_out_and_the_others_are_written(tmp_path, build_dataset,
                                                              examples_by_id, capsys):
    # Every image of the test split is skipped (no regions, an empty phrase).
    manual = _small_densecap_dir(tmp_path, splits={"train": [1], "val": [2], "test": [3, 4]},
                                 regions={3: [_region(30, 3, 0, 0, 2, 2, " ")]},
                                 sizes={4: (4, 8)})
    builder = build_dataset(vg.VgDensecap, manual_dir=manual, data_dir=tmp_path / "data",
                            config="densecap")
    assert set(builder.info.splits) == {"train", "val"}
    assert set(examples_by_id(builder, "val")) == {"2"}
    assert list(builder.empty_splits) == ["test"]
    warning = capsys.readouterr().err
    assert "split 'test': all 2 image(s) were skipped" in warning
    assert "split 'test' is NOT written" in warning
    assert "image without usable regions         2" in warning


def test_an_empty_split_stops_a_fail_build_naming_it(tmp_path, build_dataset):
    manual = _small_densecap_dir(tmp_path, splits={"train": [1], "val": [], "test": [3]})
    with pytest.raises(EmptySplitError, match="densecap split 'val': the annotations list "
                                                 "no image"):
        build_dataset(vg.VgDensecap, manual_dir=manual, data_dir=tmp_path / "data",
                      config="densecap", skip_policy="fail")


def test_grit_builds_the_splits_whose_files_are_there(tmp_path, build_dataset, examples_by_id,
                                                     capsys):
    manual = _grit_manual_dir(tmp_path)
    (manual / "annotations" / "train.json").unlink()
    builder = build_dataset(vg.VgDensecap, manual_dir=manual, data_dir=tmp_path / "data",
                            config="grit")
    assert set(builder.info.splits) == {"test"}
    assert set(examples_by_id(builder, "test")) == {"9"}
    warning = capsys.readouterr().err
    assert "split 'train' is NOT built" in warning and "annotations/train.json" in warning
    with pytest.raises(FileNotFoundError, match="requested split.*annotations/train.json"):
        build_dataset(vg.VgDensecap, manual_dir=manual, data_dir=tmp_path / "data2",
                      config="grit", splits=["train"])


@pytest.mark.parametrize("config, splits", [("grit", ["test"]), ("densecap", ["val", "test"])])
def test_splits_can_be_chosen(tmp_path, build_dataset, config, splits):
    manual = (_grit_manual_dir(tmp_path) if config == "grit"
              else _small_densecap_dir(tmp_path, splits={"train": [1], "val": [2], "test": [3]}))
    builder = build_dataset(vg.VgDensecap, manual_dir=manual, data_dir=tmp_path / "data",
                            config=config, splits=splits)
    assert set(builder.info.splits) == set(splits)
    with pytest.raises(ValueError, match=r"no split \['tset'\]"):
        build_dataset(vg.VgDensecap, manual_dir=manual, data_dir=tmp_path / "data2",
                      config=config, splits=["tset"])


@pytest.mark.parametrize("region_id", [2**63, -2**63 - 1])
def test_a_region_id_outside_int64_is_a_counted_skip(tmp_path, build_dataset, examples_by_id,
                                                     region_id):
    manual = _small_densecap_dir(
        tmp_path, splits={"train": [1], "val": [2], "test": [3]},
        regions={1: [_region(region_id, 1, 0, 0, 1, 1, "huge id"),
                     _region(11, 1, 0, 0, 2, 2, "fine")]})
    builder = build_dataset(vg.VgDensecap, manual_dir=manual, data_dir=tmp_path / "data",
                            config="densecap")
    assert list(examples_by_id(builder, "train")["1"]["objects"]["id"]) == [11]
    assert builder.skip_counts["train"] == {vg.BAD_FIELD: 1}
    with pytest.raises(BadRecordError, match=f"region_descriptions.json: image 1 region 0: "
                                             f"field 'region_id' is {region_id}, outside int64"):
        build_dataset(vg.VgDensecap, manual_dir=manual, data_dir=tmp_path / "data2",
                      config="densecap", skip_policy="fail")


def test_the_skip_summary_is_printed(tmp_path, build_dataset, capsys):
    manual = _small_densecap_dir(tmp_path, splits={"train": [1, 4], "val": [2], "test": [3]},
                                 sizes={4: (4, 8)})
    build_dataset(vg.VgDensecap, manual_dir=manual, data_dir=tmp_path / "data",
                  config="densecap")
    printed = capsys.readouterr().out
    assert "vg_densecap/densecap train: skipped records (skip policy):" in printed
    assert "vg_densecap/densecap val: no records skipped" in printed
