"""`clock.first`, the one wait of every daemon loop: events or a timeout on the injected clock."""

from __future__ import annotations

import asyncio

from ohd.clock import SystemClock, first
from tests.support.clock import FakeClock


def test_the_timeout_passes_on_the_injected_clock() -> None:
    """A fake clock moves the wait (it returns at once, the clock 30 s later), as it moves every loop."""
    clock = FakeClock()

    async def scenario() -> float:
        started = clock.monotonic()
        await asyncio.wait_for(first(clock, asyncio.Event(), timeout=30.0), timeout=5)
        return clock.monotonic() - started

    assert asyncio.run(scenario()) == 30.0 and clock.slept == [30.0]


def test_an_event_ends_the_wait_and_nothing_waits_on_afterwards() -> None:
    clock = SystemClock()

    async def scenario() -> set[asyncio.Task[object]]:
        stop, wakeup = asyncio.Event(), asyncio.Event()
        asyncio.get_running_loop().call_later(0.05, wakeup.set)
        await asyncio.wait_for(first(clock, stop, wakeup, timeout=600.0), timeout=30)
        assert wakeup.is_set() and not stop.is_set()
        return asyncio.all_tasks() - {asyncio.current_task()}   # the other waiters and the sleep: gone

    assert asyncio.run(scenario()) == set()


def test_an_event_already_set_returns_without_sleeping() -> None:
    clock = FakeClock()

    async def scenario() -> None:
        stop = asyncio.Event()
        stop.set()
        await first(clock, stop)
        await first(clock)          # nothing to wait for: returns

    asyncio.run(scenario())
    assert clock.slept == []
