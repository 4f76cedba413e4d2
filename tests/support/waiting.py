"""Bounded polling for real threads and processes (never a fixed sleep)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


HANG_S = 60.0    # the least time any wait gets: a bound on a hang, never a speed goal
MAX_PAUSE_S = 1.0   # the longest pause between two looks (a slow predicate's pause grows up to it)


def wait_for(predicate: Callable[[], T], timeout: float = HANG_S, interval: float = 0.02,
             what: str = "condition") -> T:
    """Poll `predicate` until it returns a truthy value or `timeout` seconds pass.

    A timeout below `HANG_S` is raised to it: callers name what they expect of an idle
    machine, and on a loaded one (CI, two cores running other suites) a daemon start or a
    pytest run can take many times that. A test never passes *because* a wait ran out.

    A slow predicate (an `ohd` command in its own process costs ~0.2 s of CPU) is looked at
    again only after twice the time it took, up to `MAX_PAUSE_S`: polled back to back it would
    keep a core busy and slow down the very daemon it waits for."""
    timeout = max(timeout, HANG_S)
    deadline = time.monotonic() + timeout
    while True:
        began = time.monotonic()
        value = predicate()
        if value:
            return value
        took = time.monotonic() - began
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(max(interval, min(2 * took, MAX_PAUSE_S)))
