"""One thread that owns the model, fed by a bounded queue.

Model calls run one at a time on :class:`ModelWorker`'s thread, in arrival order, so the jitted
functions and the device are never used from two request threads at once and a burst of
requests waits instead of exhausting memory. When ``max_waiting`` calls are already waiting,
:meth:`ModelWorker.submit` refuses at once (:class:`Busy`) rather than queueing without end.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class Busy(RuntimeError):
    """The queue is full; the message says how many calls are waiting."""


class ModelWorker:
    """Runs submitted calls on one daemon thread, first in first out.

    Args:
      max_waiting: how many calls may wait (the running one not counted).
    """

    def __init__(self, *, max_waiting: int):
        if max_waiting < 1:
            raise ValueError(f"max_waiting {max_waiting} must be >= 1")
        self.max_waiting = max_waiting
        self._calls: queue.Queue[tuple[Callable[[], Any], Future] | None] = queue.Queue(
            maxsize=max_waiting)
        self._thread = threading.Thread(target=self._loop, name="pixelllm-model", daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[], Any]) -> Future:
        """A future of ``call()``, run on the worker thread; :class:`Busy` if the queue is full."""
        future: Future = Future()
        try:
            self._calls.put_nowait((call, future))
        except queue.Full:
            raise Busy(f"the server is busy ({self.max_waiting} requests waiting); try again "
                       "in a moment") from None
        return future

    def close(self) -> None:
        """Finishes the waiting calls, then stops the thread."""
        self._calls.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while (item := self._calls.get()) is not None:
            call, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(call())
                except BaseException as error:  # handed to the waiting request thread
                    future.set_exception(error)
