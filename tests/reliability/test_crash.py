"""Crash safety (issue 11, point 2): a real `ohd daemon` killed with SIGKILL at seeded random
moments while it ingests a burst of task files, asks the fake server (with latency), validates and
writes outputs; restarted at once each time. At the end nothing is lost or done twice. Two more
runs aim their kills: at the ingest of a burst of 500 files (kills when `.done/` reaches seeded
counts), and at the writes of outputs and reports (kills from inside the daemon at seeded write
calls, see `test_kill_9_at_the_writes_...`).

The tasks are cheap (unit_test with the static rules only: no pytest, no lint), so the run is
about the daemon's bookkeeping, not the ladder. The seed and the counts are the constants below.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import pytest

from ohd.core.layout import CANDIDATE_NAME, DONE_DIR, OHD_NEW_SUFFIX, REJECTED_DIR
from ohd.repo import outputs
from tests.e2e.helpers import DaemonProcess, daemon_env
from tests.support.databases import open_store
from tests.support.fake_openrouter import DEFAULT_CONTENT, FakeOpenRouter, held, ok
from tests.support.gitrepo import make_repo
from tests.support.waiting import wait_for

pytestmark = pytest.mark.reliability

SEED = 11
TASKS = 200
KILLS = 20
WORKERS = 4
LATENCY_S = 0.05
MODEL = "crash/model"
RUN_BEFORE_KILL_S = (0.3, 2.0)     # how long each daemon runs before its kill (seeded)
TASK = """type: unit_test
target: shop/pricing.py
output: tests/test_gen_{n}.py
models: [{model}]
max_attempts: 1
"""


@pytest.mark.timeout(1500)  # a hang bound above its own waits (900 s for the tasks): 47 s idle, 300+ s loaded
def test_kill_9_at_random_moments_loses_nothing_and_does_nothing_twice(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    runtime = Path(tempfile.mkdtemp(prefix="ohd-rt-"))
    repo = make_repo(tmp_path / "repo")
    log = tmp_path / "daemon.log"
    started = time.monotonic()
    with FakeOpenRouter(models=[MODEL], latency_s=LATENCY_S) as server:
        env = daemon_env(tmp_path, runtime, OPENROUTER_API_KEY="sk-crash", OHD_BASE_URL=server.url,
                         OHD_MODELS=MODEL, OHD_TEST_RUNS="0", OHD_WORKERS=str(WORKERS), OHD_LEASE_S="600",
                         OHD_CRASH_LIMIT="1000",   # these kills are not the tasks' doing (the limit has its test)
                         OHD_RULE_LEVELS='{"*": {"lint": "off", "coverage_delta": "off"}}', OHD_SETTLE_S="0")
        daemon = DaemonProcess(env, repo, log).start()
        for n in range(TASKS):          # the burst: ingest runs while the first kills come
            (repo / "tasks.d" / f"t{n:03d}.yaml").write_text(TASK.format(n=n, model=MODEL))
        for _ in range(KILLS):
            time.sleep(rng.uniform(*RUN_BEFORE_KILL_S))
            assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
            daemon = DaemonProcess(env, repo, log).start()
        try:
            wait_for(lambda: daemon.json("status")["queue"].get("completed", 0) + daemon.json("status")["queue"]
                     .get("failed", 0) >= TASKS, timeout=900, what="every task to finish")
        finally:
            assert daemon.stop() == 0
        requests = len(server.completions())
    seconds = time.monotonic() - started
    store = open_store(tmp_path / "state" / "ohd.db")
    try:
        tasks = store.list_tasks(limit=10 * TASKS)
        executions = {t.id: store.executions(t.id) for t in tasks}
        written = {path: store.written_hash(str(repo), path) for path in (f"tests/test_gen_{n}.py" for n in range(TASKS))}
        integrity = store.db.execute_sql("PRAGMA integrity_check").fetchall()
    finally:
        store.close()
    print(f"\ncrash harness: {KILLS} kills survived, {len(tasks)} tasks, {requests} model requests, "
          f"{seconds:.1f} s")
    assert len(tasks) == TASKS                                       # each file became one task
    assert {t.status for t in tasks} == {"completed"}, [(t.id, t.status, t.error) for t in tasks if t.status != "completed"]
    assert all([e.outcome for e in executions[t.id]].count("accepted") == 1 for t in tasks)
    assert sorted(t.output_path or "" for t in tasks) == sorted(written)
    for path, sha in written.items():
        assert sha is not None and outputs.current_sha(repo / path) == sha, path
        assert "def test_answer_from_fake_openrouter" in (repo / path).read_text()
    done = sorted(p.name for p in (repo / "tasks.d" / ".done").iterdir())
    assert done == [f"t{n:03d}.yaml" for n in range(TASKS)]
    assert not list((repo / "tasks.d").glob("*.yaml")) and not (repo / "tasks.d" / ".rejected").exists()
    # each kill interrupts at most WORKERS running tasks, and each may ask once more
    assert TASKS <= requests <= TASKS + KILLS * WORKERS
    assert outputs.leftovers(repo, CANDIDATE_NAME) == []
    assert integrity == [("ok",)]


BURST = 500
BAD_EVERY = 25          # every 25th file of the burst does not parse: it goes to .rejected/
# the kills of the burst, in a seeded order: two when .done/ and .rejected/ have taken a seeded
# number more files, two as ingest moves a file whose task is committed, two just after such a move
BURST_KILLS = ("count", "count", "task-replace", "task-replace", "task-replace-after", "task-replace-after")
BURST_TASK = """type: unit_test
target: shop/pricing.py
output: tests/test_burst_{n}.py
description: burst file {n}
models: [{model}]
"""
KILLPOINTS = Path(__file__).resolve().parents[1] / "support" / "killpoints"


def aimed(env: dict[str, str], point: str) -> dict[str, str]:
    """`env` for a daemon that SIGKILLs itself at `point` (`<what>-<call>[-after]:<n>`, see
    tests/support/killpoints/sitecustomize.py)."""
    return {**env, "CRASH_KILL_AT": point, "PYTHONPATH": f"{KILLPOINTS}{os.pathsep}{env['PYTHONPATH']}"}


def died(daemon: DaemonProcess) -> int:
    """Wait for a daemon that kills itself; its return code."""
    assert daemon.proc is not None
    wait_for(lambda: daemon.proc is not None and daemon.proc.poll() is not None, timeout=120,
             what="the daemon to reach its kill point")
    return daemon.proc.wait()


@pytest.mark.timeout(600)
def test_kill_9_while_ingesting_a_burst_makes_each_file_one_task(tmp_path: Path) -> None:
    """500 files dropped at once, the daemon killed 6 times while it moves them to .done/: each file
    ends in .done/ or .rejected/ once, each valid one is one task (its unique description), nothing
    is left in tasks.d/ or pending in the store, and both crash windows of a move were met."""
    rng = random.Random(SEED)
    runtime = Path(tempfile.mkdtemp(prefix="ohd-rt-"))
    repo = make_repo(tmp_path / "repo")
    tasks_dir = repo / "tasks.d"
    log = tmp_path / "daemon.log"
    bad = {n for n in range(BURST) if n % BAD_EVERY == BAD_EVERY - 1}
    kills = rng.sample(BURST_KILLS, len(BURST_KILLS))
    started = time.monotonic()
    with FakeOpenRouter(models=[MODEL]) as server:
        server.default = held(threading.Event())      # no answer comes: the run is about ingest
        env = daemon_env(tmp_path, runtime, OPENROUTER_API_KEY="sk-crash", OHD_BASE_URL=server.url,
                         OHD_MODELS=MODEL, OHD_TEST_RUNS="0", OHD_WORKERS="1", OHD_GRACE_S="0",
                         OHD_CRASH_LIMIT="1000", OHD_SETTLE_S="0")
        for n in range(BURST):          # each file appears whole (a rename), all within a moment
            (tasks_dir / f".t{n:03d}.part").write_text("type: nonsense\n" if n in bad else
                                                       BURST_TASK.format(n=n, model=MODEL))
        left_at_kill = []
        for number, kill in enumerate(kills):
            step = rng.randint(20, 60)
            if kill == "count":
                daemon = DaemonProcess(env, repo, log).start()
                mark = moved(tasks_dir) + step
                if number == 0:
                    drop(tasks_dir)
                wait_for(lambda: moved(tasks_dir) >= mark, timeout=120, what=f"{mark} files moved")
                assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
            else:
                daemon = DaemonProcess(aimed(env, f"{kill}:{step}"), repo, log).launch()
                if number == 0:
                    drop(tasks_dir)
                assert died(daemon) == -signal.SIGKILL
            left_at_kill.append(len(list(tasks_dir.glob("*.yaml"))))
        daemon = DaemonProcess(env, repo, log).start()
        try:
            wait_for(lambda: not list(tasks_dir.glob("*.yaml")) and moved(tasks_dir) == BURST, timeout=120,
                     what="tasks.d/ to be empty")
        finally:
            assert daemon.stop() == 0
    seconds = time.monotonic() - started
    store = open_store(tmp_path / "state" / "ohd.db")
    try:
        tasks = store.list_tasks(limit=10 * BURST)
        pending = store.pending_files(str(repo))
        integrity = store.db.execute_sql("PRAGMA integrity_check").fetchall()
    finally:
        store.close()
    text = log.read_text()
    moves, records = text.count("before a restart; moving the file"), text.count("was not recorded before a stop")
    print(f"\ningest crash harness: {BURST} files, {len(kills)} kills ({', '.join(kills)}) with {left_at_kill} "
          f"files still in tasks.d/, {len(tasks)} tasks; after a kill {moves} moves and {records} records "
          f"of a move finished; {seconds:.1f} s")
    assert all(left > 0 for left in left_at_kill)       # each kill came in the middle of the burst
    assert moves >= kills.count("task-replace") and records >= kills.count("task-replace-after")
    good = sorted(f"t{n:03d}.yaml" for n in range(BURST) if n not in bad)
    assert sorted(p.name for p in (tasks_dir / DONE_DIR).iterdir()) == good
    rejected = sorted(f"t{n:03d}.yaml" for n in bad)
    assert sorted(p.name for p in (tasks_dir / REJECTED_DIR).iterdir()) == sorted(
        rejected + [f"{name}.error.txt" for name in rejected])
    assert sorted(os.listdir(tasks_dir)) == [DONE_DIR, REJECTED_DIR]
    assert sorted(t.description for t in tasks) == sorted(f"burst file {n}" for n in range(BURST) if n not in bad)
    assert sorted(t.source or "" for t in tasks) == [f"tasks.d/{name}" for name in good]
    assert pending == []                                 # every move to .done/ is recorded
    assert integrity == [("ok",)]


def drop(tasks_dir: Path) -> None:
    """The burst appears: each prepared file renamed to its task-file name, one after the other."""
    for part in sorted(tasks_dir.glob(".t*.part")):
        part.rename(tasks_dir / f"{part.name[1:-len('.part')]}.yaml")


def moved(tasks_dir: Path) -> int:
    """Files of the burst that have left tasks.d/ (for .done/ or .rejected/, not the error notes)."""
    return sum(1 for folder in (DONE_DIR, REJECTED_DIR) if (tasks_dir / folder).is_dir()
               for name in os.listdir(tasks_dir / folder) if not name.endswith(".error.txt"))


WRITE_TASKS = 24        # per round; round 2 gives the outputs of round 1 new content
# the kills of each round, in a seeded order, each at a seeded one of the first 3 such calls
WRITE_KILLS = ("output-open", "output-replace", "output-replace-after", "report-open", "report-replace-after")
CONTENTS = (DEFAULT_CONTENT, "```python\nfrom shop.pricing import total\n\n\n"
            "def test_total_of_two_prices_again() -> None:\n    assert total([2.0, 3.0]) == 5.0\n```\n")
WRITE_TASK = """type: unit_test
target: shop/pricing.py
output: tests/test_gen_{n}.py
description: round {round} output {n}
models: [{model}]
max_attempts: 1
"""


@pytest.mark.timeout(600)
def test_kill_9_at_the_writes_of_outputs_and_reports_writes_each_once(tmp_path: Path) -> None:
    """Two rounds of 24 tasks on the same 24 outputs (the second with new content, over what ohd
    wrote in the first), the daemon killed 5 times a round from inside, at an output's or a report's
    write: before its temp file (for an output: its hash is recorded), before or just after the rename.
    The server answers at once, so the daemon's time goes to validating and writing. At the end every
    output holds the second content and ohd's recorded hash, no `.ohd-new` was written, every task has
    one accepted execution and a report that says it wrote its output, and no temp file is left."""
    rng = random.Random(SEED)
    runtime = Path(tempfile.mkdtemp(prefix="ohd-rt-"))
    repo = make_repo(tmp_path / "repo")
    log = tmp_path / "daemon.log"
    database = tmp_path / "state" / "ohd.db"
    landed: list[str] = []
    started = time.monotonic()
    with FakeOpenRouter(models=[MODEL]) as server:
        env = daemon_env(tmp_path, runtime, OPENROUTER_API_KEY="sk-crash", OHD_BASE_URL=server.url,
                         OHD_MODELS=MODEL, OHD_TEST_RUNS="0", OHD_WORKERS=str(WORKERS), OHD_LEASE_S="600",
                         OHD_CRASH_LIMIT="1000",
                         OHD_RULE_LEVELS='{"*": {"lint": "off", "coverage_delta": "off"}}', OHD_SETTLE_S="0")
        for round, content in enumerate(CONTENTS, 1):
            server.default = ok(content)
            for n in range(WRITE_TASKS):
                (repo / "tasks.d" / f"r{round}-{n:02d}.yaml").write_text(
                    WRITE_TASK.format(n=n, round=round, model=MODEL))
            for kill in rng.sample(WRITE_KILLS, len(WRITE_KILLS)):
                point = f"{kill}:{rng.randint(1, 3)}"
                daemon = DaemonProcess(aimed(env, point), repo, log).launch()
                wait_for(lambda: daemon.proc is not None and daemon.proc.poll() is not None
                         or completed(database) == round * WRITE_TASKS, timeout=120, what=f"the kill at {point}")
                if daemon.stop(signal.SIGKILL) == -signal.SIGKILL and completed(database) < round * WRITE_TASKS:
                    landed.append(point)
            daemon = DaemonProcess(env, repo, log).start()
            try:
                wait_for(lambda: completed(database) == round * WRITE_TASKS, timeout=120,
                         what=f"round {round} to complete")
            finally:
                assert daemon.stop() == 0
        requests = len(server.completions())
    seconds = time.monotonic() - started
    store = open_store(database)
    try:
        tasks = store.list_tasks(limit=10 * WRITE_TASKS)
        executions = {t.id: store.executions(t.id) for t in tasks}
        paths = [f"tests/test_gen_{n}.py" for n in range(WRITE_TASKS)]
        written = {path: store.written_hash(str(repo), path) for path in paths}
        proposals = [store.written_hash(str(repo), path + OHD_NEW_SUFFIX) for path in paths]
        integrity = store.db.execute_sql("PRAGMA integrity_check").fetchall()
    finally:
        store.close()
    print(f"\nwrite crash harness: {len(landed)} kills at writes ({', '.join(landed)}), {len(tasks)} tasks, "
          f"{requests} model requests, {seconds:.1f} s")
    assert len(landed) >= 8                       # the kills came while there was work to cut
    assert len(tasks) == 2 * WRITE_TASKS
    assert {t.status for t in tasks} == {"completed"}, [(t.id, t.status, t.error) for t in tasks if t.status != "completed"]
    assert all([e.outcome for e in executions[t.id]].count("accepted") == 1 for t in tasks)
    assert sorted(repo.rglob(f"*{OHD_NEW_SUFFIX}")) == [] and proposals == [None] * WRITE_TASKS
    for path, sha in written.items():
        assert sha is not None and outputs.current_sha(repo / path) == sha == outputs.sha256_text(
            CONTENTS[1].split("\n", 1)[1].rsplit("```", 1)[0]), path
    for task in tasks:
        report_json = json.loads((repo / (task.report_path or "")).read_text())
        assert (task.output_path, report_json["output_path"], report_json["decision"]) == (
            task.output, task.output, "written"), task.id
    assert outputs.leftovers(repo, CANDIDATE_NAME) == []
    assert integrity == [("ok",)]


def completed(database: Path) -> int:
    """Completed tasks in the store (read beside the daemon, as `ohd status` does not while it is down)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)) as db:
            return int(db.execute("SELECT count(*) FROM task WHERE status = 'completed'").fetchone()[0])
    except sqlite3.OperationalError:      # not created yet, or not migrated yet
        return 0
