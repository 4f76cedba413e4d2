"""A real `ohd daemon`'s start and stop: what its log says about them."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.e2e.helpers import DaemonProcess, daemon_env, fake_openrouter
from tests.e2e.test_daemon_e2e import ANSWER, TASK
from tests.support.waiting import wait_for


@pytest.fixture
def runtime() -> Path:
    return Path(os.environ["OHD_RUNTIME_DIR"])


def test_an_unknown_ohd_variable_is_warned_about_in_the_daemons_log_at_start(
        repo: Path, tmp_path: Path, runtime: Path) -> None:
    env = daemon_env(tmp_path, runtime, OHD_OFFLINE="true", OHD_WORKER="2")
    daemon = DaemonProcess(env, repo, tmp_path / "daemon.log").start()
    assert daemon.stop() == 0
    [line] = [line for line in (tmp_path / "daemon.log").read_text().splitlines() if "OHD_WORKER" in line]
    assert "WARNING" in line and "OHD_WORKER is not a setting ohd knows and is ignored; did you mean OHD_WORKERS?" in line


def _finished(daemon: DaemonProcess, source: str) -> bool:
    return any(t["source"] == source and t["status"] in ("completed", "failed", "cancelled")
               for t in daemon.json("tasks")["tasks"])


def test_a_clean_shutdown_after_work_logs_no_error(repo: Path, tmp_path: Path, runtime: Path) -> None:
    """A task run, the catalogue read, a change seen by the watch, then SIGTERM: exit 0 and no
    ERROR or CRITICAL line (a user reading the journal must not see a clean stop as a failure)."""
    (tmp_path / "answer.md").write_text(ANSWER)
    log = tmp_path / "daemon.log"
    with fake_openrouter("--model", "fake/x:free", "--content-file", str(tmp_path / "answer.md")) as url:
        env = daemon_env(tmp_path, runtime, OPENROUTER_API_KEY="sk-test-lifecycle", OHD_BASE_URL=url, OHD_MODELS="auto",
                         OHD_QUIET_S="0.2", OHD_TEST_RUNS="1")
        daemon = DaemonProcess(env, repo, log).start()
        try:
            wait_for(lambda: [m["id"] for m in daemon.json("models")["models"]] == ["fake/x:free"],
                     timeout=60, what="the catalogue's model")
            (repo / "tasks.d" / "tests.yaml").write_text(TASK)
            wait_for(lambda: any(t["status"] in ("completed", "failed") for t in daemon.json("tasks")["tasks"]),
                     timeout=120, what="the task file's task to finish")
            (repo / "tasks.d" / "review.yaml").write_text("type: review\non_change: ['shop/*.py']\n")
            wait_for(lambda: "rule tasks.d/review.yaml registered" in log.read_text(), timeout=60,
                     what="the rule to be registered")
            (repo / "shop" / "pricing.py").write_text((repo / "shop" / "pricing.py").read_text() + "\n# edited\n")
            wait_for(lambda: _finished(daemon, "rule:tasks.d/review.yaml"), timeout=120,
                     what="the rule's task to finish")
        finally:
            code = daemon.stop()
    text = log.read_text()
    assert code == 0, text
    assert "ohd.daemon: stopped" in text
    bad = [line for line in text.splitlines() if re.search(r"\b(ERROR|CRITICAL)\b", line) or "Traceback" in line]
    assert bad == [], text


def test_a_sigterm_while_the_server_hangs_stops_the_daemon_releases_the_task_and_logs_no_error(
        repo: Path, tmp_path: Path, runtime: Path) -> None:
    """Every answer of the server takes 10 minutes (the catalogue's GET /models too): the stop's
    grace period ends with a call in flight, the task goes back to the queue (what a stop means,
    not an error), and the pending GET /models does not hold the stop (it did, for the request's
    whole timeout; `stop()` gives up after 60 s)."""
    (tmp_path / "answer.md").write_text(ANSWER)
    log = tmp_path / "daemon.log"
    with fake_openrouter("--latency-ms", "600000", "--content-file", str(tmp_path / "answer.md")) as url:
        env = daemon_env(tmp_path, runtime, OPENROUTER_API_KEY="sk-test-lifecycle", OHD_BASE_URL=url,
                         OHD_MODELS="fake/x:free", OHD_GRACE_S="1")
        daemon = DaemonProcess(env, repo, log).start()
        try:
            (repo / "tasks.d" / "tests.yaml").write_text(TASK)
            wait_for(lambda: "model fake/x:free" in log.read_text() or
                     any(t["status"] == "running" for t in daemon.json("tasks")["tasks"]),
                     timeout=60, what="task 1 to be running")
        finally:
            code = daemon.stop()
    text = log.read_text()
    assert code == 0, text
    assert "ohd.daemon: stopped" in text and "task 1 released back to the queue" in text
    bad = [line for line in text.splitlines() if re.search(r"\b(ERROR|CRITICAL)\b", line) or "Traceback" in line]
    assert bad == [], text
