"""End-to-end figures for the spine, against the fake OpenRouter with 200 ms answers.

    python bench/e2e.py [--quick]

Prints:
- tasks/s of a real `ohd daemon` process with 1, 8 and 32 workers, and the ratio to the
  ideal (workers / latency: a worker can finish at most one task per model answer);
- drop-to-queued latency p50/p99 over 200 task files dropped into tasks.d/ one at a
  time (includes the settle window that guards against half-written files; printed
  separately);
- the daemon's RSS when idle and after 10,000 completed tasks.
The validation ladder's pytest runs are off (`test_runs = 0`) and so is quota pacing
(`free_rpm = free_rpd = 0`; bench/ratelimit.py measures the governor), so the figures measure
the spine; `--with-test-runs` turns them on to show what they cost.
Every number comes from this run; the machine is noisy, so compare ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemonproc import BenchDaemon, add_daemon_env, daemon_env  # noqa: E402
from tests.support.fake_openrouter import FakeOpenRouter, ok  # noqa: E402
from tests.support.gitrepo import make_repo  # noqa: E402

LATENCY_S = 0.2
SETTLE_S = 0.05
ANSWER = """```python
from shop.pricing import total


def test_total() -> None:
    assert total([1.0, 2.0]) == 3.0
```"""
TASK = "type: unit_test\ntarget: shop/pricing.py\ndescription: drop {n}\noutput: tests/test_{n}.py\n"


TEST_RUNS = "0"   # the spine's own cost; --with-test-runs adds the validation ladder's pytest runs
EXTRA: dict[str, str] = {}   # --daemon-env


def Daemon(base: Path, repo: Path, url: str, workers: int) -> BenchDaemon:  # noqa: N802
    # free_rpm/free_rpd = 0: no quota pacing (bench/ratelimit.py measures the governor)
    return BenchDaemon(base, repo, url, {"OHD_MODELS": "bench/model:free", "OHD_WORKERS": str(workers),
                                         "OHD_SETTLE_S": str(SETTLE_S), "OHD_TEST_RUNS": TEST_RUNS,
                                         "OHD_FREE_RPM": "0", "OHD_FREE_RPD": "0", **EXTRA})


def _wait(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        time.sleep(0.01)


def throughput(base: Path, url: str, workers: int, tasks: int) -> float:
    repo = make_repo(base / f"repo-{workers}")
    daemon = Daemon(base / f"w{workers}", repo, url, workers)
    try:
        start = time.monotonic()
        for n in range(tasks):
            daemon.request("POST", "/tasks", {"type": "unit_test", "target": "shop/pricing.py",
                                              "output": f"tests/test_{n % 50}.py", "repo": str(repo)})
        _wait(lambda: daemon.counts().get("completed", 0) + daemon.counts().get("failed", 0) >= tasks, 600)
        elapsed = time.monotonic() - start
        failed = daemon.counts().get("failed", 0)
        if failed:
            print(f"  ({failed} failed)")
        return tasks / elapsed
    finally:
        daemon.stop()


def drop_latency(base: Path, url: str, drops: int) -> list[float]:
    repo = make_repo(base / "repo-drop")
    daemon = Daemon(base / "drop", repo, url, 4)
    latencies = []
    try:
        for n in range(drops):
            before = sum(daemon.counts().values())
            start = time.monotonic()
            (repo / "tasks.d" / f"t{n}.yaml").write_text(TASK.format(n=n))
            _wait(lambda: sum(daemon.counts().values()) > before, 30)
            latencies.append(time.monotonic() - start)
    finally:
        daemon.stop()
    return latencies


def rss(base: Path, url: str, tasks: int) -> tuple[int, int]:
    repo = make_repo(base / "repo-rss")
    daemon = Daemon(base / "rss", repo, url, 32)
    try:
        time.sleep(1.0)
        idle = daemon.rss_kib()
        for n in range(tasks):
            daemon.request("POST", "/tasks", {"type": "unit_test", "target": "shop/pricing.py",
                                              "output": f"tests/test_{n % 50}.py", "repo": str(repo)})
        _wait(lambda: daemon.counts().get("completed", 0) + daemon.counts().get("failed", 0) >= tasks, 3600)
        return idle, daemon.rss_kib()
    finally:
        daemon.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer tasks (a smoke run)")
    parser.add_argument("--with-test-runs", action="store_true",
                        help="run each candidate with pytest (the default daemon setting, test_runs = 2)")
    add_daemon_env(parser)
    args = parser.parse_args()
    global TEST_RUNS
    TEST_RUNS = "2" if args.with_test_runs else "0"
    EXTRA.update(daemon_env(parser, args.daemon_env))
    print(f"pytest runs per candidate: {TEST_RUNS}; extra daemon settings: {EXTRA or 'none'}")
    scale = 0.2 if args.quick else 1.0
    base = Path(tempfile.mkdtemp(prefix="ohd-bench-e2e-"))
    with FakeOpenRouter(latency_s=LATENCY_S) as server:
        server.default = ok(ANSWER)
        print(f"fake OpenRouter at {server.url}, {LATENCY_S * 1000:.0f} ms per answer")
        for workers in (1, 8, 32):
            tasks = max(10, int(workers * 25 * scale))
            rate = throughput(base, server.url, workers, tasks)
            ideal = workers / LATENCY_S
            print(f"workers={workers:2d}: {tasks} tasks, {rate:6.1f} tasks/s, ideal {ideal:5.1f}, ratio {rate / ideal:.2f}")
        drops = int(200 * scale)
        lat = sorted(drop_latency(base, server.url, drops))
        p50, p99 = statistics.median(lat), lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        print(f"drop-to-queued over {drops} drops: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms "
              f"(settle window {SETTLE_S * 1000:.0f} ms included)")
        total = int(10_000 * scale)
        idle, after = rss(base, server.url, total)
        print(f"daemon RSS: idle {idle / 1024:.1f} MiB, after {total} completed tasks {after / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
