"""A real `ohd daemon` under a stand-in for systemd: a real AF_UNIX datagram socket as
NOTIFY_SOCKET, real signals (SIGTERM, SIGHUP), and `ohd service install` as a real process."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ohd.cli.client import Client
from ohd.service import systemd as service
from tests.e2e.helpers import DaemonProcess, daemon_env, fake_openrouter
from tests.support.waiting import wait_for


@pytest.fixture
def runtime() -> Path:
    return Path(os.environ["OHD_RUNTIME_DIR"])


@pytest.fixture
def notify_socket(runtime: Path) -> Iterator[tuple[socket.socket, Path]]:
    path = runtime / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    try:
        yield sock, path
    finally:
        sock.close()
        path.unlink(missing_ok=True)


def receive_until(sock: socket.socket, field: str, seen: list[str]) -> str:
    """Read datagrams (appending them to `seen`) until one carries the line `field`."""
    while True:
        message = sock.recv(4096).decode()
        seen.append(message)
        if any(line == field or line.startswith(field) for line in message.split("\n")):
            return message


def test_ready_status_watchdog_then_stopping_on_sigterm(repo: Path, tmp_path: Path, runtime: Path,
                                                        notify_socket: tuple[socket.socket, Path]) -> None:
    sock, path = notify_socket
    env = daemon_env(tmp_path, runtime, NOTIFY_SOCKET=str(path), WATCHDOG_USEC="400000")
    daemon = DaemonProcess(env, repo, tmp_path / "daemon.log")
    seen: list[str] = []
    try:
        daemon.start()
        ready = receive_until(sock, "READY=1", seen)
        status = receive_until(sock, "STATUS=", seen)
        receive_until(sock, "WATCHDOG=1", seen)
        receive_until(sock, "WATCHDOG=1", seen)     # and again: it keeps pinging
    finally:
        code = daemon.stop(signal.SIGTERM)
    stopping = receive_until(sock, "STOPPING=1", seen)
    assert code == 0, (tmp_path / "daemon.log").read_text()
    assert "STATUS=0 queued, 0 running" in ready          # READY carries the first summary
    assert "workers 0/4 busy" in status
    assert "STATUS=stopping" in stopping
    assert seen.index(ready) < seen.index(stopping)
    assert not any("STOPPING=1" in m for m in seen[: seen.index(stopping)])


REVIEW = "# Review\n\n`total` (line 4) refuses a discount of 1.0; say so in its docstring.\n"


def submit(daemon: DaemonProcess, repo: Path, n: int) -> int:
    """Over the socket, not by `ohd submit`: a burst of them arrives within milliseconds, not one per
    interpreter start (on a loaded machine each took longer than an answer, so none overlapped).
    A review runs no pytest: quick under load."""
    client = Client(Path(daemon.env["OHD_RUNTIME_DIR"]) / "ohd.sock", timeout=60.0)
    return int(client.post("/tasks", {"type": "review", "target": "shop/pricing.py", "repo": str(repo),
                                      "output": f"reviews/pricing_{n}.md"})["id"])


@pytest.mark.timeout(900)   # a bound for a hang, above its own waits
def test_sighup_resizes_the_pool_without_losing_a_task(repo: Path, tmp_path: Path, runtime: Path,
                                                       notify_socket: tuple[socket.socket, Path]) -> None:
    sock, path = notify_socket
    config = tmp_path / "config.toml"
    config.write_text("workers = 1\n")
    (tmp_path / "answer.md").write_text(REVIEW)
    # each answer takes 1.5 s: the three tasks submitted to three workers at once must overlap
    with fake_openrouter("--latency-ms", "1500", "--content-file", str(tmp_path / "answer.md")) as url:
        env = daemon_env(tmp_path, runtime, OPENROUTER_API_KEY="sk-test", OHD_BASE_URL=url,
                         OHD_MODELS="fake/model-a:free", NOTIFY_SOCKET=str(path))
        daemon = DaemonProcess(env, repo, tmp_path / "daemon.log").start()
        seen: list[str] = []
        try:
            receive_until(sock, "READY=1", seen)
            assert daemon.json("status")["workers"]["size"] == 1
            ids = [submit(daemon, repo, n) for n in range(6)]
            config.write_text("workers = 3\nlog_level = \"DEBUG\"\ndatabase_url = \"sqlite:////nowhere.db\"\n")
            assert daemon.proc is not None
            daemon.proc.send_signal(signal.SIGHUP)
            receive_until(sock, "RELOADING=1", seen)
            receive_until(sock, "READY=1", seen)        # the reload is done
            assert daemon.json("status")["workers"]["size"] == 3
            ids += [submit(daemon, repo, n) for n in range(6, 9)]
            config.write_text("workers = 1\n")
            daemon.proc.send_signal(signal.SIGHUP)
            receive_until(sock, "RELOADING=1", seen)
            receive_until(sock, "READY=1", seen)
            assert daemon.json("status")["workers"]["size"] == 1
            ids += [submit(daemon, repo, n) for n in range(9, 11)]
            # over the socket: 11 `ohd show` processes a poll took minutes at load 40 (the test's 180 s ran out)
            api = Client(runtime / "ohd.sock", timeout=60.0)
            wait_for(lambda: all(api.get(f"/tasks/{i}")["status"] in ("completed", "failed") for i in ids),
                     timeout=300, what="every task to finish")
            tasks = [api.get(f"/tasks/{i}") for i in ids]
            workers = daemon.json("status")["workers"]
        finally:
            assert daemon.stop() == 0
    log = (tmp_path / "daemon.log").read_text()
    assert [t["status"] for t in tasks] == ["completed"] * 11, [(t["id"], t["error"]) for t in tasks]
    assert all(len(t["executions"]) == 1 for t in tasks)      # none was cut off and run again
    spans = sorted((t["started_at"], t["finished_at"]) for t in tasks)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), "never two at once"
    assert workers == {"size": 1, "busy": 0, "running": [], "retiring": 0}
    assert "reload: workers 1 -> 3" in log and "reload: workers 3 -> 1" in log
    assert "retired (the pool shrank to 1)" in log
    assert "database_url changed but only take(s) effect after a restart" in log
    assert "released back to the queue" not in log


def reload_and_wait(daemon: DaemonProcess, sock: socket.socket, seen: list[str]) -> None:
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    receive_until(sock, "RELOADING=1", seen)
    receive_until(sock, "READY=1", seen)        # the reload is done


def test_sighup_applies_log_format_and_log_file_and_reopens_the_file(
        repo: Path, tmp_path: Path, runtime: Path, notify_socket: tuple[socket.socket, Path]) -> None:
    sock, path = notify_socket
    config, stderr, log_file = tmp_path / "config.toml", tmp_path / "daemon.log", tmp_path / "logs" / "ohd.log"
    config.write_text("")
    daemon = DaemonProcess(daemon_env(tmp_path, runtime, NOTIFY_SOCKET=str(path)), repo, stderr).start()
    seen: list[str] = []
    try:
        receive_until(sock, "READY=1", seen)
        first = submit(daemon, repo, 1)                 # offline: no key
        config.write_text(f'log_format = "json"\nlog_file = "{log_file}"\n')
        reload_and_wait(daemon, sock, seen)
        second = submit(daemon, repo, 2)
        log_file.rename(log_file.with_suffix(".log.1"))    # as logrotate does, then its postrotate HUP
        reload_and_wait(daemon, sock, seen)
        third = submit(daemon, repo, 3)
        wait_for(lambda: all(daemon.json("show", str(i))["status"] == "completed" for i in (first, second, third)),
                 timeout=60, what="the three tasks to finish")
    finally:
        assert daemon.stop() == 0
    before, _, after = stderr.read_text().partition("reloading the configuration and the rules (SIGHUP)")
    assert f"INFO ohd.server: task {first} queued over the socket" in before        # text until the reload
    # A worker may log a line in the old format between the reload's first line and the switch
    # (task 1 finishing, seen on a loaded machine); from the first JSON line on, all are JSON.
    lines = after.splitlines()[1:]
    switched = next((i for i, line in enumerate(lines) if line.startswith("{")), None)
    assert switched is not None and all(line.startswith("{") for line in lines[switched:]), lines
    rotated = [json.loads(line) for line in log_file.with_suffix(".log.1").read_text().splitlines()]
    current = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert any(r["message"] == "reload: applied log_file, log_format" for r in rotated)
    assert {"task_id": second, "status": "queued"}.items() <= next(
        r for r in rotated if r.get("task_id") == second).items()
    assert not any(r.get("task_id") == third for r in rotated)          # let go at the second reload
    assert {"task_id": third, "status": "queued"}.items() <= next(
        r for r in current if r.get("task_id") == third).items()
    assert any(r.get("task_id") == third and r.get("status") == "completed" for r in current)
    assert [r["message"] for r in current][-1] == "stopped"


def test_service_install_writes_the_unit_with_the_real_executable(repo: Path, tmp_path: Path) -> None:
    ohd = Path(sys.executable).parent / "ohd"
    assert ohd.is_file(), "the venv has an `ohd` script (pip install -e .)"
    env = {"PATH": str(ohd.parent), "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
           "OHD_CONFIG": str(tmp_path / "config.toml")}    # no systemctl on this PATH
    import subprocess

    done = subprocess.run([str(ohd), "service", "install", "--repo", str(repo)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    unit = tmp_path / "xdg" / "systemd" / "user" / "ohd.service"
    start = f"{ohd} daemon --repo {repo.resolve()}"
    assert unit.read_text() == service.unit_text(start)
    assert f"ExecStart={start}\n" in unit.read_text()
    assert "  systemctl --user daemon-reload\n" in done.stdout
    assert "  systemctl --user enable --now ohd.service\n" in done.stdout
    done = subprocess.run([str(ohd), "service", "uninstall"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert not unit.exists()
    assert "  systemctl --user disable --now ohd.service\n" in done.stdout


def test_a_daemon_killed_by_the_watchdog_leaves_the_stack_of_every_thread(repo: Path, tmp_path: Path,
                                                                          runtime: Path) -> None:
    """systemd's watchdog kills a hung daemon with SIGABRT: the journal (its stderr) then shows where
    each thread was, the first thing needed to find why it hung."""
    daemon = DaemonProcess(daemon_env(tmp_path, runtime), repo, tmp_path / "daemon.log").start()
    assert daemon.stop(signal.SIGABRT) == -signal.SIGABRT
    log = daemon.log.read_text()
    assert "Fatal Python error: Aborted" in log
    assert "Current thread" in log and "ohd/service/daemon.py" in log, log[-3000:]
