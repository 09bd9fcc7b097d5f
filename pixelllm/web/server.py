"""The web app's HTTP server: the standard library's ``ThreadingHTTPServer``, a fixed route table.

Routes (nothing else is served; no route maps a request to a file):

* ``GET /``: the page (``page.html``, one file of HTML, CSS and JavaScript).
* ``GET /api/info``: the model's name, the modes, the limits, the overlay palette and the
  examples (``name``, ``url``, ``width``, ``height``).
* ``GET /examples/<index>.png``: an example image, from memory.
* ``POST /api/run``: a JSON request (:mod:`.modes`); ``200`` with the result, ``400`` with
  ``{"error": message}`` for bad input (the message names the field), ``413`` for a body over
  the upload limit, ``503`` when the model's queue is full, ``500`` with a one-line message when
  the model fails (the traceback goes to the server's log, never to the page).

Request threads decode and check the input and draw the overlay; the model runs on one
:class:`~.worker.ModelWorker` thread, loaded once by the caller.
"""

from __future__ import annotations

import http
import importlib.resources
import json
import re
import sys
import time
import traceback
import urllib.parse
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pixelllm import overlay
from pixelllm.predictor import Predictor
from pixelllm.web import modes
from pixelllm.web.examples import Example
from pixelllm.web.worker import Busy, ModelWorker

_EXAMPLE_ROUTE = re.compile(r"/examples/(\d{1,4})\.png")
# Base64 grows a file by 4/3; the other fields of a request are short.
_BODY_SLACK_BYTES = 64 * 1024


class DemoServer(ThreadingHTTPServer):
    """Serves the app for ``predictor`` on ``address`` ``(host, port)`` (port 0: any free one).

    Args:
      predictor: the loaded model.
      model_name: how the page and the JSON records name it (the work dir or config).
      examples: the example images.
      limits: what one request may send.
      max_waiting: model calls that may wait behind the running one before requests are refused.
    """

    daemon_threads = True

    def __init__(self, address: tuple[str, int], *, predictor: Predictor, model_name: str,
                 examples: Sequence[Example], limits: modes.Limits = modes.Limits(),
                 max_waiting: int = 8, log_requests: bool = True):
        self.predictor = predictor
        self.model_name = model_name
        self.examples = tuple(examples)
        self.limits = limits
        self.log_requests = log_requests
        self.page = importlib.resources.files(__package__).joinpath("page.html").read_bytes()
        self.worker = ModelWorker(max_waiting=max_waiting)
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def info(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "modes": list(modes.MODES),
            "max_upload_bytes": self.limits.max_upload_bytes,
            "max_pixels": self.limits.max_pixels,
            "max_text_characters": modes.MAX_TEXT_CHARACTERS,
            "palette": ["#%02x%02x%02x" % colour for colour in overlay.PALETTE],
            "examples": [{"name": e.name, "url": f"/examples/{i}.png", "width": e.width,
                          "height": e.height} for i, e in enumerate(self.examples)],
        }

    def run(self, body: bytes) -> dict[str, Any]:
        """The answer to a ``POST /api/run`` body; raises :class:`modes.BadRequest`,
        :class:`~.worker.Busy` or the model's error."""
        try:
            request = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise modes.BadRequest("request: not JSON") from None
        job = modes.parse(request, limits=self.limits)

        def call():
            start = time.perf_counter()
            result = job.run(self.predictor)
            return result, time.perf_counter() - start

        try:
            result, seconds = self.worker.submit(call).result()
        except ValueError as error:  # the model cannot do the task, e.g. no detector
            raise modes.BadRequest(str(error)) from None
        return modes.answer(job, result, model=self.model_name, seconds=seconds)

    def server_close(self) -> None:
        super().server_close()
        self.worker.close()


class _Handler(BaseHTTPRequestHandler):
    server: DemoServer
    server_version = "pixelllm"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (the http.server interface)
        path = urllib.parse.urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._send(http.HTTPStatus.OK, self.server.page, "text/html; charset=utf-8")
        elif path == "/api/info":
            self._json(http.HTTPStatus.OK, self.server.info())
        elif (match := _EXAMPLE_ROUTE.fullmatch(path)) and int(match[1]) < len(
                self.server.examples):
            self._send(http.HTTPStatus.OK, self.server.examples[int(match[1])].png, "image/png")
        else:
            self._json(http.HTTPStatus.NOT_FOUND, {"error": f"{path}: not found"})

    def do_POST(self) -> None:  # noqa: N802
        path = urllib.parse.urlsplit(self.path).path
        if path != "/api/run":
            self._json(http.HTTPStatus.NOT_FOUND, {"error": f"{path}: not found"})
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
            if length < 0:
                raise ValueError(length)
        except ValueError:
            self.close_connection = True
            self._json(http.HTTPStatus.LENGTH_REQUIRED, {"error": "request: no valid Content-Length"})
            return
        limit = self.server.limits.max_upload_bytes * 4 // 3 + _BODY_SLACK_BYTES
        if length > limit:
            # Not read: the connection is closed instead.
            self.close_connection = True
            self._json(http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                       {"error": f"request: {length} bytes is over the limit of {limit} bytes "
                                 "(the upload limit is "
                                 f"{self.server.limits.max_upload_bytes / 2**20:.1f} MB)"})
            return
        body = self.rfile.read(length)
        try:
            self._json(http.HTTPStatus.OK, self.server.run(body))
        except modes.BadRequest as error:
            self._json(http.HTTPStatus.BAD_REQUEST, {"error": str(error)})
        except Busy as error:
            self._json(http.HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(error)})
        except Exception as error:  # the server keeps serving; the page gets one line
            traceback.print_exc(file=sys.stderr)
            self._json(http.HTTPStatus.INTERNAL_SERVER_ERROR,
                       {"error": f"the model failed ({type(error).__name__}); the server log "
                                 "has the details"})

    def _json(self, status: http.HTTPStatus, value: dict[str, Any]) -> None:
        self._send(status, json.dumps(value).encode(), "application/json")

    def _send(self, status: http.HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if self.server.log_requests:
            super().log_message(format, *args)


def serve(server: DemoServer) -> None:
    """Serves until interrupted (Ctrl-C), then closes the server."""
    print(f"pixelllm: serving {server.model_name} at {server.url} (Ctrl-C stops)",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
