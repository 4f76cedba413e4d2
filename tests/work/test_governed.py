"""One governed request (`governed_call`): the real pool's governor on a real SQLite store, the real
ModelClient against the fake OpenRouter; what a task's call does around a request, for an agent's."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest

from ohd.core.routing import Policy
from ohd.errors import BadRequest, ModelGone, RateLimited
from ohd.models.llm import Completion
from ohd.service import metrics
from ohd.store.history import History
from ohd.store.quotas import Governor
from ohd.store.store import Store
from ohd.work.governed import governed_call
from tests.support.clock import FakeClock
from tests.support.fake_openrouter import FakeOpenRouter, dropped, error, not_found, ok
from tests.support.proxied import HELLO, KEY, Rig

A, B = "vendor/model-a", "vendor/model-b"


@pytest.fixture
def server() -> Iterator[FakeOpenRouter]:
    with FakeOpenRouter(api_key=KEY, models=[A, B]) as fake:
        yield fake


def ask(store: Store, server: FakeOpenRouter, clock: FakeClock, n: int = 1, *, candidates: list[str] | None = None,
        messages: list[dict[str, Any]] | None = None, **options: Any) -> list[Completion | Exception]:
    """`n` governed requests in a row for one task; each one's answer or the ModelError it raised."""
    found: list[Completion | Exception] = []

    async def scenario(rig: Rig) -> None:
        for _ in range(n):
            try:
                found.append(await governed_call(rig.pool, rig.task, candidates or [A, B], messages or HELLO,
                                                 {"model": "gpt-4o"}, 30.0))
            except (ModelGone, RateLimited, BadRequest) as exc:
                found.append(exc)

    drive(store, server, clock, scenario, **options)
    return found


def drive(store: Store, server: FakeOpenRouter, clock: FakeClock, scenario: Callable[[Rig], Awaitable[None]],
          **options: Any) -> None:
    async def main() -> None:
        async with Rig(store, server, clock, [A, B], **options) as rig:
            await scenario(rig)

    asyncio.run(main())


def answered_by(found: Completion | Exception) -> str:
    assert isinstance(found, Completion), found
    return found.answered_by


def test_a_dropped_connection_opens_the_breaker_and_the_next_model_answers(store: Store, server: FakeOpenRouter,
                                                                          clock: FakeClock) -> None:
    server.script(A, [dropped()])
    [found] = ask(store, server, clock)
    assert answered_by(found) == B
    governor = Governor(store)
    assert governor.breaker_open(A, clock.now())
    assert governor.requests_today(clock.now()) == 2     # the dropped request was sent: it counts
    assert [(e.model, e.outcome, e.error_class) for e in store.executions(1)] == [
        (A, "error", "unreachable"), (B, "agent_request", None)]


def test_a_gone_model_is_marked_dead_and_the_next_answers(store: Store, server: FakeOpenRouter,
                                                          clock: FakeClock) -> None:
    server.script(A, [not_found()])
    found = ask(store, server, clock, 2)
    assert [answered_by(f) for f in found] == [B, B]     # A is not asked again: it is dead in the store
    assert Governor(store).dead_models() == [A]
    assert [r.model for r in server.completions()] == [A, B, B]


def test_every_candidate_gone_ends_the_request(store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    server.script(A, [not_found()])
    server.script(B, [not_found()])
    first, second = ask(store, server, clock, 2)
    assert isinstance(first, ModelGone) and isinstance(second, ModelGone)
    assert len(server.completions()) == 2                # the second request asked nobody


def test_a_bad_request_is_not_sent_to_the_next_model(store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    server.script(A, [error(400, "unknown parameter")])
    [found] = ask(store, server, clock)
    assert isinstance(found, BadRequest)
    assert [r.model for r in server.completions()] == [A]


def test_a_slot_within_hold_is_waited_for_on_the_clock_a_later_one_is_raised(store: Store, server: FakeOpenRouter,
                                                                             clock: FakeClock) -> None:
    policy = Policy(free_rpm=None, free_rpd=None, rpm={A: 1})
    started = clock.now()
    found = ask(store, server, clock, 2, candidates=[A], policy=policy, hold_s=120.0)
    assert [answered_by(f) for f in found] == [A, A]
    assert clock.slept and 59 <= sum(clock.slept) <= 120     # waited in place for the next minute's slot
    waited_until = clock.now()
    assert waited_until - started >= timedelta(seconds=59)
    [over] = ask(store, server, clock, 1, candidates=[A], policy=policy, hold_s=1.0)
    assert isinstance(over, RateLimited)
    assert over.reset_at > clock.now() and over.reset_at - clock.now() <= timedelta(seconds=61)
    assert len(server.completions()) == 2


def test_agent_requests_are_in_the_call_history_and_the_metrics(store: Store, server: FakeOpenRouter,
                                                                clock: FakeClock) -> None:
    server.script(A, [ok("one", prompt_tokens=10, completion_tokens=2, cost=0.5)])
    parts = [{"role": "user", "content": [{"type": "text", "text": "first "}, {"type": "text", "text": "second"}]}]
    [found] = ask(store, server, clock, messages=parts)
    assert answered_by(found) == A
    assert server.completions()[0].body["messages"] == [{"role": "user", "content": "first second"}]
    snapshot = metrics.collect(History(store.db, store.m), clock.now(), 1.0)
    stats = snapshot.model(A)
    assert stats is not None
    data = stats.stats.as_dict()
    assert (data["calls"], data["agent_requests"], data["accepted"], data["success_rate"]) == (1, 1, 0, None)
    assert data["latency_p50_ms"] is not None and data["cost"] == 0.5
    assert 'ohd_model_calls_total{model="vendor/model-a",outcome="agent_request",task_type="unit_test"} 1.0' in (
        metrics.prometheus(snapshot))
    [execution] = store.executions(1)
    assert (execution.outcome, execution.attempt, store.get_task(1).attempts) == ("agent_request", 1, 0)
