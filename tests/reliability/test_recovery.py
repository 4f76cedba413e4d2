"""Recovery after `kill -9` (issue 11, point 1), against a real `ohd daemon` process.

The daemon is killed while its task waits for the model (the fake server in this process holds
the request and never answers it); a new daemon is started at once. Its lease is an hour
(`lease_s = 3600`), so a task can only come back because the new daemon returns its dead
predecessor's leases at start-up (it holds the state dir's lock), never because a lease expired:
before that, the task sat `running` for the whole lease. A task that three crashes interrupted is
failed with that reason (a task that kills ohd must not crash it for ever). A daemon killed while
pytest judges the model's answer judges that answer again after the restart, from the call
history, instead of asking the model again; the steps around it (an edited target, an answer
already judged, call history off or cut) are driven in-process, the kill being an exception that
nothing in ohd catches.
"""

from __future__ import annotations

import asyncio
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ohd.cli.client import Client
from ohd.core.taskfile import TaskSpec
from ohd.core.tasktypes import Job
from ohd.ladder import ladder, testrun
from ohd.models.llm import Completion, ModelClient
from ohd.store.calls import CallHistory
from ohd.store.store import Store
from ohd.work.worker import Pool
from tests.e2e.helpers import DaemonProcess, daemon_env
from tests.support.clock import FakeClock
from tests.support.databases import BACKENDS, database_url
from tests.support.fake_openrouter import FakeOpenRouter, never_answer, ok
from tests.support.gitrepo import make_repo
from tests.support.waiting import wait_for

pytestmark = pytest.mark.reliability

MODEL = "crash/model"


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[FakeOpenRouter, dict[str, str], Path]]:
    runtime = Path(tempfile.mkdtemp(prefix="ohd-rt-"))
    repo = make_repo(tmp_path / "repo")
    with FakeOpenRouter(models=[MODEL]) as server:
        env = daemon_env(tmp_path, runtime, OPENROUTER_API_KEY="sk-crash", OHD_BASE_URL=server.url,
                         OHD_MODELS=MODEL, OHD_TEST_RUNS="0", OHD_LEASE_S="3600", OHD_WORKERS="1",
                         OHD_REQUEST_TIMEOUT_S="600")
        yield server, env, repo


def _submit(daemon: DaemonProcess, env: dict[str, str]) -> int:
    client = Client(Path(env["OHD_RUNTIME_DIR"]) / "ohd.sock", timeout=60.0)
    return int(client.post("/tasks", {"type": "unit_test", "target": "shop/pricing.py", "models": [MODEL],
                                      "max_attempts": 1, "timeout_s": 600})["id"])


def _kill_while_asking(daemon: DaemonProcess, server: FakeOpenRouter, asked: int) -> None:
    """Wait until the model got its `asked`-th request (the task is running), then kill -9 (also
    when the wait fails, so no daemon outlives the test)."""
    try:
        wait_for(lambda: len(server.requests_for(MODEL)) >= asked, what=f"request {asked} to the model")
    finally:
        assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL


def _restart_until_completed(env: dict[str, str], repo: Path, log: Path, task_id: int) -> dict[str, Any]:
    """Start a daemon again and wait for the interrupted task to complete; the task as shown."""
    daemon = DaemonProcess(env, repo, log).start()
    try:
        task: dict[str, Any] = wait_for(lambda: (t := daemon.json("show", str(task_id)))["status"] == "completed" and t,
                                        what="the interrupted task to complete after the restart")
    finally:
        daemon.stop()
    return task


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_restart_after_kill_9_runs_the_interrupted_task_at_once(
        setup: tuple[FakeOpenRouter, dict[str, str], Path], tmp_path: Path, backend: str) -> None:
    """On SQLite the restart returns every running task (it holds the state dir's lock); on PostgreSQL,
    which other daemons may share, those of its predecessor on this host and state dir (issue 15)."""
    server, env, repo = setup
    server.script(MODEL, [never_answer(), ok()])
    log = tmp_path / "daemon.log"
    with database_url(backend, tmp_path) as url:
        env = {**env, "OHD_DATABASE_URL": url, "OHD_DAEMON_LOST_S": "3600"}   # neither lost nor expired
        daemon = DaemonProcess(env, repo, log).start()
        task_id = _submit(daemon, env)
        _kill_while_asking(daemon, server, 1)
        restarted = DaemonProcess(env, repo, log).start()
        up = time.monotonic()
        try:
            task = wait_for(lambda: (t := restarted.json("show", str(task_id)))["status"] == "completed" and t,
                            what="the interrupted task to complete after the restart")
            took_s = time.monotonic() - up
        finally:
            restarted.stop()
    assert task["attempts"] == 1 and task["crashes"] == 1, task
    assert len(server.requests_for(MODEL)) == 2
    assert took_s < 20, took_s      # at start-up: not once the dead daemon is lost, nor at the lease's end (1 h)
    why = "interrupted by the daemon's crash" if backend == "sqlite" else "its daemon was lost"
    assert f"task {task_id}: {why}; back to the queue" in log.read_text()


def test_a_task_that_three_crashes_interrupted_is_failed_with_that_reason(
        setup: tuple[FakeOpenRouter, dict[str, str], Path], tmp_path: Path) -> None:
    server, env, repo = setup
    server.script(MODEL, [never_answer(), never_answer(), never_answer(), ok()])
    log = tmp_path / "daemon.log"
    daemon = DaemonProcess(env, repo, log).start()
    task_id = _submit(daemon, env)
    for crash in (1, 2, 3):
        _kill_while_asking(daemon, server, crash)
        daemon = DaemonProcess(env, repo, log).start()
    try:
        task = wait_for(lambda: (t := daemon.json("show", str(task_id)))["report_path"] and t,
                        what="the poison task's report")
    finally:
        daemon.stop()
    assert task["status"] == "failed" and task["crashes"] == 3, task
    assert task["error"].startswith("interrupted by 3 daemon crashes while running"), task
    assert len(server.requests_for(MODEL)) == 3                     # not asked a fourth time
    assert (repo / task["report_path"]).is_file()
    assert "interrupted by 3 daemon crashes" in (repo / task["report_path"]).read_text()


HELD_TEST = (
    "```python\n"
    "import time\n"
    "from pathlib import Path\n\n"
    "from shop.pricing import total\n\n\n"
    "def test_total_once_released() -> None:\n"
    "    deadline = time.monotonic() + 300\n"
    "    while Path('.hold').exists() and time.monotonic() < deadline:   # killed while it waits here\n"
    "        time.sleep(0.05)\n"
    "    assert total([1.0, 1.0]) == 2.0\n"
    "```\n"
)


def test_a_daemon_killed_while_pytest_judges_the_answer_judges_it_again_without_asking(
        setup: tuple[FakeOpenRouter, dict[str, str], Path], tmp_path: Path) -> None:
    """kill -9 while the ladder's pytest runs the model's answer; the restarted daemon (static rules
    only, so its verdict comes at once) judges that answer from the call history. Before, it sent
    the same prompt to the model again."""
    server, env, repo = setup
    server.script(MODEL, [ok(HELD_TEST)])
    hold = repo / ".hold"
    hold.touch()
    log = tmp_path / "daemon.log"
    daemon = DaemonProcess({**env, "OHD_TEST_RUNS": "1", "OHD_TEST_TIMEOUT_S": "600"}, repo, log).start()
    task_id = _submit(daemon, env)
    try:
        wait_for(lambda: list((repo / "tests").glob("test_ohd_candidate_*.py")), what="pytest on the candidate")
    finally:
        assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
        hold.unlink()       # a test process the kill left behind ends now, not at its time limit
    task = _restart_until_completed(env, repo, log, task_id)
    assert (task["attempts"], task["crashes"]) == (1, 1), task
    assert len(server.requests_for(MODEL)) == 1                     # judged again, not asked again
    assert "def test_total_once_released" in (repo / "tests" / "test_pricing.py").read_text()
    assert f"task {task_id}: judging the answer {MODEL} gave before the daemon stopped" in log.read_text()


class Killed(BaseException):
    """The process dying in the middle of a validation (nothing after it runs, as after kill -9)."""


def _killed_while_judging(repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock,
                          monkeypatch: pytest.MonkeyPatch, calls: dict[str, Any] | None = None) -> int:
    """A task whose first answer came and whose validation the process died in; recovered as a
    restarted daemon does it (its lease returned), the ladder working again."""
    judge = ladder.judge

    def dies(*args: object, **kwargs: object) -> object:
        raise Killed

    task_id = store.enqueue(str(repo), TaskSpec.model_validate(
        {"type": "unit_test", "target": "shop/pricing.py", "models": [MODEL], "max_attempts": 1}), clock.now())
    monkeypatch.setattr(ladder, "judge", dies)
    with pytest.raises(Killed):
        _run_pool(store, server, clock, calls)
    crashed = store.get_task(task_id)
    assert (crashed.status, crashed.attempts, store.executions(task_id)) == ("running", 0, [])
    assert store.recover(clock.now()) == [task_id]
    monkeypatch.setattr(ladder, "judge", judge)
    return task_id


def test_a_crash_after_the_answer_and_before_the_verdict_spends_no_attempt(
        repo: Path, store: Store, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, the attempt was counted when the answer came, and the execution after the verdict:
    a crash in between came back with the attempt spent and none recorded, and with
    `max_attempts: 1` the task failed 'rejected after 1 attempt(s): no usable answer'. The answer
    already received (in the call history) is judged again, not asked for again: before, the
    restarted daemon sent the same prompt a second time."""
    with FakeOpenRouter(models=[MODEL]) as server:
        task_id = _killed_while_judging(repo, store, server, clock, monkeypatch)
        _run_pool(store, server, clock)
    task = store.get_task(task_id)
    assert (task.status, task.attempts, task.error) == ("completed", 1, None), task
    assert [(e.attempt, e.outcome) for e in store.executions(task_id)] == [(1, "accepted")]
    assert len(server.completions()) == 1                    # one request across the kill and the restart
    assert (repo / "tests" / "test_pricing.py").read_text().startswith("from shop.pricing import total")


def test_an_answer_for_a_target_edited_before_the_restart_is_asked_for_again(
        repo: Path, store: Store, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """The answer in the call history was for the old text: it is not judged against the new one."""
    with FakeOpenRouter(models=[MODEL]) as server:
        task_id = _killed_while_judging(repo, store, server, clock, monkeypatch)
        target = repo / "shop" / "pricing.py"
        target.write_text(target.read_text() + "\n\ndef added_meanwhile() -> int:\n    return 1\n")
        _run_pool(store, server, clock)
    task = store.get_task(task_id)
    assert (task.status, task.attempts, task.error) == ("completed", 1, None), task
    [first, second] = [r.body["messages"][-1]["content"] for r in server.completions()]
    assert "added_meanwhile" not in first and "added_meanwhile" in second


NO_ASSERTS = "```python\nfrom shop.pricing import total\n\n\ndef test_total_runs() -> None:\n    total([1.0])\n```\n"


def test_an_answer_judged_before_a_crash_is_not_judged_again(repo: Path, store: Store, clock: FakeClock) -> None:
    """The process dies while asking for the second answer, the first one rejected: the restarted
    daemon asks for the second; the first, which has its verdict, is neither judged nor counted again."""
    task_id = store.enqueue(str(repo), TaskSpec.model_validate(
        {"type": "unit_test", "target": "shop/pricing.py", "models": [MODEL], "max_attempts": 2}), clock.now())
    with FakeOpenRouter(models=[MODEL]) as server:
        server.script(MODEL, [ok(NO_ASSERTS)])
        with pytest.raises(Killed):
            _run_pool(store, server, clock, dies_at_call=2)
        assert store.recover(clock.now()) == [task_id]
        _run_pool(store, server, clock)
    task = store.get_task(task_id)
    assert (task.status, task.attempts, task.error) == ("completed", 2, None), task
    assert [(e.attempt, e.outcome) for e in store.executions(task_id)] == [(1, "rejected"), (2, "accepted")]
    assert len(server.completions()) == 2


@pytest.mark.parametrize("calls", [{"enabled": False}, {"max_bytes": 100}], ids=["history_off", "answer_cut"])
def test_an_answer_not_kept_whole_in_the_call_history_is_asked_for_again(
        repo: Path, store: Store, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, calls: dict[str, Any]) -> None:
    """call_history off, or the response cut by call_history_max_bytes: nothing to judge, so the
    model is asked again (as before), still without spending an attempt on the crash."""
    with FakeOpenRouter(models=[MODEL]) as server:
        task_id = _killed_while_judging(repo, store, server, clock, monkeypatch, calls)
        _run_pool(store, server, clock, calls)
    task = store.get_task(task_id)
    assert (task.status, task.attempts, task.error) == ("completed", 1, None), task
    assert len(server.completions()) == 2


def _run_pool(store: Store, server: FakeOpenRouter, clock: FakeClock, calls: dict[str, Any] | None = None,
              dies_at_call: int = 0) -> None:
    """The pool run until idle over the fake server; with `dies_at_call` the process dies as it
    is about to send that model request (counted from 1)."""
    made = 0

    async def main() -> None:
        async with httpx.AsyncClient() as http:
            client = ModelClient(http, server.url, "sk-test", clock, retries=0)

            async def call(model: str, messages: list[dict[str, str]], timeout_s: float, job: Job) -> Completion:
                nonlocal made
                made += 1
                if made == dies_at_call:
                    raise Killed
                return await client.complete(model, messages, timeout_s)

            pool = Pool(store, call, clock, models=[MODEL], size=1, calls=CallHistory(store.db, **(calls or {})),
                        ladder=ladder.Ladder(tests=testrun.Options(runs=0)))
            await pool.run_until_idle()

    asyncio.run(main())


def test_the_leftovers_of_a_killed_daemon_are_removed_at_start_up(
        setup: tuple[FakeOpenRouter, dict[str, str], Path], tmp_path: Path) -> None:
    """Temp files of interrupted atomic writes and candidate test files of an interrupted
    validation go, with one log line; files that only look alike stay."""
    _, env, repo = setup
    left = [repo / "shop" / ".ohd" / ".pricing.py.review.json.0123abcd.tmp",
            repo / "tests" / ".test_pricing.py.89abcdef.tmp",
            repo / "tests" / "test_ohd_candidate_0123456789_abcdef.py"]
    kept = [repo / ".notes.tmp", repo / "tests" / "test_ohd_candidate_mine.py",
            repo / "shop" / ".ohd" / "pricing.py.review.json"]
    for path in left + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    log = tmp_path / "daemon.log"
    daemon = DaemonProcess(env, repo, log).start()
    daemon.stop()
    assert [p for p in left if p.exists()] == []
    assert [p for p in kept if not p.exists()] == []
    lines = [line for line in log.read_text().splitlines() if "leftover file(s)" in line]
    assert len(lines) == 1 and "removed 3 leftover file(s)" in lines[0], lines
