"""A real `ohd daemon` process for the benchmarks, driven over its Unix socket.

Shared by bench/e2e.py and bench/ratelimit.py: each passes its own settings; this
module only starts the process in a private state/runtime dir, talks HTTP to its
socket (standard library), reads task counts from its SQLite file and stops it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def add_daemon_env(parser: argparse.ArgumentParser) -> None:
    """`--daemon-env OHD_KEY=VALUE` (repeatable): extra daemon settings for a run."""
    parser.add_argument("--daemon-env", action="append", default=[], metavar="OHD_KEY=VALUE",
                        help="an extra daemon setting (repeatable), e.g. to switch a validation step off; printed")


def daemon_env(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, str]:
    """The `--daemon-env` items as a dict; a parser error for anything but OHD_KEY=VALUE."""
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("OHD_"):
            parser.error(f"--daemon-env wants OHD_KEY=VALUE, not {item!r}")
        env[key] = value
    return env


class BenchDaemon:
    def __init__(self, base: Path, repo: Path, url: str | None, settings: dict[str, str]) -> None:
        """`url` None: no server and no API key, so the daemon answers with the offline provider."""
        base.mkdir(parents=True, exist_ok=True)
        self.runtime = Path(tempfile.mkdtemp(prefix="ohd-bench-"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("OHD_") and k != "OPENROUTER_API_KEY"}
        env.update({"OHD_STATE_DIR": str(base / "state"), "OHD_RUNTIME_DIR": str(self.runtime),
                    "OHD_CONFIG": str(base / "none.toml"), "OHD_LOG_LEVEL": "WARNING"})
        if url is not None:
            env.update({"OHD_BASE_URL": url, "OPENROUTER_API_KEY": "sk-bench"})
        env.update(settings)
        self.env = env
        self.repo = repo
        self.log = base / "daemon.log"
        self.db = base / "state" / "ohd.db"
        with open(self.log, "ab") as log_file:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([sys.executable, "-m", "ohd", "daemon", "--repo", str(repo)], env=env,
                                         stdout=subprocess.DEVNULL, stderr=log_file)
        deadline = time.monotonic() + 30
        while self.request("GET", "/status") is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the daemon did not start; see {self.log}")
            time.sleep(0.02)

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One HTTP request over the socket; None when nobody answers."""
        sock_path = str(self.runtime / "ohd.sock")

        class Conn(http.client.HTTPConnection):
            def connect(inner) -> None:  # noqa: N805
                inner.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                inner.sock.connect(sock_path)

        try:
            conn = Conn("localhost", timeout=30)
            conn.request(method, path, json.dumps(body) if body else None, {"Content-Type": "application/json"})
            return json.loads(conn.getresponse().read())
        except OSError:
            return None

    def counts(self) -> dict[str, int]:
        with sqlite3.connect(self.db, timeout=30) as conn:
            return dict(conn.execute("select status, count(*) from task group by status").fetchall())

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
