"""The governor in the pool: rotation on 429, deferral, retries, the breaker, restarts, pacing.

A real SQLite store, the real ModelClient and the fake OpenRouter server; time is a
FakeClock (tenacity and in-place waits sleep on it), except for the one test that
proves the pool wakes itself at a deferred task's instant.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from ohd.clock import Clock, SystemClock
from ohd.core.routing import Health, Policy
from ohd.core.taskfile import TaskSpec
from ohd.core.tasktypes import Job
from ohd.errors import RateLimited
from ohd.models.llm import Completion, ModelClient
from ohd.store.quotas import Governor
from ohd.store.store import Store
from ohd.work.worker import Pool, pace_retries
from tests.support.clock import FakeClock
from tests.support.databases import open_store
from tests.support.fake_openrouter import FakeOpenRouter, ok, rate_limited, server_error
from tests.support.governed import GOOD, STATIC_ONLY

S = timedelta(seconds=1)
AB = ["model-a", "model-b"]


@pytest.fixture
def server() -> Iterator[FakeOpenRouter]:
    with FakeOpenRouter() as fake:
        fake.default = ok(GOOD)
        yield fake


def submit(store: Store, repo: Path, clock: Clock, n: int = 1, **fields: Any) -> list[int]:
    """`n` like tasks; `cache: false`: each is a request (these tests count requests per model)."""
    return [store.enqueue(str(repo), TaskSpec.model_validate(
        {"type": "unit_test", "target": "shop/pricing.py", "output": f"tests/test_g{store.counts()['queued']}_{i}.py",
         "cache": False, **fields}), clock.now()) for i in range(n)]


def run(store: Store, server: FakeOpenRouter, clock: Clock, models: list[str], *, policy: Policy | None = None,
        retries: int = 0, forever: int = 0, hold_s: float = 1.0) -> Pool:
    """A fresh pool (as after a restart) stepped until idle, or run for real until `forever` tasks end."""

    async def main() -> Pool:
        async with httpx.AsyncClient() as http:
            client = ModelClient(http, server.url, "sk-test", clock, retries=retries)

            async def call(model: str, messages: list[dict[str, str]], timeout_s: float, job: Job) -> Completion:
                return await client.complete(model, messages, timeout_s)

            pool = Pool(store, call, clock, models=models, size=2, policy=policy, hold_s=hold_s,
                        ladder=STATIC_ONLY)
            if forever:
                await _run_until(pool, store, forever)
            else:
                await pool.run_until_idle()
            return pool

    return asyncio.run(main())


async def _run_until(pool: Pool, store: Store, finished: int) -> None:
    stop = asyncio.Event()
    runner = asyncio.create_task(pool.run(stop, grace_s=5))
    deadline = time.monotonic() + 120     # a bound on a hang, not a speed goal: the ladder runs pytest
    while time.monotonic() < deadline:
        counts = await asyncio.to_thread(store.counts)
        if counts["completed"] + counts["failed"] >= finished:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await runner


def models_used(store: Store, task_id: int) -> list[tuple[str, str]]:
    return [(e.model, e.outcome) for e in store.executions(task_id)]


def test_a_429_moves_the_task_to_b_and_a_gets_nothing_before_its_reset(
        repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    server.script("model-a", [rate_limited(retry_after=60)])
    [first] = submit(store, repo, clock)
    run(store, server, clock, AB)
    task = store.get_task(first)
    assert task.status == "completed" and task.attempts == 1
    assert models_used(store, first) == [("model-a", "rate_limited"), ("model-b", "accepted")]

    clock.advance(59)
    [second] = submit(store, repo, clock)
    run(store, server, clock, AB)
    assert store.get_task(second).status == "completed"
    assert len(server.requests_for("model-a")) == 1          # still cooling: nothing sent to A

    clock.advance(1)
    [third] = submit(store, repo, clock)
    run(store, server, clock, AB)
    assert models_used(store, third) == [("model-a", "accepted")]


def test_every_model_429_defers_the_task_and_it_completes_after_the_reset(
        repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    server.script("model-a", [rate_limited(retry_after=120)])
    server.script("model-b", [rate_limited(retry_after=30)])
    start = clock.now()
    [task_id] = submit(store, repo, clock)
    run(store, server, clock, AB)
    task = store.get_task(task_id)
    assert task.status == "pending" and task.attempts == 0 and task.not_before == start + 30 * S

    clock.advance(29)
    run(store, server, clock, AB)
    assert store.get_task(task_id).status == "pending" and len(server.completions()) == 2

    clock.advance(1)
    run(store, server, clock, AB)
    assert store.get_task(task_id).status == "completed"
    assert models_used(store, task_id)[-1] == ("model-b", "accepted")


def test_5xx_twice_then_success_is_retried_on_the_same_model(
        repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    server.script("model-a", [server_error(502), server_error(503)])
    [task_id] = submit(store, repo, clock)
    pool = run(store, server, clock, AB, retries=2)
    task = store.get_task(task_id)
    assert task.status == "completed" and task.attempts == 1
    assert len(server.requests_for("model-a")) == 3 and server.requests_for("model-b") == []
    assert len(clock.slept) >= 2                               # tenacity's backoff, on the injected clock
    assert pool.governor.state("model-a").failures == 0


def test_the_breaker_opens_after_repeated_failures_and_half_opens_after_the_reset(
        repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    policy = Policy(breaker_failures=2, breaker_reset=60 * S)
    server.script("model-a", [server_error(500), server_error(500)])
    for _ in range(2):
        [task_id] = submit(store, repo, clock)
        run(store, server, clock, AB, policy=policy)
        assert models_used(store, task_id) == [("model-a", "error"), ("model-b", "accepted")]
    pool = run(store, server, clock, AB, policy=policy)
    assert pool.model_states()[0]["state"] == Health.OPEN.value

    [while_open] = submit(store, repo, clock)
    run(store, server, clock, AB, policy=policy)
    assert models_used(store, while_open) == [("model-b", "accepted")]
    assert len(server.requests_for("model-a")) == 2

    clock.advance(60)
    [probe] = submit(store, repo, clock)
    pool = run(store, server, clock, AB, policy=policy)
    assert models_used(store, probe) == [("model-a", "accepted")]
    assert pool.model_states()[0]["state"] == Health.READY.value


def test_cooldowns_and_counters_survive_a_restart(repo: Path, db_path: Path, server: FakeOpenRouter,
                                                  clock: FakeClock) -> None:
    policy = Policy(rpm={"model-b": 1})
    server.script("model-a", [rate_limited(retry_after=120)])
    first = open_store(db_path)
    start = clock.now()
    [done] = submit(first, repo, clock)
    run(first, server, clock, AB, policy=policy)
    assert first.get_task(done).status == "completed"
    first.close()

    again = open_store(db_path)                                # a new daemon on the same file
    [waiting] = submit(again, repo, clock)
    pool = run(again, server, clock, AB, policy=policy)
    task = again.get_task(waiting)
    assert task.status == "pending" and len(server.completions()) == 2
    assert task.not_before == start + policy.window + policy.margin
    states = {s["id"]: s for s in pool.model_states()}
    assert states["model-a"]["state"] == "cooldown" and states["model-b"]["requests_left_minute"] == 0
    again.close()


def test_quota_pacing_sends_exactly_the_limit_and_defers_the_rest_with_no_429(
        repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    server.rate_limit(3)
    policy = Policy(rpm={"m": 3})
    ids = submit(store, repo, clock, n=5)
    start = clock.now()
    run(store, server, clock, ["m"], policy=policy)
    assert [r.status for r in server.completions()] == [200, 200, 200]
    statuses = [store.get_task(i).status for i in ids]
    assert statuses.count("completed") == 3 and statuses.count("pending") == 2
    assert {store.get_task(i).not_before for i in ids if store.get_task(i).status == "pending"} == {
        start + policy.window + policy.margin}

    clock.advance(61)
    server.rate_limit(3)                                       # the server's own window passed too
    run(store, server, clock, ["m"], policy=policy)
    assert all(store.get_task(i).status == "completed" for i in ids)
    assert [r.status for r in server.completions()] == [200] * 5


def test_a_learned_limit_paces_the_next_requests(repo: Path, store: Store, server: FakeOpenRouter,
                                                 clock: FakeClock) -> None:
    server.rate_limit(2)
    ids = submit(store, repo, clock, n=4)
    run(store, server, clock, ["m"])
    assert [r.status for r in server.completions()] == [200, 200, 429]     # one 429 teaches the limit
    assert store.get_task(ids[3]).status == "pending"
    pool = run(store, server, clock, ["m"])
    assert pool.model_states()[0]["rpm_limit"] == 2 and len(server.completions()) == 3


def test_the_pool_wakes_itself_at_the_deferral_instant(repo: Path, store: Store, server: FakeOpenRouter) -> None:
    """Real clock: a 1 s cooldown on the only model; no housekeeping runs, the pool's timer does."""
    clock = SystemClock()
    server.script("m", [rate_limited(retry_after=1)])
    [task_id] = submit(store, repo, clock)
    run(store, server, clock, ["m"], forever=1, hold_s=0.0)
    task = store.get_task(task_id)
    assert task.status == "completed"
    assert task.finished_at is not None
    first, second = server.completions()
    assert [first.status, second.status] == [429, 200]
    # Nothing else promotes a pending task here, so without the pool's timer there is no
    # second request at all (the run ends at its 120 s bound with one). The gap is at least
    # the cooldown; its upper end depends on the machine's load, so it is only a bound on a
    # hang far below the next thing that could promote it (a 60 s lease), never a speed goal.
    assert 1.0 <= second.at - first.at < 30.0



def test_headerless_429s_in_flight_together_do_not_grow_the_cooldown_but_a_later_repeat_does(
        server: FakeOpenRouter, clock: FakeClock) -> None:
    server.script("m", [rate_limited(), rate_limited(), rate_limited(), rate_limited()])

    async def main() -> list[timedelta]:
        async with httpx.AsyncClient() as http:
            client = ModelClient(http, server.url, "sk-test", clock, retries=0)

            async def ask() -> timedelta:
                try:
                    await client.complete("m", [{"role": "user", "content": "hi"}], 5)
                except RateLimited as exc:
                    return exc.reset_at - clock.now()
                raise AssertionError("expected a 429")

            together = await asyncio.gather(ask(), ask(), ask())    # in flight at the same time
            return [*together, await ask()]                        # sent after they came back

    assert asyncio.run(main()) == [60 * S, 60 * S, 60 * S, 120 * S]


def test_retries_inside_one_call_are_paced_too(repo: Path, store: Store, server: FakeOpenRouter,
                                               clock: FakeClock) -> None:
    """A 5xx retry is one more request: with 2/min left for A, the second retry is not sent."""
    server.script("model-a", [server_error(500), server_error(500)])
    policy = Policy(rpm={"model-a": 2})
    [task_id] = submit(store, repo, clock)

    async def main() -> None:
        async with httpx.AsyncClient() as http:
            governor = Governor(store, policy)      # as the daemon wires them: one governor for both
            client = ModelClient(http, server.url, "sk-test", clock, retries=2,
                                 before_retry=pace_retries(governor, clock))

            async def call(model: str, messages: list[dict[str, str]], timeout_s: float, job: Job) -> Completion:
                return await client.complete(model, messages, timeout_s)

            await Pool(store, call, clock, models=AB, governor=governor, ladder=STATIC_ONLY).run_until_idle()

    asyncio.run(main())
    assert store.get_task(task_id).status == "completed"
    assert [r.status for r in server.requests_for("model-a")] == [500, 500]
    assert models_used(store, task_id) == [("model-a", "rate_limited"), ("model-b", "accepted")]
