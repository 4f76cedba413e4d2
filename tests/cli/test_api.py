"""The Python API for scripts (`from ohd import Client`) against a real daemon process."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import ohd
from ohd.errors import ApiError, DaemonNotRunning, InvalidTransition, NotFound
from tests.e2e.helpers import DaemonProcess, daemon_env
from tests.support.fake_openrouter import FakeOpenRouter, never_answer
from tests.support.gitrepo import make_repo
from tests.support.waiting import wait_for

TARGET = "shop/pricing.py"


@pytest.fixture
def runtime() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="ohd-api-"))      # short: a socket path has 108 bytes
    yield folder
    for child in folder.glob("*"):
        child.unlink()
    folder.rmdir()


def test_a_script_submits_waits_and_reads_what_the_cli_would(tmp_path: Path, runtime: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo(tmp_path / "repo")
    env = daemon_env(tmp_path, runtime)
    daemon = DaemonProcess(env, repo, tmp_path / "daemon.log").start()
    try:
        for name in ("OHD_RUNTIME_DIR", "OHD_STATE_DIR", "OHD_CONFIG"):
            monkeypatch.setenv(name, env[name])
        client = ohd.Client()                   # the socket found as the CLI finds it
        task_id = client.submit("review", TARGET, repo=repo, description="look at the rounding")
        task = client.wait(task_id, timeout_s=120)
        assert (task["id"], task["status"], task["type"], task["target"]) == (task_id, "completed", "review", TARGET)
        assert task["description"] == "look at the rounding" and task["executions"][-1]["outcome"] == "accepted"
        assert task["output_path"] == "shop/.ohd/reviews/pricing.py.md" and task["error"] is None   # as the README prints
        assert task == daemon.json("show", str(task_id)) | {"executions": task["executions"]}
        assert [t["id"] for t in client.tasks()] == [task_id]
        assert client.tasks(status="failed") == [] and len(client.tasks(limit=1)) == 1
        assert client.status()["queue"]["completed"] == 1
        with pytest.raises(InvalidTransition):
            client.cancel(task_id)
        with pytest.raises(InvalidTransition):
            client.retry(task_id)
        with pytest.raises(NotFound):
            client.show(task_id + 100)
        with pytest.raises(ApiError) as refused:
            client.submit("review", "../outside.py")
        assert refused.value.status == 400 and "leaves the repo" in refused.value.message
    finally:
        assert daemon.stop() == 0


def test_wait_gives_up_at_its_time_limit_and_cancel_stops_a_running_task(tmp_path: Path, runtime: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    with FakeOpenRouter(models=["api/model"]) as server:
        server.script("api/model", [never_answer()])
        env = daemon_env(tmp_path, runtime, OPENROUTER_API_KEY="sk-api", OHD_BASE_URL=server.url,
                         OHD_MODELS="api/model", OHD_REQUEST_TIMEOUT_S="600")
        daemon = DaemonProcess(env, repo, tmp_path / "daemon.log").start()
        now = [0.0]
        slept: list[float] = []

        def sleep(seconds: float) -> None:
            slept.append(seconds)
            now[0] += seconds

        try:
            client = ohd.Client(runtime / "ohd.sock", sleep=sleep, monotonic=lambda: now[0])
            task_id = client.submit("review", TARGET, timeout_s=600)
            wait_for(lambda: len(server.requests_for("api/model")) == 1, what="the model to be asked")
            with pytest.raises(TimeoutError, match=f"task {task_id} is still running after 2s"):
                client.wait(task_id, timeout_s=2, poll_s=0.5)
            assert slept == [0.5, 0.5, 0.5, 0.5]
            assert client.cancel(task_id)["cancel_requested"] is True
            assert client.wait(task_id, timeout_s=60, poll_s=0.05)["status"] == "cancelled"
        finally:
            assert daemon.stop() == 0


def test_without_a_daemon_the_script_is_told_so(runtime: Path) -> None:
    with pytest.raises(DaemonNotRunning):
        ohd.Client(runtime / "ohd.sock").status()


def test_importing_ohd_does_not_import_the_api() -> None:
    import subprocess
    import sys

    code = "import ohd.cli.client, sys; print('ohd.cli.api' in sys.modules, 'ohd.config' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.split() == ["False", "False"]
