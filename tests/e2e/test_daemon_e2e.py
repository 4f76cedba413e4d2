"""A real `ohd daemon` process, a real fake OpenRouter on 127.0.0.1, a real git repo."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.e2e.helpers import DaemonProcess, daemon_env, fake_openrouter
from tests.support.waiting import wait_for

ANSWER = """Here are the tests:

```python
import pytest

from shop.pricing import Cart, total


def test_total_applies_the_discount() -> None:
    assert total([100.0], discount=0.25) == 75.0


def test_cart_refuses_negative_prices() -> None:
    with pytest.raises(ValueError):
        Cart().add(-1.0)
```
"""
TASK = """type: unit_test
target: shop/pricing.py
description: Cover total and the Cart
priority: high
"""


@pytest.fixture
def runtime() -> Path:
    return Path(os.environ["OHD_RUNTIME_DIR"])


def _task_done(daemon: DaemonProcess, task_id: int) -> dict[str, object] | None:
    task = daemon.json("show", str(task_id))
    return task if task["status"] in ("completed", "failed", "cancelled") else None


def test_dropped_task_file_is_completed_with_output_and_report(repo: Path, tmp_path: Path, runtime: Path) -> None:
    (tmp_path / "answer.md").write_text(ANSWER)
    with fake_openrouter("--latency-ms", "50", "--content-file", str(tmp_path / "answer.md")) as url:
        env = daemon_env(tmp_path, runtime, OPENROUTER_API_KEY="sk-test-secret", OHD_BASE_URL=url,
                         OHD_MODELS="fake/model-a:free,fake/model-b:free")
        daemon = DaemonProcess(env, repo, tmp_path / "daemon.log").start()
        try:
            (repo / "tasks.d" / "auth-tests.yaml").write_text(TASK)
            task = wait_for(lambda: _task_done(daemon, 1), timeout=60, what="task 1 to finish")
            status = daemon.json("status")
        finally:
            assert daemon.stop() == 0
    assert task["status"] == "completed", task
    for key in ("id", "status", "type", "target", "priority", "attempts", "output_path", "report_path",
                "error", "executions"):
        assert key in task
    assert task["output_path"] == "tests/test_pricing.py"
    assert (repo / "tests" / "test_pricing.py").read_text().count("def test_") == 2
    report = json.loads((repo / task["report_path"]).read_text())
    assert report["decision"] == "written"
    assert (repo / "shop" / ".ohd" / "pricing.py.unit_test.md").exists()
    execution = task["executions"][0]
    assert execution["model"] == "fake/model-a:free" and execution["outcome"] == "accepted"
    assert execution["prompt_tokens"] > 0 and execution["latency_ms"] >= 0
    assert (repo / "tasks.d" / ".done" / "auth-tests.yaml").exists()
    for key in ("version", "pid", "uptime_s", "repos", "queue", "workers", "models"):
        assert key in status
    assert status["queue"]["completed"] == 1
    assert "sk-test-secret" not in (tmp_path / "daemon.log").read_text()


def test_files_dropped_while_down_are_ingested_at_start(repo: Path, tmp_path: Path, runtime: Path) -> None:
    (repo / "tasks.d" / "good.yaml").write_text(TASK)
    (repo / "tasks.d" / "bad.yaml").write_text("type: unit_test\ntarget: shop/pricing.py\ncolour: blue\n")
    env = daemon_env(tmp_path, runtime)          # no API key: the offline provider
    daemon = DaemonProcess(env, repo, tmp_path / "daemon.log").start()
    try:
        task = wait_for(lambda: _task_done(daemon, 1), timeout=60, what="task 1 to finish")
    finally:
        daemon.stop()
    assert task["status"] == "completed", task
    assert task["executions"][0]["model"] == "offline"
    error = (repo / "tasks.d" / ".rejected" / "bad.yaml.error.txt").read_text()
    assert "colour" in error and ":3" in error
    assert (repo / "tasks.d" / ".rejected" / "bad.yaml").exists()


def test_tasks_and_show_work_while_the_daemon_is_down_and_status_exits_3(
        repo: Path, tmp_path: Path, runtime: Path) -> None:
    env = daemon_env(tmp_path, runtime)
    daemon = DaemonProcess(env, repo, tmp_path / "daemon.log").start()
    (repo / "tasks.d" / "t.yaml").write_text(TASK)
    wait_for(lambda: _task_done(daemon, 1), timeout=60, what="task 1 to finish")
    daemon.stop()
    assert daemon.ohd("status").returncode == 3
    listed = daemon.json("tasks")["tasks"]
    assert [t["id"] for t in listed] == [1]
    assert daemon.ohd("show", "99").returncode == 1


def test_second_daemon_on_the_same_state_refuses(repo: Path, tmp_path: Path, runtime: Path) -> None:
    env = daemon_env(tmp_path, runtime)
    daemon = DaemonProcess(env, repo, tmp_path / "daemon.log").start()
    try:
        second = daemon.ohd("daemon", "--repo", str(repo))
    finally:
        daemon.stop()
    assert second.returncode == 1
    assert "already" in second.stderr


def test_kill_9_mid_task_then_restart_completes_the_task_once(repo: Path, tmp_path: Path, runtime: Path) -> None:
    with fake_openrouter("--latency-ms", "3000") as url:
        env = daemon_env(tmp_path, runtime, OPENROUTER_API_KEY="k", OHD_BASE_URL=url,
                         OHD_MODELS="fake/slow:free", OHD_LEASE_S="2")
        daemon = DaemonProcess(env, repo, tmp_path / "daemon.log").start()
        (repo / "tasks.d" / "t.yaml").write_text(TASK)
        wait_for(lambda: daemon.json("show", "1")["status"] == "running", timeout=30, what="task 1 running")
        daemon.stop(signal.SIGKILL)
        restarted = DaemonProcess(env, repo, tmp_path / "daemon.log").start()
        try:
            task = wait_for(lambda: _task_done(restarted, 1), timeout=60, what="task 1 to finish")
            listed = restarted.json("tasks")["tasks"]
        finally:
            restarted.stop()
    assert task["status"] == "completed"
    assert len(listed) == 1
    accepted = [e for e in task["executions"] if e["outcome"] == "accepted"]
    assert len(accepted) == 1


def test_submit_cancel_running_and_retry_through_the_cli(repo: Path, tmp_path: Path, runtime: Path) -> None:
    with fake_openrouter("--latency-ms", "1500") as url:
        env = daemon_env(tmp_path, runtime, OPENROUTER_API_KEY="k", OHD_BASE_URL=url, OHD_MODELS="fake/slow:free")
        daemon = DaemonProcess(env, repo, tmp_path / "daemon.log").start()
        try:
            submitted = daemon.ohd("submit", "--type", "unit_test", "--target", "shop/pricing.py",
                                   "--repo", str(repo), "--priority", "critical")
            assert submitted.returncode == 0, submitted.stderr
            task_id = submitted.stdout.strip()
            wait_for(lambda: daemon.json("show", task_id)["status"] == "running", timeout=30, what="running")
            assert daemon.ohd("cancel", task_id).returncode == 0
            cancelled = wait_for(lambda: _task_done(daemon, int(task_id)), timeout=30, what="cancelled")
            again = daemon.ohd("cancel", task_id)
            assert daemon.ohd("retry", task_id).returncode == 0
            retried = wait_for(lambda: _task_done(daemon, int(task_id)), timeout=30, what="retried task")
            outside = daemon.ohd("submit", "--type", "unit_test", "--target", "../etc/passwd", "--repo", str(repo))
        finally:
            daemon.stop()
    assert cancelled["status"] == "cancelled"
    assert again.returncode == 1 and "cancelled" in again.stderr
    assert retried["status"] == "completed"
    assert outside.returncode == 1 and "target" in outside.stderr


@pytest.mark.timeout(600)   # a bound for a hang, above its own waits
def test_sigterm_lets_a_running_task_finish_within_the_grace_period(repo: Path, tmp_path: Path,
                                                                    runtime: Path) -> None:
    """The grace is far above what the task needs (its answer, two pytest runs and coverage: about
    3 s idle; 20 s ran out at load 7-72): the daemon stops once the task is done, not at the grace."""
    with fake_openrouter("--latency-ms", "1500") as url:
        env = daemon_env(tmp_path, runtime, OPENROUTER_API_KEY="k", OHD_BASE_URL=url, OHD_MODELS="fake/slow:free",
                         OHD_GRACE_S="240")
        daemon = DaemonProcess(env, repo, tmp_path / "daemon.log").start()
        (repo / "tasks.d" / "t.yaml").write_text(TASK)
        wait_for(lambda: daemon.json("show", "1")["status"] == "running", timeout=30, what="task 1 running")
        assert daemon.stop(signal.SIGTERM, timeout=300) == 0
    assert daemon.json("show", "1")["status"] == "completed"


def test_sigterm_past_the_grace_period_puts_the_task_back_in_the_queue(repo: Path, tmp_path: Path,
                                                                       runtime: Path) -> None:
    with fake_openrouter("--latency-ms", "5000") as url:
        env = daemon_env(tmp_path, runtime, OPENROUTER_API_KEY="k", OHD_BASE_URL=url, OHD_MODELS="fake/slow:free",
                         OHD_GRACE_S="0.5")
        daemon = DaemonProcess(env, repo, tmp_path / "daemon.log").start()
        (repo / "tasks.d" / "t.yaml").write_text(TASK)
        wait_for(lambda: daemon.json("show", "1")["status"] == "running", timeout=30, what="task 1 running")
        assert daemon.stop(signal.SIGTERM) == 0
    task = daemon.json("show", "1")
    assert task["status"] == "queued" and task["executions"] == []


def _reported(daemon: DaemonProcess, task_id: str) -> dict[str, object] | None:
    """The task once it is cancelled and has its report."""
    task = daemon.json("show", task_id)
    return task if task["status"] == "cancelled" and task["report_path"] else None


def test_a_task_cancelled_queued_or_running_over_the_cli_has_a_report_saying_so(
        repo: Path, tmp_path: Path, runtime: Path) -> None:
    with fake_openrouter("--latency-ms", "120000") as url:    # the running task's answer never comes in time
        env = daemon_env(tmp_path, runtime, OPENROUTER_API_KEY="k", OHD_BASE_URL=url, OHD_MODELS="fake/slow:free",
                         OHD_WORKERS="1")
        daemon = DaemonProcess(env, repo, tmp_path / "daemon.log").start()
        try:
            ids = []
            for priority in ("critical", "low"):
                submitted = daemon.ohd("submit", "--type", "unit_test", "--target", "shop/pricing.py",
                                       "--repo", str(repo), "--priority", priority)
                assert submitted.returncode == 0, submitted.stderr
                ids.append(submitted.stdout.strip())
            running, queued = ids
            wait_for(lambda: daemon.json("show", running)["status"] == "running", timeout=60, what="running")
            assert daemon.json("show", queued)["status"] == "queued"    # one worker, busy with the other
            assert daemon.ohd("cancel", queued).returncode == 0
            assert daemon.ohd("cancel", running).returncode == 0
            tasks = {task_id: wait_for(lambda: _reported(daemon, task_id), timeout=60, what=f"task {task_id}'s report")
                     for task_id in ids}
            reports = [_report_files(repo, task) for task in tasks.values()]
            assert daemon.ohd("retry", queued).returncode == 0      # its report is written again when it ends
            assert daemon.ohd("cancel", queued).returncode == 0
            again = wait_for(lambda: _reported(daemon, queued), timeout=60, what="the second cancel's report")
            reports.append(_report_files(repo, again))
        finally:
            daemon.stop(signal.SIGKILL)     # the fake server holds its answers (and GET /models) for minutes
    assert tasks[queued]["error"] == "cancelled by the user, before any model answered"
    assert str(tasks[running]["error"]).startswith("cancelled by the user while running")
    assert str(again["error"]).startswith("cancelled by the user")
    for task, (report, markdown) in zip((*tasks.values(), again), reports):
        assert (report["decision"], report["task"]["status"], report["error"]) == (
            "cancelled", "cancelled", task["error"])
        assert f"Nothing was written: {task['error']}." in markdown


def _report_files(repo: Path, task: dict[str, object]) -> tuple[dict[str, object], str]:
    path = repo / str(task["report_path"])
    return json.loads(path.read_text()), path.with_suffix(".md").read_text()
