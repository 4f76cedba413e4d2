"""The replay cache: a real SQLite store, the real pool and ModelClient, the fake OpenRouter counting
the requests it is sent, a real git repo (the ladder runs pytest on every answer), and a schedule
rule fired by an injected clock."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from ohd.core import views
from ohd.core.taskfile import TaskSpec
from ohd.core.tasktypes import Job
from ohd.intake.ingest import Ingestor
from ohd.intake.rules import RuleBook
from ohd.ladder import ladder
from ohd.models.llm import Completion, ModelClient
from ohd.service.metrics import collect, prometheus
from ohd.service.web.pages import task_page
from ohd.store.calls import CallHistory, calls_text, request_key
from ohd.store.history import History
from ohd.store.schema import TaskStatus
from ohd.store.store import Store
from ohd.work.worker import Pool
from tests.support.clock import FakeClock
from tests.support.databases import BACKENDS, store_on
from tests.support.fake_openrouter import FakeOpenRouter, ok
from tests.support.governed import GOOD

MODEL = "model-a"
PARAMS = {"base_url": "fake", "max_tokens": 4096, "temperature": 0.2}
NIGHTLY = "type: unit_test\ntarget: shop/pricing.py\nschedule: '0 3 * * *'\n"
BROKEN = "```python\ndef test_x(:\n    pass\n```"   # does not parse: rejected


@pytest.fixture
def server() -> Iterator[FakeOpenRouter]:
    with FakeOpenRouter() as fake:
        fake.default = ok(GOOD)
        yield fake


def run_pool(store: Store, server: FakeOpenRouter, clock: FakeClock, params: dict[str, Any] | None = None,
             calls: CallHistory | None = None) -> None:
    """A pool over a real httpx client to the fake server, run until no task is ready."""

    async def main() -> None:
        async with httpx.AsyncClient() as http:
            client = ModelClient(http, server.url, "sk-test", clock, retries=0)

            async def call(model: str, messages: list[dict[str, str]], timeout_s: float, job: Job) -> Completion:
                return await client.complete(model, messages, timeout_s)

            pool = Pool(store, call, clock, models=[MODEL], size=1, request_params=PARAMS if params is None else params,
                        calls=calls)
            await pool.run_until_idle()

    asyncio.run(main())


def submit(store: Store, repo: Path, clock: FakeClock, **fields: Any) -> int:
    spec = TaskSpec.model_validate({"type": "unit_test", "target": "shop/pricing.py", "models": [MODEL], **fields})
    return store.enqueue(str(repo), spec, clock.now())


def completed(store: Store, task_id: int) -> None:
    task = store.get_task(task_id)
    assert task.status == "completed", task.error


def fire(book: RuleBook, clock: FakeClock, hours: float) -> int:
    clock.advance(hours * 3600)
    [task_id] = book.due(clock.now())
    return task_id


def test_a_rule_firing_twice_on_an_unchanged_target_sends_no_second_request(
        repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    book = RuleBook(store, clock, timezone=UTC, grace=timedelta(hours=1))
    ingestor = Ingestor(store, clock, settle_s=0.1, on_rule=book.register)
    (repo / "tasks.d" / "nightly.yaml").write_text(NIGHTLY)
    ingestor.ingest_file(repo.resolve(), repo / "tasks.d" / "nightly.yaml")
    assert book.due(clock.now()) == []                   # registered at 12:00; it fires at 03:00

    first = fire(book, clock, 15)
    run_pool(store, server, clock)
    completed(store, first)
    assert len(server.completions()) == 1
    written = (repo / "tests" / "test_pricing.py").read_bytes()
    first_report = json.loads((repo / store.get_task(first).report_path).read_text())

    second = fire(book, clock, 24)                       # the next night: the target has not changed
    run_pool(store, server, clock)
    completed(store, second)
    assert len(server.completions()) == 1               # no request sent
    assert (repo / "tests" / "test_pricing.py").read_bytes() == written
    report = json.loads((repo / store.get_task(second).report_path).read_text())
    assert report["verdict"]["accepted"] and report["verdict"]["score"] == first_report["verdict"]["score"]
    [execution] = store.executions(second)
    assert (execution.outcome, execution.cached, execution.prompt_tokens, execution.cost) == ("accepted", True, 0, 0.0)

    # ohd show marks it; the calls say which call it replays
    shown = views.task_text(store.get_task(second).as_dict() | {"executions": [execution.as_dict()]})
    assert "accepted" in shown and "cached: replayed, no request sent" in shown
    calls = CallHistory(store.db).for_task(second)
    [original] = CallHistory(store.db).for_task(first)
    assert [c["replay_of"] for c in calls] == [original["id"]]
    assert "no request sent" in calls_text(calls)
    page = task_page(store.get_task(second).as_dict() | {"executions": [execution.as_dict()]}, calls, None)
    assert "accepted (cached: replayed, no request sent)" in page      # the dashboard's task page
    assert f"(replayed from call id {original['id']}: no request sent)" in page

    # no quota: the governor counted one request in all; today (the second night) no call, one saved
    assert store.m.model_request.select().count() == 1
    assert store.totals_today(clock.now())["calls"] == 0 and store.totals_today(clock.now())["saved"] == 1
    [row] = History(store.db, store.m).efficiency()
    assert (row.model, row.task_type, row.requests, row.accepted, row.saved) == (MODEL, "unit_test", 1, 2, 1)
    assert row.accepted_per_request == 2.0
    text = prometheus(collect(History(store.db, store.m), clock.now(), None))
    assert f'ohd_model_requests_saved_total{{model="{MODEL}",task_type="unit_test"}} 1.0' in text
    assert f'ohd_accepted_outputs_per_request{{model="{MODEL}",task_type="unit_test"}} 2.0' in text
    assert f'ohd_model_calls_total{{model="{MODEL}",outcome="accepted",task_type="unit_test"}} 1.0' in text


def test_an_edited_target_asks_again(repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    first = submit(store, repo, clock)
    run_pool(store, server, clock)
    completed(store, first)
    pricing = repo / "shop" / "pricing.py"
    pricing.write_text(pricing.read_text() + "\n\ndef double(x: float) -> float:\n    return 2 * x\n")
    second = submit(store, repo, clock)
    run_pool(store, server, clock)
    completed(store, second)
    assert len(server.completions()) == 2
    assert [e.cached for e in store.executions(second)] == [False]


def test_cache_false_asks_again(repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    first = submit(store, repo, clock)
    run_pool(store, server, clock)
    completed(store, first)
    second = submit(store, repo, clock, cache=False)
    run_pool(store, server, clock)
    completed(store, second)
    assert len(server.completions()) == 2
    assert [e.cached for e in store.executions(second)] == [False]


def test_other_request_parameters_ask_again(repo: Path, store: Store, server: FakeOpenRouter,
                                            clock: FakeClock) -> None:
    first = submit(store, repo, clock)
    run_pool(store, server, clock)
    completed(store, first)
    second = submit(store, repo, clock)
    run_pool(store, server, clock, params={**PARAMS, "temperature": 0.9})
    completed(store, second)
    assert len(server.completions()) == 2


def test_a_retried_rejected_task_asks_anew(repo: Path, store: Store, server: FakeOpenRouter,
                                           clock: FakeClock) -> None:
    server.script(MODEL, [ok(BROKEN)])                  # rejected, then (the default) a good answer
    task_id = submit(store, repo, clock, max_attempts=1)
    run_pool(store, server, clock)
    assert store.get_task(task_id).status == "failed"
    store.retry(task_id, clock.now())
    run_pool(store, server, clock)
    completed(store, task_id)
    assert len(server.completions()) == 2               # the same first prompt, asked anew
    assert [(e.outcome, e.cached) for e in store.executions(task_id)] == [("rejected", False), ("accepted", False)]


def test_an_answer_accepted_once_and_rejected_since_is_not_replayed(
        repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    """The key's newest verdict decides: a replay that the ladder rejects (the code changed under the
    same prompt: here the repo's conftest) blocks the key, and the next run asks the model."""
    first = submit(store, repo, clock)
    run_pool(store, server, clock)
    completed(store, first)
    (repo / "tests" / "test_pricing.py").unlink()        # the output gone: the prompt is the first run's
    (repo / "conftest.py").write_text("import shop.pricing\n\nshop.pricing.total = lambda xs: 0.0\n")
    second = submit(store, repo, clock, max_attempts=1)
    run_pool(store, server, clock)
    assert [(e.outcome, e.cached) for e in store.executions(second)] == [("rejected", True)]
    assert len(server.completions()) == 1
    (repo / "conftest.py").unlink()
    third = submit(store, repo, clock)
    run_pool(store, server, clock)
    completed(store, third)
    assert len(server.completions()) == 2
    assert [e.cached for e in store.executions(third)] == [False]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_key_lookup_and_the_figures_on_each_backend(backend: str, tmp_path: Path, clock: FakeClock) -> None:
    """The SQL of the cache (the newest verdict of a key decides) and of the efficiency figures, on
    SQLite and PostgreSQL."""
    messages = [{"role": "user", "content": "write tests"}]
    key = request_key(MODEL, messages, PARAMS)
    assert key == request_key(MODEL, [dict(m) for m in messages], dict(reversed(list(PARAMS.items()))))
    assert key != request_key("model-b", messages, PARAMS)
    with store_on(backend, tmp_path) as store:
        calls, now = CallHistory(store.db), clock.now()
        task_id = store.enqueue("/repo", TaskSpec.model_validate({"type": "unit_test", "target": "a.py"}), now)

        def answer(response: str, outcome: str, replay_of: int | None = None) -> None:
            calls.record(task_id, MODEL, now, messages, response, {"p": 1}, key=key, replay_of=replay_of)
            store.record_execution(task_id, 0, MODEL, now, now, 0 if replay_of else 10, 0 if replay_of else 5,
                                   0.0, outcome, counts=True, cached=replay_of is not None)

        calls.record(task_id, MODEL, now, messages, "unjudged", {"p": 1}, key=key)
        assert calls.replay(key) is None                   # no verdict yet
        store.finish(task_id, None, TaskStatus.FAILED, now)    # closes it unjudged
        answer("first", "accepted")
        found = calls.replay(key)
        assert found is not None and (found.model, found.response) == (MODEL, "first")
        answer("first", "accepted", replay_of=found.call_id)
        answer("first", "rejected", replay_of=found.call_id)
        assert calls.replay(key) is None                   # the newest verdict: rejected
        assert CallHistory(store.db, enabled=False).replay(key) is None
        [row] = History(store.db, store.m).efficiency()
        assert (row.requests, row.accepted, row.saved, row.accepted_per_request) == (1, 2, 2, 2.0)
        assert store.totals_today(now) == {"calls": 1, "prompt_tokens": 10, "completion_tokens": 5, "cost": 0.0,
                                           "saved": 2}
        [usage] = History(store.db, store.m).usage()        # replays are no calls
        assert (usage.outcome, usage.calls) == ("accepted", 1)
        assert History(store.db, store.m).measured("unit_test")[MODEL].calls == 1


class Killed(BaseException):
    """The process dying in the middle of a validation (nothing after it runs, as after kill -9)."""


def test_a_replay_whose_validation_a_crash_interrupted_is_judged_after_the_restart_and_stays_a_replay(
        repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """The crash-recovery path (README: Crash recovery) judges the replayed answer left pending, as it
    judges a model's: no request before, during or after the crash, and the execution is a replay."""
    first = submit(store, repo, clock)
    run_pool(store, server, clock)
    completed(store, first)
    judge = ladder.judge

    def dies(*args: object, **kwargs: object) -> object:
        raise Killed

    second = submit(store, repo, clock)
    monkeypatch.setattr(ladder, "judge", dies)
    with pytest.raises(Killed):
        run_pool(store, server, clock)
    assert store.executions(second) == [] and store.recover(clock.now()) == [second]
    monkeypatch.setattr(ladder, "judge", judge)
    run_pool(store, server, clock)
    completed(store, second)
    assert len(server.completions()) == 1
    assert [(e.outcome, e.cached, e.attempt) for e in store.executions(second)] == [("accepted", True, 1)]
    [row] = History(store.db, store.m).efficiency()
    assert (row.requests, row.saved) == (1, 1)


def test_a_rule_with_cache_false_asks_on_every_firing(repo: Path, store: Store, server: FakeOpenRouter,
                                                      clock: FakeClock) -> None:
    book = RuleBook(store, clock, timezone=UTC, grace=timedelta(hours=1))
    (repo / "tasks.d" / "nightly.yaml").write_text(NIGHTLY + "cache: false\n")
    Ingestor(store, clock, settle_s=0.1, on_rule=book.register).ingest_file(repo.resolve(),
                                                                            repo / "tasks.d" / "nightly.yaml")
    assert book.due(clock.now()) == []                   # registered at 12:00; it fires at 03:00
    for hours in (15, 24):
        task_id = fire(book, clock, hours)
        assert store.get_task(task_id).cache is False
        run_pool(store, server, clock)
        completed(store, task_id)
    assert len(server.completions()) == 2


@pytest.mark.parametrize("history", ["cut", "off"])
def test_an_answer_not_kept_whole_or_call_history_off_is_asked_for_again(
        history: str, repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    """A response cut at call_history_max_bytes keeps no key; with call_history off nothing is kept."""
    server.default = ok(GOOD + "\n\nNotes: " + "x" * 3000)   # over 1000 bytes: the cut keeps the code block whole
    calls = CallHistory(store.db, max_bytes=1000) if history == "cut" else CallHistory(store.db, enabled=False)
    for _ in range(2):
        task_id = submit(store, repo, clock)
        run_pool(store, server, clock, calls=calls)
        completed(store, task_id)
    assert len(server.completions()) == 2
