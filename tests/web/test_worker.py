"""The model worker runs calls one at a time in order, hands errors to the caller and refuses
calls beyond its queue's bound instead of queueing them."""

import threading

import pytest

from pixelllm.web.worker import Busy, ModelWorker


def test_calls_run_in_order_on_one_thread_and_a_full_queue_refuses():
    worker = ModelWorker(max_waiting=2)
    release, started = threading.Event(), threading.Event()
    order = []

    def blocking():
        started.set()
        release.wait(10)
        return threading.current_thread().name

    running = worker.submit(blocking)
    assert started.wait(10)
    waiting = [worker.submit(lambda i=i: order.append(i) or i) for i in range(2)]
    with pytest.raises(Busy, match="2 requests waiting"):
        worker.submit(lambda: None)
    release.set()
    assert running.result(10) == "pixelllm-model"
    assert [future.result(10) for future in waiting] == [0, 1] == order
    worker.close()


def test_an_error_reaches_the_caller_and_the_worker_goes_on():
    worker = ModelWorker(max_waiting=1)
    with pytest.raises(ZeroDivisionError):
        worker.submit(lambda: 1 / 0).result(10)
    assert worker.submit(lambda: 7).result(10) == 7
    worker.close()
