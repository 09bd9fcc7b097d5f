"""The page in a real browser (headless Chromium through chromedriver) on the tiny model: an
uploaded image runs in every mode, the overlay appears at the image's size, the text shown is the
result's, hovering a word highlights its trace, a dragged box and clicked points become the
region, the downloaded JSON is the ``pixelllm`` command's record; bad input shows its message
and the page keeps working. A screenshot of each mode is written under the test's temp dir.

Debian's ``chromium`` and ``chromium-driver`` are installed with apt-get when missing and the
tests run as root; otherwise the tests are skipped, saying why.
"""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from tests.test_cli import EXPRESSION, RESULT_KEYS
from tests.web.webdriver import Browser

# The session fixture `app` (conftest.py) compiles the tiny model: one xdist worker builds it.
pytestmark = pytest.mark.xdist_group("web")
WIDTH, HEIGHT = 40, 24
# The page shows images fitted to 448 CSS pixels: the photo 11.2 times enlarged.
SCALE = 448 / WIDTH
PACKAGES = ("chromium", "chromium-driver")


def _chromium() -> tuple[str, str]:
    """``(chromedriver, chromium)`` paths, installing the Debian packages if needed."""
    found = shutil.which("chromedriver"), shutil.which("chromium")
    if all(found):
        return found
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip(f"no chromium/chromedriver and cannot install {' '.join(PACKAGES)} "
                    "(needs apt-get as root)")
    try:
        install = subprocess.run(["apt-get", "install", "-y", "-q", *PACKAGES],
                                 capture_output=True, text=True, timeout=900)
        if install.returncode:  # a fresh machine has no package lists yet
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=600)
            install = subprocess.run(["apt-get", "install", "-y", "-q", *PACKAGES],
                                     capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip(f"apt-get install {' '.join(PACKAGES)} timed out")
    found = shutil.which("chromedriver"), shutil.which("chromium")
    if install.returncode or not all(found):
        pytest.skip(f"apt-get install {' '.join(PACKAGES)} failed: "
                    f"{install.stderr.strip().splitlines()[-1:]}")
    return found


@pytest.fixture(scope="module")
def browser(app):
    driver, binary = _chromium()
    session = Browser(driver=driver, binary=binary, size=(1100, 1000))
    session.get(app.url)
    session.wait("return document.body.dataset.ready === 'true'")
    yield session
    session.quit()


def _photo(path):
    pixels = np.random.default_rng(1).integers(0, 255, (HEIGHT, WIDTH, 3), np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _run_mode(browser, mode: str) -> None:
    """Clicks Run in ``mode`` and waits for the result or a message."""
    browser.run("document.getElementById('status').textContent = '';"
                "document.getElementById('message').textContent = ''")
    browser.click("#run")
    browser.wait("const status = document.getElementById('status').textContent;"
                 "return status.startsWith('done: ' + arguments[0]) || "
                 "document.getElementById('message').textContent", mode, timeout=120)


def _message(browser) -> str:
    return browser.run("return document.getElementById('message').textContent")


def _downloaded(browser) -> dict:
    text = browser.run_async("const done = arguments[arguments.length - 1];"
                             "fetch(document.getElementById('download').href)"
                             ".then((r) => r.text()).then(done)")
    return json.loads(text)


def _shown(browser) -> dict:
    return browser.run("""
        const output = document.getElementById('output');
        return {size: [output.naturalWidth, output.naturalHeight],
                hidden: document.getElementById('output-view').hidden,
                text: document.getElementById('text').textContent,
                words: [...document.querySelectorAll('.word')].map((w) => w.textContent),
                regions: document.querySelectorAll('.region').length,
                download: document.getElementById('download').download};""")


def test_every_mode_in_a_real_browser(app, browser, tmp_path):
    browser.upload("#upload", _photo(tmp_path / "photo.png"))
    browser.wait("return document.getElementById('image-info').textContent"
                 ".includes('40 x 24')")
    shown_texts = []
    for mode in ("caption", "locate", "segment", "describe", "describe-points", "dense",
                 "answer"):
        task = mode.partition("-")[0]
        browser.click(f".tab[data-mode={task}]")
        if task in ("locate", "segment"):
            browser.type("#expression", EXPRESSION)
        elif task == "answer":
            browser.type("#question", "what is it?")
        elif mode == "describe":
            # A drag of 200 x 110 CSS pixels around the centre.
            browser.pointer("#input", [("move", -100, -50), ("down", 0, 0), ("move", 0, 0),
                                       ("move", 100, 60), ("up", 0, 0)])
        elif mode == "describe-points":  # two clicks
            browser.click("#clear-region")
            browser.pointer("#input", [("move", -60, 0), ("down", 0, 0), ("up", 0, 0),
                                       ("move", 60, 24), ("down", 0, 0), ("up", 0, 0)])
        _run_mode(browser, task)
        assert _message(browser) == "", mode
        record = _downloaded(browser)
        shown = _shown(browser)
        browser.screenshot(tmp_path / f"{mode}.png")
        assert Image.open(tmp_path / f"{mode}.png").width == 1100
        assert shown["size"] == [WIDTH, HEIGHT] and not shown["hidden"], mode
        assert shown["download"] == f"photo_{task}.json"
        assert set(record) == {"image", "width", "height", "task", "model", "result"}
        assert (record["image"], record["width"], record["height"], record["task"]) == (
            "photo.png", WIDTH, HEIGHT, task)
        result = record["result"]
        assert set(result) == (RESULT_KEYS[task] if mode != "describe-points"
                               else {"caption", "score", "points"})
        if task == "caption":
            assert shown["words"] == result["caption"].split() == [
                w["word"] for w in result["words"]]
            shown_texts.append(result["caption"])
        elif task == "answer":
            assert shown["text"] == f"Q: what is it?  A: {result['answer']}"
            shown_texts.append(result["answer"])
        elif task == "describe":
            assert shown["text"] == result["caption"]
            shown_texts.append(result["caption"])
        elif task == "dense":
            assert shown["regions"] == len(result["regions"])
            assert shown["text"] == f"{len(result['regions'])} regions"
        else:
            assert shown["text"].startswith(f"{EXPRESSION}: box ")
        if mode == "describe":
            np.testing.assert_allclose(result["box"], [20 - 100 / SCALE, 12 - 50 / SCALE,
                                                       20 + 100 / SCALE, 12 + 60 / SCALE],
                                       atol=0.2)
        if mode == "describe-points":
            np.testing.assert_allclose(result["points"], [[20 - 60 / SCALE, 12],
                                                          [20 + 60 / SCALE, 12 + 24 / SCALE]],
                                       atol=0.2)
        if task == "caption":
            assert result["words"], "no word to hover"
            assert browser.run("return document.getElementById('highlight').getContext('2d')"
                               ".getImageData(0, 0, 40, 24).data[3]") == 0
            browser.pointer(".word", [("move", 0, 0)])
            lit = browser.run("""
                const canvas = document.getElementById('highlight');
                const pixels = canvas.getContext('2d').getImageData(0, 0, 40, 24).data;
                const word = document.querySelector('.word');
                return [pixels[3], word.classList.contains('selected')];""")
            assert lit == [140, True]  # the dimming layer (alpha 0.55) and the word selected
            browser.screenshot(tmp_path / "caption-hover.png")
    # The tiny model writes something in at least one generating mode.
    assert any(text.strip() for text in shown_texts), shown_texts


def test_bad_input_shows_a_message_and_the_page_keeps_working(app, browser, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    browser.upload("#upload", notes)
    browser.wait("return document.getElementById('message').textContent")
    assert _message(browser) == "notes.txt: not an image; upload a JPEG, PNG or WebP file"
    browser.screenshot(tmp_path / "bad-upload.png")
    # An example, one click away.
    browser.click(".example")
    browser.wait("return document.getElementById('image-info').textContent"
                 ".includes('48 x 48')")
    assert _message(browser) == ""
    browser.click(".tab[data-mode=locate]")
    browser.type("#expression", "")
    _run_mode(browser, "locate")
    assert _message(browser) == "expression: empty; type some text"
    browser.click(".tab[data-mode=describe]")
    browser.type("#box", "0,0,60,10")
    _run_mode(browser, "describe")
    assert "box: box [0.0, 0.0, 60.0, 10.0] is not inside the 48x48 image" in _message(browser)
    browser.screenshot(tmp_path / "bad-box.png")
    browser.click(".tab[data-mode=caption]")
    _run_mode(browser, "caption")
    assert _message(browser) == ""
    assert _shown(browser)["size"] == [48, 48]
    assert _downloaded(browser)["image"] == "scene-1.png"
