"""Two real `ohd daemon` processes on one PostgreSQL database (issue 15, point 1: daemons as rows).

Each daemon has its own state dir and socket; the database is a schema of its own, dropped after.
Daemon A's two workers wait for answers that never come (the fake server in this process holds
them) when A is killed with SIGKILL; daemon B, beside it, finds A lost once its heartbeat is older
than `daemon_lost_s` and returns A's leases at once, long before the 60 s lease would expire.
"""

from __future__ import annotations

import signal
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from ohd.cli.client import Client
from ohd.clock import SystemClock
from ohd.store.fleet import Fleet
from ohd.store.store import open_database
from tests.e2e.helpers import DaemonProcess, daemon_env
from tests.support.databases import POSTGRES_URL, database_url
from tests.support.fake_openrouter import FakeOpenRouter, never_answer
from tests.support.gitrepo import make_repo
from tests.support.waiting import wait_for

pytestmark = pytest.mark.skipif(not POSTGRES_URL, reason="set OHD_TEST_POSTGRES_URL for the fleet on PostgreSQL")

MODEL = "fleet/model"
LOST_S = 2.0


def _env(tmp_path: Path, name: str, url: str, server: FakeOpenRouter, workers: int) -> dict[str, str]:
    (tmp_path / name).mkdir()
    return daemon_env(tmp_path / name, Path(tempfile.mkdtemp(prefix="ohd-rt-")), OPENROUTER_API_KEY="sk-fleet",
                      OHD_BASE_URL=server.url, OHD_MODELS=MODEL, OHD_TEST_RUNS="0", OHD_WORKERS=str(workers),
                      OHD_DATABASE_URL=url, OHD_HEARTBEAT_S="0.5", OHD_DAEMON_LOST_S=str(LOST_S),
                      OHD_REQUEST_TIMEOUT_S="600")


def _submit(env: dict[str, str], output: str) -> int:
    client = Client(Path(env["OHD_RUNTIME_DIR"]) / "ohd.sock", timeout=60.0)
    return int(client.post("/tasks", {"type": "unit_test", "target": "shop/pricing.py", "models": [MODEL],
                                      "output": output, "max_attempts": 1, "timeout_s": 600})["id"])


def _me(daemon: DaemonProcess) -> dict[str, Any]:
    [me] = [d for d in daemon.json("status")["fleet"] if d["self"]]
    return me


def test_a_kill_9_of_one_of_two_daemons_hands_its_tasks_to_the_other_within_seconds(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    with database_url("postgresql", tmp_path) as url, FakeOpenRouter(models=[MODEL]) as server:
        server.script(MODEL, [never_answer(), never_answer()])     # A's two requests
        env_a, env_b = _env(tmp_path, "a", url, server, 2), _env(tmp_path, "b", url, server, 4)
        a = DaemonProcess(env_a, repo, tmp_path / "a.log").start()
        b: DaemonProcess | None = None
        try:
            a_id = _me(a)["id"]
            held = [_submit(env_a, f"tests/test_a{i}.py") for i in range(2)]
            wait_for(lambda: len(server.completions()) == 2, what="A's two model calls")
            b = DaemonProcess(env_b, repo, tmp_path / "b.log").start()
            b_id = _me(b)["id"]
            others = [_submit(env_b, f"tests/test_b{i}.py") for i in range(4)]
            fleet = {d["id"]: d for d in b.json("status")["fleet"]}
            assert (fleet[a_id]["state"], fleet[a_id]["running"], fleet[b_id]["state"]) == ("alive", 2, "alive")
            assert a.stop(signal.SIGKILL) == -signal.SIGKILL
            killed = time.monotonic()
            wait_for(lambda: all(b.json("show", str(i))["status"] == "completed" for i in held),
                     timeout=60, what="A's tasks to complete on B")
            handed_over_s = time.monotonic() - killed
            wait_for(lambda: all(b.json("show", str(i))["status"] == "completed" for i in others),
                     timeout=60, what="B's own tasks to complete")
            status_text = b.ohd("status").stdout
            fleet = {d["id"]: d for d in b.json("status")["fleet"]}
            listed = Client(Path(env_b["OHD_RUNTIME_DIR"]) / "ohd.sock").get("/daemons")["daemons"]
            tasks = [b.json("show", str(i)) for i in held + others]
        finally:
            if a.proc is not None and a.proc.poll() is None:
                a.stop(signal.SIGKILL)
            if b is not None:
                assert b.stop() == 0
        db = open_database(url)
        after_stop = {info.id: info.state for info in Fleet(db).daemons(SystemClock().now(), timedelta(seconds=LOST_S))}
        db.close()
        print(f"A's tasks completed on B {handed_over_s:.1f} s after the kill (lease 60 s, lost after {LOST_S:g} s)")
        assert handed_over_s < 20, handed_over_s           # not a lease period: lost after 2 s, then run at once
        for task in tasks:
            assert [e["outcome"] for e in task["executions"]] == ["accepted"], task    # each task once
        assert [t["crashes"] for t in tasks] == [1, 1, 0, 0, 0, 0]
        assert len(server.completions()) == 2 + 6             # A's two unanswered, then one call per task
        assert (fleet[a_id]["state"], fleet[a_id]["running"], fleet[b_id]["state"]) == ("lost", 0, "alive")
        assert after_stop == {a_id: "lost", b_id: "stopped"}      # B's clean stop deregistered it
        assert sorted(d["id"] for d in listed) == sorted(fleet)
        assert f"lost  {a_id}" in status_text and f"alive {b_id} (this daemon)" in status_text, status_text
        assert f"task {held[0]}: its daemon was lost; back to the queue" in (tmp_path / "b.log").read_text()
