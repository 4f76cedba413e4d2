"""Graceful stop (issue 11, point 10), against real `ohd daemon` processes.

SIGTERM must end the daemon within systemd's `TimeoutStopSec` (read from `systemd/ohd.service`),
else systemd SIGKILLs it: running tasks finish within `grace_s` or go back to `queued` (no
attempt spent), nothing is lost, no test process it started outlives it, and every request in
flight is cancelled. Before, a start-up `GET /models` that never answered held the daemon for
55-92 s (its timeout and retries), and a pytest run of a task cut off at the grace deadline held
it until that run ended (up to `test_timeout_s`, and a new run could still start after the stop).
"""

from __future__ import annotations

import configparser
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ohd.config import Settings
from tests.e2e.helpers import ROOT, DaemonProcess, daemon_env
from tests.support.fake_openrouter import FakeOpenRouter, never_answer
from tests.support.gitrepo import make_repo
from tests.support.waiting import wait_for

pytestmark = pytest.mark.reliability

UNIT = ROOT / "systemd" / "ohd.service"
MODEL = "stop/quick"


def timeout_stop_s() -> float:
    """`TimeoutStopSec` of the unit systemd runs (seconds, as the file writes it)."""
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(UNIT, encoding="utf-8")
    return float(unit["Service"]["TimeoutStopSec"])


def test_the_units_stop_timeout_leaves_the_grace_period_time_to_release_and_exit() -> None:
    """systemd SIGKILLs after TimeoutStopSec: the grace period plus 10 s (release, kill the test
    runs, close the store) must fit inside it."""
    assert Settings.model_fields["grace_s"].default + 10 <= timeout_stop_s()


@pytest.fixture
def runtime() -> Iterator[Path]:
    yield Path(tempfile.mkdtemp(prefix="ohd-rt-"))


def _stopped(daemon: DaemonProcess, signalled: bool = False) -> int:
    """SIGTERM (unless `signalled`), then the exit code within TimeoutStopSec; past it the daemon is
    SIGKILLed (as systemd would) and the test fails."""
    assert daemon.proc is not None
    if not signalled:
        daemon.proc.send_signal(signal.SIGTERM)
    try:
        return daemon.proc.wait(timeout=timeout_stop_s())
    except subprocess.TimeoutExpired:
        daemon.proc.kill()
        daemon.proc.wait()
        raise AssertionError(f"still running {timeout_stop_s():g} s after SIGTERM (systemd would SIGKILL it):\n"
                             + daemon.log.read_text()) from None


def test_sigterm_while_the_start_up_catalogue_request_hangs_exits_at_once(tmp_path: Path, runtime: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    log = tmp_path / "daemon.log"
    with FakeOpenRouter(models=[MODEL]) as server:
        server.script_catalogue([never_answer()] * 5)   # the first request and every retry
        env = daemon_env(tmp_path, runtime, OPENROUTER_API_KEY="sk-stop", OHD_BASE_URL=server.url,
                         OHD_DISCOVER="true", OHD_MODELS=MODEL)
        daemon = DaemonProcess(env, repo, log).launch()
        proc = daemon.proc
        assert proc is not None
        try:
            wait_for(lambda: any(r.path.endswith("/models") for r in server.requests) or proc.poll() is not None,
                     what="the daemon's start-up GET /models")
            assert proc.poll() is None, log.read_text()
        finally:
            code = _stopped(daemon)
    assert code == 0, log.read_text()
    assert "ohd.daemon: stopped" in log.read_text()
