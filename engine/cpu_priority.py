"""Lowering one thread's CPU priority, so that work that can wait yields the cores to work that sets the pace
(MediaPipe's process, the tracking loop) whenever both want them."""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger(__name__)

#: Unix ``nice`` steps for background work: its share of a core wanted by normal work is then about a tenth.
BACKGROUND_NICENESS = 10


def lower_thread_priority(steps: int = BACKGROUND_NICENESS) -> None:
    """Lower the calling thread's priority by ``steps`` (at most to 19). Linux only: threads there have their
    own nice value, and threads they start inherit it; elsewhere, and where the system refuses, nothing changes."""
    if not sys.platform.startswith("linux"):
        return
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, min(os.getpriority(os.PRIO_PROCESS, thread) + steps, 19))
    except OSError as error:
        log.debug("thread %s keeps its priority (%s)", threading.current_thread().name, error)
