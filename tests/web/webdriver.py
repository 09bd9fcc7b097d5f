"""A minimal W3C WebDriver client over the standard library, for headless Chromium.

``chromedriver`` speaks WebDriver as JSON over HTTP, so driving a real browser needs no client
package: :class:`Browser` starts the driver on a free port, opens one headless session and
offers the few commands the page tests use.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

# The W3C key of an element reference in WebDriver's JSON.
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


class WebDriverError(RuntimeError):
    """A command the driver refused; the message is the driver's."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Browser:
    """A headless Chromium session driven through ``driver`` (a chromedriver executable).

    Args:
      driver: the chromedriver path.
      binary: the Chromium path.
      size: the window's ``(width, height)`` in CSS pixels.
    """

    def __init__(self, *, driver: str, binary: str, size: tuple[int, int] = (1100, 900)):
        port = _free_port()
        self._process = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
        self._base = f"http://127.0.0.1:{port}"
        self.session = None
        deadline = time.monotonic() + 20
        while True:
            try:
                if self._call("GET", "/status")["ready"]:
                    break
            except (OSError, WebDriverError):
                pass
            if time.monotonic() > deadline or self._process.poll() is not None:
                self.quit()
                raise WebDriverError(f"{driver} did not start")
            time.sleep(0.1)
        options = {"binary": binary, "args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--window-size={size[0]},{size[1]}", "--force-device-scale-factor=1"]}
        capabilities = {"alwaysMatch": {"browserName": "chrome",
                                        "goog:chromeOptions": options}}
        try:
            self.session = self._call("POST", "/session",
                                      {"capabilities": capabilities})["sessionId"]
        except WebDriverError:
            self.quit()
            raise

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self._base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as answer:
                return json.loads(answer.read())["value"]
        except urllib.error.HTTPError as error:
            value = json.loads(error.read())["value"]
            raise WebDriverError(f"{value.get('error')}: {value.get('message')}") from None

    def _session(self, method: str, path: str, body: dict | None = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)

    def get(self, url: str) -> None:
        self._session("POST", "/url", {"url": url})

    def find(self, css: str) -> str:
        """The first element matching ``css`` (its WebDriver id)."""
        return self._session("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def click(self, css: str) -> None:
        self._session("POST", f"/element/{self.find(css)}/click", {})

    def type(self, css: str, text: str) -> None:
        """Replaces the text of the input ``css``."""
        element = self.find(css)
        self._session("POST", f"/element/{element}/clear", {})
        if text:
            self._session("POST", f"/element/{element}/value", {"text": text})

    def upload(self, css: str, path: Path) -> None:
        """Chooses the file ``path`` in the file input ``css``."""
        self._session("POST", f"/element/{self.find(css)}/value", {"text": str(path)})

    def run(self, script: str, *args: Any) -> Any:
        """``script``'s return value (a function body; ``arguments`` holds ``args``)."""
        return self._session("POST", "/execute/sync", {"script": script, "args": list(args)})

    def run_async(self, script: str, *args: Any) -> Any:
        """The value ``script`` passes to its callback, ``arguments[arguments.length - 1]``."""
        return self._session("POST", "/execute/async", {"script": script, "args": list(args)})

    def wait(self, script: str, *args: Any, timeout: float = 60) -> Any:
        """Polls ``script`` until it returns a truthy value, which is returned."""
        deadline = time.monotonic() + timeout
        while not (value := self.run(script, *args)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for: {script}")
            time.sleep(0.05)
        return value

    def pointer(self, css: str, moves: list[tuple[str, float, float]]) -> None:
        """Mouse actions relative to the centre of ``css``: ``("move", dx, dy)``, ``("down",
        0, 0)``, ``("up", 0, 0)``."""
        origin = {ELEMENT: self.find(css)}
        # Pointer moves must stay inside the viewport.
        self.run("arguments[0].scrollIntoView({block: 'nearest'})", origin)
        steps = []
        for kind, dx, dy in moves:
            if kind == "move":
                steps.append({"type": "pointerMove", "duration": 50, "origin": origin,
                              "x": int(dx), "y": int(dy)})
            else:
                steps.append({"type": f"pointer{kind.capitalize()}", "button": 0})
        self._session("POST", "/actions", {"actions": [
            {"type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
             "actions": steps}]})
        self._session("DELETE", "/actions")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self._session("GET", "/screenshot")))

    def quit(self) -> None:
        if self.session is not None:
            try:
                self._session("DELETE", "")
            except (OSError, WebDriverError):
                pass
        self._process.terminate()
        self._process.wait(10)
