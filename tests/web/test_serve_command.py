"""``pixelllm serve``: the command serves a work dir on a free port with the examples beside
it and stops cleanly on Ctrl-C; a missing model is a one-line error naming it, and with no
arguments it serves the demo's work dir."""

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelllm import cli

# The session fixture `tiny_workdir` (conftest.py) is built once: on one xdist worker.
pytestmark = pytest.mark.xdist_group("web")
REPOSITORY = Path(__file__).resolve().parents[2]


def test_serve_command_serves_the_work_dir_and_stops_on_ctrl_c(tiny_workdir):
    images = tiny_workdir.parent / "images"
    images.mkdir(exist_ok=True)
    for name, size in (("b.png", (40, 30)), ("a.png", (33, 36))):
        Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(images / name)
    (images / "notes.txt").write_text("not an example")
    # pytest-xdist workers ignore SIGINT, and a child inherits an ignored signal (Python then
    # installs no KeyboardInterrupt handler): give the server the default, as a shell does.
    process = subprocess.Popen(
        [sys.executable, "-m", "pixelllm.cli", "serve", "--workdir", str(tiny_workdir),
         "--port", "0"], cwd=REPOSITORY, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in process.stderr:
            if line.startswith("pixelllm: serving"):
                break
        url = line.split(" at ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "api/info", timeout=30) as answer:
            info = json.loads(answer.read())
        assert info["model"] == str(tiny_workdir)
        assert [(e["name"], e["width"], e["height"]) for e in info["examples"]] == [
            ("a.png", 33, 36), ("b.png", 40, 30)]
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0


def test_serve_without_a_model_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    assert cli.main(["serve", "--workdir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"pixelllm: error: cannot serve: {tmp_path}/config.json: no such file; " \
                  f"{tmp_path} is not a training run's work dir"
    monkeypatch.chdir(tmp_path)
    assert cli.main(["serve"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pixelllm: error: cannot serve: {cli.DEMO_WORKDIR}/config.json")
    assert err.endswith("train it with `bash launch/demo.sh` or pass --workdir")
