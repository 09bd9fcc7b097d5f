"""ReasonSeg builder on small files in the public layout (ReasonSeg/<split>/<name>.jpg + .json)."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from data_pipelines.builders import reason_seg
from data_pipelines.images import read_upright_photo
from data_pipelines.skips import BadRecordError


def _png(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels(height, width, seed):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _rect(label, x0, y0, x1, y1):
    return {"label": label, "points": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]],
            "group_id": None, "shape_type": "polygon", "flags": {}}


def _annotation(text, is_sentence, shapes, size=None):
    content = {"text": text, "is_sentence": is_sentence, "shapes": shapes}
    if size:
        content.update(imageHeight=size[0], imageWidth=size[1])
    return content


# Image a (6 x 8): a small "ignore" region listed before the large target that holds it, and a
# "Flag" over everything. Points are truncated toward zero: 4.9 -> 4, 3.7 -> 3.
A_SHAPES = [
    {"label": "ignore_1", "points": [[2, 1], [4.9, 1], [4.9, 3.7], [2, 3.7]]},
    _rect("target", 0, 0, 7, 5),
    _rect("Flag", 0, 0, 7, 5),
]
A_MASK = np.ones((6, 8), np.uint8)
A_MASK[1:4, 2:5] = 255
# Image b (5 x 6): a small target inside a large ignored region.
B_SHAPES = [_rect("target", 1, 1, 2, 2), _rect("ignore", 0, 0, 5, 4)]
B_MASK = np.full((5, 6), 255, np.uint8)
B_MASK[1:3, 1:3] = 1
# Image c (3 x 5): two shapes of equal area (6 pixels); the earlier one is drawn last and wins.
C_SHAPES = [_rect("target", 0, 0, 2, 1), _rect("ignore", 1, 0, 3, 1)]
C_MASK = np.zeros((3, 5), np.uint8)
C_MASK[0:2, 0:3] = 1
C_MASK[0:2, 3] = 255

PIXELS = {"a": _pixels(6, 8, 0), "b": _pixels(5, 6, 1), "c": _pixels(3, 5, 2),
          "mismatch": _pixels(6, 8, 3)}

EXPECTED_SKIPS = {
    "train": {reason_seg.EMPTY_QUERY: 1, reason_seg.CORRUPT_IMAGE: 1, reason_seg.BAD_JSON: 1,
              reason_seg.BAD_FIELD: 1, reason_seg.MISSING_ANNOTATION: 1,
              reason_seg.MISSING_IMAGE: 1, reason_seg.UNMATCHED_EXPLANATION: 2,
              reason_seg.BAD_EXPLANATION: 1},
    "val": {reason_seg.SIZE_MISMATCH: 1},
}


def _rotated_jpeg():
    """A 2 x 4 JPEG (stored) whose EXIF orientation 6 shows it turned to 4 x 2."""
    image = Image.fromarray(_pixels(2, 4, 4))
    exif = image.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    return buffer.getvalue()


def _write(folder, name, *, image=None, annotation=None):
    folder.mkdir(parents=True, exist_ok=True)
    if image is not None:
        (folder / f"{name}.jpg").write_bytes(image)
    if annotation is not None:
        text = annotation if isinstance(annotation, str) else json.dumps(annotation)
        (folder / f"{name}.json").write_text(text)


def _manual_dir(tmp_path):
    root = tmp_path / "manual" / "ReasonSeg"
    train, val = root / "train", root / "val"
    _write(train, "a", image=_png(PIXELS["a"]), annotation=_annotation(
        ["What is the ignored thing?", "  ", "Second phrasing"], True, A_SHAPES, size=(6, 8)))
    _write(train, "b", image=_png(PIXELS["b"]),
           annotation=_annotation(["the cup"], False, B_SHAPES))
    _write(train, "corrupt", image=_png(PIXELS["b"])[:40],
           annotation=_annotation(["x"], False, B_SHAPES))
    _write(train, "badjson", image=_png(PIXELS["b"]), annotation='{"text": ["x"], ')
    _write(train, "badshape", image=_png(PIXELS["b"]), annotation=_annotation(
        ["x"], False, [{"label": "target", "points": [[1, 2, 3]]}]))
    _write(train, "lonely", image=_png(PIXELS["b"]))
    _write(train, "orphan", annotation=_annotation(["x"], False, B_SHAPES))
    _write(val, "c", image=_png(PIXELS["c"]), annotation=_annotation(["the c"], False, C_SHAPES))
    _write(val, "rot", image=_rotated_jpeg(), annotation=_annotation(
        ["top row"], True, [{"label": "target", "points": [[0, 0], [1, 0]]}], size=(4, 2)))
    _write(val, "mismatch", image=_png(PIXELS["mismatch"]),
           annotation=_annotation(["x"], False, B_SHAPES, size=(5, 8)))
    explanatory = root / "explanatory"
    explanatory.mkdir()
    (explanatory / "train.json").write_text(json.dumps([
        {"image": "a.jpg", "query": "Second phrasing", "outputs": "It is ignored because."},
        {"image": "b.jpg", "query": "a cup of tea", "outputs": "The cup holds tea."},
        {"image": "ghost.jpg", "query": "x", "outputs": "y"},
        {"image": "a.jpg", "query": 3, "outputs": "y"},
        {"image": "corrupt.jpg", "query": "x", "outputs": "y"},
    ]))
    return tmp_path / "manual"


def _texts(values):
    return [v.decode("utf-8") for v in values]


@pytest.fixture(scope="module")
def built(tmp_path_factory, build_dataset):
    tmp_path = tmp_path_factory.mktemp("reason_seg")
    return build_dataset(reason_seg.ReasonSeg, manual_dir=_manual_dir(tmp_path),
                         data_dir=tmp_path / "data")


def test_splits_and_images_kept(built, examples_by_id):
    # No test/ folder: that split is announced and left out.
    assert set(built.info.splits) == {"train", "val"}
    assert set(examples_by_id(built, "train")) == {"a", "b"}
    assert set(examples_by_id(built, "val")) == {"c", "rot"}


def test_queries_mask_and_explanation_of_an_image(built, examples_by_id):
    example = examples_by_id(built, "train")["a"]
    np.testing.assert_array_equal(example["image"], PIXELS["a"])
    assert example["image/filename"].decode() == "a.jpg"
    assert (example["image/height"], example["image/width"]) == (6, 8)
    assert _texts(example["queries"]) == ["What is the ignored thing?", "Second phrasing"]
    assert bool(example["is_sentence"]) is True
    assert example["mask"].dtype == np.uint8
    np.testing.assert_array_equal(example["mask"][..., 0], A_MASK)
    explanations = example["explanations"]
    assert _texts(explanations["query"]) == ["Second phrasing"]
    assert _texts(explanations["outputs"]) == ["It is ignored because."]
    assert list(explanations["query_index"]) == [1]


def test_smaller_shapes_overwrite_larger_ones(built, examples_by_id):
    example = examples_by_id(built, "train")["b"]
    np.testing.assert_array_equal(example["mask"][..., 0], B_MASK)
    assert bool(example["is_sentence"]) is False
    # An explanation whose query is not one of the image's queries is kept, unmatched.
    assert list(example["explanations"]["query_index"]) == [-1]
    tie = examples_by_id(built, "val")["c"]
    np.testing.assert_array_equal(tie["mask"][..., 0], C_MASK)
    assert len(tie["explanations"]["query"]) == 0


def test_exif_rotated_image_is_stored_upright(built, examples_by_id, tmp_path):
    example = examples_by_id(built, "val")["rot"]
    assert (example["image/height"], example["image/width"]) == (4, 2)
    assert example["image"].shape == (4, 2, 3)
    (tmp_path / "rot.jpg").write_bytes(_rotated_jpeg())
    np.testing.assert_array_equal(example["image"],
                                  read_upright_photo(tmp_path / "rot.jpg", name="rot"))
    expected = np.zeros((4, 2), np.uint8)
    expected[0] = 1
    np.testing.assert_array_equal(example["mask"][..., 0], expected)


def test_bad_records_are_counted_per_split(built):
    assert built.skip_counts == EXPECTED_SKIPS


@pytest.mark.parametrize("name, image, annotation, bad_file", [
    ("corrupt", _png(PIXELS["b"])[:40], _annotation(["x"], False, B_SHAPES), "corrupt.jpg"),
    ("badjson", _png(PIXELS["b"]), '{"text": ["x"], ', "badjson.json"),
])
def test_fail_policy_names_the_file(tmp_path, build_dataset, name, image, annotation, bad_file):
    manual = tmp_path / "manual"
    folder = manual / "ReasonSeg" / "val"
    _write(folder, "b", image=_png(PIXELS["b"]), annotation=_annotation(["x"], False, B_SHAPES))
    _write(folder, name, image=image, annotation=annotation)
    with pytest.raises(BadRecordError) as raised:
        build_dataset(reason_seg.ReasonSeg, manual_dir=manual, data_dir=tmp_path / "data",
                      skip_policy="fail")
    assert str(folder / bad_file) in str(raised.value)
    assert f"image {name}" in str(raised.value)


@pytest.mark.parametrize("shapes, message", [
    ({"label": "target"}, "not a list"),
    ([{"points": [[0, 0]]}], r"shapes\[0\]: 'label'"),
    ([_rect("target", 0, 0, 1, 1), {"label": "t", "points": []}], r"shapes\[1\]: 'points'"),
    ([{"label": "t", "points": [[0, float("nan")]]}], "points"),
])
def test_malformed_shapes_are_named(shapes, message):
    with pytest.raises(reason_seg.BadReasonSegRecordError, match=message) as raised:
        reason_seg.reason_seg_mask(shapes, height=4, width=4)
    assert raised.value.reason == reason_seg.BAD_FIELD


def _lisa_mask(shapes, height, width, cv2):
    """LISA's get_mask_from_json on ``shapes``, with cv2."""
    areas, kept = [], []
    for shape in shapes:
        if shape["label"].lower() == "flag":
            continue
        drawn = np.zeros((height, width), np.uint8)
        cv2.polylines(drawn, np.array([shape["points"]], dtype=np.int32), True, 1, 1)
        cv2.fillPoly(drawn, np.array([shape["points"]], dtype=np.int32), 1)
        areas.append(drawn.sum())
        kept.append(shape)
    mask = np.zeros((height, width), np.uint8)
    for index in list(np.argsort(areas)[::-1].astype(np.int32)):
        shape = kept[index]
        value = 255 if "ignore" in shape["label"].lower() else 1
        cv2.polylines(mask, np.array([shape["points"]], dtype=np.int32), True, value, 1)
        cv2.fillPoly(mask, np.array([shape["points"]], dtype=np.int32), value)
    return mask


def test_masks_agree_with_lisa_on_random_shapes():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    labels = ["target", "Ignore", "flag", "object"]
    for _ in range(100):
        height, width = (int(v) for v in rng.integers(4, 32, size=2))
        shapes = [{"label": labels[rng.integers(len(labels))],
                   "points": rng.uniform(-5, 36, size=(rng.integers(3, 7), 2)).tolist()}
                  for _ in range(rng.integers(1, 5))]
        np.testing.assert_array_equal(
            reason_seg.reason_seg_mask(shapes, height=height, width=width),
            _lisa_mask(shapes, height, width, cv2))
