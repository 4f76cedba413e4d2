"""Concurrency (issue 11, point 8): bursts of real `ohd` processes against one store.

With a daemon running: 50 `ohd submit` processes released at the same instant, 50 task files
dropped into tasks.d/ at that instant, and `ohd status` / `ohd tasks` / `ohd select-model`
(the last two open the store directly, beside the daemon) among them, while the daemon's
workers run the tasks against the fake server. Every task is stored exactly once and
completes; no user sees "database is locked", a traceback or a failing exit.

Without a daemon, 50 processes at once on a state dir with no database yet: 40 of the
commands that open the store themselves (`ohd tasks`, `show`, `select-model`, `rules`), which
create, migrate and read it at the same moment, and 10 `ohd submit`, which has no path to the
store (it only talks to the daemon) and says the daemon is not running, with exit code 3.
And the reading commands answer while another process holds SQLite's writer lock.

The processes wait at a barrier (a read of their stdin, after their imports) and are released
together by closing the pipes. SQLite always; PostgreSQL too when `OHD_TEST_POSTGRES_URL` is set.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from ohd.core.taskfile import TaskSpec
from ohd.store.store import Store, open_database
from tests.e2e.helpers import ROOT, DaemonProcess, daemon_env
from tests.support.databases import BACKENDS, database_url
from tests.support.fake_openrouter import FakeOpenRouter
from tests.support.gitrepo import make_repo
from tests.support.waiting import wait_for

pytestmark = pytest.mark.reliability

SUBMITS = 50
FILES = 50
READERS = 3          # of each reading command, in the same burst
STORE_COMMANDS = 40  # without a daemon: commands that open the store themselves, together with
LONE_SUBMITS = 10    # `ohd submit`s: 50 at once; each says the daemon is not running (it has no other path)
LOCKED_READERS = 9   # reading commands while another process holds the writer lock
WORKERS = 4
LATENCY_S = 0.02
MODEL = "conc/model"
TASK = """type: unit_test
target: shop/pricing.py
output: tests/test_file_{n}.py
models: [{model}]
max_attempts: 1
"""
# `python -m ohd ARGS`, held after its imports until its stdin closes: the release is one instant
BARRIER = ("import sys\n"
           "from ohd.cli.commands import main\n"
           "print('ready', flush=True)\n"
           "sys.stdin.buffer.read()\n"
           "raise SystemExit(main(sys.argv[1:]))\n")
FORBIDDEN = ("locked", "Traceback", "Error:")


@dataclass
class Outcome:
    args: tuple[str, ...]
    code: int
    out: str
    err: str


class Burst:
    """Processes started now, held at the barrier until `release()`."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.procs: list[tuple[tuple[str, ...], subprocess.Popen[str]]] = []

    def add(self, *args: str) -> None:
        proc = subprocess.Popen([sys.executable, "-c", BARRIER, *args], env=self.env, cwd=ROOT, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.procs.append((args, proc))

    def ready(self) -> None:
        """Wait until every process has done its imports and sits at the barrier."""
        for args, proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line == "ready\n", (args, line, proc.stderr.read() if proc.stderr else "")

    def release(self) -> None:
        for _, proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.stdin = None     # closed: `communicate` has nothing to send

    def outcomes(self, within_s: float = 480.0) -> list[Outcome]:
        """Each process's outcome; all of them within one bound (a hang detector: 60 processes at
        once on 2 busy cores took over 120 s for one of them to exit)."""
        deadline = time.monotonic() + within_s
        results = []
        for args, proc in self.procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append(Outcome(args, proc.returncode, out, err))
        return results


def assert_clean(outcomes: Sequence[Outcome], expect_code: int = 0) -> None:
    """Each exited `expect_code`, and no stderr holds a lock error or a traceback."""
    bad = [o for o in outcomes if o.code != expect_code or any(word in o.err for word in FORBIDDEN)]
    assert not bad, [(o.args[:2], o.code, o.err[-600:]) for o in bad[:5]] + [f"{len(bad)} of {len(outcomes)}"]


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database_url(request.param, tmp_path) as url:
        yield url


def store_at(url: str) -> Store:
    store = Store(open_database(url))
    store.migrate()
    return store


def submit_args(repo: Path, n: int) -> tuple[str, ...]:
    return ("submit", "--type", "unit_test", "--target", "shop/pricing.py", "--repo", str(repo),
            "--output", f"tests/test_api_{n}.py", "--model", MODEL)


@pytest.mark.timeout(600)   # a hang bound above its own waits; about 30 s here
def test_a_burst_of_submits_and_files_is_stored_once_and_completed(tmp_path: Path, db_url: str) -> None:
    runtime = Path(tempfile.mkdtemp(prefix="ohd-rt-"))
    repo = make_repo(tmp_path / "repo")
    log = tmp_path / "daemon.log"
    started = time.monotonic()
    with FakeOpenRouter(models=[MODEL], latency_s=LATENCY_S) as server:
        env = daemon_env(tmp_path, runtime, OPENROUTER_API_KEY="sk-conc", OHD_BASE_URL=server.url,
                         OHD_MODELS=MODEL, OHD_TEST_RUNS="0", OHD_WORKERS=str(WORKERS), OHD_DATABASE_URL=db_url,
                         OHD_RULE_LEVELS='{"*": {"lint": "off", "coverage_delta": "off"}}')
        daemon = DaemonProcess(env, repo, log).start()
        try:
            burst = Burst(env)
            for n in range(SUBMITS):
                burst.add(*submit_args(repo, n))
            for _ in range(READERS):
                burst.add("status")
                burst.add("tasks", "--limit", "5")
                burst.add("select-model", "--type", "unit_test")
            burst.ready()
            burst.release()
            for n in range(FILES):       # the same instant: ingest runs beside the submits
                (repo / "tasks.d" / f"t{n:03d}.yaml").write_text(TASK.format(n=n, model=MODEL))
            outcomes = burst.outcomes()
            burst_s = time.monotonic() - started
            wait_for(lambda: daemon.json("status")["queue"].get("completed", 0) >= SUBMITS + FILES, timeout=180,
                     what="every task to complete")
        finally:
            assert daemon.stop() == 0
    seconds = time.monotonic() - started
    store = store_at(db_url)
    try:
        tasks = store.list_tasks(limit=10 * (SUBMITS + FILES))
    finally:
        store.close()
    print(f"\nconcurrency: {len(outcomes)} processes and {FILES} files at once, {len(tasks)} tasks, "
          f"burst answered in {burst_s:.1f} s, all done in {seconds:.1f} s")
    assert_clean(outcomes)
    ids = [int(o.out.strip()) for o in outcomes if o.args[0] == "submit"]
    assert len(set(ids)) == SUBMITS
    assert len(tasks) == SUBMITS + FILES, sorted((t.source or "", t.output or "") for t in tasks)
    assert {t.id for t in tasks if t.source == "api"} == set(ids)
    assert sorted(t.output or "" for t in tasks) == sorted(
        [f"tests/test_api_{n}.py" for n in range(SUBMITS)] + [f"tests/test_file_{n}.py" for n in range(FILES)])
    assert {t.status for t in tasks} == {"completed"}, [(t.id, t.status, t.error) for t in tasks
                                                        if t.status != "completed"]
    done = sorted(p.name for p in (repo / "tasks.d" / ".done").iterdir())
    assert done == [f"t{n:03d}.yaml" for n in range(FILES)]
    assert not list((repo / "tasks.d").glob("*.yaml")) and not (repo / "tasks.d" / ".rejected").exists()
    text = log.read_text()
    assert "locked" not in text and "Traceback" not in text, text[-3000:]


@pytest.mark.timeout(600)
def test_a_burst_of_store_commands_without_a_daemon_creates_and_reads_one_store(tmp_path: Path,
                                                                                 db_url: str) -> None:
    runtime = Path(tempfile.mkdtemp(prefix="ohd-rt-"))
    repo = make_repo(tmp_path / "repo")
    (repo / "tasks.d" / "nightly.yaml").write_text(
        "type: review\ntarget: shop/pricing.py\nschedule: '0 3 * * *'\n")
    env = daemon_env(tmp_path, runtime, OHD_DATABASE_URL=db_url, OHD_MODELS=MODEL, OHD_REPOS=str(repo))
    started = time.monotonic()
    readers, submits = Burst(env), Burst(env)
    for n in range(STORE_COMMANDS):
        readers.add(*(("tasks",), ("show", "1"), ("select-model", "--type", "unit_test"), ("rules",))[n % 4])
    for n in range(LONE_SUBMITS):
        submits.add(*submit_args(repo, n))
    for burst in (readers, submits):
        burst.ready()
    for burst in (readers, submits):
        burst.release()
    read, submitted = readers.outcomes(), submits.outcomes()
    seconds = time.monotonic() - started
    print(f"\nconcurrency without a daemon: {len(read) + len(submitted)} processes at once, {seconds:.1f} s")
    shows = [o for o in read if o.args[0] == "show"]
    assert_clean([o for o in read if o.args[0] != "show"])
    assert_clean(shows, expect_code=1)      # the store is empty: task 1 is not found, said plainly
    assert all("no task 1" in o.err for o in shows), shows[0].err
    assert_clean(submitted, expect_code=3)
    assert all("start it with: ohd daemon" in o.err for o in submitted), submitted[0].err
    store = store_at(db_url)
    try:
        assert store.list_tasks() == []
    finally:
        store.close()


@pytest.mark.timeout(600)
def test_the_reading_commands_answer_while_another_process_holds_the_writer_lock(tmp_path: Path) -> None:
    """`ohd tasks`, `show` and `select-model` only read: while a writer holds SQLite's lock (a busy
    daemon, a user's `sqlite3`) for longer than any busy timeout, a burst of them still answers."""
    runtime = Path(tempfile.mkdtemp(prefix="ohd-rt-"))
    path = tmp_path / "state" / "ohd.db"
    store = store_at(f"sqlite:///{path}")
    task_id = store.enqueue(str(tmp_path), TaskSpec.model_validate({"type": "review", "target": "a.py"}),
                            datetime.now(UTC))
    store.close()
    env = daemon_env(tmp_path, runtime, OHD_MODELS=MODEL)
    burst = Burst(env)
    for n in range(LOCKED_READERS):
        burst.add(*(("tasks",), ("show", str(task_id)), ("select-model", "--type", "review"))[n % 3])
    burst.ready()
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        burst.release()
        outcomes = burst.outcomes()
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert_clean(outcomes)
    assert all("a.py" in o.out for o in outcomes if o.args[0] in ("tasks", "show"))
