"""An alarm on the event loop: run an action once at the earliest wall-clock instant asked for.

Used by the pool to wake itself exactly when a deferred task becomes due, instead of
finding out at the next periodic poll. Invariant: at most one timer is armed, for the
earliest instant set since it last fired; the delay is measured on the injected
`Clock`, and the action runs as a task on the loop (it may set the alarm again).
Call `set` and `cancel` on the loop thread only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime

from ohd.clock import Clock


class Alarm:
    def __init__(self, clock: Clock, action: Callable[[], Awaitable[None]]) -> None:
        self.clock = clock
        self.action = action
        self.at: datetime | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._jobs: set[asyncio.Task[None]] = set()

    def set(self, at: datetime) -> None:
        """Fire at `at`, unless the alarm is already set for that instant or earlier."""
        if self.at is not None and self.at <= at:
            return
        self.cancel()
        self.at = at
        delay = max(0.0, (at - self.clock.now()).total_seconds())
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.at = None

    def _fire(self) -> None:
        self._timer = self.at = None
        job = asyncio.ensure_future(self.action())
        self._jobs.add(job)               # keep a reference until it finishes
        job.add_done_callback(self._jobs.discard)
