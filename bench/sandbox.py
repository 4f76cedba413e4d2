"""What the test sandbox costs per pytest run: the median of N runs at each level against none.

    python bench/sandbox.py [--runs 15]

One real git repo with `shop/pricing.py` and one passing candidate test file; each run is one
`python -m pytest` of it the way `ohd.ladder.testrun` runs it (scrubbed environment, private HOME and
TMPDIR, junit report), once with no jail at all (how ohd ran tests before issue 11 point 7) and
once per level this machine offers. The levels run interleaved (a noisy machine slows all of
them alike); also printed: what `sandbox.detect` (the start-up probe) takes. Every number comes
from this run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "daemon"))

from ohd import testrun  # noqa: E402
from ohd.ladder import sandbox
from tests.support.gitrepo import make_repo  # noqa: E402

CANDIDATE = "from shop.pricing import total\n\n\ndef test_total() -> None:\n    assert total([1.0, 2.0]) == 3.0\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    started = time.perf_counter()
    best = sandbox.detect(sandbox.hidden_paths())
    probe_ms = (time.perf_counter() - started) * 1000
    levels = [lvl for lvl in sandbox.Level if lvl is sandbox.Level.PROCESS or
              sandbox.detect(sandbox.hidden_paths(), lvl.value).level is lvl]
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repo(Path(tmp) / "repo")
        timings: dict[str, list[float]] = {"none": [], **{lvl.value: [] for lvl in levels}}
        with testrun.candidate_file(repo, "tests/test_pricing.py", CANDIDATE) as rel:
            keep = testrun.probe(sys.executable).paths
            for _ in range(args.runs):
                for name in timings:
                    with tempfile.TemporaryDirectory() as scratch:
                        env = testrun.private_env(testrun.clean_env(testrun.os.environ, (), [str(repo)]),
                                                  Path(scratch))
                        jail = None if name == "none" else (sandbox.Jail(sandbox.Level(name),
                                                                         sandbox.hidden_paths()), Path(scratch), keep)
                        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                   f"--junitxml={scratch}/r.xml", rel]
                        t0 = time.perf_counter()
                        code, out = testrun._run(command, repo, env, 60.0, jail=jail)
                        timings[name].append((time.perf_counter() - t0) * 1000)
                        assert code == 0, out
    base = statistics.median(timings["none"])
    print(f"start-up probe (sandbox.detect): {probe_ms:.0f} ms -> {best.level.value}")
    print(f"{'level':<10} {'median ms':>10} {'overhead ms':>12}   ({args.runs} runs each, pytest of one test)")
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"{name:<10} {median:>10.0f} {median - base:>+12.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
