"""The ``pixelllm`` command in-process (``main(argv)``) on a tiny work dir: every subcommand
writes a JSON of the documented keys and a PNG of the upright image's size; bad input gets a
one-line error and its exit status; a folder run skips a corrupt file and finishes the rest."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelllm import cli
from tests.test_predictor import MAX_NEW_TOKENS, make_tiny_workdir

# The predictor tests' group: both modules compile the same tiny programs, so on one xdist worker
# (launch/test.sh uses --dist loadgroup) the second reads them from the compilation cache instead
# of compiling them again at the same time on the other worker, and the work dir fixture is
# built once per module, not once per worker.
pytestmark = pytest.mark.xdist_group("test_predictor")

# The result keys of each subcommand (README, "Using a trained model").
RESULT_KEYS = {
    "caption": {"caption", "score", "words"},
    "locate": {"expression", "box"},
    "segment": {"expression", "box", "mask", "mask_score"},
    "describe": {"caption", "score", "box"},
    "dense": {"regions"},
    "answer": {"question", "answer", "score"},
}
# The predictor tests' longest expression: their text buckets, so their compiled programs.
EXPRESSION = "a red car on the left"
TASK_ARGS = {"caption": [], "locate": ["--expression", EXPRESSION],
             "segment": ["--expression", EXPRESSION], "describe": ["--box", "1,2,10,15"],
             "dense": [], "answer": ["--question", "what is it?"]}
# Stored 20 wide and 12 high, displayed turned a quarter (EXIF orientation 6): 12 x 20.
STORED_WH, UPRIGHT_WH = (20, 12), (12, 20)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(make_tiny_workdir(tmp_path_factory.mktemp("cli"))[0])


def _photo(path: Path) -> Path:
    pixels = np.random.default_rng(0).integers(0, 255, (*STORED_WH[::-1], 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)
    return path


def _run(argv, capsys) -> tuple[int, str]:
    status = cli.main([str(a) for a in argv])
    return status, capsys.readouterr().err


def test_every_subcommand_writes_its_json_and_overlay(workdir, tmp_path, capsys):
    photo = _photo(tmp_path / "photo.jpg")
    for task, extra in TASK_ARGS.items():
        out = tmp_path / task
        # Twice, as the predictor tests' batches of two: their compiled programs are reused.
        status, err = _run([task, photo, photo, "--workdir", workdir, "--out", out,
                            "--max_new_tokens", MAX_NEW_TOKENS, *extra], capsys)
        assert status == 0, err
        assert sorted(p.name for p in out.iterdir()) == ["photo-2.json", "photo-2.png",
                                                         "photo.json", "photo.png"]
        record = json.loads((out / "photo.json").read_text())
        assert set(record) == {"image", "width", "height", "task", "model", "result"}
        assert (record["width"], record["height"]) == UPRIGHT_WH
        assert record["task"] == task and set(record["result"]) == RESULT_KEYS[task], task
        assert Image.open(out / "photo.png").size == UPRIGHT_WH
        boxes = ([r["box"] for r in record["result"]["regions"]] if task == "dense"
                 else [record["result"]["box"]] if "box" in record["result"] else [])
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 <= x1 <= UPRIGHT_WH[0] and 0 <= y0 <= y1 <= UPRIGHT_WH[1], task
    words = json.loads((tmp_path / "caption" / "photo.json").read_text())["result"]["words"]
    assert all(set(word) == {"word", "points"} for word in words)
    mask = json.loads((tmp_path / "segment" / "photo.json").read_text())["result"]["mask"]
    assert mask["size"] == [UPRIGHT_WH[1], UPRIGHT_WH[0]]


def test_a_folder_run_skips_a_corrupt_file_and_finishes(workdir, tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    _photo(folder / "a.jpg")
    Image.new("L", (9, 7), 200).save(folder / "more" / "b.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (folder / "notes.txt").write_text("not an image, not counted")
    out = tmp_path / "out"
    status, err = _run(["locate", folder, "--workdir", workdir, "--out", out,
                        "--expression", EXPRESSION], capsys)
    assert status == 1
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a.png", "more__b.json",
                                                     "more__b.png"]
    skipped = [line for line in err.splitlines() if "skipped" in line and "broken.jpg" in line]
    assert len(skipped) == 1
    assert "2 of 3 images written" in err and "1 skipped" in err


@pytest.mark.parametrize("argv, status, message", [
    (["locate", "{photo}", "--workdir", "{workdir}", "--out", "{out}", "--expression", " "],
     2, "empty text"),
    (["describe", "{photo}", "--workdir", "{workdir}", "--out", "{out}", "--box", "1,2,3"],
     2, "expected 4 numbers"),
    (["describe", "{photo}", "--workdir", "{workdir}", "--out", "{out}", "--box", "0,0,15,5"],
     1, "photo.jpg: --box: box [0.0, 0.0, 15.0, 5.0] is not inside the 12x20 image"),
    (["caption", "{missing}", "--workdir", "{workdir}", "--out", "{out}"],
     1, "missing.png: image file not found"),
    (["caption", "{photo}", "--workdir", "{out}", "--out", "{out}"],
     1, "config.json: no such file"),
    (["caption", "{photo}", "--workdir", "{workdir}", "--config", "x.py", "--out", "{out}"],
     2, "exactly one of --workdir and --config"),
    (["caption", "{photo}", "--config", "{missing}", "--out", "{out}"],
     1, "missing.png: no such file"),
])
def test_bad_input_gets_a_one_line_error(workdir, tmp_path, capsys, argv, status, message):
    names = {"photo": _photo(tmp_path / "photo.jpg"), "workdir": workdir,
             "out": tmp_path / "out", "missing": tmp_path / "missing.png"}
    found, err = _run([a.format(**names) for a in argv], capsys)
    assert found == status
    errors = [line for line in err.splitlines() if line.startswith("pixelllm: error")
              or line.startswith("pixelllm: skipped")]
    assert len(errors) == 1 and message in errors[0], err
