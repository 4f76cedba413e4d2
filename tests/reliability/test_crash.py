"""Crash safety (issue 11, point 2): a real `ohd daemon` killed with SIGKILL at seeded random
moments while it ingests a burst of task files, asks the fake server (with latency), validates and
writes outputs; restarted at once each time. At the end nothing is lost or done twice.

The tasks are cheap (unit_test with the static rules only: no pytest, no lint), so the run is
about the daemon's bookkeeping, not the ladder. The seed and the counts are the constants below.
"""

from __future__ import annotations

import random
import signal
import tempfile
import time
from pathlib import Path

import pytest

from ohd import outputs
from ohd.testrun import CANDIDATE_NAME
from tests.e2e.helpers import DaemonProcess, daemon_env
from tests.support.databases import open_store
from tests.support.fake_openrouter import FakeOpenRouter
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


@pytest.mark.timeout(900)   # a hang bound above its own waits (300 s for the tasks): 47 s idle, 180+ s loaded
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
                     .get("failed", 0) >= TASKS, timeout=300, what="every task to finish")
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
