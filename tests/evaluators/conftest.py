"""One METEOR JVM for the whole test session: it loads a 60 MB paraphrase table at start."""

import shutil

import pytest

from pixelllm.evaluators.caption_metrics import JAVA_DEBIAN_PACKAGE, MeteorProcess


@pytest.fixture(scope="session")
def meteor():
    """The session's shared real METEOR 1.5 process (skips without Java)."""
    if shutil.which("java") is None:
        pytest.skip(f"java is not on PATH (Debian: {JAVA_DEBIAN_PACKAGE}); real METEOR needs it")
    with MeteorProcess() as process:
        yield process
