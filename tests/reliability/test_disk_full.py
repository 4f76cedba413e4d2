"""Disk full and read-only (issue 11, point 9), against real `ohd daemon` processes.

The state dir (the SQLite store) or the repo is a small tmpfs of its own that the test fills up
(a filler file written until ENOSPC) or remounts read-only, then frees or remounts read-write.
The model's answer is held by the fake server until the store is full, so the task's own
writes meet the full disk; the lease is 2 s, so it comes due while the disk is full (before, the
housekeeping's 'database or disk is full' ended the daemon then; now the worker holds the task
and the housekeeping leaves it to it, so the held task counts no crash). A full or read-only store:
the daemon stays up, says it waits for storage (`ohd status`, 507 on the socket, one line and
exit 1 from the CLI), holds the task and runs it to completion, attempt 1, once space is back;
`PRAGMA integrity_check` is ok. A full or read-only repo: the task fails with that reason and the
output ohd wrote before keeps its bytes. Needs root (mount); skipped otherwise.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from ohd.cli.client import Client
from ohd.core.taskfile import TaskSpec
from ohd.errors import ApiError
from ohd.store.store import Store, open_database

from tests.e2e.helpers import DaemonProcess, daemon_env
from tests.support.fake_openrouter import DEFAULT_CONTENT, FakeOpenRouter, held, ok
from tests.support.gitrepo import make_repo
from tests.support.waiting import wait_for

pytestmark = pytest.mark.reliability

MODEL = "disk/model"
SIZE = "2m"
OUTPUT = "tests/test_pricing.py"
SECOND = ("```python\nfrom shop.pricing import total\n\n\n"
          "def test_total_of_nothing() -> None:\n    assert total([]) == 0\n```\n")


def _code(answer: str) -> str:
    """The file ohd writes from an answer: the code block's text."""
    return answer.split("```python\n", 1)[1].split("```", 1)[0]


class Tmpfs:
    """A tmpfs mounted at `path`: `fill` it (a filler file written until ENOSPC) and `free` it,
    remount it `read_only` and `writable`; `unmount` in teardown, whatever state it is in."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / ".filler"

    def mount(self) -> Tmpfs:
        self.path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0700", "tmpfs", str(self.path)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
        return self

    def fill(self) -> int:
        written = 0
        with open(self.filler, "ab", buffering=0) as fh:
            for chunk in (1 << 16, 1 << 12, 1):
                try:
                    while True:
                        written += fh.write(b"\0" * chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
        return written

    def free(self) -> None:
        self.filler.unlink()

    def read_only(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True)

    def writable(self) -> None:
        subprocess.run(["mount", "-o", "remount,rw", str(self.path)], check=True)

    def unmount(self) -> None:
        subprocess.run(["mount", "-o", "remount,rw", str(self.path)], capture_output=True, check=False)
        if subprocess.run(["umount", str(self.path)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True, check=False)


@pytest.fixture
def tmpfs() -> Iterator[list[Tmpfs]]:
    """Mounts made by the test (`Tmpfs(path).mount()` appended here), unmounted after it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounts: list[Tmpfs] = []
    yield mounts
    for mount in reversed(mounts):
        mount.unmount()


@pytest.fixture
def server() -> Iterator[FakeOpenRouter]:
    with FakeOpenRouter(models=[MODEL]) as fake:
        yield fake


def _env(tmp_path: Path, state: Path, server: FakeOpenRouter, **extra: str) -> dict[str, str]:
    runtime = Path(tempfile.mkdtemp(prefix="ohd-rt-"))
    env = daemon_env(tmp_path, runtime, OPENROUTER_API_KEY="sk-disk", OHD_BASE_URL=server.url, OHD_MODELS=MODEL,
                     OHD_LEASE_S="2", OHD_WORKERS="1",
                     OHD_RULE_LEVELS='{"*": {"lint": "off", "coverage_delta": "off"}}', **extra)
    env["OHD_STATE_DIR"] = str(state)
    return env


def _renewed_since(daemon: DaemonProcess, task_id: int) -> bool:
    """The task's lease runs past the daemon's "now" read before it: renewed meanwhile (the 2 s lease
    read first would have run out while a slow `ohd status` of a loaded machine ran)."""
    now = datetime.fromisoformat(daemon.json("status")["now"])
    return datetime.fromisoformat(_task(daemon, task_id)["lease_until"]) > now


def _client(env: dict[str, str]) -> Client:
    return Client(Path(env["OHD_RUNTIME_DIR"]) / "ohd.sock", timeout=60.0)


def _submit(env: dict[str, str], repo: Path, **extra: Any) -> int:
    return int(_client(env).post("/tasks", {"type": "unit_test", "target": "shop/pricing.py", "models": [MODEL],
                                            "repo": str(repo), "max_attempts": 1, "cache": False,   # a new answer each
                                            **extra})["id"])


def _task(daemon: DaemonProcess, task_id: int) -> dict[str, Any]:
    return dict(daemon.json("show", str(task_id)))


def _settled(daemon: DaemonProcess, task_id: int) -> dict[str, Any] | None:
    task = _task(daemon, task_id)
    return task if task["status"] in ("completed", "failed") else None


def _alive(daemon: DaemonProcess) -> bool:
    assert daemon.proc is not None
    return daemon.proc.poll() is None


def _integrity(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def _left_running(db: Path, repo: Path) -> int:
    """A task another daemon (on a shared store) was running, its lease due in 5 s; its id."""
    store = Store(open_database(f"sqlite:///{db}"))
    try:
        now = datetime.now(UTC)
        task_id = store.enqueue(str(repo), TaskSpec.model_validate(
            {"type": "unit_test", "target": "shop/pricing.py", "models": [MODEL], "max_attempts": 1}), now)
        claim = store.claim_next("gone-daemon", now, timedelta(seconds=5))
        assert claim is not None and claim.task.id == task_id, claim
        return task_id
    finally:
        store.close()


def test_a_full_state_dir_holds_the_task_and_resumes_when_space_is_back(
        tmp_path: Path, tmpfs: list[Tmpfs], server: FakeOpenRouter) -> None:
    state = Tmpfs(tmp_path / "state").mount()
    tmpfs.append(state)
    repo = make_repo(tmp_path / "repo")
    gate = threading.Event()
    server.script(MODEL, [held(gate)])
    env = _env(tmp_path, state.path, server, OHD_TEST_RUNS="0")
    log = tmp_path / "daemon.log"
    daemon = DaemonProcess(env, repo, log).start()
    try:
        task_id = _submit(env, repo)
        wait_for(lambda: server.requests_for(MODEL), what="the task's request to the model")
        ghost = _left_running(state.path / "ohd.db", repo)   # its lease comes due while the disk is full
        state.fill()
        gate.set()     # the answer comes: its writes meet the full store
        reason = "the disk is full"
        status = wait_for(lambda: not _alive(daemon) or (s := daemon.json("status")).get("storage") and s,
                          what="the daemon to say it waits for storage")
        assert _alive(daemon), log.read_text()
        assert reason in status["storage"]["error"], status["storage"]
        # the leases come due while the store is full: the housekeeping's reap of the other daemon's
        # task is refused (before, that ended the daemon), the held task's own is left to its worker
        wait_for(lambda: not _alive(daemon) or "housekeeping: cannot write the store" in log.read_text(),
                 what="the housekeeping to meet the full store")
        lease_until = datetime.fromisoformat(_task(daemon, task_id)["lease_until"])
        wait_for(lambda: not _alive(daemon) or datetime.fromisoformat(daemon.json("status")["now"])
                 > lease_until + timedelta(seconds=3), what="the held task's lease to come due and pass")
        assert _alive(daemon), log.read_text()
        text = daemon.ohd("status")
        assert text.returncode == 0 and "waiting for storage" in text.stdout and reason in text.stdout, text
        with pytest.raises(ApiError) as refused:
            _submit(env, repo)
        assert refused.value.status == 507 and reason in refused.value.message, refused.value
        cli = daemon.ohd("submit", "--type", "unit_test", "--target", "shop/pricing.py", "--repo", str(repo))
        assert cli.returncode == 1 and reason in cli.stderr and len(cli.stderr.strip().splitlines()) == 1, cli
        assert "Traceback" not in log.read_text()
        state.free()
        task = wait_for(lambda: _settled(daemon, task_id), what="the held task to finish once the store is back")
        assert (task["status"], task["attempts"], task["error"]) == ("completed", 1, None), task
        assert task["crashes"] == 0, task      # held by a live worker: no crash, whatever its lease said
        assert (repo / OUTPUT).read_text() == _code(DEFAULT_CONTENT)
        ghosted = wait_for(lambda: _settled(daemon, ghost), what="the other daemon's task, reaped once there is room")
        assert (ghosted["status"], ghosted["crashes"]) == ("completed", 1), ghosted
        assert not daemon.json("status").get("storage")
        assert _alive(daemon)
    finally:
        assert daemon.stop() == 0, log.read_text()
    assert _integrity(state.path / "ohd.db") == "ok"


def test_an_idle_daemon_stops_waiting_for_storage_once_space_is_back(
        tmp_path: Path, tmpfs: list[Tmpfs], server: FakeOpenRouter) -> None:
    """Nothing writes after the refused submit: the daemon itself finds out that the store is back."""
    state = Tmpfs(tmp_path / "state").mount()
    tmpfs.append(state)
    repo = make_repo(tmp_path / "repo")
    env = _env(tmp_path, state.path, server, OHD_TEST_RUNS="0")
    log = tmp_path / "daemon.log"
    daemon = DaemonProcess(env, repo, log).start()
    try:
        state.fill()
        with pytest.raises(ApiError) as refused:
            _submit(env, repo)
        assert refused.value.status == 507, refused.value
        assert "the disk is full" in daemon.json("status")["storage"]["error"]
        wait_for(lambda: "housekeeping: cannot write the store" in log.read_text(),
                 what="the daemon's own probe to be refused while the disk is full")
        assert "the disk is full" in daemon.json("status")["storage"]["error"]
        state.free()
        wait_for(lambda: not daemon.json("status").get("storage"), what="the daemon to see the store writable")
        assert daemon.json("tasks")["tasks"] == []     # the refused task was never half-stored
    finally:
        assert daemon.stop() == 0, log.read_text()


def test_a_task_file_dropped_while_the_store_is_full_waits_in_tasks_d_and_runs_once_there_is_room(
        tmp_path: Path, tmpfs: list[Tmpfs], server: FakeOpenRouter) -> None:
    state = Tmpfs(tmp_path / "state").mount()
    tmpfs.append(state)
    repo = make_repo(tmp_path / "repo")
    env = _env(tmp_path, state.path, server, OHD_TEST_RUNS="0")
    log = tmp_path / "daemon.log"
    daemon = DaemonProcess(env, repo, log).start()
    try:
        state.fill()
        dropped = repo / "tasks.d" / "tests.yaml"
        dropped.write_text(f"type: unit_test\ntarget: shop/pricing.py\nmodels: [{MODEL}]\nmax_attempts: 1\n")
        wait_for(lambda: "ingest of" in log.read_text(), what="ingest to meet the full store")
        assert "Traceback" not in log.read_text()
        assert "the disk is full" in log.read_text()
        assert dropped.exists() and not (repo / "tasks.d" / ".rejected").exists()   # waits where it was
        state.free()
        tasks = wait_for(lambda: [t for t in daemon.json("tasks")["tasks"] if t["status"] == "completed"],
                         what="the dropped file's task to run once there is room")
        assert len(tasks) == 1 and (repo / "tasks.d" / ".done" / "tests.yaml").exists(), tasks
        assert "Traceback" not in log.read_text()
    finally:
        assert daemon.stop() == 0, log.read_text()


def test_lease_renewals_refused_by_a_full_state_dir_start_again_once_space_is_back(
        tmp_path: Path, tmpfs: list[Tmpfs], server: FakeOpenRouter) -> None:
    """The task waits for its answer the whole time, so only its lease renewals meet the full disk."""
    state = Tmpfs(tmp_path / "state").mount()
    tmpfs.append(state)
    repo = make_repo(tmp_path / "repo")
    gate = threading.Event()
    server.script(MODEL, [held(gate)])
    env = _env(tmp_path, state.path, server, OHD_TEST_RUNS="0")
    log = tmp_path / "daemon.log"
    daemon = DaemonProcess(env, repo, log).start()
    try:
        task_id = _submit(env, repo)
        wait_for(lambda: server.requests_for(MODEL), what="the task's request to the model")
        state.fill()
        refused = wait_for(lambda: not _alive(daemon) or (s := daemon.json("status")).get("storage") and s,
                           what="a refused renewal")
        assert _alive(daemon) and "the disk is full" in refused["storage"]["error"], log.read_text()
        lease_until = datetime.fromisoformat(_task(daemon, task_id)["lease_until"])
        wait_for(lambda: not _alive(daemon) or datetime.fromisoformat(daemon.json("status")["now"])
                 > lease_until + timedelta(seconds=2), what="the lease to run out while the disk is full")
        state.free()
        wait_for(lambda: not _alive(daemon) or _renewed_since(daemon, task_id), what="the lease renewed again")
        assert _alive(daemon), log.read_text()
        gate.set()
        task = wait_for(lambda: _settled(daemon, task_id), what="the task to complete")
        assert (task["status"], task["attempts"], task["crashes"]) == ("completed", 1, 0), task
        assert len(server.requests_for(MODEL)) == 1      # never put back: it ran through
    finally:
        assert daemon.stop() == 0, log.read_text()
    assert _integrity(state.path / "ohd.db") == "ok"


def test_a_full_or_read_only_repo_fails_the_task_with_that_reason_and_keeps_the_old_output(
        tmp_path: Path, tmpfs: list[Tmpfs], server: FakeOpenRouter) -> None:
    disk = Tmpfs(tmp_path / "disk").mount()
    tmpfs.append(disk)
    repo = make_repo(disk.path / "repo")
    env = _env(tmp_path, tmp_path / "state", server, OHD_TEST_RUNS="1")   # the ladder writes in the repo too
    log = tmp_path / "daemon.log"
    daemon = DaemonProcess(env, repo, log).start()
    try:
        task_id = _submit(env, repo)
        first = wait_for(lambda: _settled(daemon, task_id), what="the first task")
        assert first["status"] == "completed", first
        before = (repo / OUTPUT).read_bytes()
        server.default = ok(SECOND)     # the next answers would replace the output
        # full: the output's own write meets it (no pytest run); read-only: the candidate's, for pytest
        for fault, reason, levels in (("full", "the disk is full", {"runs_green": "off"}),
                                      ("read-only", "the file system is read-only", {})):
            if fault == "full":
                disk.fill()
            else:
                disk.read_only()
            task_id = _submit(env, repo, rule_levels=levels)
            task = wait_for(lambda: _settled(daemon, task_id), what=f"the task in the {fault} repo")  # noqa: B023
            assert task["status"] == "failed", task
            assert task["error"].startswith(f"cannot write in {repo}: {reason}"), task
            assert "internal error" not in task["error"], task
            assert (repo / OUTPUT).read_bytes() == before
            assert _alive(daemon), log.read_text()
            if fault == "full":
                disk.free()
            else:
                disk.writable()
        assert not [p for p in (repo / "tests").iterdir() if p.name.endswith(".tmp")]
        assert daemon.ohd("retry", str(task_id)).returncode == 0
        task = wait_for(lambda: _settled(daemon, task_id), what="the retried task once the repo is writable")
        assert task["status"] == "completed", task
        assert (repo / OUTPUT).read_text() == _code(SECOND)
    finally:
        assert daemon.stop() == 0, log.read_text()


def test_a_daemon_started_on_a_full_or_read_only_state_dir_says_so_in_one_line_and_starts_once_writable(
        tmp_path: Path, tmpfs: list[Tmpfs], server: FakeOpenRouter) -> None:
    """A read-only remount needs no file open for writing, so it is tested at start-up: under a
    running daemon (its store open) the kernel refuses it ('mount point is busy'). Before, each start
    ended in a traceback (OSError ENOSPC, EROFS from the lock file)."""
    state = Tmpfs(tmp_path / "state").mount()
    tmpfs.append(state)
    env = _env(tmp_path, state.path, server, OHD_TEST_RUNS="0")
    repo = make_repo(tmp_path / "repo")
    log = tmp_path / "daemon.log"
    daemon = DaemonProcess(env, repo, log).start()     # a store with a task waiting in it
    task_id = _submit(env, repo)
    assert daemon.stop() == 0
    # full: the lock keeps its page, the store cannot make its -shm (SQLite says 'disk I/O error');
    # read-only: the lock file cannot be opened for writing
    for fault, what, reason in (("full", "the store", "the disk is full"),
                                ("read-only", "the lock file", "the file system is read-only")):
        if fault == "full":
            state.fill()
        else:
            state.read_only()
        done = subprocess.run([sys.executable, "-m", "ohd", "daemon", "--repo", str(repo)], env=env,
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 1, done
        assert "Traceback" not in done.stderr, done.stderr
        errors = [line for line in done.stderr.splitlines() if line.startswith("ohd: ")]
        assert len(errors) == 1 and f"cannot write {what} " in errors[0] and reason in errors[0], done.stderr
        if fault == "full":
            state.free()
        else:
            state.writable()
    daemon = DaemonProcess(env, repo, log).start()     # writable again: it starts and runs the task
    try:
        task = wait_for(lambda: _settled(daemon, task_id), what="the waiting task once the store is back")
        assert task["status"] == "completed", task
    finally:
        assert daemon.stop() == 0
    assert _integrity(state.path / "ohd.db") == "ok"


def test_a_store_locked_by_another_process_is_503_and_the_daemon_goes_on(
        tmp_path: Path, server: FakeOpenRouter) -> None:
    """Another process holds the store's write lock past the busy timeout (5 s) and the store's wait
    for it (`store_lock_wait_s`, 1 s here: 30 by default); no root needed."""
    repo = make_repo(tmp_path / "repo")
    env = _env(tmp_path, tmp_path / "state", server, OHD_TEST_RUNS="0", OHD_STORE_LOCK_WAIT_S="1")
    log = tmp_path / "daemon.log"
    daemon = DaemonProcess(env, repo, log).start()
    try:
        holder = sqlite3.connect(tmp_path / "state" / "ohd.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(ApiError) as refused:
                _submit(env, repo)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert refused.value.status == 503 and "locked" in refused.value.message, refused.value
        task_id = _submit(env, repo)
        task = wait_for(lambda: _settled(daemon, task_id), what="a task once the lock is let go")
        assert task["status"] == "completed", task
        assert [t["id"] for t in daemon.json("tasks")["tasks"]] == [task_id]   # the refused one left nothing
        assert _alive(daemon)
    finally:
        assert daemon.stop() == 0, log.read_text()


def test_the_filler_really_fills(tmp_path: Path, tmpfs: list[Tmpfs]) -> None:
    """The other tests' premise: after `fill`, nothing more can be written on the tmpfs."""
    disk = Tmpfs(tmp_path / "disk").mount()
    tmpfs.append(disk)
    assert disk.fill() > 1_000_000
    with pytest.raises(OSError) as full:
        (disk.path / "more").write_bytes(b"x" * 4096)
    assert full.value.errno == errno.ENOSPC
    disk.free()
    (disk.path / "more").write_bytes(b"x" * 4096)
