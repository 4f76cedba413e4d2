"""Webhooks of a real `ohd daemon` (offline provider) to real receivers on 127.0.0.1: a receiver down
while tasks end and the daemon killed with SIGKILL, then both back: every event delivered, signed;
a hook on a closed port never holds the tasks nor the other hook."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from tests.e2e.helpers import DaemonProcess, daemon_env
from tests.support.receiver import Receiver
from tests.support.waiting import wait_for

SECRET = "e2e-hook-secret"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def completed(daemon: DaemonProcess, n: int) -> bool:
    return bool(daemon.json("status")["queue"]["completed"] == n)


def test_events_wait_out_a_receiver_down_and_a_sigkill(repo: Path, tmp_path: Path) -> None:
    receiver = Receiver().start()
    receiver.stop()                                   # down from the start; its port is kept
    dead_url = f"http://127.0.0.1:{closed_port()}/never"
    (tmp_path / "config.toml").write_text(
        f'webhooks = [{{url = "{receiver.url}", secret_env = "OHD_HOOK_SECRET", events = ["task.completed"]}},\n'
        f'            {{url = "{dead_url}", events = ["task.completed", "task.failed"]}}]\n'
        "webhook_retry_s = 0.2\nwebhook_retry_max_s = 0.5\n")
    env = daemon_env(tmp_path, Path(os.environ["OHD_RUNTIME_DIR"]), OHD_OFFLINE="true",
                     OHD_HOOK_SECRET=SECRET)
    daemon = DaemonProcess(env, repo, tmp_path / "daemon.log").start()
    try:
        for n in range(2):
            done = daemon.ohd("submit", "--type", "review", "--target", "shop/pricing.py", "--repo", str(repo))
            assert done.returncode == 0, done.stderr
        wait_for(lambda: completed(daemon, 2), timeout=120, what="both tasks to complete while no hook answers")
        hooks = wait_for(lambda: [h for h in daemon.json("status")["webhooks"] if h["last_error"]] or None,
                         timeout=60, what="the hooks' errors in the status")
        assert {h["pending"] for h in hooks} == {2} and all("ConnectError" in h["last_error"] for h in hooks)
        text = daemon.ohd("status").stdout
        assert "webhooks:" in text and "0 delivered, 2 pending" in text and "/never" not in text
    finally:
        daemon.stop(signal.SIGKILL)
    assert receiver.tried() == []
    receiver.start()                                  # back, on the same port
    daemon = DaemonProcess(env, repo, tmp_path / "daemon.log").start()
    try:
        got = wait_for(lambda: receiver.delivered() if len(receiver.delivered()) >= 2 else None, timeout=60,
                       what="the two completions to reach the receiver after the restart")
        mine, other = sorted(daemon.json("status")["webhooks"], key=lambda h: f":{receiver.port}/" not in h["hook"])
        assert (mine["delivered"], mine["pending"]) == (2, 0)
        assert (other["delivered"], other["pending"]) == (0, 2)    # the closed port: still failing, still waiting
    finally:
        assert daemon.stop() == 0
        receiver.stop()
    assert sorted(r.json["data"]["id"] for r in got) == [1, 2]
    assert len({r.delivery for r in got}) == 2
    assert all(r.event == "task.completed" and r.signed_with(SECRET) for r in got)
    assert SECRET not in (tmp_path / "daemon.log").read_text()

