"""Connection faults on PostgreSQL (issue 15, point 5): a real daemon on a private PostgreSQL cluster
of its own (initdb + pg_ctl on a free port in a temp dir; the shared server is never touched),
tasks against the fake model server, and the cluster restarted, then stopped for a while and
started again, mid-run. Every task completes once, nothing is lost, and `ohd status` answers while
the server is down, saying why the daemon waits. Skipped only when the PostgreSQL binaries are absent.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.e2e.helpers import DaemonProcess, daemon_env
from tests.support.fake_openrouter import FakeOpenRouter
from tests.support.gitrepo import make_repo
from tests.support.waiting import wait_for

from ohd.cli.client import Client
from ohd.errors import ApiError, StorageUnavailable
from ohd.store import schema
from ohd.store.store import Store, open_database

BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
pytestmark = pytest.mark.skipif(not BIN, reason="no PostgreSQL binaries (initdb, pg_ctl) in /usr/lib/postgresql")

MODEL = "faults/model"
TASKS = 16


class Cluster:
    """A PostgreSQL cluster of this test's own: a data dir in a temp dir, a free port on 127.0.0.1,
    run as the postgres user when we are root (initdb refuses root)."""

    def __init__(self) -> None:
        self.bin = Path(BIN[-1]).parent
        self.dir = Path(tempfile.mkdtemp(prefix="ohd-pg-"))
        self.data, self.log = self.dir / "data", self.dir / "server.log"
        self.port = _free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.dir, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self.as_user, str(self.bin / tool), *args], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"{tool} {' '.join(args)}: {done.stdout}{done.stderr}"

    def _ctl(self, *args: str) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "300", *args, "-o", options)

    def start(self) -> None:
        self._ctl("start")

    def restart(self) -> None:
        self._ctl("restart", "-m", "fast")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "300", "stop", "-m", "fast")

    def remove(self) -> None:
        subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "stop", "-m", "immediate"],
                       capture_output=True, timeout=300)
        shutil.rmtree(self.dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    pg = Cluster()
    try:
        pg.start()
        yield pg
    finally:
        pg.remove()


def _status(daemon: DaemonProcess) -> dict[str, Any] | None:
    done = daemon.ohd("status", "--json")
    return json.loads(done.stdout) if done.returncode == 0 else None


def _completed(daemon: DaemonProcess) -> int:
    status = _status(daemon)
    queue = status.get("queue") if status else None
    return int(queue["completed"]) if isinstance(queue, dict) else -1


def _ended(daemon: DaemonProcess) -> int:
    """Tasks in a final state (completed, failed or cancelled): a wait on them ends on a failure too."""
    status = _status(daemon)
    queue = status.get("queue") if status else None
    return sum(int(queue[s]) for s in ("completed", "failed", "cancelled")) if isinstance(queue, dict) else -1


def _submit(client: Client, i: int) -> int:
    return int(client.post("/tasks", {"type": "unit_test", "target": "shop/pricing.py", "models": [MODEL],
                                      "output": f"tests/test_t{i}.py", "max_attempts": 1})["id"])


def _down(daemon: DaemonProcess) -> dict[str, Any]:
    """`ohd status` while the server is down: it answers, with the reason, without a made-up queue."""
    status = wait_for(lambda: (s := _status(daemon)) and s.get("storage") and s, timeout=120,
                      what="ohd status to name the outage")
    assert status["storage"]["reason"] == StorageUnavailable.UNREACHABLE, status["storage"]
    assert "queue" not in status
    text = daemon.ohd("status")
    assert text.returncode == 0, text.stderr
    assert "storage: waiting for the database: cannot write the store postgresql://127.0.0.1/postgres: its " \
           "server cannot be reached" in text.stdout, text.stdout
    assert "no task is claimed until it answers" in text.stdout, text.stdout
    return status


def test_a_restart_and_an_outage_of_postgresql_lose_nothing_and_status_says_why(
        tmp_path: Path, cluster: Cluster) -> None:
    repo = make_repo(tmp_path / "repo")
    (tmp_path / "d").mkdir()
    with FakeOpenRouter(models=[MODEL], latency_s=0.3) as server:
        env = daemon_env(tmp_path / "d", Path(tempfile.mkdtemp(prefix="ohd-rt-")), OPENROUTER_API_KEY="sk-faults",
                         OHD_BASE_URL=server.url, OHD_MODELS=MODEL, OHD_TEST_RUNS="0", OHD_WORKERS="2",
                         OHD_DATABASE_URL=cluster.url, OHD_DAEMON_LOST_S="120", OHD_LEASE_S="120")
        daemon = DaemonProcess(env, repo, tmp_path / "daemon.log").start()
        try:
            client = Client(Path(env["OHD_RUNTIME_DIR"]) / "ohd.sock", timeout=60.0)
            ids = [_submit(client, i) for i in range(TASKS)]
            wait_for(lambda: _completed(daemon) >= 3, timeout=300, what="3 tasks to complete")

            cluster.restart()                 # the daemon's connections are cut mid-run
            wait_for(lambda: _completed(daemon) >= 8, timeout=300, what="8 tasks done after the restart")

            cluster.stop()                    # down for a while with tasks running: they are held
            _down(daemon)
            time.sleep(3)                     # the outage lasts a while (nothing is asserted of its length)
            cluster.start()
            wait_for(lambda: _ended(daemon) == TASKS, timeout=300, what="every task to end")

            cluster.stop()                    # down while the workers are idle: they stop claiming
            _down(daemon)
            with pytest.raises(ApiError) as refused:       # a submit says why it cannot be queued now
                _submit(client, TASKS)
            assert refused.value.status == 503 and "its server cannot be reached" in refused.value.message
            wait_for(lambda: "claiming nothing until it answers" in daemon.log.read_text(), timeout=120,
                     what="the workers to back off")
            assert daemon.proc is not None and daemon.proc.poll() is None, "the daemon died in the outage"
            cluster.start()
            wait_for(lambda: "the store answers again; claiming" in daemon.log.read_text(), timeout=120,
                     what="the workers to claim again")
            ids += [_submit(client, i) for i in range(TASKS, TASKS + 4)]
            wait_for(lambda: _ended(daemon) == TASKS + 4, timeout=300, what="the new tasks to end")
            wait_for(lambda: (s := _status(daemon)) and s.get("storage") is None, timeout=120,
                     what="the status to clear the outage")
        finally:
            assert daemon.stop() == 0, daemon.log.read_text()
        requests = server.completions()
    log = daemon.log.read_text()
    db = open_database(cluster.url)
    store = Store(db)
    tasks = [store.get_task(i) for i in ids]
    assert [t.status for t in tasks] == ["completed"] * len(ids), [(t.id, t.status, t.error) for t in tasks]
    for task in tasks:        # once each: one accepted answer, its output written
        assert [e.outcome for e in store.executions(task.id)] == ["accepted"], (task.id, store.executions(task.id))
        assert task.output_path is not None and (repo / task.output_path).is_file(), task
    counted = schema.bind(db).model_request.select().count()
    assert counted == len(requests), (counted, len(requests))   # every request sent was counted, once
    assert len(requests) == len(ids), (len(requests), len(ids))  # and no model was asked twice for a task
    assert "Traceback" not in log, log
    held = log.count("holding the task until the store can be written")
    print(f"{len(ids)} tasks, {len(requests)} model requests, {held} run(s) held and run again")


def test_two_daemons_ride_out_a_restart_and_an_outage_without_running_a_task_twice(
        tmp_path: Path, cluster: Cluster) -> None:
    """A fleet of two on the private cluster: the restart and the outage cut both daemons' connections
    at once; no task is completed by both, none is lost, every output is written once."""
    repo = make_repo(tmp_path / "repo")
    daemons = []
    with FakeOpenRouter(models=[MODEL], latency_s=0.3) as server:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            env = daemon_env(tmp_path / name, Path(tempfile.mkdtemp(prefix="ohd-rt-")), OPENROUTER_API_KEY="sk-f",
                             OHD_BASE_URL=server.url, OHD_MODELS=MODEL, OHD_TEST_RUNS="0", OHD_WORKERS="2",
                             OHD_DATABASE_URL=cluster.url, OHD_DAEMON_LOST_S="120", OHD_LEASE_S="120")
            daemons.append(DaemonProcess(env, repo, tmp_path / f"{name}.log").launch())
        try:
            for daemon in daemons:
                wait_for(lambda d=daemon: d.ohd("status", "--json").returncode == 0 or d._died(), timeout=120,
                         what="the daemon to answer on its socket")
            clients = [Client(Path(d.env["OHD_RUNTIME_DIR"]) / "ohd.sock", timeout=60.0) for d in daemons]
            ids = [_submit(clients[i % 2], i) for i in range(2 * TASKS)]
            wait_for(lambda: _completed(daemons[0]) >= 4, timeout=300, what="4 tasks to complete")
            cluster.restart()
            wait_for(lambda: _completed(daemons[1]) >= 12, timeout=300, what="12 tasks done after the restart")
            cluster.stop()
            for daemon in daemons:
                _down(daemon)
            cluster.start()
            wait_for(lambda: _ended(daemons[0]) == 2 * TASKS, timeout=300, what="every task to end")
        finally:
            codes = [d.stop() for d in daemons if d.proc is not None]
        assert codes == [0, 0], codes
        requests = server.completions()
    logs = [d.log.read_text() for d in daemons]
    db = open_database(cluster.url)
    store = Store(db)
    tasks = [store.get_task(i) for i in ids]
    assert [t.status for t in tasks] == ["completed"] * len(ids), [(t.id, t.status, t.error) for t in tasks]
    for task in tasks:
        assert [e.outcome for e in store.executions(task.id)] == ["accepted"], (task.id, store.executions(task.id))
        assert task.output_path is not None and (repo / task.output_path).is_file(), task
    finished = [line for log in logs for line in log.splitlines() if " completed: model=" in line]
    assert len(finished) == len(ids), finished           # each task completed by one daemon, once
    assert schema.bind(db).model_request.select().count() == len(requests)
    assert len(requests) == len(ids), (len(requests), len(ids))  # no model asked twice for a task
    for log in logs:
        assert "Traceback" not in log, log
    print(f"{len(ids)} tasks on 2 daemons, {len(requests)} model requests")
