"""One tiny model served for the web tests: the predictor tests' work dir
(``multitask_refseg_tiny``, every module built), loaded once per test session and served on a
free local port from a thread."""

import threading

import pytest

from pixelllm.predictor import Predictor
from pixelllm.web import examples, modes
from pixelllm.web.server import DemoServer
from tests.test_predictor import MAX_NEW_TOKENS, make_tiny_workdir

# Small enough that the tests can send a body over it quickly.
UPLOAD_LIMIT_BYTES = 512 * 1024


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
    return make_tiny_workdir(tmp_path_factory.mktemp("web"))[0]


@pytest.fixture(scope="session")
def app(tiny_workdir):
    """A running :class:`DemoServer` (``app.url``) on the tiny model, two 48-pixel examples."""
    predictor = Predictor.from_workdir(tiny_workdir, max_new_tokens=MAX_NEW_TOKENS,
                                       max_batch=1)
    server = DemoServer(("127.0.0.1", 0), predictor=predictor, model_name="tiny",
                        examples=examples.synthetic(count=2, size=48),
                        limits=modes.Limits(max_upload_bytes=UPLOAD_LIMIT_BYTES),
                        log_requests=False)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()
