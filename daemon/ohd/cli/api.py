"""The Python API for scripts: the calls the CLI makes, over the running daemon's socket.

    from ohd import Client

    ohd = Client()                                  # finds the socket as `ohd status` does
    task_id = ohd.submit("unit_test", "src/shop/pricing.py", repo="~/src/shop")
    task = ohd.wait(task_id, timeout_s=600)         # the task as `ohd show --json` prints it
    print(task["status"], task["output"])

Every method answers with the JSON documents of the socket API (README, "Socket API") as
plain dicts and lists, and raises what the CLI reports: `DaemonNotRunning` when no daemon
answers, `NotFound` for an unknown id, `InvalidTransition` for a cancel or retry the task's
status does not allow, `ApiError` (with `.status`) for a refused submission, and `TimeoutError`
when `wait` runs out. Nothing here touches the store or starts a daemon.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ohd.cli.client import Client as SocketClient

# the statuses a task stays in (records.TERMINAL; not imported, so that a script's import stays light)
TERMINAL = frozenset({"completed", "failed", "cancelled"})


class Client:
    """A script's handle on the running daemon.

    `socket_path` defaults to the configured one (`runtime_dir`/ohd.sock, read from `config`
    or the default config file and the `OHD_*` variables, as the CLI reads them). `sleep` and
    `monotonic` are injectable for `wait`."""

    def __init__(self, socket_path: Path | str | None = None, *, config: Path | None = None,
                 timeout_s: float = 10.0, sleep: Callable[[float], None] = time.sleep,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if socket_path is None:
            from ohd import config as settings

            socket_path = settings.load(config).socket_path
        self.socket = SocketClient(Path(socket_path).expanduser(), timeout=timeout_s)
        self._sleep = sleep
        self._monotonic = monotonic

    def status(self) -> dict[str, Any]:
        """What `ohd status --json` prints: the queue by status, workers, models, repos."""
        answer: dict[str, Any] = self.socket.get("/status")
        return answer

    def submit(self, type: str, target: str, *, repo: Path | str | None = None, **fields: Any) -> int:
        """Queue a task (any task-file key but the standing-rule ones: `description`,
        `priority`, `output`, `models`, `max_attempts`, `timeout_s`, `prompt`, `rule_levels`...);
        its id. `repo` defaults to the daemon's only repo."""
        body: dict[str, Any] = {"type": type, "target": target, **fields}
        if repo is not None:
            body["repo"] = str(Path(repo).expanduser().resolve())
        return int(self.socket.post("/tasks", body)["id"])

    def tasks(self, status: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """The tasks, newest first, as `ohd tasks --json` lists them."""
        query = "&".join(f"{key}={value}" for key, value in (("status", status), ("limit", limit))
                         if value is not None)
        answer: list[dict[str, Any]] = self.socket.get("/tasks" + (f"?{query}" if query else ""))["tasks"]
        return answer

    def show(self, task_id: int) -> dict[str, Any]:
        """One task with its executions, as `ohd show --json` prints it."""
        answer: dict[str, Any] = self.socket.get(f"/tasks/{int(task_id)}")
        return answer

    def wait(self, task_id: int, timeout_s: float | None = None, poll_s: float = 0.5) -> dict[str, Any]:
        """The task once it is completed, failed or cancelled; `TimeoutError` after `timeout_s`
        (None: no limit). A `pending` task (waiting for a model's cooldown or quota) is waited for."""
        deadline = None if timeout_s is None else self._monotonic() + timeout_s
        while True:
            task = self.show(task_id)
            if task["status"] in TERMINAL:
                return task
            if deadline is not None and self._monotonic() >= deadline:
                raise TimeoutError(f"task {task_id} is still {task['status']} after {timeout_s:g}s")
            self._sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - self._monotonic())))

    def cancel(self, task_id: int) -> dict[str, Any]:
        """Cancel a queued, pending or running task; the task as it is then."""
        answer: dict[str, Any] = self.socket.post(f"/tasks/{int(task_id)}/cancel")
        return answer

    def retry(self, task_id: int) -> dict[str, Any]:
        """Queue a failed or cancelled task again (a pending one at once); the task as it is then."""
        answer: dict[str, Any] = self.socket.post(f"/tasks/{int(task_id)}/retry")
        return answer
