"""What ohd's git hooks add to a commit.

    python bench/hooks.py [--commits N] [--quick] [--baseline REV]

Two fresh repos, one without hooks and one with ohd's pre-commit and post-commit hooks
installed (`ohd.repo.gitrepo.install_hooks`). Each round changes one file and times
`git commit` in both repos, alternating which goes first, so machine noise falls on
both sides alike. Staging and draining the spool (what the daemon does) are not timed.
Prints the median commit time of each side and the median of the per-round differences:
the time the hooks add to one commit (goal, issue 17: at most 5 ms), and the ratio of the
hooked commit to the floor (the commit without hooks) measured in the same run. With
`--baseline REV` a third repo gets the hooks of that git revision of this repo (e.g. `main`
before a change), timed in the same rounds: before and after on the same machine load.
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
from ohd.repo.gitrepo import HOOK_NAMES, install_hooks  # noqa: E402
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


def install_baseline(repo: Path, rev: str) -> None:
    """The hooks as they were at `rev` of this repo, installed by hand (no chaining needed)."""
    for name in HOOK_NAMES:
        hook = repo / ".git" / "hooks" / name
        hook.write_text(git(ROOT, "show", f"{rev}:hooks/{name}"))
        hook.chmod(0o755)


def run(commits: int, baseline: str | None) -> None:
    base = Path(tempfile.mkdtemp(prefix="ohd-bench-hooks-"))
    repos = {"plain": make_repo(base / "plain"), "hooked": make_repo(base / "hooked")}
    install_hooks(repos["hooked"])
    if baseline:
        repos["baseline"] = make_repo(base / "baseline")
        install_baseline(repos["baseline"], baseline)
    times: dict[str, list[float]] = {name: [] for name in repos}
    events = 0
    for n in range(WARMUP + commits):
        order = list(repos.items())
        if n % 2:
            order.reverse()
        for name, repo in order:
            ms = timed_commit(repo, n)
            if n >= WARMUP:
                times[name].append(ms)
        drained = drain(repos["hooked"])
        if baseline:
            drain(repos["baseline"])
        if n >= WARMUP:
            events += drained
    report(times, events, commits)
    if baseline:
        added = [b - p for p, b in zip(times["plain"], times["baseline"])]
        print(f"  baseline {baseline}'s hooks: median {statistics.median(times['baseline']):6.2f} ms, "
              f"added per commit median {statistics.median(added):6.2f} ms, ratio "
              f"{statistics.median(times['baseline']) / statistics.median(times['plain']):.2f}x")


def report(times: dict[str, list[float]], events: int, commits: int) -> None:
    plain, hooked = times["plain"], times["hooked"]
    added = [h - p for p, h in zip(plain, hooked)]
    print(f"git commit of one file, {commits} times each, alternating (git {git(ROOT, '--version').split()[-1]})")
    print(f"  without hooks:        median {statistics.median(plain):6.2f} ms")
    print(f"  with ohd's hooks:     median {statistics.median(hooked):6.2f} ms "
          f"({events} events recorded, expected {2 * commits})")
    print(f"  added per commit:     median {statistics.median(added):6.2f} ms "
          f"(p90 {percentile(added, 0.9):.2f} ms; goal <= 5 ms)")
    print(f"  ratio to the floor:   {statistics.median(hooked) / statistics.median(plain):6.2f}x "
          "(with hooks / without, medians)")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="10 commits each")
    parser.add_argument("--baseline", metavar="REV", help="also time the hooks of this git revision (e.g. main)")
    args = parser.parse_args()
    # The user's own git configuration (a global core.hooksPath, say) must not take part.
    os.environ.update(GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1")
    run(10 if args.quick else args.commits, args.baseline)


if __name__ == "__main__":
    main()
