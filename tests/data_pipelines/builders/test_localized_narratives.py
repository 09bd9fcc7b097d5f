"""Tests for data_pipelines/builders/localized_narratives.py on a tiny hand-made COCO layout."""

import json

import numpy as np
import pytest
from PIL import Image

from data_pipelines.alignment import NarrativeTraces, exact_utterance_targets
from data_pipelines.builders import localized_narratives as ln
from data_pipelines.skips import BadRecordError

VAL_FILE = "coco_val_localized_narratives.jsonl"


def _points(*xyt):
    return [{"x": x, "y": y, "t": t} for x, y, t in xyt]


def _narrative(image_id, annotator_id, caption, timed, traces):
    return {"dataset_id": "mscoco_val2017", "image_id": image_id, "annotator_id": annotator_id,
            "caption": caption, "voice_recording": "x.ogg",
            "timed_caption": [{"utterance": u, "start_time": s, "end_time": e}
                              for u, s, e in timed],
            "traces": traces}


# Image 1: two annotators. Annotator 7's second segment is stored out of time order.
DOG = _narrative("1", 7, "a dog on grass later",
                 [("a dog", 0.0, 1.5), ("on grass", 1.5, 3.0), ("", 3.0, 3.2),
                  ("later", 5.0, 6.0)],
                 [_points((0.1, 0.2, 0.0), (0.4, 0.2, 1.5)),
                  _points((0.9, 0.8, 3.0), (0.4, 0.5, 2.0))])
# Starts left of the image: x(t) = -0.5 + t, clipped.
GRASS = _narrative("1", 8, "grass", [("grass", 0.0, 1.0)],
                   [_points((-0.5, 0.5, 0.0), (0.5, 0.5, 1.0))])
# Window [0, 3] is wider than the trace [1, 2]; three points at t = 1 average to (0.2, 0.3).
CAT = _narrative("2", 1, "cat", [("cat", 0.0, 3.0)],
                 [_points((0.2, 0.3, 1.0), (0.4, 0.3, 1.0), (0.0, 0.3, 1.0), (0.6, 0.7, 2.0))])


def _without(record, key):
    return {k: v for k, v in record.items() if k != key}


VAL_LINES = [
    json.dumps(DOG),                                                    # 1
    json.dumps(GRASS),                                                  # 2
    json.dumps(CAT),                                                    # 3
    '{"image_id": "1", "caption": ',                                    # 4 malformed json
    json.dumps(_without(DOG, "traces")),                                # 5 missing field
    json.dumps({**DOG, "caption": "  "}),                               # 6 empty caption
    json.dumps({**CAT, "traces": [_points((0.5, 0.5, 1.0))]}),          # 7 one point
    json.dumps({**CAT, "traces": [_points((1.5, 0.5, 0.0), (1.2, -0.1, 1.0))]}),  # 8 outside
    json.dumps({**CAT, "image_id": "3"}),                               # 9 image file missing
    json.dumps({**CAT, "image_id": "4"}),                               # 10 image file corrupt
    json.dumps({**CAT, "image_id": "5", "caption": ""}),                # 11 image 5: no narrative
    "",                                                                 # 12 blank: ignored
    json.dumps({**GRASS, "caption": "a cat on a sofa"}),                # 13 unrelated narration
    json.dumps({**GRASS, "annotator_id": 2 ** 31}),                     # 14 id beyond int32
]


def _write_image(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="JPEG", quality=95)


def _manual_dir(tmp_path, val_lines=VAL_LINES):
    manual = tmp_path / "manual"
    _write_image(manual / "val2017" / "000000000001.jpg", np.full((4, 6, 3), 90, np.uint8))
    _write_image(manual / "val2017" / "000000000002.jpg", np.full((3, 5), 200, np.uint8))
    _write_image(manual / "val2017" / "000000000004.jpg", np.zeros((32, 32, 3), np.uint8))
    corrupt = manual / "val2017" / "000000000004.jpg"
    corrupt.write_bytes(corrupt.read_bytes()[:100])
    _write_image(manual / "train2017" / "000000000009.jpg", np.zeros((2, 2, 3), np.uint8))
    (manual / VAL_FILE).write_text("\n".join(val_lines) + "\n")
    # One image's narratives spread over two train shards.
    for shard, annotator in ((0, 3), (1, 4)):
        record = {**CAT, "image_id": "9", "annotator_id": annotator}
        name = f"coco_train_localized_narratives-0000{shard}-of-00004.jsonl"
        (manual / name).write_text(json.dumps(record) + "\n")
    return manual


@pytest.fixture(scope="module")
def built(tmp_path_factory, build_dataset, examples_by_id):
    tmp_path = tmp_path_factory.mktemp("ln")
    builder = build_dataset(ln.LocalizedNarratives, manual_dir=_manual_dir(tmp_path),
                            data_dir=tmp_path / "data", config="coco")
    by_id = {split: examples_by_id(builder, split) for split in ("train", "validation")}
    return builder, by_id


def _utterances(example, narrative):
    utterances = example["utterances"]
    rows = [i for i, n in enumerate(utterances["narrative"]) if n == narrative]
    return {key: [value[i] for i in rows] for key, value in utterances.items()}


def test_examples_and_image_fields(built):
    _, by_id = built
    assert sorted(by_id["validation"]) == ["1", "2"]
    first, second = by_id["validation"]["1"], by_id["validation"]["2"]
    assert first["image"].shape == (4, 6, 3) and first["image/height"] == 4
    assert first["image/width"] == 6 and first["image/filename"] == b"000000000001.jpg"
    assert abs(int(first["image"].mean()) - 90) <= 2
    # Grayscale JPEG stored as RGB.
    assert second["image"].shape == (3, 5, 3)
    assert [c.decode() for c in first["narratives"]["caption"]] == ["a dog on grass later",
                                                                    "grass"]
    assert list(first["narratives"]["annotator_id"]) == [7, 8]


def test_dog_utterances_by_hand(built):
    _, by_id = built
    utterances = _utterances(by_id["validation"]["1"], 0)
    assert [t.decode() for t in utterances["text"]] == ["a dog", "on grass", "", "later"]
    np.testing.assert_allclose(utterances["start_time"], [0, 1.5, 3, 5])
    np.testing.assert_allclose(utterances["end_time"], [1.5, 3, 3.2, 6])
    points = np.asarray(utterances["points"])
    assert points.shape == (4, 16, 2)
    # Merged, time-sorted trace: t=0 (.1,.2), 1.5 (.4,.2), 2 (.4,.5), 3 (.9,.8).
    # "a dog": t_k = 0.1 k, x = 0.1 + 0.2 t, y = 0.2.
    np.testing.assert_allclose(points[0, :, 0], 0.1 + 0.02 * np.arange(16), atol=1e-6)
    np.testing.assert_allclose(points[0, :, 1], 0.2, atol=1e-6)
    # "on grass": t_k = 1.5 + 0.1 k; t=1.8 -> (0.4, 0.2 + 0.6*0.3); t=2.5 -> (0.65, 0.65).
    np.testing.assert_allclose(points[1, 3], [0.4, 0.38], atol=1e-6)
    np.testing.assert_allclose(points[1, 10], [0.65, 0.65], atol=1e-6)
    boxes = np.asarray(utterances["box"])
    np.testing.assert_allclose(boxes[0], [0.1, 0.2, 0.4, 0.2], atol=1e-6)
    np.testing.assert_allclose(boxes[1], [0.4, 0.2, 0.9, 0.8], atol=1e-6)
    # Window [5, 6] after the trace's end (t=3): clamped to the last point, and not valid.
    np.testing.assert_allclose(points[3], np.tile([0.9, 0.8], (16, 1)), atol=1e-6)
    assert list(utterances["valid"]) == [True, True, False, False]


def test_clipping_and_clamping_by_hand(built):
    _, by_id = built
    grass = _utterances(by_id["validation"]["1"], 1)
    x = np.asarray(grass["points"])[0, :, 0]
    np.testing.assert_allclose(x, np.clip(-0.5 + np.arange(16) / 15, 0, 1), atol=1e-6)
    np.testing.assert_allclose(grass["box"][0], [0.0, 0.5, 0.5, 0.5], atol=1e-6)
    assert list(grass["valid"]) == [True]

    cat = _utterances(by_id["validation"]["2"], 0)
    points = np.asarray(cat["points"])[0]
    t = 0.2 * np.arange(16)
    expected_x = np.interp(t, [1.0, 2.0], [0.2, 0.6])
    expected_y = np.interp(t, [1.0, 2.0], [0.3, 0.7])
    np.testing.assert_allclose(points, np.stack([expected_x, expected_y], -1), atol=1e-6)
    np.testing.assert_allclose(points[0], [0.2, 0.3], atol=1e-6)   # before the trace: clamped
    np.testing.assert_allclose(points[-1], [0.6, 0.7], atol=1e-6)  # after: clamped
    np.testing.assert_allclose(cat["box"][0], [0.2, 0.3, 0.6, 0.7], atol=1e-6)


def test_narratives_of_one_image_across_files_are_grouped(built):
    _, by_id = built
    assert list(by_id["train"]) == ["9"]
    assert sorted(by_id["train"]["9"]["narratives"]["annotator_id"]) == [3, 4]


def test_skip_counts(built):
    builder, _ = built
    assert builder.skip_counts["validation"] == {
        ln.MALFORMED_JSON: 1, ln.BAD_FIELD: 1, ln.EMPTY_CAPTION: 2, ln.TOO_FEW_POINTS: 1,
        ln.TRACE_OUTSIDE: 1, ln.BAD_IMAGE: 2, ln.NO_NARRATIVE: 1, ln.UNRELATED_UTTERANCES: 1,
        ln.ID_OUT_OF_RANGE: 1}
    assert builder.skip_counts["train"] == {}


def test_fail_policy_names_file_and_line(tmp_path, build_dataset):
    manual = _manual_dir(tmp_path)
    with pytest.raises(BadRecordError, match=rf"{VAL_FILE}: line 4: not valid JSON"):
        build_dataset(ln.LocalizedNarratives, manual_dir=manual, data_dir=tmp_path / "a",
                      config="coco", skip_policy="fail")
    manual = _manual_dir(tmp_path, val_lines=VAL_LINES[:3] + [VAL_LINES[5]])
    with pytest.raises(BadRecordError, match=rf"{VAL_FILE}: line 4: image 1: caption is empty"):
        build_dataset(ln.LocalizedNarratives, manual_dir=manual, data_dir=tmp_path / "b",
                      config="coco", skip_policy="fail")
    manual = _manual_dir(tmp_path, val_lines=[VAL_LINES[8]])
    with pytest.raises(BadRecordError, match=r"000000000003.jpg: image 3: .*not found"):
        build_dataset(ln.LocalizedNarratives, manual_dir=manual, data_dir=tmp_path / "c",
                      config="coco", skip_policy="fail")


def test_a_split_left_empty_by_skips_says_why(tmp_path, build_dataset):
    manual = _manual_dir(tmp_path, val_lines=[VAL_LINES[8]])  # its image file is missing
    builder = build_dataset(ln.LocalizedNarratives, manual_dir=manual,
                            data_dir=tmp_path / "data", config="coco")
    assert sorted(builder.info.splits) == ["train"]
    assert "all 1 image(s)" in builder.empty_splits["validation"]


def test_missing_annotation_files_are_reported(tmp_path, build_dataset):
    manual = tmp_path / "empty"
    manual.mkdir()
    (manual / "readme.txt").write_text("not an annotation file")
    with pytest.raises(FileNotFoundError, match="coco_train_localized_narratives"):
        build_dataset(ln.LocalizedNarratives, manual_dir=manual, data_dir=tmp_path / "data",
                      config="coco")


def test_sample_utterance_traces_reversed_window_and_unknown_policy():
    trace = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    points, boxes, overlaps = ln.sample_utterance_traces(
        trace=trace, start_times=np.array([1.0]), end_times=np.array([0.0]), num_samples=3)
    np.testing.assert_allclose(points[0], [[1, 1], [0.5, 0.5], [0, 0]])
    np.testing.assert_allclose(boxes[0], [0, 0, 1, 1])
    assert overlaps.tolist() == [True]
    narrative = ln.parse_narrative(_narrative("7", 1, "x y", [("x", 1.0, 0.5), ("y", 0, 1)],
                                              [_points((0, 0, 0), (1, 1, 1))]))
    assert narrative.valid.tolist() == [False, True]  # window ends before it starts
    bad_point = {**CAT, "traces": [_points((0.1, 0.1, 0.0)) + [{"x": "0.5", "y": 0.5, "t": 1}]]}
    with pytest.raises(ln.BadNarrativeError, match=r"traces\[0\]\[1\] field 'x' is '0.5'"):
        ln.parse_narrative(bad_point)
    with pytest.raises(ln.BadNarrativeError, match=r"traces\[0\]\[0\] has no field 't'"):
        ln.parse_narrative({**CAT, "traces": [[{"x": 0.1, "y": 0.1}]]})
    with pytest.raises(ValueError, match="policy"):
        ln.LocalizedNarratives(skip_policy="ignore")


def test_raw_trace_is_stored_time_sorted_with_float64_times(built):
    _, by_id = built
    example = by_id["validation"]["1"]
    trace = example["trace"]
    dog = np.asarray(trace["narrative"]) == 0
    # DOG's segments merged and sorted by time (its second segment is stored backwards), raw.
    np.testing.assert_array_equal(np.asarray(trace["t"])[dog], [0.0, 1.5, 2.0, 3.0])
    np.testing.assert_allclose(np.asarray(trace["xy"])[dog],
                               [[0.1, 0.2], [0.4, 0.2], [0.4, 0.5], [0.9, 0.8]], atol=1e-7)
    # GRASS keeps its point left of the image (x = -0.5): raw, not clipped.
    np.testing.assert_allclose(np.asarray(trace["xy"])[~dog][0], [-0.5, 0.5])
    assert np.asarray(trace["t"]).dtype == np.float64
    assert np.asarray(example["utterances"]["start_time"]).dtype == np.float64


def test_float64_windows_keep_boundary_points_where_the_file_puts_them(tmp_path, build_dataset,
                                                                     examples_by_id):
    # A point at t = 0.30000000000000004 is after the first window's end 0.3 in the file's
    # precision; in float32 both are the same number and the point would fall in the window.
    record = _narrative("1", 7, "a dog", [("a", 0.0, 0.3), ("dog", 0.30000000000000004, 1.0)],
                        [_points((0.2, 0.2, 0.0), (0.9, 0.9, 0.30000000000000004),
                                 (0.5, 0.5, 1.0))])
    manual = _manual_dir(tmp_path, val_lines=[json.dumps(record)])
    builder = build_dataset(ln.LocalizedNarratives, manual_dir=manual,
                            data_dir=tmp_path / "data", config="coco")
    example = examples_by_id(builder, "validation")["1"]
    traces = NarrativeTraces.from_example(example, narrative=0)
    targets, located = exact_utterance_targets(traces)
    assert located.tolist() == [True, True]
    np.testing.assert_allclose(targets[0], [[0.2, 0.2], [0.2, 0.2]], atol=1e-7)
    np.testing.assert_allclose(targets[1], [[0.5, 0.5], [0.9, 0.9]], atol=1e-7)


def test_unrelated_utterances_and_out_of_range_ids_are_refused_naming_the_line():
    with pytest.raises(ln.BadNarrativeError, match="do not say the caption") as error:
        ln.parse_narrative({**GRASS, "caption": "a cat on a sofa"})
    assert error.value.reason == ln.UNRELATED_UTTERANCES
    # Case, punctuation and how words are split over utterances do not matter.
    narrative = ln.parse_narrative({**DOG, "caption": "A dog, on-grass. Later!"})
    assert narrative.caption == "A dog, on-grass. Later!"
    for annotator_id in (2 ** 31, -(2 ** 31) - 1):
        with pytest.raises(ln.BadNarrativeError, match="does not fit the stored int32") as error:
            ln.parse_narrative({**GRASS, "annotator_id": annotator_id})
        assert error.value.reason == ln.ID_OUT_OF_RANGE
    assert ln.parse_narrative({**GRASS, "annotator_id": 2 ** 31 - 1}).annotator_id == 2 ** 31 - 1


def test_fail_policy_names_the_line_of_an_out_of_range_id(tmp_path, build_dataset):
    manual = _manual_dir(tmp_path, val_lines=[VAL_LINES[0], VAL_LINES[13]])
    with pytest.raises(BadRecordError, match=rf"{VAL_FILE}: line 2: .*annotator_id 2147483648"):
        build_dataset(ln.LocalizedNarratives, manual_dir=manual, data_dir=tmp_path / "data",
                      config="coco", skip_policy="fail")


def _validation_only(tmp_path):
    manual = _manual_dir(tmp_path, val_lines=VAL_LINES[:3])
    for shard in (0, 1):
        (manual / f"coco_train_localized_narratives-0000{shard}-of-00004.jsonl").unlink()
    return manual


def test_only_the_splits_whose_files_are_present_are_built(tmp_path, build_dataset,
                                                            examples_by_id, capfd):
    manual = _validation_only(tmp_path)
    builder = build_dataset(ln.LocalizedNarratives, manual_dir=manual,
                            data_dir=tmp_path / "data", config="coco")
    assert sorted(builder.info.splits) == ["validation"]
    assert sorted(examples_by_id(builder, "validation")) == ["1", "2"]
    err = capfd.readouterr().err
    assert "split 'train' is NOT built" in err
    assert "coco_train_localized_narratives-*.jsonl" in err


def test_chosen_splits_are_built_or_refused_by_name(tmp_path, build_dataset):
    manual = _validation_only(tmp_path)
    builder = build_dataset(ln.LocalizedNarratives, manual_dir=manual, data_dir=tmp_path / "a",
                            config="coco", splits=["validation"])
    assert sorted(builder.info.splits) == ["validation"]
    with pytest.raises(FileNotFoundError, match=r"'train': .*coco_train_localized_narratives"):
        build_dataset(ln.LocalizedNarratives, manual_dir=manual, data_dir=tmp_path / "b",
                      config="coco", splits=["train", "validation"])
    # With every file present, splits picks among them.
    builder = build_dataset(ln.LocalizedNarratives, manual_dir=_manual_dir(tmp_path / "all"),
                            data_dir=tmp_path / "c", config="coco", splits=["train"])
    assert sorted(builder.info.splits) == ["train"]
