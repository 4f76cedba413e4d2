"""A real `ohd daemon`'s start and stop: what its log says about them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.e2e.helpers import DaemonProcess, daemon_env


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
