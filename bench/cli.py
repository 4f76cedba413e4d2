"""What the read-only commands cost a user: `ohd status`, `ohd tasks`, `ohd show`, whole process.

    python bench/cli.py [--runs N] [--quick] [--baseline REV]

A real `ohd daemon` (offline provider) in a private state and runtime dir, a few finished
tasks in its store. Each round runs every command once as a new process (`python -m ohd
...`, the interpreter of this venv), in an order that rotates from round to round, beside the
floor: a bare `python -c pass` in the same rounds. Then the daemon is stopped and the same
is done again (the store path of `tasks` and `show`; `status` exits 3). Prints each
command's median wall time and its ratio to the floor's (goal, issue 17: at most 4x, 60 ms),
and the same for the process's CPU time (user + system), which a loaded machine inflates less.

With `--baseline REV` every command is also run with the `daemon/` of that git revision of
this repo (e.g. `main` before a change) first on PYTHONPATH, in the same rounds: before and
after under the same machine load. The settings the fast path remembers live in a private
XDG_CACHE_HOME, warmed by one run of each command before the rounds.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemonproc import BenchDaemon  # noqa: E402
from tests.support.gitrepo import make_repo  # noqa: E402

COMMANDS = (("status", "--json"), ("status",), ("tasks", "--json"), ("tasks",), ("show", "1", "--json"),
            ("show", "1"))
FLOOR = ("-c", "pass")
GOAL_RATIO = 4.0


def baseline_tree(rev: str, into: Path) -> Path:
    """`daemon/` of `rev`, unpacked under `into`; the folder to put on PYTHONPATH."""
    data = subprocess.run(["git", "archive", rev, "daemon"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as archive:
        archive.extractall(into, filter="data")
    return into / "daemon"


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall ms, CPU ms: the child's user + system time, which a loaded machine inflates less)."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _pid, _status, usage = os.wait4(child.pid, 0)
    child.returncode = 0                                      # reaped here; keep Popen from waiting again
    return (time.perf_counter() - start) * 1000, (usage.ru_utime + usage.ru_stime) * 1000


Times = dict[tuple[str, str], list[tuple[float, float]]]


def measure(env: dict[str, str], sides: dict[str, str | None], runs: int) -> Times:
    """Medians' material: `runs` rounds of every (side, command) and the floor, order rotating."""
    jobs: list[tuple[str, tuple[str, ...]]] = [("floor", FLOOR)]
    jobs += [(side, ("-m", "ohd", *command)) for side in sides for command in COMMANDS]
    envs = {"floor": env, **{side: {**env, "PYTHONPATH": path} if path else env for side, path in sides.items()}}
    for side, argv in jobs:                                   # warm: the fast path remembers its settings
        timed([sys.executable, *argv], envs[side])
    times: Times = {(side, " ".join(argv)): [] for side, argv in jobs}
    for n in range(runs):
        shift = n % len(jobs)
        for side, argv in jobs[shift:] + jobs[:shift]:
            times[(side, " ".join(argv))].append(timed([sys.executable, *argv], envs[side]))
    return times


def report(title: str, times: Times) -> None:
    floor = [statistics.median(m[i] for m in times[("floor", " ".join(FLOOR))]) for i in (0, 1)]
    print(f"{title} (floor: python -c pass, median {floor[0]:.1f} ms wall, {floor[1]:.1f} ms CPU)")
    for (side, label), values in times.items():
        if side == "floor":
            continue
        wall, cpu = (statistics.median(m[i] for m in values) for i in (0, 1))
        mark = "" if wall <= GOAL_RATIO * floor[0] else "  over 4x"
        print(f"  {side:>9}  ohd {label.removeprefix('-m ohd '):16} median {wall:6.1f} ms {wall / floor[0]:4.1f}x"
              f" | CPU {cpu:6.1f} ms {cpu / floor[1]:4.1f}x the floor{mark}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="8 runs of each")
    parser.add_argument("--baseline", metavar="REV", help="also time the daemon/ of this git revision (e.g. main)")
    args = parser.parse_args()
    runs = 8 if args.quick else args.runs
    base = Path(tempfile.mkdtemp(prefix="ohd-bench-cli-"))
    sides: dict[str, str | None] = {"now": None}
    if args.baseline:
        sides = {f"{args.baseline}": str(baseline_tree(args.baseline, base / "baseline")), **sides}
    repo = make_repo(base / "repo")
    daemon = BenchDaemon(base, repo, None, {"OHD_LOG_LEVEL": "WARNING", "OHD_SETTLE_S": "0.05"})
    env = {**daemon.env, "XDG_CACHE_HOME": str(base / "cache")}
    env.pop("PYTHONPATH", None)
    try:
        for target in itertools.islice(itertools.cycle(["shop/pricing.py", "shop/__init__.py"]), 5):
            daemon.request("POST", "/tasks", {"type": "docstring", "target": target, "repo": str(repo)})
        deadline = time.monotonic() + 120
        while sum(daemon.counts().get(s, 0) for s in ("completed", "failed")) < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        print(f"python {sys.version.split()[0]}, {runs} runs of each, store: {daemon.counts()}")
        report("daemon running", measure(env, sides, runs))
    finally:
        daemon.stop()
    report("daemon stopped (status exits 3; tasks and show read the store)", measure(env, sides, runs))


if __name__ == "__main__":
    main()
