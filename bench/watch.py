"""Working-tree watch figures: a file save to its task queued, p50/p99.

    python bench/watch.py [--quick] [--saves 200] [--quiet 2.0] [--interval 0.05]

In one process, as in the daemon: a real watchdog observer on a real git repo, the
loop-side debounce (`TreeWatcher`, system clock), one `git check-ignore` per batch and
`RuleBook.changed` committing the task row to SQLite. Each save goes to its own file
(the debounce is per path), one save every `--interval` seconds; the latency of a save
is from just before its write to the moment its task row is committed. Printed raw and
minus the quiet period (the debounce waits that long on purpose). Every number comes
from this run; the machine is noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "daemon"))

from ohd.clock import SystemClock  # noqa: E402
from ohd.core.taskfile import parse  # noqa: E402
from ohd.intake.rules import RuleBook  # noqa: E402
from ohd.intake.watch import TreeWatcher  # noqa: E402
from ohd.store.store import Store, open_database  # noqa: E402
from tests.support.gitrepo import make_repo  # noqa: E402

RULE = "type: docstring\ntarget: src/f0.py\non_change: ['src/**/*.py']\n"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(repo: Path, store: Store, saves: int, quiet_s: float, interval: float) -> list[float]:
    book = RuleBook(store, SystemClock())
    (repo / "tasks.d" / "docs.yaml").write_text(RULE)
    book.register(repo, "tasks.d/docs.yaml", parse(RULE))
    tree = TreeWatcher(SystemClock(), quiet_s=quiet_s)
    tree.watch(repo)
    tree.start(asyncio.get_running_loop())
    saved: dict[str, float] = {}
    queued: dict[str, float] = {}

    async def on_change(changed_repo: Path, paths: list[str]) -> None:
        ids = await asyncio.to_thread(book.changed, changed_repo, paths, "watch")
        now = time.perf_counter()
        for task_id in ids:
            queued[store.get_task(task_id).target] = now

    stop = asyncio.Event()
    runner = asyncio.create_task(tree.run(stop, on_change))
    try:
        for i in range(saves):
            rel = f"src/f{i}.py"
            saved[rel] = time.perf_counter()
            (repo / rel).write_text(f"VALUE = {i}\n")
            await asyncio.sleep(interval)
        deadline = time.monotonic() + quiet_s + 30
        while len(queued) < saves and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await runner
        tree.stop()
    missing = saves - len(queued)
    if missing:
        print(f"warning: {missing} save(s) never queued a task", file=sys.stderr)
    return [queued[rel] - saved[rel] for rel in saved if rel in queued]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 saves, quiet 0.5 s (a smoke run)")
    parser.add_argument("--saves", type=int, default=200)
    parser.add_argument("--quiet", type=float, default=2.0, help="the debounce quiet period (config quiet_s)")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between saves")
    args = parser.parse_args()
    saves, quiet = (20, 0.5) if args.quick else (args.saves, args.quiet)
    with tempfile.TemporaryDirectory(prefix="ohd-bench-watch-") as tmp:
        repo = make_repo(Path(tmp) / "repo").resolve()
        (repo / "src").mkdir()
        store = Store(open_database(f"sqlite:///{tmp}/ohd.db"))
        store.migrate()
        latencies = asyncio.run(measure(repo, store, saves, quiet, args.interval))
        store.close()
    ms = [v * 1000 for v in latencies]
    print(f"save -> task queued, {len(ms)} saves (one every {args.interval * 1000:.0f} ms), quiet period {quiet:g} s")
    print(f"  raw:          p50 {percentile(ms, 0.5):8.1f} ms   p99 {percentile(ms, 0.99):8.1f} ms"
          f"   (min {min(ms):.1f}, max {max(ms):.1f}, mean {statistics.fmean(ms):.1f})")
    print(f"  minus quiet:  p50 {percentile(ms, 0.5) - quiet * 1000:8.1f} ms   "
          f"p99 {percentile(ms, 0.99) - quiet * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
