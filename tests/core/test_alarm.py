"""alarm: one loop timer for the earliest instant asked for; the action may set it again."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from ohd.core.alarm import Alarm
from tests.support.clock import FakeClock


def test_the_alarm_keeps_the_earliest_instant_and_fires_once() -> None:
    clock = FakeClock()
    fired: list[str] = []

    async def main() -> None:
        async def action() -> None:
            fired.append("fired")

        alarm = Alarm(clock, action)
        alarm.set(clock.now() + timedelta(seconds=30))      # 30 s on the clock: too far for this test
        alarm.set(clock.now() + timedelta(milliseconds=20))  # earlier wins
        alarm.set(clock.now() + timedelta(seconds=60))      # later is ignored
        assert alarm.at == clock.now() + timedelta(milliseconds=20)
        for _ in range(200):
            if fired:
                break
            await asyncio.sleep(0.01)
        assert alarm.at is None

    asyncio.run(main())
    assert fired == ["fired"]


def test_a_cancelled_alarm_does_not_fire_and_an_instant_in_the_past_fires_at_once() -> None:
    clock = FakeClock()
    fired: list[int] = []

    async def main() -> None:
        async def action() -> None:
            fired.append(len(fired))

        alarm = Alarm(clock, action)
        alarm.set(clock.now() + timedelta(milliseconds=10))
        alarm.cancel()
        await asyncio.sleep(0.05)
        assert fired == []
        alarm.set(clock.now() - timedelta(seconds=5))
        for _ in range(200):
            if fired:
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert fired == [0]
