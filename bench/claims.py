"""Claims per second of ohd's queue, on SQLite and PostgreSQL, beside Huey's SqliteHuey.

    python bench/claims.py [--tasks N] [--repeats R] [--claimers 1,4,16] [--postgres-url URL]

For each backend and each number of claimer processes: a fresh database (a SQLite file in a
temp dir; a PostgreSQL schema of its own, dropped after), N tasks queued (not timed), then the
claimers, started and connected first, are released at one instant and call
`Store.claim_next` (a read, then one write transaction that leases the task: `BEGIN IMMEDIATE`
on SQLite, `FOR UPDATE SKIP LOCKED` on PostgreSQL) until the queue is empty. The rate is N over
the time from the release to the last claimer's end; double claims are ids claimed by more
than one claimer (must be 0), and every task must be `running` under one lease owner after.

The floor, measured in the same run for the same N and process counts: Huey 3.5.4's SqliteHuey
(N calls of a no-op task, each enqueued, in one process; then the claimers take them out with
its storage's `dequeue` and unpickle each message, as `Huey.dequeue` does but for the task-class
lookup; its default pragmas), installed on the first run into a venv cached under the user cache dir
(`ohd-bench/huey-venv`). Huey's dequeue takes a task away (a DELETE); ohd's claim leases it
(an UPDATE that keeps the row). Prints the median of R repeats of each, and ohd's ratio to Huey.
Goal (issue 15): at least 5,000 claims/s on SQLite and 2,000 on PostgreSQL with 16 claimers.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import platformdirs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ohd.core.taskfile import TaskSpec  # noqa: E402
from ohd.store.store import Store, open_database  # noqa: E402
from tests.support.databases import postgres_schema  # noqa: E402

HUEY = "huey==3.5.4"
LEASE = timedelta(minutes=10)


# -- ohd ------------------------------------------------------------------------------------


@contextmanager
def database(backend: str, tmp: Path, postgres_url: str) -> Iterator[str]:
    """A URL for an empty database of `backend`, removed afterwards."""
    if backend == "sqlite":
        path = tmp / f"ohd-{uuid.uuid4().hex[:8]}.db"
        yield f"sqlite:///{path}"
        return
    with postgres_schema(postgres_url, prefix="ohd_bench") as url:
        yield url


def fill(url: str, tasks: int) -> None:
    store = Store(open_database(url))
    store.migrate()
    spec = TaskSpec.model_validate({"type": "unit_test", "target": "src/app.py"})
    now = datetime.now(UTC)
    for _ in range(tasks):
        store.enqueue("/bench/repo", spec, now)
    store.close()


def claimer(url: str, name: str, ready: multiprocessing.synchronize.Semaphore,
            go: multiprocessing.synchronize.Event, out: multiprocessing.queues.Queue[tuple[list[int], float]]) -> None:
    store = Store(open_database(url))
    store.claim_next(f"{name}-warm", datetime.now(UTC) - timedelta(days=1), LEASE)   # connects; claims nothing
    ready.release()
    go.wait()
    ids = []
    while (claim := store.claim_next(name, datetime.now(UTC), LEASE)) is not None:
        ids.append(claim.task.id)
    out.put((ids, time.monotonic()))
    store.close()


def ohd_run(backend: str, url: str, tasks: int, claimers: int) -> tuple[float, int, int]:
    """(claims per second, double claims, tasks not leased once) of one run on a filled database."""
    fill(url, tasks)
    ctx = multiprocessing.get_context("spawn")
    ready, go, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=claimer, args=(url, f"bench/w{i}", ready, go, out)) for i in range(claimers)]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.acquire()
    start = time.monotonic()
    go.set()
    results = [out.get(timeout=600) for _ in procs]     # a claimer that died ends the run
    for proc in procs:
        proc.join()
    ids = [i for claimed, _ in results for i in claimed]
    elapsed = max(end for _, end in results) - start
    store = Store(open_database(url))
    t = store.m.task
    leased = t.select().where((t.status == "running") & t.lease_owner.is_null(False)).count()
    store.close()
    return len(ids) / elapsed, len(ids) - len(set(ids)), tasks - leased


# -- Huey -----------------------------------------------------------------------------------

HUEY_SCRIPT = textwrap.dedent("""
    import json, multiprocessing, sys, time
    from huey import SqliteHuey

    def make(path):
        huey = SqliteHuey(filename=path)
        @huey.task(name="noop")      # the same name in the spawned consumers
        def noop():
            pass
        return huey, noop

    def consumer(path, ready, go, out):
        huey, _ = make(path)
        huey.storage.queue_size()                     # connects
        ready.release()
        go.wait()
        ids = []
        while (data := huey.storage.dequeue()) is not None:     # huey.dequeue() but the task-class lookup
            ids.append(huey.serializer.deserialize(data).id)
        out.put((ids, time.monotonic()))

    if __name__ == "__main__":
        path, tasks, claimers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        huey, noop = make(path)
        start = time.monotonic()
        for _ in range(tasks):
            noop()
        enqueue = tasks / (time.monotonic() - start)
        ctx = multiprocessing.get_context("spawn")
        ready, go, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=consumer, args=(path, ready, go, out)) for _ in range(claimers)]
        for proc in procs:
            proc.start()
        for _ in procs:
            ready.acquire()
        start = time.monotonic()
        go.set()
        results = [out.get(timeout=600) for _ in procs]   # a consumer that died ends the run
        for proc in procs:
            proc.join()
        ids = [i for claimed, _ in results for i in claimed]
        elapsed = max(end for _, end in results) - start
        print(json.dumps({"enqueue": enqueue, "dequeue": len(ids) / elapsed,
                          "double": len(ids) - len(set(ids)), "missing": tasks - len(set(ids))}))
""")


def huey_python() -> Path:
    """The cached venv's Python with Huey installed (made on the first run)."""
    venv = Path(platformdirs.user_cache_dir("ohd-bench")) / "huey-venv"
    python = venv / "bin" / "python"
    probe = "import importlib.metadata as m; assert m.version('huey') == '3.5.4'"
    if python.exists() and subprocess.run([str(python), "-c", probe], capture_output=True).returncode == 0:
        return python
    print(f"first run: installing {HUEY} into {venv} (cached for later runs)", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    for step in ([sys.executable, "-m", "venv", "--clear", str(venv)], [str(python), "-m", "pip", "install", "-q",
                                                                         HUEY]):
        if subprocess.run(step).returncode != 0:
            raise SystemExit(f"{' '.join(step)} failed")
    return python


def huey_run(python: Path, tmp: Path, tasks: int, claimers: int) -> dict[str, float]:
    script = tmp / "huey_claims.py"
    script.write_text(HUEY_SCRIPT)
    done = subprocess.run([str(python), str(script), str(tmp / f"huey-{uuid.uuid4().hex[:8]}.db"), str(tasks),
                           str(claimers)], capture_output=True, text=True, cwd=tmp)
    if done.returncode != 0:
        raise SystemExit(f"the Huey run failed:\n{done.stderr}")
    result: dict[str, float] = json.loads(done.stdout)
    return result


# -- the run --------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--claimers", default="1,4,16")
    parser.add_argument("--postgres-url", default=os.environ.get("OHD_TEST_POSTGRES_URL", ""),
                        help="a PostgreSQL database to make schemas in "
                        "(default: $OHD_TEST_POSTGRES_URL; none: PostgreSQL is skipped)")
    args = parser.parse_args()
    counts = [int(c) for c in args.claimers.split(",")]
    backends = ["sqlite"] + (["postgresql"] if args.postgres_url else [])
    python = huey_python()
    rows: list[tuple[str, int, float, float, int, int]] = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="ohd-bench-claims-") as tmp_name:
        tmp = Path(tmp_name)
        for claimers in counts:
            huey = [huey_run(python, tmp, args.tasks, claimers) for _ in range(args.repeats)]
            floor = statistics.median(h["dequeue"] for h in huey)
            enqueue = statistics.median(h["enqueue"] for h in huey)
            lost = sum(int(h["double"]) + int(h["missing"]) for h in huey)
            print(f"huey SqliteHuey  {claimers:2d} claimer(s): dequeue {floor:8.0f}/s  enqueue {enqueue:8.0f}/s "
                  f"(1 process)  doubled or missing {lost}", flush=True)
            for backend in backends:
                runs = []
                for _ in range(args.repeats):
                    with database(backend, tmp, args.postgres_url) as url:
                        runs.append(ohd_run(backend, url, args.tasks, claimers))
                rate = statistics.median(r[0] for r in runs)
                double, unleased = sum(r[1] for r in runs), sum(r[2] for r in runs)
                failed |= bool(double or unleased)
                rows.append((backend, claimers, rate, floor, double, unleased))
                print(f"ohd  {backend:<11} {claimers:2d} claimer(s): claims  {rate:8.0f}/s  "
                      f"{rate / floor:4.2f}x Huey's dequeue  double claims {double}  not leased once {unleased}  "
                      f"(runs: {', '.join(f'{r[0]:.0f}' for r in runs)})", flush=True)
    print(f"\n{args.tasks} tasks, median of {args.repeats} runs; goal with 16 claimers: SQLite >= 5000/s, "
          "PostgreSQL >= 2000/s")
    print("| backend | claimers | ohd claims/s | Huey SqliteHuey dequeues/s | ratio | double claims |")
    print("| --- | --- | --- | --- | --- | --- |")
    for backend, claimers, rate, floor, double, _ in rows:
        print(f"| {backend} | {claimers} | {rate:,.0f} | {floor:,.0f} | {rate / floor:.2f} | {double} |")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
