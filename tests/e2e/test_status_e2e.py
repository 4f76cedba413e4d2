"""`ohd status` of a real daemon (offline provider) after a task ran: the JSON fields and the text."""

from __future__ import annotations

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

