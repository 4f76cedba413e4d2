"""Acceptance bench for a fleet on PostgreSQL (issue 15): the rate-limited burst of bench/ratelimit.py, 3 daemons.

    python bench/fleet.py               # 200 tasks, 5 models x 20 req / 60 s, 3 daemons x 16 workers (~2.5 min)
    python bench/fleet.py --quick       # 40 tasks, 2 models x 10 req / 10 s window (~40 s)

The workload and the fake OpenRouter are bench/ratelimit.py's (`--models` free models, each
allowed `--rpm` requests per sliding `--window` seconds, a 429 past that, 200 ms answers with
a valid pytest module). `--daemons` real `ohd daemon` processes, each with its own state and
runtime dir and `--workers` workers, all serving one git repo, share one fresh PostgreSQL schema
(`--postgres-url`, default $OHD_TEST_POSTGRES_URL or postgresql://postgres@127.0.0.1:5432/test;
dropped afterwards) through `database_url`. The tasks are POSTed to the daemons in turn; the
clock runs from the first POST until every task is completed or failed (counted in the schema).

The floor, in the same run: the same burst through 1 daemon (same workers per daemon) on a
schema of its own. Each run's ideal is bench/ratelimit.py's with the run's total workers: the
limits admit models*rpm requests per window, so ceil(tasks / (models*rpm)) - 1 windows must
pass, then the last batch goes through the workers at 200 ms an answer.

Goals (issue 15): every task completed, the fleet at >= 95% of its ideal, 0 wasted 429s (every
429 the server sent is a request that did no work). Exit status 0 on PASS, 1 on FAIL.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemonproc import BenchDaemon, add_daemon_env, daemon_env  # noqa: E402
from bench import ratelimit  # noqa: E402
from bench.ratelimit import ANSWER, SETTLE_S, Result, Workload, governor_env, server_counts, timeline  # noqa: E402
from tests.support.databases import postgres_schema  # noqa: E402
from tests.support.fake_openrouter import FakeOpenRouter, ok  # noqa: E402
from tests.support.gitrepo import make_repo  # noqa: E402

TARGET_RATIO = 0.95
MAX_WASTED_429 = 0
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def counts(url: str) -> dict[str, int]:
    """Tasks by status, read from the fleet's schema."""
    import psycopg2

    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("select status, count(*) from task group by status")
            return {str(status): int(n) for status, n in cur.fetchall()}
    finally:
        conn.close()


def run_fleet(label: str, daemons: int, work: Workload, base: Path, server_url: str, timeout_s: float,
              log_level: str, more_env: dict[str, str]) -> Result:
    """The burst through `daemons` daemon processes with `work.workers` workers each, on a fresh schema."""
    with postgres_schema(server_url, prefix="ohd_bench_fleet") as url, \
            FakeOpenRouter(latency_s=work.latency_s, models=work.model_ids) as server:
        server.default = ok(ANSWER)
        server.rate_limit(work.rpm, work.window_s)
        repo = make_repo(base / "repo")
        settings = {"OHD_MODELS": ",".join(work.model_ids), "OHD_WORKERS": str(work.workers),
                    "OHD_SETTLE_S": str(SETTLE_S), "OHD_DATABASE_URL": url, "OHD_LOG_LEVEL": log_level,
                    **governor_env(work), **more_env}
        fleet: list[BenchDaemon] = []
        try:
            for n in range(daemons):     # started (and the schema migrated) before the clock runs
                fleet.append(BenchDaemon(base / f"ohd-{n}", repo, server.url, settings))
            start = time.monotonic()
            for n in range(work.tasks):
                reply = fleet[n % daemons].request("POST", "/tasks", {
                    "type": "unit_test", "target": "shop/pricing.py", "output": f"tests/test_bench_{n}.py",
                    "repo": str(repo)})
                if not reply or "id" not in reply:
                    raise SystemExit(f"POST /tasks refused task {n}: {reply}")
            submitted = time.monotonic() - start
            deadline = start + timeout_s
            timed_out = False
            while True:
                done = counts(url)
                if done.get("completed", 0) + done.get("failed", 0) >= work.tasks:
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                time.sleep(0.02)
            elapsed = time.monotonic() - start
            done = counts(url)
        finally:
            for daemon in fleet:
                daemon.stop()
        requests, limited, per_model = server_counts(server)
        when = timeline(server, start, work)
    written = sum(1 for n in range(work.tasks) if (repo / "tests" / f"test_bench_{n}.py").is_file())
    logs = ", ".join(str(d.log) for d in fleet)
    note = (f"{when}\n  outputs written: {written}; {work.tasks} POSTs took {submitted:.2f} s (inside the time); "
            f"daemon logs {logs}")
    return Result(label, elapsed, done.get("completed", 0), done.get("failed", 0), requests, limited,
                  timed_out, per_model, note)


def report(result: Result, work: Workload, goal: bool) -> bool:
    """Print one run against its ideal; the verdict only for the fleet (`goal`)."""
    return ratelimit.report(result, work, work.ideal_s(), of=f" ({work.workers} workers in all)", verdict=goal,
                            target=TARGET_RATIO, wasted=MAX_WASTED_429)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=None, help="tasks to submit (default 200; --quick 40)")
    parser.add_argument("--models", type=int, default=None, help="free models (default 5; --quick 2)")
    parser.add_argument("--rpm", type=int, default=None, help="requests per model per window (default 20; --quick 10)")
    parser.add_argument("--window", type=float, default=None,
                        help="the server's sliding window in seconds (default 60; --quick 10)")
    parser.add_argument("--daemons", type=int, default=3, help="daemon processes in the fleet (default 3)")
    parser.add_argument("--workers", type=int, default=16, help="workers per daemon (default 16)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 40 tasks, 2 models x 10 per 10 s window")
    parser.add_argument("--no-floor", action="store_true", help="skip the 1-daemon run")
    parser.add_argument("--postgres-url", default=os.environ.get("OHD_TEST_POSTGRES_URL") or DEFAULT_URL,
                        help=f"the PostgreSQL server (a schema of its own per run, dropped after; default "
                             f"$OHD_TEST_POSTGRES_URL or {DEFAULT_URL})")
    parser.add_argument("--log-level", default="WARNING", help="the daemons' log level (their log paths are printed)")
    add_daemon_env(parser)
    args = parser.parse_args()
    defaults = (40, 2, 10, 10.0) if args.quick else (200, 5, 20, 60.0)
    per_daemon = Workload(tasks=args.tasks or defaults[0], models=args.models or defaults[1],
                          rpm=args.rpm or defaults[2], window_s=args.window or defaults[3], workers=args.workers)
    if min(per_daemon.tasks, per_daemon.models, per_daemon.rpm, per_daemon.workers, args.daemons) < 1 \
            or per_daemon.window_s <= 0:
        parser.error("--tasks, --models, --rpm, --workers, --daemons and --window must be positive")
    fleet_work = Workload(per_daemon.tasks, per_daemon.models, per_daemon.rpm, per_daemon.window_s,
                          per_daemon.workers * args.daemons)
    more_env = daemon_env(parser, args.daemon_env)
    per_window = per_daemon.models * per_daemon.rpm
    timeout_s = max(120.0, 10 * per_daemon.ideal_s())
    print(f"workload: {per_daemon.describe()} per daemon; {args.daemons} daemons on one PostgreSQL schema")
    print(f"ideal: ({math.ceil(per_daemon.tasks / per_window)} - 1) windows x {per_daemon.window_s:g} s + last "
          f"batch through the workers at {per_daemon.latency_s * 1000:.0f} ms = {fleet_work.ideal_s():.1f} s "
          f"({fleet_work.workers} workers), {per_daemon.ideal_s():.1f} s ({per_daemon.workers} workers)")
    print(f"daemon settings for the governor: {' '.join(f'{k}={v}' for k, v in governor_env(per_daemon).items())}")
    if more_env:
        print(f"extra daemon settings (--daemon-env): {' '.join(f'{k}={v}' for k, v in more_env.items())}")
    base = Path(tempfile.mkdtemp(prefix="ohd-bench-fleet-"))
    fleet = run_fleet(f"{args.daemons} daemons, one PostgreSQL schema", args.daemons, per_daemon, base / "fleet",
                      args.postgres_url, timeout_s, args.log_level, more_env)
    passed = report(fleet, fleet_work, goal=True)
    if args.no_floor:
        print("1-daemon floor skipped (--no-floor)")
        return 0 if passed else 1
    floor = run_fleet("1 daemon, one PostgreSQL schema (the floor)", 1, per_daemon, base / "floor",
                      args.postgres_url, timeout_s, args.log_level, more_env)
    report(floor, per_daemon, goal=False)
    print(f"fleet / floor: {fleet.elapsed_s:.1f} s / {floor.elapsed_s:.1f} s = "
          f"{fleet.elapsed_s / floor.elapsed_s:.2f}x the time; wasted 429s {fleet.rate_limited} / {floor.rate_limited}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
