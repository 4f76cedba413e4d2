"""`ohd demo`: a temp repo with a small real module, a task, a real daemon until done.

It shows what happened: the status, the generated file, the report, and the
generated tests run with pytest. State and socket live in the temp dir, so the demo
never touches the user's own daemon or database.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from ohd.core import layout, views
from ohd.errors import DaemonNotRunning, OhdError
from ohd.store.store import Store, open_database

TASK = """type: unit_test
target: shop/pricing.py
description: Cover total(), is_free() and the Cart, including the error paths
priority: high
"""
StatusFetcher = Callable[[Path], dict[str, Any]]


def run(fetch_status: StatusFetcher, keep: bool = False, out: Callable[[str], None] = print,
        timeout_s: float = 300.0) -> int:
    base = Path(tempfile.mkdtemp(prefix="ohd-demo-"))
    repo = _make_repo(base / "repo")
    env = {**os.environ, "OHD_STATE_DIR": str(base / "state"), "OHD_RUNTIME_DIR": str(base / "run"),
           "OHD_CONFIG": str(base / "config.toml")}
    out(f"demo repo: {repo}")
    with open(base / "daemon.log", "wb") as log_file:
        daemon = subprocess.Popen([sys.executable, "-m", "ohd", "daemon", "--repo", str(repo)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=log_file)
    try:
        socket = layout.socket_path(base / "run")
        status = _wait_ready(fetch_status, socket, daemon, timeout_s)
        (layout.tasks_dir(repo) / "pricing-tests.yaml").write_text(TASK, encoding="utf-8")
        out(f"dropped {layout.task_relpath('pricing-tests.yaml')}\n")
        status = _wait_done(fetch_status, socket, daemon, timeout_s)
        out("$ ohd status\n" + views.status_text(status) + "\n")
        return _show(base, repo, out)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
        out(f"daemon log: {base / 'daemon.log'}" + ("" if keep else " (temp dir kept only with --keep)"))
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


def _make_repo(repo: Path) -> Path:
    (repo / "shop").mkdir(parents=True)
    (repo / "tests").mkdir()
    layout.tasks_dir(repo).mkdir()
    (repo / "shop" / "__init__.py").write_text("", encoding="utf-8")
    (repo / "tests" / "__init__.py").write_text("", encoding="utf-8")
    source = resources.files("ohd").joinpath("examples", "pricing.py").read_text(encoding="utf-8")
    (repo / "shop" / "pricing.py").write_text(source, encoding="utf-8")
    for args in (["init", "-q"], ["add", "-A"],
                 ["-c", "user.name=ohd demo", "-c", "user.email=demo@localhost", "commit", "-qm", "demo"]):
        subprocess.run(["git", *args], cwd=repo, capture_output=True, check=False)
    return repo


def _wait_ready(fetch: StatusFetcher, socket: Path, daemon: subprocess.Popen[bytes],
                timeout_s: float) -> dict[str, Any]:
    return _poll(lambda: fetch(socket), daemon, timeout_s)


def _wait_done(fetch: StatusFetcher, socket: Path, daemon: subprocess.Popen[bytes],
               timeout_s: float) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        status = fetch(socket)
        queue = status["queue"]
        return status if queue.get("completed", 0) + queue.get("failed", 0) >= 1 else None

    return _poll(finished, daemon, timeout_s)


def _poll(probe: Callable[[], dict[str, Any] | None], daemon: subprocess.Popen[bytes],
          timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise OhdError(f"the demo daemon exited with code {daemon.returncode}; see its log")
        try:
            answer = probe()
            if answer is not None:
                return answer
        except DaemonNotRunning:
            pass
        time.sleep(0.1)
    raise OhdError(f"the demo did not finish within {timeout_s:g}s")


def _show(base: Path, repo: Path, out: Callable[[str], None]) -> int:
    store = Store(open_database(f"sqlite:///{layout.database_path(base / 'state')}"))
    task = store.get_task(1)
    data = task.as_dict()
    data["executions"] = [e.as_dict() for e in store.executions(task.id)]
    store.close()
    out("$ ohd show 1\n" + views.task_text(data) + "\n")
    if task.report_path:
        report = (repo / task.report_path).with_suffix(".md")
        out(f"$ cat {report.relative_to(repo)}\n{report.read_text(encoding='utf-8')}")
    if task.status != "completed" or not task.output_path:
        out(f"the task did not complete: {task.error}")
        return 1
    out(f"$ cat {task.output_path}\n{(repo / task.output_path).read_text(encoding='utf-8')}")
    out(f"$ python -m pytest -q {task.output_path}")
    tested = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", task.output_path],
                            cwd=repo, capture_output=True, text=True)
    out((tested.stdout.strip() or tested.stderr.strip()) + "\n")
    return 0 if tested.returncode == 0 else 1


