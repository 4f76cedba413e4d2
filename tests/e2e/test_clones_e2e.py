"""Two real `ohd daemon` processes, each with its own clone of one repo at another path, on one
PostgreSQL schema (issue 15, point 2: repo identity).

The clones share the repo's identity (its root commit and origin), so the two daemons share one
queue: 40 tasks submitted half to each daemon are each completed exactly once, by one of them, and
each output is written once, in the clone of the daemon that ran it; a task of a repo neither daemon
has stays queued.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from ohd.cli.client import Client
from ohd.core.taskfile import TaskSpec
from ohd.clock import SystemClock
from ohd.repo.gitrepo import repo_identity
from ohd.store.store import Store, open_database
from tests.e2e.helpers import DaemonProcess, daemon_env
from tests.support.databases import POSTGRES_URL, database_url
from tests.support.fake_openrouter import FakeOpenRouter
from tests.support.gitrepo import git, make_repo
from tests.support.waiting import wait_for

pytestmark = pytest.mark.skipif(not POSTGRES_URL, reason="set OHD_TEST_POSTGRES_URL for the fleet on PostgreSQL")

MODEL = "fleet/model"
TASKS = 40


def _env(tmp_path: Path, name: str, url: str, server: FakeOpenRouter) -> dict[str, str]:
    (tmp_path / name).mkdir()
    return daemon_env(tmp_path / name, Path(tempfile.mkdtemp(prefix="ohd-rt-")), OPENROUTER_API_KEY="sk-fleet",
                      OHD_BASE_URL=server.url, OHD_MODELS=MODEL, OHD_TEST_RUNS="0", OHD_WORKERS="2",
                      OHD_DATABASE_URL=url, OHD_HEARTBEAT_S="0.5")


def _submit(env: dict[str, str], repo: Path, output: str) -> int:
    client = Client(Path(env["OHD_RUNTIME_DIR"]) / "ohd.sock", timeout=60.0)
    return int(client.post("/tasks", {"type": "unit_test", "target": "shop/pricing.py", "models": [MODEL],
                                      "output": output, "max_attempts": 1, "repo": str(repo)})["id"])


def test_two_daemons_with_two_clones_complete_each_task_once_and_write_it_in_their_own_clone(tmp_path: Path) -> None:
    origin = make_repo(tmp_path / "origin")
    clones = []
    for dest in (tmp_path / "machine-a" / "shop", tmp_path / "machine-b" / "work" / "shop"):
        git(origin.parent, "clone", "-q", str(origin), str(dest))
        (dest / "tasks.d").mkdir()
        clones.append(dest.resolve())
    a_repo, b_repo = clones
    other = make_repo(tmp_path / "other")
    with database_url("postgresql", tmp_path) as url, FakeOpenRouter(models=[MODEL], latency_s=0.1) as server:
        env_a, env_b = _env(tmp_path, "a", url, server), _env(tmp_path, "b", url, server)
        a = DaemonProcess(env_a, a_repo, tmp_path / "a.log").start()
        b: DaemonProcess | None = None
        try:
            b = DaemonProcess(env_b, b_repo, tmp_path / "b.log").start()
            foreign_store = Store(open_database(url))
            foreign_store.adopt_clones({str(other): repo_identity(other)})
            foreign = foreign_store.enqueue(str(other), TaskSpec.model_validate(
                {"type": "unit_test", "target": "shop/pricing.py", "models": [MODEL]}), SystemClock().now())
            # three in four to A: B's idle workers take some of them too, and run them in clone B
            ids = [_submit(*((env_a, a_repo) if n % 4 else (env_b, b_repo)), f"tests/test_gen{n}.py")
                   for n in range(TASKS)]
            wait_for(lambda: sum(foreign_store.counts()[s] for s in ("completed", "failed", "cancelled")) >= TASKS,
                     timeout=300, what=f"the {TASKS} tasks to end")
            tasks = [a.json("show", str(i)) for i in ids]
            assert foreign_store.get_task(foreign).status == "queued"        # neither daemon has that repo
        finally:
            assert a.stop() == 0
            if b is not None:
                assert b.stop() == 0
    logs = {a_repo: (tmp_path / "a.log").read_text(), b_repo: (tmp_path / "b.log").read_text()}
    ran_in = {a_repo: 0, b_repo: 0}
    crossed = 0      # submitted to A (made in clone A), run by B
    for n, task in enumerate(tasks):
        assert task["status"] == "completed", task
        assert [e["outcome"] for e in task["executions"]] == ["accepted"], task       # each task once
        [runner] = [repo for repo, text in logs.items() if f"task {task['id']} completed:" in text]   # by one daemon
        other = ({a_repo, b_repo} - {runner}).pop()
        assert Path(task["repo"]) == runner, task               # the store says which clone ran it
        output = task["output"]
        assert output == f"tests/test_gen{n}.py"
        assert (runner / output).is_file(), task                # written in the clone that ran it...
        assert not (other / output).exists(), task              # ...and in no other
        ran_in[runner] += 1
        crossed += bool(n % 4) and runner == b_repo
    written = [p.name for repo in (a_repo, b_repo) for p in (repo / "tests").glob("test_gen*.py")]
    assert sorted(written) == sorted(f"test_gen{n}.py" for n in range(TASKS))     # each output once in all
    print(f"{TASKS} tasks: {ran_in[a_repo]} ran in clone A, {ran_in[b_repo]} in clone B ({crossed} of them "
          f"submitted to A); {len(server.completions())} model requests")
    assert len(server.completions()) == TASKS                  # one model call per task: none ran twice
    assert crossed > 0
