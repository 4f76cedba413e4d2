"""The pool against a real SQLite store, the real ModelClient and the fake OpenRouter server."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from ohd.clock import SystemClock
from ohd.core import views
from ohd.core.routing import Policy
from ohd.core.taskfile import TaskSpec
from ohd.core.tasktypes import Job
from ohd.ladder import ladder
from ohd.models.llm import Completion, ModelClient
from ohd.store.fleet import worker_prefix
from ohd.store.quotas import Governor
from ohd.store.store import Store
from ohd.work.worker import Pool, pace_retries
from tests.support.clock import FakeClock
from tests.support.databases import BACKENDS, store_on
from tests.support.fake_openrouter import (
    FakeOpenRouter,
    error,
    garbage,
    not_found,
    ok,
    rate_limited,
    server_error,
    slow,
)
from tests.support.governed import GOOD, STATIC_ONLY
from tests.support.waiting import wait_for

BROKEN = "```python\ndef test_x(:\n    pass\n```"


@pytest.fixture
def server() -> Iterator[FakeOpenRouter]:
    with FakeOpenRouter() as fake:
        fake.default = ok(GOOD)
        yield fake


def spec(**fields: Any) -> TaskSpec:
    return TaskSpec.model_validate({"type": "unit_test", "target": "shop/pricing.py", **fields})


def run_pool(store: Store, server: FakeOpenRouter | str, clock: Any, models: list[str], size: int = 1,
             until_idle: bool = True, stop_after: int = 0, retries: int = 0,
             judged: ladder.Ladder | None = None) -> Pool:
    """Build a pool over a real httpx client (to the server, or a base URL) and run it until no task is ready;
    `judged`: its ladder (default: the real one, pytest runs included)."""

    async def main() -> Pool:
        async with httpx.AsyncClient() as http:
            url = server if isinstance(server, str) else server.url
            client = ModelClient(http, url, "sk-test", clock, retries=retries)

            async def call(model: str, messages: list[dict[str, str]], timeout_s: float, job: Job) -> Completion:
                return await client.complete(model, messages, timeout_s)

            pool = Pool(store, call, clock, models=models, size=size, ladder=judged)
            if until_idle:
                await pool.run_until_idle()
            else:
                await _run_until_done(pool, store, stop_after)
            return pool

    return asyncio.run(main())


async def _run_until_done(pool: Pool, store: Store, expected: int) -> None:
    stop = asyncio.Event()
    runner = asyncio.create_task(pool.run(stop, grace_s=5))
    deadline = time.monotonic() + 600   # generous: each task runs pytest, on a loaded machine
    while time.monotonic() < deadline:
        counts = store.counts()
        if counts["completed"] + counts["failed"] >= expected:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await runner


def test_priority_order_then_fifo_with_one_worker(repo: Path, store: Store, server: FakeOpenRouter,
                                                  clock: FakeClock) -> None:
    for name, priority in (("low-1", "low"), ("high-1", "high"), ("normal-1", "normal"),
                           ("high-2", "high"), ("critical-1", "critical")):
        store.enqueue(str(repo), spec(priority=priority, description=name, output=f"tests/test_{name[:3]}{name[-1]}.py"),
                      clock.now())
    run_pool(store, server, clock, ["m"], judged=STATIC_ONLY)
    order = [_description(r.body) for r in server.completions()]
    assert order == ["critical-1", "high-1", "high-2", "normal-1", "low-1"]


def _description(body: Any) -> str:
    text = " ".join(m["content"] for m in body["messages"])
    for name in ("critical-1", "high-1", "high-2", "normal-1", "low-1"):
        if name in text:
            return name
    raise AssertionError("no description in the prompt")


def test_accepted_answer_is_written_with_report_and_execution(repo: Path, store: Store,
                                                              server: FakeOpenRouter, clock: FakeClock) -> None:
    task_id = store.enqueue(str(repo), spec(), clock.now())
    run_pool(store, server, clock, ["model-a"])
    task = store.get_task(task_id)
    assert task.status == "completed", task.error
    assert task.output_path == "tests/test_pricing.py"
    assert "from shop.pricing import total" in (repo / "tests" / "test_pricing.py").read_text()
    report = json.loads((repo / task.report_path).read_text())
    assert report["decision"] == "written" and report["verdict"]["accepted"]
    assert report["task"]["status"] == "completed"
    [execution] = store.executions(task_id)
    assert (execution.model, execution.outcome, execution.prompt_tokens) == ("model-a", "accepted", 100)


SLOW_TESTS = GOOD.replace("def test_total_sums() -> None:\n",
                          "def test_total_sums() -> None:\n    import time\n    time.sleep(1.5)\n")


def test_an_answer_records_the_calls_own_latency_and_the_validation_time_beside_it(
        repo: Path, store: Store, server: FakeOpenRouter) -> None:
    server.latency_s = 0.3                 # the model answers in 300 ms; its tests take 2 x 1.5 s to run
    server.default = ok(SLOW_TESTS)
    task_id = store.enqueue(str(repo), spec(), SystemClock().now())
    run_pool(store, server, SystemClock(), ["model-a"])
    assert store.get_task(task_id).status == "completed", store.get_task(task_id).error
    [execution] = store.executions(task_id)
    assert execution.validation_ms is not None and execution.validation_ms >= 3000
    assert 300 <= execution.latency_ms < execution.validation_ms
    line = views.task_text(store.get_task(task_id).as_dict() | {"executions": [execution.as_dict()]})
    assert f"{execution.latency_ms} ms" in line and f"validated in {execution.validation_ms} ms" in line


def closed_port() -> int:
    """A port nothing listens on (connections to it are refused) until a server binds it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.timeout(900)   # 10 pytest runs of the ladder: 13 s here, over 180 s at load 30
def test_a_model_server_that_is_down_loses_no_task_and_they_resume_once_it_answers(
        repo: Path, store: Store, clock: FakeClock) -> None:
    port = closed_port()
    ids = [store.enqueue(str(repo), spec(output=f"tests/test_down{i}.py"), clock.now()) for i in range(5)]
    pool = run_pool(store, f"http://127.0.0.1:{port}/api/v1", clock, ["model-a", "model-b"], retries=2,
                    judged=STATIC_ONLY)
    tasks = [store.get_task(i) for i in ids]        # more tasks than breaker_failures (3): none failed
    assert [t.status for t in tasks] == ["pending"] * 5, [t.error for t in tasks]
    assert all(t.attempts == 0 and "waiting for the model server" in (t.error or "")
               and "Connection refused" in (t.error or "") for t in tasks), tasks[0].error
    assert [view.left_today for view in pool.governor.views(["model-a:free"], clock.now())] == [50]
    assert pool.governor.request.select().count() == 0, "a refused connection is no request against a quota"
    with FakeOpenRouter(port=port) as server:
        server.default = ok(GOOD)
        clock.advance(pool.governor.policy.breaker_reset.total_seconds())   # the probe is due
        run_pool(store, server, clock, ["model-a", "model-b"], judged=STATIC_ONLY)
        assert [store.get_task(i).status for i in ids] == ["completed"] * 5
        assert [store.get_task(i).attempts for i in ids] == [1] * 5
        assert len(server.completions()) == 5       # one probe, then the others at once


def test_a_probe_that_gets_an_answer_resumes_the_tasks_waiting_for_that_server_at_once(
        repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    waiting = store.enqueue(str(repo), spec(output="tests/test_wait.py"), clock.now())
    claim = store.claim_next("w-other", clock.now(), timedelta(seconds=60))
    assert claim is not None and claim.task.id == waiting      # deferred behind the probe of another task
    store.defer(waiting, "w-other", clock.now() + timedelta(seconds=60), clock.now(), "waiting for the probe")
    Governor(store).unreachable("model-a", clock.now() - timedelta(seconds=60), "Connection refused")  # half-open
    probe = store.enqueue(str(repo), spec(output="tests/test_probe.py"), clock.now())
    run_pool(store, server, clock, ["model-a"], judged=STATIC_ONLY)         # the clock does not move
    assert [store.get_task(i).status for i in (probe, waiting)] == ["completed", "completed"]
    assert len(server.completions()) == 2


def test_a_newer_task_does_not_take_the_slot_that_older_pending_tasks_wait_for(
        repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    def task(name: str) -> int:
        return store.enqueue(str(repo), spec(description=name, output=f"tests/test_{name}.py"), clock.now())

    async def main(steps: list[float]) -> None:
        async with httpx.AsyncClient() as http:
            client = ModelClient(http, server.url, "sk-test", clock, retries=0)

            async def call(model: str, messages: list[dict[str, str]], timeout_s: float, job: Job) -> Completion:
                return await client.complete(model, messages, timeout_s)

            pool = Pool(store, call, clock, models=["m"], size=1, policy=Policy(rpm={"m": 1}), ladder=STATIC_ONLY)
            for step in steps:
                clock.advance(step)
                if step == 59.5:
                    task("fourth")          # arrives a moment before the slot the others wait for frees
                await pool.run_until_idle()

    for name in ("first", "second", "third"):
        task(name)
    asyncio.run(main([0.0, 59.5, 5.0]))
    names = [_named(r.body) for r in server.completions()]
    assert names == ["first", "second"], names


def _named(body: Any) -> str:
    text = " ".join(m["content"] for m in body["messages"])
    return next(name for name in ("first", "second", "third", "fourth") if name in text)


def test_429_moves_to_the_next_model_without_spending_an_attempt(repo: Path, store: Store,
                                                                 server: FakeOpenRouter, clock: FakeClock) -> None:
    server.script("model-a", [rate_limited(retry_after=60)])
    task_id = store.enqueue(str(repo), spec(), clock.now())
    pool = run_pool(store, server, clock, ["model-a", "model-b"])
    task = store.get_task(task_id)
    assert task.status == "completed" and task.attempts == 1
    assert [e.outcome for e in store.executions(task_id)] == ["rate_limited", "accepted"]
    assert pool.governor.state("model-a").cooldown_until == clock.now() + timedelta(seconds=60)


def test_every_model_cooling_defers_the_task_until_the_earliest_reset(repo: Path, store: Store,
                                                                      server: FakeOpenRouter,
                                                                      clock: FakeClock) -> None:
    server.script("model-a", [rate_limited(retry_after=120)])
    server.script("model-b", [rate_limited(retry_after=30)])
    task_id = store.enqueue(str(repo), spec(), clock.now())
    start = clock.now()
    run_pool(store, server, clock, ["model-a", "model-b"])
    task = store.get_task(task_id)
    assert task.status == "pending" and task.attempts == 0
    assert task.not_before == start + timedelta(seconds=30)


def test_a_rejected_answer_feeds_the_next_attempt_and_failing_all_attempts_fails(
        repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    server.default = ok(BROKEN)
    task_id = store.enqueue(str(repo), spec(max_attempts=2), clock.now())
    run_pool(store, server, clock, ["m"])
    task = store.get_task(task_id)
    assert task.status == "failed" and task.attempts == 2
    assert "valid_python" in (task.error or "") or "syntax" in (task.error or "").lower()
    second_prompt = server.completions()[1].body["messages"][-1]["content"]
    assert "line" in second_prompt.lower() and "previous" in second_prompt.lower()
    assert not (repo / "tests" / "test_pricing.py").exists()
    assert json.loads((repo / task.report_path).read_text())["decision"] == "rejected"


def test_a_garbled_answer_costs_an_attempt_then_the_next_one_is_used(repo: Path, store: Store,
                                                                     server: FakeOpenRouter,
                                                                     clock: FakeClock) -> None:
    server.script("m", [ok("I cannot help with that."), garbage()])
    task_id = store.enqueue(str(repo), spec(max_attempts=3), clock.now())
    run_pool(store, server, clock, ["m"])
    task = store.get_task(task_id)
    assert task.status == "completed" and task.attempts == 3
    assert [e.outcome for e in store.executions(task_id)] == ["malformed", "malformed", "accepted"]


def test_a_file_the_user_edited_is_not_overwritten(repo: Path, store: Store, server: FakeOpenRouter,
                                                   clock: FakeClock) -> None:
    mine = repo / "tests" / "test_pricing.py"
    mine.write_text("# my own tests\n")
    task_id = store.enqueue(str(repo), spec(), clock.now())
    run_pool(store, server, clock, ["m"])
    task = store.get_task(task_id)
    assert mine.read_text() == "# my own tests\n"
    assert task.output_path == "tests/test_pricing.py.ohd-new"
    assert json.loads((repo / task.report_path).read_text())["decision"] == "written_as_ohd_new"


def test_ohd_overwrites_its_own_previous_output(repo: Path, store: Store, server: FakeOpenRouter,
                                                clock: FakeClock) -> None:
    first = store.enqueue(str(repo), spec(), clock.now())
    run_pool(store, server, clock, ["m"])
    server.default = ok(GOOD.replace("3.0", "3.0  # again"))
    second = store.enqueue(str(repo), spec(cache=False), clock.now())   # else the first answer is replayed
    run_pool(store, server, clock, ["m"])
    assert store.get_task(first).output_path == store.get_task(second).output_path == "tests/test_pricing.py"
    assert "# again" in (repo / "tests" / "test_pricing.py").read_text()


def test_a_missing_target_fails_with_a_clear_error(repo: Path, store: Store, server: FakeOpenRouter,
                                                   clock: FakeClock) -> None:
    (repo / "shop" / "pricing.py").unlink()
    task_id = store.enqueue(str(repo), spec(), clock.now())
    run_pool(store, server, clock, ["m"])
    task = store.get_task(task_id)
    assert task.status == "failed" and "shop/pricing.py" in (task.error or "")
    assert server.completions() == []


def test_many_workers_run_each_task_exactly_once(repo: Path, store: Store, server: FakeOpenRouter) -> None:
    server.latency_s = 0.2       # the six workers' calls overlap (no pytest run: the static rules judge)
    ids = [store.enqueue(str(repo), spec(output=f"tests/test_p{i}.py"), SystemClock().now()) for i in range(24)]
    run_pool(store, server, SystemClock(), ["m"], size=6, until_idle=False, stop_after=len(ids), judged=STATIC_ONLY)
    assert all(store.get_task(i).status == "completed" for i in ids)
    assert len(server.completions()) == len(ids)
    assert sorted(e.task_id for i in ids for e in store.executions(i)) == sorted(ids)


def test_a_defect_in_ohd_fails_the_task_at_once_and_the_next_task_runs(
        repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    real = ladder.judge
    calls: list[int] = []

    def judge_once_broken(*args: Any) -> Any:      # stands in for a bug (CPython's AST race was one)
        calls.append(1)
        if len(calls) == 1:
            raise SystemError("AST constructor recursion depth mismatch (before=33, after=26)")
        return real(*args)

    monkeypatch.setattr(ladder, "judge", judge_once_broken)
    first = store.enqueue(str(repo), spec(output="tests/test_a.py"), clock.now())
    second = store.enqueue(str(repo), spec(output="tests/test_b.py"), clock.now())
    run_pool(store, server, clock, ["m"])
    broken = store.get_task(first)
    assert broken.status == "failed" and broken.lease_owner is None
    assert "internal error in ohd (SystemError: AST constructor" in (broken.error or "")
    assert f"ohd retry {first}" in (broken.error or "")
    assert store.get_task(second).status == "completed"


def test_a_full_disk_fails_the_task_saying_so_and_leaves_the_old_file(
        repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    def disk_full(*args: object, **kwargs: object) -> None:   # os.replace, also with dir fds
        raise OSError(28, "No space left on device")

    task_id = store.enqueue(str(repo), spec(), clock.now())
    monkeypatch.setattr(os, "replace", disk_full)
    run_pool(store, server, clock, ["m"])
    task = store.get_task(task_id)
    assert task.status == "failed" and (task.error or "").startswith(f"cannot write in {repo}: the disk is full")
    assert "internal error" not in (task.error or "") and task.lease_owner is None
    assert not (repo / "tests" / "test_pricing.py").exists()
    assert [e.outcome for e in store.executions(task_id)] == ["accepted"]      # what the model did is kept


def test_a_model_that_repeats_a_rejected_answer_is_not_asked_again(repo: Path, store: Store,
                                                                   server: FakeOpenRouter, clock: FakeClock) -> None:
    vacuous = "```python\ndef test_x():\n    assert True\n# {}\n```"   # the same verdict each time
    server.script("model-a", [ok(vacuous.format("a"))] * 5)
    server.script("model-b", [ok(vacuous.format(n)) for n in "bcde"])
    task_id = store.enqueue(str(repo), spec(max_attempts=5), clock.now())
    run_pool(store, server, clock, ["model-a", "model-b"])
    task = store.get_task(task_id)
    # the repeat is recorded but not judged again, and model-a gets no more attempts
    assert [r.body["model"] for r in server.completions()] == ["model-a", "model-a", "model-b", "model-b", "model-b"]
    assert task.status == "failed" and task.attempts == 5


# -- failures: refused before any call, and every failure has its report ------------------

REFUSED = {
    "not python": ("unit_test", "README.md", b"# Shop\n", "is not a Python module (.py)"),
    "does not parse": ("docstring", "shop/broken.py", b"def f(:\n    pass\n",
                       "does not parse as Python (invalid syntax at line 1)"),
    "empty": ("unit_test", "shop/empty.py", b"\n", "is empty"),
    "binary": ("review", "shop/blob.bin", b"\x7fELF\x00\x01", "is a binary file"),
    "huge": ("unit_test", "shop/huge.py", b"x = 1\n" * 90_000, "larger than the limit of 512000 bytes"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_target_the_type_cannot_work_on_is_refused_before_any_call_with_a_report(
        case: str, repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    task_type, target, content, reason = REFUSED[case]
    (repo / target).write_bytes(content)
    task_id = store.enqueue(str(repo), spec(type=task_type, target=target), clock.now())
    run_pool(store, server, clock, ["m"])
    task = store.get_task(task_id)
    assert task.status == "failed" and reason in (task.error or ""), task.error
    assert server.completions() == [] and task.attempts == 0
    assert task.report_path is not None
    report = json.loads((repo / task.report_path).read_text())
    assert (report["decision"], report["task"]["status"]) == ("failed", "failed")
    assert reason in report["error"]
    assert reason in (repo / task.report_path).with_suffix(".md").read_text()


def test_a_review_takes_a_text_file_that_is_not_python(repo: Path, store: Store, server: FakeOpenRouter,
                                                      clock: FakeClock) -> None:
    (repo / "NOTES.txt").write_text("TODO: everything\n")
    store.enqueue(str(repo), spec(type="review", target="NOTES.txt"), clock.now())
    run_pool(store, server, clock, ["m"])
    assert len(server.completions()) >= 1


def test_a_timeout_ends_with_a_report(repo: Path, store: Store, clock: FakeClock) -> None:
    async def never_answers(model: str, messages: list[dict[str, str]], timeout_s: float, job: Job) -> Completion:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def main() -> None:
        await Pool(store, never_answers, clock, models=["m"], size=1).run_until_idle()

    task_id = store.enqueue(str(repo), spec(timeout_s=0.5), clock.now())
    asyncio.run(main())
    task = store.get_task(task_id)
    assert task.status == "failed" and task.error == "timed out after 0.5s"
    report = json.loads((repo / str(task.report_path)).read_text())
    assert (report["decision"], report["error"]) == ("failed", "timed out after 0.5s")


def test_a_failure_whose_report_cannot_be_written_says_why(repo: Path, store: Store, server: FakeOpenRouter,
                                                           clock: FakeClock) -> None:
    task_id = store.enqueue(str(repo), spec(target="gone/away.py"), clock.now())
    run_pool(store, server, clock, ["m"])
    task = store.get_task(task_id)
    assert task.status == "failed" and task.report_path is None
    assert task.error == "gone/away.py: does not exist; no report was written (gone/away.py: its folder gone/ does not exist)"
    assert not (repo / "gone").exists()


def test_a_rejection_leads_with_the_error_level_rule_not_the_infos(repo: Path, store: Store, server: FakeOpenRouter,
                                                                   clock: FakeClock) -> None:
    server.default = ok("```python\ndef test_x():\n    assert True\n```")
    task_id = store.enqueue(str(repo), spec(max_attempts=1), clock.now())
    run_pool(store, server, clock, ["m"])
    task = store.get_task(task_id)
    report = json.loads((repo / str(task.report_path)).read_text())
    failed = [r for r in report["verdict"]["rules"] if not r["passed"]]
    first_error = next(r["message"] for r in failed if r["level"] == "error")
    assert any(r["level"] != "error" for r in failed[:1]), "the rules list an info before the error"
    assert (task.error or "").startswith(f"rejected after 1 attempt(s): {first_error}")


def test_a_400_ends_with_a_report_that_gives_the_servers_reason(repo: Path, store: Store,
                                                                server: FakeOpenRouter, clock: FakeClock) -> None:
    server.default = error(400, "This endpoint's maximum context length is 8192 tokens")
    task_id = store.enqueue(str(repo), spec(), clock.now())
    run_pool(store, server, clock, ["m"])
    task = store.get_task(task_id)
    assert task.status == "failed" and "maximum context length is 8192 tokens" in (task.error or "")
    report = json.loads((repo / str(task.report_path)).read_text())
    assert report["decision"] == "failed" and [a["outcome"] for a in report["attempts"]] == ["error"]


def test_a_malformed_answer_names_the_model_that_gave_it(repo: Path, store: Store, server: FakeOpenRouter,
                                                         clock: FakeClock) -> None:
    # found by bench/localmodel.py: `ohd show` said "(?: malformed: a code block is opened but never closed ...)"
    server.script("vendor/small", [ok("```python\ndef test_x():\n    assert True")])
    task_id = store.enqueue(str(repo), spec(max_attempts=2), clock.now())
    run_pool(store, server, clock, ["vendor/small"])
    first = store.executions(task_id)[0]
    assert first.outcome == "malformed"
    assert first.error is not None and first.error.startswith("vendor/small: malformed: a code block is opened")


def test_a_retry_refused_by_an_open_breaker_is_not_a_429(store: Store, clock: FakeClock) -> None:
    # found by bench/localmodel.py: a request cut when llama.cpp's server was killed was to be retried
    # after another task's failure had opened the breaker; the execution said rate_limited ("no request
    # left within the known limits"), for a server that never answers 429, and the model cooled down
    from ohd.errors import RateLimited, Unreachable

    async def never_called(model: str, messages: list[dict[str, str]], timeout_s: float, job: Job) -> Completion:
        raise AssertionError("no call is made")

    pool = Pool(store, never_called, clock, models=["m"], size=1)
    pool.governor.unreachable("m", clock.now(), "cannot connect (Connection refused)")
    with pytest.raises(Unreachable) as raised:
        asyncio.run(pace_retries(pool.governor, clock)("m"))
    assert not isinstance(raised.value, RateLimited)
    assert "breaker" in str(raised.value)


def test_a_task_cancelled_while_running_has_a_report_with_its_attempts_and_last_verdict(
        repo: Path, store: Store, server: FakeOpenRouter) -> None:
    clock = SystemClock()
    server.script("m", [ok(BROKEN), slow(600.0)])    # rejected, then an answer that never comes in time
    task_id = store.enqueue(str(repo), spec(max_attempts=3), clock.now())

    async def main() -> None:
        async with httpx.AsyncClient() as http:
            client = ModelClient(http, server.url, "sk-test", clock, retries=0)

            async def call(model: str, messages: list[dict[str, str]], timeout_s: float, job: Job) -> Completion:
                return await client.complete(model, messages, timeout_s)

            stop = asyncio.Event()
            runner = asyncio.create_task(Pool(store, call, clock, models=["m"], size=1).run(stop, grace_s=0.05))
            await asyncio.to_thread(wait_for, lambda: len(server.completions()) == 2, what="the second request")
            store.cancel(task_id, clock.now())
            await asyncio.to_thread(wait_for, lambda: store.get_task(task_id).report_path, what="the report")
            stop.set()
            await runner

    asyncio.run(main())
    task = store.get_task(task_id)
    assert task.status == "cancelled" and task.attempts == 1
    assert (task.error or "").startswith("cancelled by the user while running, after 1 attempt(s); "
                                         "the last answer was rejected: "), task.error
    report = json.loads((repo / str(task.report_path)).read_text())
    assert (report["decision"], report["task"]["status"], report["error"]) == ("cancelled", "cancelled", task.error)
    assert report["verdict"] is not None and not report["verdict"]["accepted"]
    assert [a["outcome"] for a in report["attempts"]] == ["rejected"]


def test_every_model_failing_leads_the_error_with_each_models_reason(repo: Path, store: Store,
                                                                     server: FakeOpenRouter, clock: FakeClock) -> None:
    server.script("m1", [server_error(500, "upstream fell over")])
    server.script("m2", [not_found()])
    task_id = store.enqueue(str(repo), spec(), clock.now())
    run_pool(store, server, clock, ["m1", "m2"])
    task = store.get_task(task_id)
    assert task.status == "failed"
    assert task.error == ("every model failed: m1: server: HTTP 500: upstream fell over; "
                          "m2: not_found: HTTP 404: No endpoints found for m2."), task.error
    assert json.loads((repo / str(task.report_path)).read_text())["error"] == task.error


def test_a_model_that_repeats_an_unusable_answer_gives_way_to_the_next_model(
        repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    server.script("model-a", [ok("I would test total and the Cart.")] * 5)    # prose, no code block, every time
    task_id = store.enqueue(str(repo), spec(max_attempts=5), clock.now())
    run_pool(store, server, clock, ["model-a", "model-b"])
    task = store.get_task(task_id)
    assert [r.body["model"] for r in server.completions()] == ["model-a", "model-a", "model-b"]
    assert task.status == "completed" and task.attempts == 3


def test_a_lone_model_that_repeats_an_unusable_answer_fails_saying_so(
        repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    server.script("m", [ok("I would test total and the Cart.")] * 5)
    task_id = store.enqueue(str(repo), spec(max_attempts=5), clock.now())
    run_pool(store, server, clock, ["m"])
    task = store.get_task(task_id)
    assert len(server.completions()) == 2 and task.attempts == 2
    assert task.status == "failed"
    assert (task.error or "").startswith("rejected after 2 attempt(s): no usable answer (m gave the same unusable "
                                         "answer twice: "), task.error
    assert json.loads((repo / str(task.report_path)).read_text())["error"] == task.error


def test_a_model_whose_unusable_answers_differ_moves_on_after_the_second(
        repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    server.script("model-a", [ok("I cannot help with that."), garbage(), ok("Nor with this.")])
    task_id = store.enqueue(str(repo), spec(max_attempts=5), clock.now())
    run_pool(store, server, clock, ["model-a", "model-b"])
    assert [r.body["model"] for r in server.completions()] == ["model-a", "model-a", "model-b"]
    assert store.get_task(task_id).status == "completed"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stalled_daemon_cannot_finish_a_task_another_daemon_took_over(
        repo: Path, tmp_path: Path, backend: str) -> None:
    """Daemon A's worker claims and stalls (no renewal) inside the model call; its lease expires and
    daemon B takes the task. A's answer then arrives: its commit is refused (its lease owner is not
    B's, though both are worker 0), A calls no model again, and B completes the task once."""
    clock = SystemClock()
    calls: list[str] = []
    answer = {"A": asyncio.Event(), "B": asyncio.Event()}

    def caller(daemon: str) -> Any:
        async def call(model: str, messages: list[dict[str, str]], timeout_s: float, job: Job) -> Completion:
            calls.append(daemon)
            await answer[daemon].wait()
            return Completion(model, GOOD, 10, 10, 0.0, 5, "stop", None)
        return call

    async def main(store: Store) -> None:
        task_id = store.enqueue(str(repo), spec(), clock.now())
        a = Pool(store, caller("A"), clock, models=["m"], name=worker_prefix("host-1-aaaaaaaa"),
                 lease=timedelta(seconds=0.5))
        b = Pool(store, caller("B"), clock, models=["m"], name=worker_prefix("host-2-bbbbbbbb"))
        a_run = asyncio.create_task(a.run_once(a.name + "0", renew=False))    # stalled: it renews nothing
        await asyncio.to_thread(wait_for, lambda: calls == ["A"], 30, what="A's model call")
        await asyncio.sleep(0.6)
        assert store.reap(clock.now()) == [task_id]          # A's lease expired: the task is free
        b_run = asyncio.create_task(b.run_once(b.name + "0"))
        await asyncio.to_thread(wait_for, lambda: calls == ["A", "B"], 30, what="B's model call")
        answer["A"].set()
        await a_run
        held = store.get_task(task_id)
        assert (held.status, held.lease_owner) == ("running", b.name + "0")   # A's commit was refused
        answer["B"].set()
        await b_run
        done = store.get_task(task_id)
        assert done.status == "completed"
        assert calls == ["A", "B"]                            # A asked no model again

    with store_on(backend, tmp_path) as store:
        asyncio.run(main(store))
