"""StopController: the one owner of SIGINT/SIGTERM and the time budget (pipeline and hpo)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from compress_cli.engine.signals import StopController


def test_graceful_first_signal_asks_to_stop_second_interrupts_and_handlers_come_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    said: list[str] = []
    stop = StopController(notify=said.append)
    with stop.handling_signals():
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.should_stop() and stop.signal == signal.SIGTERM
        assert said == ["SIGTERM received: finishing the current step, then saving"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert {s: signal.getsignal(s) for s in before} == before


def test_interrupt_mode_raises_at_once_and_leaves_a_foreign_handler_alone():
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        stop = StopController()
        with stop.handling_signals(interrupt=True):
            os.kill(os.getpid(), signal.SIGTERM)  # somebody else's: stays theirs
            assert seen == [signal.SIGTERM] and not stop.should_stop()
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_nested_request_inside_a_graceful_run_is_a_no_op():
    stop = StopController()
    with stop.handling_signals():
        with stop.handling_signals(interrupt=True):  # hpo inside a pipeline
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.should_stop()  # graceful, no KeyboardInterrupt
        assert signal.getsignal(signal.SIGTERM) == stop._on_signal


def test_other_threads_install_nothing():
    stop = StopController()
    got: list[object] = []

    def worker() -> None:
        with stop.handling_signals():
            got.append(signal.getsignal(signal.SIGTERM))

    before = signal.getsignal(signal.SIGTERM)
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert got == [before]


def test_time_budget():
    stop = StopController(budget_s=0.05)
    assert not stop.should_stop() and stop.reason is None
    time.sleep(0.1)
    assert stop.should_stop() and stop.reason == "time_budget_s (0.05 s) spent"
