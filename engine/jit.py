"""Compiled NumPy kernels (numba) with an on-disk cache, so that a kernel is compiled once per machine.

numba keeps its cache next to the module when that folder is writable, else in the user's cache folder
(``~/.cache/numba``), or wherever ``NUMBA_CACHE_DIR`` says. With no writable place at all (a read-only
install and home), kernels are compiled in each process instead, which costs seconds at start-up, not a failure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from numba import njit

log = logging.getLogger(__name__)

Function = TypeVar("Function", bound=Callable)


def compiled(function: Function) -> Function:
    """``numba.njit`` with its cache where numba finds a writable place for it, without where it does not."""
    try:
        return njit(cache=True)(function)
    except RuntimeError as error:  # numba: "cannot cache function ...: no locator available"
        log.warning("%s; compiling it in every process (set NUMBA_CACHE_DIR to a writable folder to keep it)", error)
        return njit(function)
