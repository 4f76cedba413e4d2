"""What ohd's git hooks add to a commit.

    python bench/hooks.py [--commits N] [--quick]

Two fresh repos, one without hooks and one with ohd's pre-commit and post-commit hooks
installed (`ohd.repo.gitrepo.install_hooks`). Each round changes one file and times
`git commit` in both repos, alternating which goes first, so machine noise falls on
both sides alike. Staging and draining the spool (what the daemon does) are not timed.
Prints the median commit time of each side and the median of the per-round differences:
the time the hooks add to one commit (goal: at most 10 ms, aim 5 ms).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ohd.intake.spool import spool_dir  # noqa: E402
from ohd.repo.gitrepo import install_hooks  # noqa: E402
from tests.support.gitrepo import git, make_repo  # noqa: E402

WARMUP = 3


def timed_commit(repo: Path, n: int) -> float:
    """Change one file, stage it (untimed), then time `git commit`; milliseconds."""
    (repo / "notes.txt").write_text(f"change {n}\n")
    git(repo, "add", "notes.txt")
    start = time.perf_counter()
    subprocess.run(["git", "commit", "-q", "-m", f"change {n}"], cwd=repo, check=True)
    return (time.perf_counter() - start) * 1000


def drain(repo: Path) -> int:
    """Delete the spool's events, as the daemon would; returns how many there were."""
    spool = spool_dir(repo)
    found = list(spool.glob("*.event")) if spool.is_dir() else []
    for path in found:
        path.unlink()
    return len(found)


def run(commits: int) -> None:
    base = Path(tempfile.mkdtemp(prefix="ohd-bench-hooks-"))
    plain, hooked = make_repo(base / "plain"), make_repo(base / "hooked")
    install_hooks(hooked)
    times: dict[str, list[float]] = {"plain": [], "hooked": []}
    events = 0
    for n in range(WARMUP + commits):
        order = [("plain", plain), ("hooked", hooked)]
        if n % 2:
            order.reverse()
        for name, repo in order:
            ms = timed_commit(repo, n)
            if n >= WARMUP:
                times[name].append(ms)
        drained = drain(hooked)
        if n >= WARMUP:
            events += drained
    report(times, events, commits)


def report(times: dict[str, list[float]], events: int, commits: int) -> None:
    plain, hooked = times["plain"], times["hooked"]
    added = [h - p for p, h in zip(plain, hooked)]
    print(f"git commit of one file, {commits} times each, alternating (git {git(ROOT, '--version').split()[-1]})")
    print(f"  without hooks:        median {statistics.median(plain):6.2f} ms")
    print(f"  with ohd's hooks:     median {statistics.median(hooked):6.2f} ms "
          f"({events} events recorded, expected {2 * commits})")
    print(f"  added per commit:     median {statistics.median(added):6.2f} ms "
          f"(p90 {percentile(added, 0.9):.2f} ms; goal <= 10 ms, aim 5 ms)")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="10 commits each")
    args = parser.parse_args()
    # The user's own git configuration (a global core.hooksPath, say) must not take part.
    os.environ.update(GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1")
    run(10 if args.quick else args.commits)


if __name__ == "__main__":
    main()
