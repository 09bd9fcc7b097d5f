"""The web app over HTTP on the tiny model: every mode answers the ``pixelllm`` command's JSON
record and an overlay of the image's size; every bad input gets a 4xx with a one-line message
naming the field (never a traceback) and the server keeps serving; no route reads a file the
client names."""

import base64
import io
import json
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from pixelllm.web import modes
from tests.test_cli import EXPRESSION, RESULT_KEYS
from tests.web.conftest import UPLOAD_LIMIT_BYTES

# The session fixture `app` (conftest.py) compiles the tiny model: one xdist worker builds it.
pytestmark = pytest.mark.xdist_group("web")
WIDTH, HEIGHT = 40, 24
# Each mode's request fields; "describe" also with points.
FIELDS = {"caption": {}, "locate": {"expression": EXPRESSION},
          "segment": {"expression": EXPRESSION}, "describe": {"box": [2, 3, 30, 20]},
          "dense": {}, "answer": {"question": "what is it?"}}


def png(width: int = WIDTH, height: int = HEIGHT, *, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def request(app, path: str, body: dict | bytes | None = None) -> tuple[int, bytes]:
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(app.url.rstrip("/") + path,
                                                           data=data), timeout=120) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def run(app, mode: str, image: bytes | None = None, **fields) -> tuple[int, dict]:
    body = {"mode": mode, "name": "photo.png",
            "image": base64.b64encode(png() if image is None else image).decode(), **fields}
    status, answer = request(app, "/api/run", body)
    return status, json.loads(answer)


def test_page_info_and_examples(app):
    status, page = request(app, "/")
    assert status == 200 and b'<canvas id="input"' in page
    status, info = request(app, "/api/info")
    info = json.loads(info)
    assert info["modes"] == list(RESULT_KEYS) and info["max_upload_bytes"] == UPLOAD_LIMIT_BYTES
    assert len(info["examples"]) == 2
    for example in info["examples"]:
        status, data = request(app, example["url"])
        assert status == 200
        assert Image.open(io.BytesIO(data)).size == (example["width"], example["height"]) == (
            48, 48)


@pytest.mark.parametrize("path", ["/examples/2.png", "/page.html", "/../pixelllm/cli.py",
                                  "/examples/../../README.md", "/etc/passwd"])
def test_no_route_reads_a_named_file(app, path):
    status, answer = request(app, path)
    assert status == 404 and json.loads(answer)["error"].endswith("not found")


@pytest.mark.parametrize("mode, fields", [*FIELDS.items(),
                                          ("describe", {"points": "5,6 20.5,10"})])
def test_every_mode_answers_a_record_and_an_overlay(app, mode, fields):
    status, answer = run(app, mode, **fields)
    assert status == 200, answer
    record = answer["record"]
    assert set(record) == {"image", "width", "height", "task", "model", "result"}
    assert (record["image"], record["width"], record["height"], record["task"]) == (
        "photo.png", WIDTH, HEIGHT, mode)
    expected = RESULT_KEYS[mode] if "points" not in fields else {"caption", "score", "points"}
    assert set(record["result"]) == expected
    header, _, data = answer["overlay"].partition(",")
    assert header == "data:image/png;base64"
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))
    assert overlay.shape == (HEIGHT, WIDTH, 3)
    result = record["result"]
    boxes = ([r["box"] for r in result["regions"]] if mode == "dense"
             else [result["box"]] if "box" in result else [])
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 <= x1 <= WIDTH and 0 <= y0 <= y1 <= HEIGHT
    for word in result.get("words", []):
        assert all(0 <= x <= WIDTH and 0 <= y <= HEIGHT for x, y in word["points"])
    if mode == "segment":
        assert result["mask"]["size"] == [HEIGHT, WIDTH]
    if mode == "describe":
        assert result.get("box", result.get("points")) == (
            [2.0, 3.0, 30.0, 20.0] if "box" in fields else [[5.0, 6.0], [20.5, 10.0]])
    assert answer["seconds"] > 0


def _huge_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (5000, 4000)).save(buffer, format="PNG")  # 20 MP, a few KB
    return buffer.getvalue()


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="GIF")
    return buffer.getvalue()


@pytest.mark.parametrize("mode, image, fields, message", [
    ("caption", b"%PDF-1.4 not an image", {}, "photo.png: not an image"),
    ("caption", png()[:60], {}, "photo.png: corrupt or truncated image"),
    ("caption", _gif(), {}, "photo.png: GIF images are not supported"),
    ("caption", _huge_png(), {}, "photo.png: 5000x4000 pixels is over the limit of 16.8 "
                                 "megapixels"),
    ("locate", None, {"expression": "  "}, "expression: empty"),
    ("segment", None, {}, "expression: empty"),
    ("answer", None, {"question": "x" * 201}, "question: 201 characters; at most 200"),
    ("describe", None, {"box": [0, 0, 50, 10]}, "box: box [0.0, 0.0, 50.0, 10.0] is not inside "
                                                "the 40x24 image"),
    ("describe", None, {"box": "1,2,3"}, "box: '1,2,3': expected 4 numbers"),
    ("describe", None, {"box": [5, 5, 2, 9]}, "is not inside"),
    ("describe", None, {"points": "1,2 3"}, "points: 3 numbers are not x,y pairs"),
    ("describe", None, {"points": [[1, 30]]}, "points: points [[1.0, 30.0]] are not inside"),
    ("describe", None, {"box": [1, 1, 5, 5], "points": [[1, 2]]}, "not both and not neither"),
    ("describe", None, {}, "not both and not neither"),
    ("draw", None, {}, "mode: 'draw' is not one of caption, locate"),
])
def test_bad_input_gets_a_message(app, mode, image, fields, message):
    status, answer = run(app, mode, image, **fields)
    assert status == 400 and set(answer) == {"error"}
    assert message in answer["error"] and "\n" not in answer["error"], answer


@pytest.mark.parametrize("body, message", [
    (b"{not json", "request: not JSON"),
    (b"[1, 2]", "request: expected a JSON object"),
    (json.dumps({"mode": "caption"}).encode(), "image: no image"),
    (json.dumps({"mode": "caption", "image": "***"}).encode(), "image: not base64 data"),
    (json.dumps({"mode": "caption", "name": "big.png",
                 "image": base64.b64encode(bytes(UPLOAD_LIMIT_BYTES + 1)).decode()}).encode(),
     "big.png: 0.5 MB is over the upload limit of 0.5 MB"),
])
def test_bad_request_bodies_get_a_message(app, body, message):
    status, answer = request(app, "/api/run", body)
    assert status == 400 and message in json.loads(answer)["error"]


def test_a_model_failure_is_one_line_and_the_server_keeps_serving(app, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(app.predictor, "caption", broken)
    status, answer = run(app, "caption")
    assert status == 500 and answer == {
        "error": "the model failed (RuntimeError); the server log has the details"}
    assert "device lost" in capsys.readouterr().err  # the traceback went to the log
    monkeypatch.undo()
    status, answer = run(app, "caption")
    assert status == 200 and answer["record"]["task"] == "caption"


def test_decode_image_applies_exif_orientation():
    pixels = np.zeros((12, 20, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 20 wide, displayed a quarter turn: 12 x 20
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", exif=exif.tobytes())
    image = modes.decode_image(base64.b64encode(buffer.getvalue()).decode(), name="p.jpg",
                               limits=modes.Limits())
    assert image.shape == (20, 12, 3)


def _post_headers_only(app, length_header: str) -> bytes:
    """The server's reply to a POST's headers alone (no body is sent)."""
    host, port = app.server_address[:2]
    with socket.create_connection((host, port), timeout=30) as connection:
        connection.sendall(f"POST /api/run HTTP/1.1\r\nHost: {host}\r\n{length_header}\r\n"
                           .encode())
        return connection.makefile("rb").read()


def test_a_body_over_the_limit_is_refused_unread(app):
    # The answer comes before any of the body is sent; the connection is then closed.
    reply = _post_headers_only(app, f"Content-Length: {2 * UPLOAD_LIMIT_BYTES}\r\n")
    assert reply.startswith(b"HTTP/1.1 413") and b"upload limit is 0.5 MB" in reply


@pytest.mark.parametrize("length_header", ["", "Content-Length: -5\r\n"])
def test_a_body_without_a_valid_length_is_refused(app, length_header):
    reply = _post_headers_only(app, length_header)
    assert reply.startswith(b"HTTP/1.1 411") and b"no valid Content-Length" in reply
