"""Time, in one place: the only module that reads the wall clock or sleeps.

Everything else asks the `Clock` it was given (or takes `now` as a parameter), so
tests drive time with a fake clock and need no sleeps. Wall-clock instants are
timezone-aware UTC datetimes.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current instant, timezone-aware UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (for durations)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` on this clock."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


async def first(clock: Clock, *events: asyncio.Event, timeout: float | None = None) -> None:
    """Return when any of `events` is set or, with `timeout`, once `timeout` seconds have passed on
    `clock`: the injected clock, so a fake one moves every loop alike. What was waited on is
    cancelled and awaited before this returns. Every loop of the daemon waits with this."""
    waiters: list[asyncio.Future[object]] = [asyncio.ensure_future(event.wait()) for event in events]
    if timeout is not None:
        waiters.append(asyncio.ensure_future(clock.sleep(timeout)))
    if not waiters:
        return
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


def pause(seconds: float) -> None:
    """Block this thread for `seconds`: for code that runs on threads, not in the event loop
    (the store's retries while another process holds the database's writer lock)."""
    time.sleep(max(0.0, seconds))
