"""Shared limits across a fleet: three real `ohd daemon` processes on one PostgreSQL schema (issue 15, point 3).

The governor's cooldowns and request counts are rows of the shared database, and a reservation is
counted in the transaction that checks the limit (PostgreSQL: under the governor's advisory lock),
so a 429 one daemon sees cools the model for every daemon, and the fleet as a whole stays under a
model's configured per-window limit. The fake server in this process records every request with
its arrival time and enforces its own sliding window; each test's schema is dropped after.
"""

from __future__ import annotations

import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ohd.cli.client import Client
from tests.e2e.helpers import DaemonProcess, daemon_env
from tests.support.databases import POSTGRES_URL, database_url
from tests.support.fake_openrouter import FakeOpenRouter, rate_limited
from tests.support.gitrepo import make_repo
from tests.support.waiting import wait_for

pytestmark = pytest.mark.skipif(not POSTGRES_URL, reason="set OHD_TEST_POSTGRES_URL for the fleet on PostgreSQL")

MODEL = "fleet/limited"
NAMES = ("a", "b", "c")


def _fleet(tmp_path: Path, url: str, server: FakeOpenRouter, **extra: str) -> list[DaemonProcess]:
    """Three daemons with their own state dirs and sockets on `url`, started together."""
    repo = make_repo(tmp_path / "repo")
    daemons = []
    for name in NAMES:
        (tmp_path / name).mkdir()
        env = daemon_env(tmp_path / name, Path(tempfile.mkdtemp(prefix="ohd-rt-")), OPENROUTER_API_KEY="sk-fleet",
                         OHD_BASE_URL=server.url, OHD_MODELS=MODEL, OHD_TEST_RUNS="0", OHD_WORKERS="2",
                         OHD_DATABASE_URL=url, OHD_HEARTBEAT_S="0.5", OHD_DAEMON_LOST_S="10", **extra)
        daemons.append(DaemonProcess(env, repo, tmp_path / f"{name}.log").launch())
    for daemon in daemons:
        _wait_up(daemon)
    return daemons


def _wait_up(daemon: DaemonProcess) -> None:
    wait_for(lambda: daemon.ohd("status", "--json").returncode == 0 or daemon._died(), timeout=60,
             what="the daemon to answer on its socket")
    assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log.read_text()


def _submit(daemon: DaemonProcess, output: str) -> int:
    client = Client(Path(daemon.env["OHD_RUNTIME_DIR"]) / "ohd.sock", timeout=60.0)
    return int(client.post("/tasks", {"type": "unit_test", "target": "shop/pricing.py", "models": [MODEL],
                                      "output": output, "max_attempts": 1})["id"])


def _stop(daemons: list[DaemonProcess]) -> None:
    codes = [d.stop() for d in daemons if d.proc is not None]
    assert codes == [0] * len(codes), codes


def _completed(daemon: DaemonProcess, ids: list[int]) -> bool:
    return all(daemon.json("show", str(i))["status"] == "completed" for i in ids)


def test_a_429_seen_by_one_daemon_keeps_every_daemon_from_the_model_until_its_reset(tmp_path: Path) -> None:
    with database_url("postgresql", tmp_path) as url, FakeOpenRouter(models=[MODEL]) as server:
        daemons = _fleet(tmp_path, url, server)
        try:
            reset_at = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=30)
            reset_mono = time.monotonic() + (reset_at.timestamp() - time.time())
            server.script(MODEL, [rate_limited(reset_ms=int(reset_at.timestamp() * 1000))])
            first = _submit(daemons[0], "tests/test_first.py")
            wait_for(lambda: [r.status for r in server.completions()] == [429], what="the 429 to the first request")
            wait_for(lambda: daemons[0].json("show", str(first))["not_before"] is not None,
                     what="the first task to wait for the reset")
            seen_429 = time.monotonic()
            cooling = [d.json("models") for d in daemons]
            ids = [_submit(d, f"tests/test_{name}{i}.py") for d, name in zip(daemons, NAMES, strict=True)
                   for i in range(3)]
            submitted = time.monotonic()
            wait_for(lambda: _completed(daemons[1], [first, *ids]), timeout=120, what="every task to complete")
            tasks = [daemons[2].json("show", str(i)) for i in [first, *ids]]
        finally:
            _stop(daemons)
        requests = server.completions()
        assert submitted < reset_mono - 3, "the submits took too long to leave the cooldown a test"
        early = [r for r in requests[1:] if r.at < reset_mono - 0.05]
        print(f"429 at +0; {len(requests) - 1} requests after it, the first "
              f"{min(r.at for r in requests[1:]) - reset_mono:+.2f} s from the reset")
        assert early == [], [(r.at - seen_429, r.status) for r in early]      # nobody asked before the reset
        assert [r.status for r in requests] == [429] + [200] * 10             # then one request per task
        for listed in cooling:     # every daemon, not only the one that got the 429, shows the cooldown
            [row] = [m for m in listed["models"] if m["id"] == MODEL]
            assert row["state"] == "cooldown", row
            assert datetime.fromisoformat(row["cooldown_until"]) == reset_at, row
        for task in tasks:
            assert [e["outcome"] for e in task["executions"]][-1:] == ["accepted"], task


def _most_in_any_window(times: list[float], window_s: float) -> int:
    times = sorted(times)
    return max((sum(1 for t in times[i:] if t < start + window_s) for i, start in enumerate(times)), default=0)


def test_the_fleet_as_a_whole_stays_under_a_models_configured_limit(tmp_path: Path) -> None:
    limit, window_s, per_daemon = 3, 4.0, 4
    with database_url("postgresql", tmp_path) as url, FakeOpenRouter(models=[MODEL]) as server:
        server.rate_limit(limit, window_s)          # the server answers 429 past `limit` per sliding window
        daemons = _fleet(tmp_path, url, server, OHD_RATE_LIMITS=f'{{"{MODEL}": {limit}}}',
                         OHD_QUOTA_WINDOW_S=str(window_s))
        try:
            ids = [_submit(d, f"tests/test_{name}{i}.py") for d, name in zip(daemons, NAMES, strict=True)
                   for i in range(per_daemon)]
            wait_for(lambda: _completed(daemons[0], ids), timeout=180, what="every task to complete")
            tasks = [daemons[1].json("show", str(i)) for i in ids]
        finally:
            _stop(daemons)
        requests = server.completions()
        times = [r.at for r in requests]
        most = _most_in_any_window(times, window_s)
        span = max(times) - min(times)
        print(f"{len(requests)} requests in {span:.1f} s, at most {most} in any {window_s:g} s window "
              f"(limit {limit}); statuses {sorted({r.status for r in requests})}")
        assert [r.status for r in requests] == [200] * len(ids)     # no 429: the governor paced the fleet
        assert most <= limit
        assert span >= (len(ids) / limit - 1) * window_s            # the window was the bound, not luck
        for task in tasks:
            assert [e["outcome"] for e in task["executions"]] == ["accepted"], task
