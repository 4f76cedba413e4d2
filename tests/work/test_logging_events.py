"""Every task transition and every model request is logged once, with task_id (and model).

Real tasks through the real Pool, the real ModelClient and the fake OpenRouter server
(a real HTTP server on 127.0.0.1), a real SQLite store, the socket API over a real Unix
socket; the log is the daemon's own JSON-lines handler (`logfmt.setup`) at DEBUG, read
back and parsed. A transition line carries `status` (what the task became); a model
request's line carries `outcome`: each is counted against what really happened (the
store's transitions, the requests the server received).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from ohd import logfmt
from ohd.cli.client import Client
from ohd.clock import Clock, SystemClock
from ohd.core.tasktypes import Job
from ohd.intake.ingest import Ingestor
from ohd.models.llm import Completion, ModelClient, OfflineProvider
from ohd.service.server import ApiServer
from ohd.store.store import Store
from ohd.work.worker import Pool
from tests.support.clock import FakeClock
from tests.support.fake_openrouter import FakeOpenRouter, error, ok, rate_limited, server_error, slow
from tests.support.waiting import wait_for
from tests.support.governed import GOOD

KEY = "sk-or-v1-logging-events-0123456789"
TASK_FILE = "type: unit_test\ntarget: shop/pricing.py\noutput: tests/test_{n}.py\n"


@pytest.fixture
def log() -> Iterator[io.StringIO]:
    """The daemon's JSON handler on a buffer, at DEBUG (so a duplicate at any level is seen)."""
    root, httpx_log = logging.getLogger(), logging.getLogger("httpx")
    handlers, level, httpx_level = list(root.handlers), root.level, httpx_log.level
    out = io.StringIO()
    logfmt.setup("DEBUG", "json", [KEY], stream=out)
    yield out
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    httpx_log.setLevel(httpx_level)


@pytest.fixture
def server() -> Iterator[FakeOpenRouter]:
    with FakeOpenRouter() as fake:
        fake.default = ok(GOOD)
        yield fake


def records(log: io.StringIO) -> list[dict[str, Any]]:
    text = log.getvalue()
    assert KEY not in text
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert not [r for r in lines if r["level"] == "DEBUG" and ("status" in r or "outcome" in r)], \
        "transitions and requests are logged at the default level (INFO) or above"
    return lines


def calls(log: io.StringIO) -> list[tuple[str, str, int]]:
    """(model, outcome, task_id) of every model-request line, in order."""
    return [(r["model"], r["outcome"], r["task_id"]) for r in records(log) if "outcome" in r]


def other_request_lines(log: io.StringIO) -> list[str]:
    """Lines above DEBUG about a request that are not its one line (httpx's, a second note of a 429)."""
    return [r["message"] for r in records(log) if r["level"] != "DEBUG" and "outcome" not in r
            and "status" not in r and any(word in r["message"] for word in ("HTTP", "rate limit", "retry"))]


def transitions(log: io.StringIO, task_id: int) -> list[str]:
    return [r["status"] for r in records(log) if "status" in r and r.get("task_id") == task_id]


def requests(server: FakeOpenRouter) -> list[tuple[str | None, int]]:
    return [(r.model, r.status) for r in server.completions()]


def drop(repo: Path, store: Store, clock: Clock, n: int) -> int:
    """A task file dropped into tasks.d/ and ingested (as the daemon's watcher would)."""
    path = repo / "tasks.d" / f"t{n}.yaml"
    path.write_text(TASK_FILE.format(n=n))
    task_id = Ingestor(store, clock).ingest_file(repo, path)
    assert task_id is not None
    return task_id


def with_client(store: Store, server: FakeOpenRouter, clock: Clock, models: list[str],
                step: Callable[[Pool], Awaitable[None]] | None = None, *, retries: int = 0) -> None:
    """A pool over the real ModelClient on a fresh HTTP client, then `step(pool)` (default:
    run tasks until none is ready)."""

    async def main() -> None:
        async with httpx.AsyncClient() as http:
            client = ModelClient(http, server.url, KEY, clock, retries=retries)

            async def call(model: str, messages: list[dict[str, str]], timeout_s: float, job: Job) -> Completion:
                return await client.complete(model, messages, timeout_s)

            pool = Pool(store, call, clock, models=models, size=1)
            await (step(pool) if step is not None else pool.run_until_idle())

    asyncio.run(main())


def stop_mid_request(server: FakeOpenRouter, act: Callable[[], object]) -> Callable[[Pool], Awaitable[None]]:
    """Run the pool for real; once the server holds the request, `act()`, then stop the pool."""

    async def step(pool: Pool) -> None:
        stop = asyncio.Event()
        runner = asyncio.create_task(pool.run(stop, grace_s=0.05))
        await asyncio.to_thread(wait_for, lambda: server.completions(), 10.0, 0.01, "the request")
        await asyncio.to_thread(act)
        stop.set()
        await runner

    return step


def test_a_429_then_another_model_one_line_per_request_and_per_transition(
        repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock, log: io.StringIO) -> None:
    server.script("model-a", [rate_limited(retry_after=60)])
    first = drop(repo, store, clock, 1)
    with_client(store, server, clock, ["model-a", "model-b"])
    assert requests(server) == [("model-a", 429), ("model-b", 200)]
    assert calls(log) == [("model-a", "rate_limited", first), ("model-b", "ok", first)]
    assert other_request_lines(log) == []
    assert transitions(log, first) == ["queued", "running", "completed"]
    [limited, answered] = [r for r in records(log) if "outcome" in r]
    assert limited["logger"] == "ohd.llm" and "until 2026-01-01T12:01:00+00:00" in limited["message"]
    assert "100 prompt + 50 completion tokens" in answered["message"] and " ms" in answered["message"]
    [done] = [r for r in records(log) if r.get("status") == "completed"]
    assert "model=model-b" in done["message"] and "output=tests/test_1.py" in done["message"]
    assert store.get_task(first).status == "completed"


def test_each_tenacity_retry_is_its_own_line(repo: Path, store: Store, server: FakeOpenRouter,
                                             clock: FakeClock, log: io.StringIO) -> None:
    server.script("model-a", [server_error(502, "upstream fell over"), server_error(500)])
    task_id = drop(repo, store, clock, 1)
    with_client(store, server, clock, ["model-a"], retries=2)
    assert requests(server) == [("model-a", 502), ("model-a", 500), ("model-a", 200)]
    assert calls(log) == [("model-a", "server", task_id)] * 2 + [("model-a", "ok", task_id)]
    assert other_request_lines(log) == []
    messages = [r["message"] for r in records(log) if "outcome" in r]
    assert "upstream fell over" in messages[0] and "(retry 1)" in messages[1] and "(retry 2)" in messages[2]
    assert transitions(log, task_id) == ["queued", "running", "completed"]


def test_deferred_then_resumed_then_failed(repo: Path, store: Store, server: FakeOpenRouter,
                                           clock: FakeClock, log: io.StringIO) -> None:
    server.script("model-a", [rate_limited(retry_after=120), error(401, "No auth credentials found")])
    server.script("model-b", [rate_limited(retry_after=300)])
    task_id = drop(repo, store, clock, 1)
    with_client(store, server, clock, ["model-a", "model-b"])
    assert store.get_task(task_id).status == "pending"
    assert transitions(log, task_id) == ["queued", "running", "pending"]
    clock.advance(121)          # model-a may be asked again; the task is due
    with_client(store, server, clock, ["model-a", "model-b"])
    assert store.get_task(task_id).status == "failed"
    assert requests(server) == [("model-a", 429), ("model-b", 429), ("model-a", 401)]
    assert calls(log) == [("model-a", "rate_limited", task_id), ("model-b", "rate_limited", task_id),
                          ("model-a", "auth", task_id)]
    assert other_request_lines(log) == []
    assert transitions(log, task_id) == ["queued", "running", "pending", "queued", "running", "failed"]


def test_submit_cancel_and_retry_over_the_socket(repo: Path, store: Store, server: FakeOpenRouter,
                                                 clock: FakeClock, log: io.StringIO) -> None:
    sock = Path(os.environ["OHD_RUNTIME_DIR"]) / "ohd.sock"
    api = ApiServer(sock, store, repos=[repo], clock=clock, status=lambda: {}, wake=lambda: None,
                    models=lambda: [])
    api.start()
    try:
        client = Client(sock)
        body = {"type": "review", "target": "shop/pricing.py", "repo": str(repo)}
        kept = client.post("/tasks", body | {"output": "reviews/a.md"})["id"]
        dropped = client.post("/tasks", body | {"output": "reviews/b.md"})["id"]
        assert client.post(f"/tasks/{dropped}/cancel")["status"] == "cancelled"
        assert client.post(f"/tasks/{dropped}/retry")["status"] == "queued"
        assert client.post(f"/tasks/{dropped}/cancel")["status"] == "cancelled"
    finally:
        api.stop()
    server.default = ok("The pricing module is small and clear; `total` could check for negative prices.")
    with_client(store, server, clock, ["model-a"])
    assert transitions(log, kept) == ["queued", "running", store.get_task(kept).status]
    assert transitions(log, dropped) == ["queued", "cancelled", "queued", "cancelled"]
    assert calls(log) == [("model-a", "ok", kept)] * len(server.completions())
    assert len(server.completions()) == len(store.executions(kept)) >= 1


def test_a_stop_releases_the_running_task_and_logs_the_cut_request(
        repo: Path, store: Store, server: FakeOpenRouter, log: io.StringIO) -> None:
    clock = SystemClock()
    server.script("model-a", [slow(30.0)])     # answered only when the server stops
    task_id = drop(repo, store, clock, 1)
    with_client(store, server, clock, ["model-a"], stop_mid_request(server, lambda: None))
    assert store.get_task(task_id).status == "queued"
    assert requests(server) == [("model-a", 200)]
    assert calls(log) == [("model-a", "cancelled", task_id)]
    assert transitions(log, task_id) == ["queued", "running", "queued"]


def test_a_cancel_while_running_is_one_cancelled_line(
        repo: Path, store: Store, server: FakeOpenRouter, log: io.StringIO) -> None:
    clock = SystemClock()
    server.script("model-a", [slow(30.0)])
    task_id = drop(repo, store, clock, 1)

    def cancel_and_wait() -> None:
        store.cancel(task_id, clock.now())
        wait_for(lambda: store.get_task(task_id).status == "cancelled", 10.0, what="the worker to stop it")

    with_client(store, server, clock, ["model-a"], stop_mid_request(server, cancel_and_wait))
    assert requests(server) == [("model-a", 200)]
    assert calls(log) == [("model-a", "cancelled", task_id)]
    assert transitions(log, task_id) == ["queued", "running", "cancelled"]


def test_an_expired_lease_is_one_line_back_to_the_queue_or_cancelled(
        repo: Path, store: Store, clock: FakeClock, log: io.StringIO) -> None:
    back, cancelled = drop(repo, store, clock, 1), drop(repo, store, clock, 2)
    for _ in range(2):           # a worker that died holding both
        assert store.claim_next("w-dead", clock.now(), timedelta(seconds=60)) is not None
    store.cancel(cancelled, clock.now())
    clock.advance(61)
    assert store.reap(clock.now()) == [back, cancelled]
    assert store.reap(clock.now()) == []
    assert transitions(log, back) == ["queued", "queued"]
    assert transitions(log, cancelled) == ["queued", "cancelled"]


def test_the_offline_provider_logs_its_answer_like_a_request(repo: Path, store: Store, clock: FakeClock,
                                                             log: io.StringIO) -> None:
    offline = OfflineProvider(clock)
    task_id = drop(repo, store, clock, 1)

    async def call(model: str, messages: list[dict[str, str]], timeout_s: float, job: Job) -> Completion:
        return await offline.complete(model, messages, timeout_s, job)

    async def main() -> None:
        await Pool(store, call, clock, models=["offline"], size=1).run_until_idle()

    asyncio.run(main())
    executions = store.executions(task_id)
    assert calls(log) == [("offline", "ok", task_id)] * len(executions) and executions
    assert transitions(log, task_id) == ["queued", "running", store.get_task(task_id).status]
