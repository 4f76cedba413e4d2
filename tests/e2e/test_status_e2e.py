"""`ohd status` of a real daemon (offline provider) after a task ran: the JSON fields and the text."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.e2e.helpers import DaemonProcess, daemon_env
from tests.support.waiting import wait_for

TASK = "type: unit_test\ntarget: shop/pricing.py\n"


def test_status_has_today_throughput_and_eta(repo: Path, tmp_path: Path) -> None:
    env = daemon_env(tmp_path, Path(os.environ["OHD_RUNTIME_DIR"]))
    daemon = DaemonProcess(env, repo, tmp_path / "daemon.log").start()
    try:
        (repo / "tasks.d" / "one.yaml").write_text(TASK)
        wait_for(lambda: daemon.json("show", "1")["status"] == "completed", timeout=60, what="task 1 done")
        status = daemon.json("status")
        text = daemon.ohd("status").stdout
    finally:
        daemon.stop()
    for key in ("now", "today", "throughput", "eta_s"):
        assert key in status
    assert status["today"]["calls"] >= 1 and status["today"]["prompt_tokens"] > 0
    assert status["throughput"]["completed_last_hour"] == 1 and status["throughput"]["per_minute"] > 0
    assert status["eta_s"] == 0.0
    assert "today:" in text and "tasks/min" in text and "ETA for 0 waiting: none" in text
    assert "offline" in text


def test_json_logs_of_a_real_daemon_parse_carry_the_task_id_and_never_the_key(repo: Path, tmp_path: Path) -> None:
    from tests.e2e.helpers import fake_openrouter

    key = "sk-or-v1-e2e-secret-key-0042"
    with fake_openrouter("--latency-ms", "10") as url:
        env = daemon_env(tmp_path, Path(os.environ["OHD_RUNTIME_DIR"]), OPENROUTER_API_KEY=key, OHD_BASE_URL=url,
                         OHD_MODELS="fake/model-a:free", OHD_LOG_FORMAT="json",
                         OHD_LOG_FILE=str(tmp_path / "ohd.log"))
        daemon = DaemonProcess(env, repo, tmp_path / "daemon.log").start()
        try:
            (repo / "tasks.d" / "one.yaml").write_text(TASK)
            wait_for(lambda: daemon.json("show", "1")["status"] in ("completed", "failed"), timeout=60,
                     what="task 1 done")
            tail = daemon.ohd("logs", "-n", "500").stdout
        finally:
            daemon.stop()
    stderr = (tmp_path / "daemon.log").read_text()
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    assert any(r.get("task_id") == 1 for r in records)
    assert key not in stderr and key not in (tmp_path / "ohd.log").read_text()
    assert any(line.startswith("{") and '"task_id": 1' in line for line in tail.splitlines())
