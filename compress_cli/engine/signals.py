"""When a run stops early: SIGINT/SIGTERM and the time budget, in one object (Lightning's
``_SignalConnector`` shape: handlers only on the main thread, the previous ones put back after).

A pipeline run handles signals gracefully: the first signal asks every loop to finish its current
step (``should_stop()``), the run then snapshots and exits 130; a second signal raises
KeyboardInterrupt at once. An hpo search started outside a pipeline (a stage called from Python)
asks for ``interrupt=True`` instead, so Optuna sees a KeyboardInterrupt and marks the running trial
failed; inside a pipeline its request is a no-op and the pipeline's handling stays in charge.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _is_default(handler: Any) -> bool:
    return handler in (signal.SIG_DFL, signal.default_int_handler, None)


class StopController:
    """Signals received and the time budget of one run; ``should_stop()`` is what loops poll.

    ``budget_s``: seconds from construction after which ``should_stop()`` turns true (None: no
    budget). ``notify`` receives one line when the first signal arrives in graceful mode.
    """

    def __init__(self, budget_s: float | None = None, notify: Callable[[str], None] | None = None):
        self.budget_s = budget_s
        self.notify = notify
        self.t0 = time.perf_counter()
        self.signal: int | None = None  # the first signal received
        self.reason: str | None = None  # why should_stop() turned true without a signal
        self._interrupt = False
        self._handling = False

    def should_stop(self) -> bool:
        """True once a signal arrived or the budget is spent (then ``reason`` says so)."""
        if self.signal is not None:
            return True
        if self.budget_s is not None and time.perf_counter() - self.t0 > self.budget_s:
            self.reason = f"time_budget_s ({self.budget_s:g} s) spent"
            return True
        return False

    def interrupted(self, signum: int = signal.SIGINT) -> None:
        """Record a stop request that arrived as KeyboardInterrupt (keeps an earlier signal)."""
        if self.signal is None:
            self.signal = signum

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self._interrupt:
            raise KeyboardInterrupt(signal.Signals(signum).name)
        if self.signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum
        if self.notify is not None:
            self.notify(f"{signal.Signals(signum).name} received: finishing the current step, then saving")

    @contextmanager
    def handling_signals(self, *, interrupt: bool = False) -> Iterator[None]:
        """Handle SIGINT/SIGTERM inside; the previous handlers come back after. Only on the main
        thread, and a no-op while this controller already handles them. ``interrupt=False``: the
        first signal sets ``should_stop()``. ``interrupt=True``: a signal raises KeyboardInterrupt,
        and a signal somebody else already handles is left to them."""
        if self._handling or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in SIGNALS}
        mine = [s for s in SIGNALS if not interrupt or _is_default(previous[s])]
        self._handling, self._interrupt = True, interrupt
        for s in mine:
            signal.signal(s, self._on_signal)
        try:
            yield
        finally:
            for s in mine:
                signal.signal(s, previous[s])
            self._handling = self._interrupt = False
