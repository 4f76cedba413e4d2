"""Bounded polling for real threads and processes (never a fixed sleep)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


HANG_S = 60.0    # the least time any wait gets: a bound on a hang, never a speed goal


def wait_for(predicate: Callable[[], T], timeout: float = HANG_S, interval: float = 0.02,
             what: str = "condition") -> T:
    """Poll `predicate` until it returns a truthy value or `timeout` seconds pass.

    A timeout below `HANG_S` is raised to it: callers name what they expect of an idle
    machine, and on a loaded one (CI, two cores running other suites) a daemon start or a
    pytest run can take many times that. A test never passes *because* a wait ran out."""
    timeout = max(timeout, HANG_S)
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
