"""The replay cache through a real `ohd daemon` process and the real CLI: the fake OpenRouter (in this
process, over HTTP) counts the requests it is sent; the store is the daemon's SQLite file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.helpers import DaemonProcess, daemon_env
from tests.support.fake_openrouter import FakeOpenRouter, ok
from tests.support.gitrepo import make_repo
from tests.support.governed import GOOD
from tests.support.waiting import wait_for

MODEL = "cache/model"


def _submit(daemon: DaemonProcess, repo: Path, *extra: str) -> int:
    done = daemon.ohd("submit", "--type", "unit_test", "--target", "shop/pricing.py", "--repo", str(repo),
                      "--model", MODEL, *extra)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


def _completed(daemon: DaemonProcess, task_id: int) -> None:
    def settled() -> str | None:
        status = str(daemon.json("show", str(task_id))["status"])
        return status if status in ("completed", "failed", "cancelled") else None

    status = wait_for(settled, timeout=300, what=f"task {task_id} to finish")
    assert status == "completed", daemon.ohd("show", str(task_id)).stdout


@pytest.mark.timeout(900)   # a hang bound above its own waits (three daemon starts, five pytest runs)
def test_an_unchanged_task_run_again_sends_no_request_and_says_so(tmp_path: Path, isolated_environment: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    with FakeOpenRouter(models=[MODEL]) as server:
        server.default = ok(GOOD)
        env = daemon_env(tmp_path, isolated_environment, OPENROUTER_API_KEY="sk-cache", OHD_BASE_URL=server.url,
                         OHD_MODELS=MODEL, OHD_TEST_RUNS="1")
        daemon = DaemonProcess(env, repo, tmp_path / "daemon.log").start()
        try:
            first = _submit(daemon, repo)
            _completed(daemon, first)
            assert len(server.completions()) == 1
            written = (repo / "tests" / "test_pricing.py").read_bytes()

            second = _submit(daemon, repo)                # the same task again: the answer is replayed
            _completed(daemon, second)
            assert len(server.completions()) == 1
            assert (repo / "tests" / "test_pricing.py").read_bytes() == written
            assert "accepted" in (shown := daemon.ohd("show", str(second)).stdout), shown
            assert "cached: replayed, no request sent" in shown
            assert "no request sent" in daemon.ohd("show", str(second), "--calls").stdout
            [execution] = daemon.json("show", str(second))["executions"]
            assert (execution["outcome"], execution["cached"]) == ("accepted", True)

            status = daemon.json("status")
            assert status["today"]["calls"] == 1 and status["today"]["saved"] == 1
            assert status["budget"]["requests_today"] == 1           # the governor counted one request
            [row] = status["efficiency"]["by_model"]
            assert row == {"model": MODEL, "task_type": "unit_test", "requests": 1, "accepted": 2, "saved": 1,
                           "accepted_per_request": 2.0}
            text = daemon.ohd("status").stdout
            assert "quota:   1 requests, 2 accepted outputs (2.00 per request), 1 saved by the cache" in text, text
            metrics = daemon.ohd("metrics").stdout
            assert f'ohd_model_requests_saved_total{{model="{MODEL}",task_type="unit_test"}} 1.0' in metrics
            assert f'ohd_accepted_outputs_per_request{{model="{MODEL}",task_type="unit_test"}} 2.0' in metrics
            assert daemon.json("metrics")["efficiency"]["saved"] == 1

            third = _submit(daemon, repo, "--no-cache")   # asks the model
            _completed(daemon, third)
            assert len(server.completions()) == 2
            assert [e["cached"] for e in daemon.json("show", str(third))["executions"]] == [False]
        finally:
            daemon.stop()

        daemon = DaemonProcess(env, repo, tmp_path / "daemon.log").start()   # the cache is in the store
        try:
            fourth = _submit(daemon, repo)
            _completed(daemon, fourth)
            assert len(server.completions()) == 2
            assert daemon.json("status")["efficiency"]["saved"] == 2
        finally:
            daemon.stop()
