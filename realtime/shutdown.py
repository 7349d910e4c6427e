"""Signals for the long-running commands: clean shutdown on Ctrl-C and SIGTERM (live, replay), and
recalibration on SIGUSR1 (live)."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Ctrl-C (SIGINT) and SIGTERM set `stop`, so a loop watching it ends cleanly after its current step.

    A second Ctrl-C interrupts at once (KeyboardInterrupt), for a run stuck somewhere. Signal handlers
    can only be installed from the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}

    def request_stop(number: int, _frame: object) -> None:
        if not stop.is_set():
            log.info("stopping (%s); Ctrl-C again to interrupt at once", signal.Signals(number).name)
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    for number in previous:
        signal.signal(number, request_stop)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def recalibrate_on_signal(request: threading.Event) -> Iterator[None]:
    """SIGUSR1 (``kill -USR1 PID``) sets `request`: the live loop recalibrates identity and FOV.

    POSIX only; where there is no SIGUSR1, or off the main thread, this does nothing.
    """
    if not hasattr(signal, "SIGUSR1") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, lambda _number, _frame: request.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, previous)
