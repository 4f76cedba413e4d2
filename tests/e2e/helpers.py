"""Real processes for end-to-end tests: the fake OpenRouter server and `ohd daemon`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def fake_openrouter(*args: str) -> Iterator[str]:
    """Start the fake server as its own process; yields its base URL (…/api/v1)."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.fake_openrouter", "--port", "0", *args],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("http://"), f"fake server did not print its URL: {line!r}"
        yield line.rstrip("/")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class DaemonProcess:
    """`python -m ohd daemon` with its own environment; stderr goes to a log file."""

    def __init__(self, env: dict[str, str], repo: Path, log: Path) -> None:
        self.env = env
        self.repo = repo
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> DaemonProcess:
        """Start the process without waiting for its socket (a start-up that hangs before it listens)."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "ohd", "daemon", "--repo", str(self.repo)],
                                         env=self.env, stdout=log, stderr=log)
        return self

    def start(self) -> DaemonProcess:
        self.launch()
        assert self.proc is not None
        wait_for(lambda: self.ohd("status", "--json").returncode == 0 or self._died(), timeout=30,
                 what="the daemon to answer on its socket")
        assert self.proc.poll() is None, self.log.read_text()
        return self

    def _died(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def ohd(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ohd", *args], env=self.env, capture_output=True,
                              text=True, timeout=60)

    def json(self, *args: str) -> Any:
        done = self.ohd(*args, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)    # its faulthandler writes every thread's stack to the log
            self.proc.wait(timeout=30)
            raise AssertionError(f"the daemon did not stop within {timeout:g} s of signal {sig}; its log, with the "
                                 f"stacks it had:\n{self.log.read_text(errors='replace')[-20000:]}") from None


def daemon_env(tmp: Path, runtime: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OHD_") and k != "OPENROUTER_API_KEY"}
    env.update({"OHD_STATE_DIR": str(tmp / "state"), "OHD_RUNTIME_DIR": str(runtime),
                "OHD_CONFIG": str(tmp / "config.toml"), "OHD_SETTLE_S": "0.1",
                "OHD_SELECTION_EPSILON": "0",   # no random exploration: tests name the model that answers
                "PYTHONPATH": str(ROOT)})
    env.update(extra)
    return env
