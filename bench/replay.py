"""The replay cache on the project shapes: the same tasks run twice on unchanged targets.

    python bench/replay.py [--shapes a,b] [--quick] [--workers N]

For each shape of tests/projects (tests/support/projects.py: src layout, relative imports,
tests inside the package, a re-export clash, a version re-export, a 5,600-line module), a real
`ohd daemon` with the offline provider (no API key, no server; its answers are counted as
requests by the governor like any model's) runs a unit_test and a review task on each of the
shape's modules, waits for them, then submits the very same tasks again. Printed per shape and
pass: tasks, their outcomes, model requests sent (the governor's count), answers the replay cache
replayed, accepted outputs per request, and the pass's wall time (the second pass still validates
every replayed answer: pytest runs, so it is not free in time, only in quota). The ratio is the
second pass's time to the first's, measured in the same run. Every number comes from this run.

Invariants (the exit status is 1 when one fails): the second pass ends each task as the first did,
with the same output bytes; it sends no more requests than the first pass's answers that were not
accepted (an accepted answer is never asked for twice; a rejected one is asked anew).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemonproc import BenchDaemon  # noqa: E402
from tests.support.projects import MODULES, SHAPES, copy_project  # noqa: E402

TYPES = ("unit_test", "review")
TERMINAL = {"completed", "failed", "cancelled"}
TIMEOUT_S = 900


def submit(daemon: BenchDaemon, repo: Path, task_type: str, target: str) -> int:
    reply = daemon.request("POST", "/tasks", {"type": task_type, "target": target, "repo": str(repo),
                                              "timeout_s": TIMEOUT_S})
    if not reply or "id" not in reply:
        raise SystemExit(f"submit {task_type} {target} failed: {reply}")
    return int(reply["id"])


def wait(daemon: BenchDaemon, ids: list[int]) -> list[dict[str, Any]]:
    deadline = time.monotonic() + TIMEOUT_S * max(1, len(ids))
    while True:
        rows = [daemon.request("GET", f"/tasks/{i}") or {} for i in ids]
        if all(r.get("status") in TERMINAL for r in rows):
            return rows
        if daemon.proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the daemon stopped or the tasks did not finish; see {daemon.log}")
        time.sleep(0.5)


def efficiency(daemon: BenchDaemon) -> dict[str, Any]:
    status = daemon.request("GET", "/status") or {}
    return dict(status.get("efficiency") or {"requests": 0, "accepted": 0, "saved": 0})


def one_pass(daemon: BenchDaemon, repo: Path, targets: tuple[str, ...]) -> tuple[list[dict[str, Any]], float]:
    started = time.monotonic()
    ids = [submit(daemon, repo, kind, target) for target in targets for kind in TYPES]
    rows = wait(daemon, ids)
    return rows, time.monotonic() - started


def outputs(repo: Path, rows: list[dict[str, Any]]) -> dict[str, bytes | None]:
    found = {}
    for row in rows:
        path = row.get("output_path")
        found[f"{row['type']} {row['target']}"] = (repo / path).read_bytes() if path and (repo / path).is_file() else None
    return found


def bench(shape: str, base: Path, workers: int) -> list[str]:
    """Run the shape's tasks twice; print its lines; return the invariants it broke."""
    repo = copy_project(shape, base / "repo")
    targets = MODULES[shape]
    daemon = BenchDaemon(base / "ohd", repo, None, {"OHD_OFFLINE": "true", "OHD_WORKERS": str(workers)})
    try:
        before = efficiency(daemon)
        first, first_s = one_pass(daemon, repo, targets)
        middle = efficiency(daemon)
        first_out = outputs(repo, first)
        second, second_s = one_pass(daemon, repo, targets)
        after = efficiency(daemon)
        second_out = outputs(repo, second)
    finally:
        daemon.stop()
    sent = (middle["requests"] - before["requests"], after["requests"] - middle["requests"])
    accepted = (middle["accepted"] - before["accepted"], after["accepted"] - middle["accepted"])
    saved = (middle["saved"] - before["saved"], after["saved"] - middle["saved"])
    broken = []
    statuses = ([r["status"] for r in first], [r["status"] for r in second])
    if statuses[0] != statuses[1]:
        broken.append(f"{shape}: the second pass ended {statuses[1]}, the first {statuses[0]}")
    if first_out != second_out:
        broken.append(f"{shape}: the second pass wrote other bytes: "
                      + ", ".join(k for k in first_out if first_out[k] != second_out.get(k)))
    if sent[1] > sent[0] - accepted[0]:
        broken.append(f"{shape}: the second pass sent {sent[1]} requests, more than the first pass's "
                      f"{sent[0] - accepted[0]} answers that were not accepted")
    for n, (rows, seconds) in enumerate(((first, first_s), (second, second_s))):
        done = sum(1 for r in rows if r["status"] == "completed")
        per = f"{accepted[n] / sent[n]:.2f}" if sent[n] else "-"
        print(f"{shape:17} pass {n + 1}: {len(rows)} tasks, {done} completed, {sent[n]} requests, "
              f"{saved[n]} replayed, {accepted[n]} accepted ({per} per request), {seconds:.1f} s", flush=True)
    print(f"{shape:17} second pass / first pass time: {second_s / first_s:.2f}", flush=True)
    return broken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated shapes (default: all)")
    parser.add_argument("--quick", action="store_true", help="two shapes only (src_layout, relative_imports)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    shapes = ["src_layout", "relative_imports"] if args.quick else [s for s in args.shapes.split(",") if s]
    broken: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ohd-bench-replay-") as tmp:
        for shape in shapes:
            broken += bench(shape, Path(tmp) / shape, args.workers)
    for line in broken:
        print("BROKEN:", line)
    sys.exit(1 if broken else 0)


if __name__ == "__main__":
    main()
