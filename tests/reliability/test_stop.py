"""Graceful stop (issue 11, point 10), against real `ohd daemon` processes.

SIGTERM must end the daemon within systemd's `TimeoutStopSec` (read from `systemd/ohd.service`),
else systemd SIGKILLs it: running tasks finish within `grace_s` or go back to `queued` (no
attempt spent), nothing is lost, no test process it started outlives it, and every request in
flight is cancelled. Before, a start-up `GET /models` that never answered held the daemon for
55-92 s (its timeout and retries), and a pytest run of a task cut off at the grace deadline held
it until that run ended (up to `test_timeout_s`, and a new run could still start after the stop).
"""

from __future__ import annotations

import configparser
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ohd.cli.client import Client
from ohd.config import Settings
from ohd.core.layout import CANDIDATE_NAME
from ohd.repo import outputs
from tests.e2e.helpers import ROOT, DaemonProcess, daemon_env
from tests.support.databases import open_store
from tests.support.fake_openrouter import Answer, FakeOpenRouter, never_answer, ok
from tests.support.gitrepo import make_repo
from tests.support.waiting import wait_for

pytestmark = pytest.mark.reliability

UNIT = ROOT / "systemd" / "ohd.service"
MODEL = "stop/quick"
SLOW_MODEL = "stop/slow"
GRACE_S = 10        # the quick tests (a 1 s pause) finish well within it, the slow ones (10 min) never
PAUSED = "started"  # a candidate test writes this file into its TMPDIR when its pause begins
TEST = """```python
import os
import pathlib
import time

from shop.pricing import total


def test_total_after_a_pause() -> None:
    pathlib.Path(os.environ["TMPDIR"], "{paused}").write_text("")
    deadline = time.monotonic() + {seconds}
    while time.monotonic() < deadline and not pathlib.Path("{release}").exists():
        time.sleep(0.05)
    assert total([1.0, 1.0]) == 2.0
```
"""


def answers(release: Path) -> tuple[Answer, Answer]:
    """The quick answer (a 1 s pause) and the slow one (10 min, or until `release` exists: the
    restarted daemon judges the slow answers it already has, not asking again, so they must end)."""
    quick, slow = (ok(TEST.format(paused=PAUSED, seconds=s, release=release)) for s in (1, 600))
    return quick, slow


def timeout_stop_s() -> float:
    """`TimeoutStopSec` of the unit systemd runs (seconds, as the file writes it)."""
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(UNIT, encoding="utf-8")
    return float(unit["Service"]["TimeoutStopSec"])


def test_the_units_stop_timeout_leaves_the_grace_period_time_to_release_and_exit() -> None:
    """systemd SIGKILLs after TimeoutStopSec: the grace period plus 10 s (release, kill the test
    runs, close the store) must fit inside it."""
    assert Settings.model_fields["grace_s"].default + 10 <= timeout_stop_s()


@pytest.fixture
def runtime() -> Iterator[Path]:
    yield Path(tempfile.mkdtemp(prefix="ohd-rt-"))


def _stopped(daemon: DaemonProcess, signalled_at: float | None = None) -> int:
    """SIGTERM (unless sent at `signalled_at`), then the exit code within TimeoutStopSec of it; past it
    the daemon is SIGKILLed (as systemd would) and the test fails. Prints how long the stop took."""
    assert daemon.proc is not None
    if signalled_at is None:
        daemon.proc.send_signal(signal.SIGTERM)
        signalled_at = time.monotonic()
    try:
        code = daemon.proc.wait(timeout=timeout_stop_s() - (time.monotonic() - signalled_at))
        print(f"\nstopped {time.monotonic() - signalled_at:.1f} s after SIGTERM (exit {code})")
        return code
    except subprocess.TimeoutExpired:
        daemon.proc.kill()
        daemon.proc.wait()
        raise AssertionError(f"still running {timeout_stop_s():g} s after SIGTERM (systemd would SIGKILL it):\n"
                             + daemon.log.read_text()) from None


def test_sigterm_while_the_start_up_catalogue_request_hangs_exits_at_once(tmp_path: Path, runtime: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    log = tmp_path / "daemon.log"
    with FakeOpenRouter(models=[MODEL]) as server:
        server.script_catalogue([never_answer()] * 5)   # the first request and every retry
        env = daemon_env(tmp_path, runtime, OPENROUTER_API_KEY="sk-stop", OHD_BASE_URL=server.url,
                         OHD_DISCOVER="true", OHD_MODELS=MODEL)
        daemon = DaemonProcess(env, repo, log).launch()
        proc = daemon.proc
        assert proc is not None
        try:
            wait_for(lambda: any(r.path.endswith("/models") for r in server.requests) or proc.poll() is not None,
                     what="the daemon's start-up GET /models")
            assert proc.poll() is None, log.read_text()
        finally:
            code = _stopped(daemon)
    assert code == 0, log.read_text()
    assert "ohd.daemon: stopped" in log.read_text()


def _live_test_runs(repo: Path) -> list[str]:
    """Command lines of live processes running a candidate test of `repo` (the jail and pytest)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        line = b" ".join(argv).decode(errors="replace")
        if "test_ohd_candidate_" in line and str(repo) in line:
            found.append(line)
    return found


def _submit(client: Client, n: int, model: str) -> int:
    return int(client.post("/tasks", {"type": "unit_test", "target": "shop/pricing.py", "models": [model],
                                      "output": f"tests/test_stop_{n}.py", "max_attempts": 1,
                                      "timeout_s": 900})["id"])


@pytest.mark.timeout(300)   # a hang bound above its own waits
def test_sigterm_in_a_busy_run_finishes_or_requeues_every_task_and_kills_its_test_runs(
        tmp_path: Path, runtime: Path) -> None:
    """Four workers, each in a pytest run: two short (they finish within grace_s and are completed),
    two of ten minutes (cut off at the grace deadline: back to the queue, no attempt spent, their
    pytest killed); two more tasks come in during the stop and wait in the queue. Exit 0 within
    TimeoutStopSec, no task `running`, no test process left; a restart completes each task once."""
    repo = make_repo(tmp_path / "repo")
    log = tmp_path / "daemon.log"
    scratch = tmp_path / "tmp"      # the daemon's TMPDIR: each test run's scratch dir is made in it
    scratch.mkdir()
    with FakeOpenRouter(models=[MODEL, SLOW_MODEL]) as server:
        release = repo / "release-the-slow-tests"
        quick_answer, slow_answer = answers(release)
        server.default = quick_answer
        server.script(SLOW_MODEL, [slow_answer, slow_answer])
        env = daemon_env(tmp_path, runtime, OPENROUTER_API_KEY="sk-stop", OHD_BASE_URL=server.url,
                         OHD_MODELS=f"{MODEL},{SLOW_MODEL}", OHD_WORKERS="4", OHD_TEST_PARALLEL="4",
                         OHD_TEST_RUNS="1", OHD_TEST_TIMEOUT_S="600", OHD_GRACE_S=str(GRACE_S),
                         OHD_RULE_LEVELS='{"*": {"lint": "off", "coverage_delta": "off"}}', TMPDIR=str(scratch))
        daemon = DaemonProcess(env, repo, log).start()
        assert daemon.proc is not None
        signalled_at = None
        try:
            client = Client(runtime / "ohd.sock", timeout=60.0)
            running = [_submit(client, n, model) for n, model in enumerate([MODEL, SLOW_MODEL] * 2)]
            wait_for(lambda: len(list(scratch.glob(f"ohd-pytest-*/tmp/{PAUSED}"))) == len(running),
                     what="every worker's test run to be in its pause")
            daemon.proc.send_signal(signal.SIGTERM)
            signalled_at = time.monotonic()
            waiting = [_submit(client, n, MODEL) for n in (4, 5)]   # within the grace period: kept, not run
        finally:
            code = _stopped(daemon, signalled_at)
        text = log.read_text()
        assert code == 0, text
        wait_for(lambda: not _live_test_runs(repo), what="no test run of the stopped daemon left")
        assert outputs.leftovers(repo, CANDIDATE_NAME) == []
        store = open_store(tmp_path / "state" / "ohd.db")
        try:
            stopped = {t.id: (t.status, t.attempts) for t in store.list_tasks(limit=100)}
        finally:
            store.close()
        quick, slow = running[0::2], running[1::2]
        assert stopped == {**{i: ("completed", 1) for i in quick}, **{i: ("queued", 0) for i in slow + waiting}}, text

        release.write_text("")
        daemon = DaemonProcess(env, repo, log).start()
        try:
            wait_for(lambda: daemon.json("status")["queue"].get("completed", 0) == len(running + waiting),
                     what="every task to complete after the restart")
        finally:
            assert _stopped(daemon) == 0
    store = open_store(tmp_path / "state" / "ohd.db")
    try:
        tasks = store.list_tasks(limit=100)
        accepted = {t.id: [e.outcome for e in store.executions(t.id)].count("accepted") for t in tasks}
    finally:
        store.close()
    assert {(t.status, t.attempts) for t in tasks} == {("completed", 1)}
    assert set(accepted.values()) == {1}
    assert len(server.completions()) == 6      # the slow answers were judged again after the restart, not asked for again
    code_of = {s: TEST.format(paused=PAUSED, seconds=s, release=release).split("```python\n")[1].split("```")[0]
               for s in (1, 600)}
    for n in range(6):
        assert (repo / "tests" / f"test_stop_{n}.py").read_text() == code_of[600 if n in (1, 3) else 1]
    assert outputs.leftovers(repo, CANDIDATE_NAME) == [] and not _live_test_runs(repo)
