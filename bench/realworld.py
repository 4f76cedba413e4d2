"""ohd on real PyPI projects: their own code, their own test suites, a real daemon.

    python bench/realworld.py [--projects a,b] [--quick] [--workers N]

For each pinned project below: the sdist is downloaded from PyPI into a cache
(`<user cache dir>/ohd-bench/sdists`, once), unpacked into a git repo with one commit and
its own `.venv` (`pip install -e .`, pytest, coverage.py and the project's test
dependencies; cached beside the repo, so reruns are fast). The project's own suite runs
under coverage.py first (`coverage run -m pytest`, an empty rcfile as ohd uses); then a
real `ohd daemon` (offline provider: no API key, no server) runs unit_test and review tasks
on each chosen module, then docstring tasks. Printed per project: tasks, written,
`.ohd-new`, quarantined and failed per type; whether the written tests pass under the
project's own pytest; ohd's coverage baseline (the report's `coverage` section) against
coverage.py's figure for the same file; the tracked files changed.

Invariants (the exit status is 1 when one fails):
- no false "possible bug": no unit_test is quarantined on a project whose own suite passes;
- no lost review: each completed review's output file holds the review text the model gave;
- each coverage baseline ohd measured is within 1 point of coverage.py's;
- no tracked file damaged: the only tracked files changed are docstring targets, and those
  only in docstrings (tokens, comments and columns compared, not ASTs).
Needs the network (PyPI) on the first run only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemonproc import BenchDaemon  # noqa: E402
from tests.support.projects import only_docstrings_differ  # noqa: E402

TYPES = ("unit_test", "docstring", "review")
TERMINAL = {"completed", "failed", "cancelled"}
TIMEOUT_S = 900     # per task: the machine is shared; the bench measures correctness, not speed


@dataclass(frozen=True)
class Project:
    name: str
    version: str
    shape: str                   # what about it matters to ohd (tests/support/projects.py has each small)
    targets: tuple[str, ...]     # modules ohd is run on (as many as the project has, up to 5)
    tests: tuple[str, ...] = ()  # how the project runs its suite, when not plain `pytest` (pytest's own selection)
    test_deps: tuple[str, ...] = ()
    pytest: str = "pytest"       # the pytest the project's suite works with


PROJECTS = (
    Project("python-slugify", "5.0.2", "re-exporting __init__: `from .slugify import *`, module slugify defines slugify"
            " (shape reexport_clash); its suite is test.py, which plain `pytest` does not collect",
            ("slugify/slugify.py", "slugify/special.py", "slugify/__main__.py", "slugify/__init__.py"), ("test.py",)),
    Project("idna", "3.10", "`from .package_data import __version__`; tests `import idna` (shape version_reexport)",
            ("idna/core.py", "idna/intranges.py", "idna/codec.py", "idna/compat.py", "idna/package_data.py")),
    Project("more-itertools", "10.5.0", "a 4,980-line module re-exported by `from .more import *` (shape large_module)",
            ("more_itertools/more.py", "more_itertools/recipes.py", "more_itertools/__init__.py")),
    Project("toolz", "1.0.0", "tests inside the package, toolz/tests/, no top-level tests/ (shape tests_in_package)",
            ("toolz/itertoolz.py", "toolz/dicttoolz.py", "toolz/functoolz.py", "toolz/recipes.py", "toolz/utils.py")),
    Project("boltons", "24.1.0", "a flat package whose modules import each other relatively (shape relative_imports)",
            ("boltons/strutils.py", "boltons/iterutils.py", "boltons/dictutils.py", "boltons/setutils.py",
             "boltons/typeutils.py"),
            pytest="pytest==7.4.4"),   # its conftest's pytest_ignore_collect(path) is refused by pytest 8
    Project("packaging", "24.2", "src/ layout: src/packaging/ (shape src_layout)",
            ("src/packaging/version.py", "src/packaging/specifiers.py", "src/packaging/markers.py",
             "src/packaging/requirements.py", "src/packaging/utils.py"), test_deps=("pretend",)),
    Project("six", "1.16.0", "one module at the repo root, its test file beside it", ("six.py",),
            ("--deselect", "test_six.py::test_move_items[dbm_ndbm]")),   # no _dbm in this Python
)


@dataclass
class Result:
    """What one task did, from its row, its report and its calls."""

    ident: int
    type: str
    target: str
    status: str
    kind: str                     # written | ohd-new | quarantined | failed | unchanged | cancelled
    output: str | None
    error: str | None
    coverage: dict[str, Any] | None = None


@dataclass
class Figures:
    project: Project
    suite: str = ""
    suite_ok: bool = False
    results: list[Result] = field(default_factory=list)
    written_tests: str = ""
    written_tests_ok: bool = True
    coverage_lines: list[str] = field(default_factory=list)
    tracked: list[str] = field(default_factory=list)
    false_alarms: int = 0
    lost_reviews: int = 0
    baselines_off: int = 0
    baselines_compared: int = 0
    baselines_unmeasured: int = 0
    damaged: int = 0
    notes: list[str] = field(default_factory=list)


def run(cmd: list[str], cwd: Path, timeout: float = 1800, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def clean_env() -> dict[str, str]:
    """The environment without ohd's settings or an API key (nothing here may reach a model)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("OHD_") and k not in ("OPENROUTER_API_KEY", "PYTHONPATH", "VIRTUAL_ENV")}


# -- the project: sdist, repo, venv -----------------------------------------------------------

def sdist(cache: Path, project: Project) -> Path:
    folder = cache / "sdists"
    folder.mkdir(parents=True, exist_ok=True)
    found = _sdist_in(folder, project)
    if found is None:
        print(f"  downloading {project.name}=={project.version} (sdist) from PyPI", flush=True)
        done = run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q",
                    "-d", str(folder), f"{project.name}=={project.version}"], folder)
        found = _sdist_in(folder, project)
        if found is None:
            raise SystemExit(f"cannot download {project.name}=={project.version}: {done.stderr.strip()[-500:]}")
    return found


def _sdist_in(folder: Path, project: Project) -> Path | None:
    stems = {f"{n}-{project.version}" for n in (project.name, project.name.replace("-", "_"))}
    return next((p for p in sorted(folder.glob("*.tar.gz")) if p.name[:-len(".tar.gz")] in stems), None)


def build_repo(cache: Path, project: Project, archive: Path) -> Path:
    """The sdist unpacked at a fixed path (the venv's editable install points there), as a git
    repo with one commit; the venv (kept between runs) is linked in as `.venv`."""
    home = cache / "projects" / f"{project.name}-{project.version}"
    repo, venv = home / "repo", home / "venv"
    if repo.exists():
        shutil.rmtree(repo)
    with tempfile.TemporaryDirectory(dir=home.parent if home.parent.exists() else None) as scratch:
        with tarfile.open(archive) as tar:
            tar.extractall(scratch, filter="data")
        (top,) = Path(scratch).iterdir()
        home.mkdir(parents=True, exist_ok=True)
        shutil.move(str(top), repo)
    git = ["git", "-c", "user.email=bench@example.com", "-c", "user.name=bench"]
    run([*git, "init", "-q", "-b", "main"], repo)
    (repo / ".git" / "info" / "exclude").write_text(
        ".venv\n__pycache__/\n*.egg-info/\n.eggs/\nbuild/\n.pytest_cache/\n.coverage*\n")
    run([*git, "add", "-A"], repo)
    run([*git, "commit", "-q", "-m", f"{project.name} {project.version} from its sdist"], repo)
    _venv(project, repo, venv)
    (repo / ".venv").symlink_to(venv)
    init = run([sys.executable, "-m", "ohd", "init", "--repo", str(repo)], repo, env=clean_env())
    if init.returncode != 0:
        raise SystemExit(f"ohd init failed in {repo}: {init.stderr.strip()}")
    return repo


def _venv(project: Project, repo: Path, venv: Path) -> None:
    wanted = " ".join((project.pytest, "coverage", *project.test_deps))
    marker = venv / "ohd-bench.txt"
    if marker.is_file() and marker.read_text() == wanted:
        return
    print(f"  building the venv of {project.name} (once)", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    for cmd in ([sys.executable, "-m", "venv", str(venv)],
                [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-e", str(repo), *wanted.split()]):
        done = run(cmd, repo, env=clean_env())
        if done.returncode != 0:
            raise SystemExit(f"venv of {project.name}: {' '.join(cmd)} failed: {done.stderr.strip()[-800:]}")
    marker.write_text(wanted)


# -- the project's own suite under coverage.py -------------------------------------------------

def own_suite(repo: Path, project: Project, scratch: Path) -> tuple[str, bool, dict[str, tuple[float, int]], str]:
    """The suite's outcome line (run the project's way), whether it passed, coverage.py's
    (percent, statements) per file for `coverage run -m pytest` (pytest's own selection, the
    suite ohd measures), and a note when the project's way covers other lines."""
    line, passed, by_own_args = _under_coverage(repo, project.tests, scratch / "own")
    if not project.tests:
        return line, passed, by_own_args, ""
    _, _, by_selection = _under_coverage(repo, (), scratch / "selection")
    return line, passed, by_selection, f"coverage.py with `pytest {' '.join(project.tests)}`: " + ", ".join(
        f"{t} {by_own_args[t][0]:.1f}%" for t in project.targets if t in by_own_args)


def _under_coverage(repo: Path, args: tuple[str, ...], scratch: Path) -> tuple[str, bool, dict[str, tuple[float, int]]]:
    python = str(repo / ".venv" / "bin" / "python")
    scratch.mkdir(parents=True, exist_ok=True)
    rcfile, data, report, junit = (scratch / n for n in ("rc", "data", "coverage.json", "suite.xml"))
    rcfile.write_text("")
    start = time.monotonic()
    done = run([python, "-m", "coverage", "run", f"--rcfile={rcfile}", f"--data-file={data}", "-m", "pytest",
                "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *args], repo, env=clean_env())
    elapsed = time.monotonic() - start
    counts = _junit_counts(junit)
    if counts is None:
        return f"no result (exit {done.returncode}): {done.stdout.strip()[-300:]}", False, {}
    tests, failed, skipped = counts
    line = f"{tests - failed - skipped} passed, {failed} failed, {skipped} skipped ({elapsed:.0f} s)"
    run([python, "-m", "coverage", "json", f"--rcfile={rcfile}", f"--data-file={data}", "-o", str(report)],
        repo, env=clean_env())
    files = {}
    if report.is_file():
        for name, entry in json.loads(report.read_text())["files"].items():
            rel = (repo / name).resolve().relative_to(repo.resolve()).as_posix() if not Path(name).is_absolute() \
                else name
            summary = entry["summary"]
            files[rel] = (float(summary["percent_covered"]), int(summary["num_statements"]))
    return line, done.returncode == 0 and failed == 0, files


def _junit_counts(path: Path) -> tuple[int, int, int] | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = [sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")]
    return total[0], total[1] + total[2], total[3]


# -- ohd ---------------------------------------------------------------------------------------

def run_ohd(repo: Path, project: Project, targets: tuple[str, ...], workers: int, base: Path) -> list[Result]:
    """Reviews all at once; unit_tests one after another, each written test file held outside
    the repo until the last one ran (so every coverage baseline is the project's own suite, as
    coverage.py measured it, not one grown by ohd's earlier outputs); then the docstrings (they
    change the targets)."""
    daemon = BenchDaemon(base, repo, None, {"OHD_OFFLINE": "true", "OHD_WORKERS": str(workers)})
    held: list[tuple[Path, Path]] = []
    try:
        reviews = [_submit(daemon, repo, "review", t) for t in targets]
        results = []
        for target in targets:
            (row,) = _wait(daemon, [_submit(daemon, repo, "unit_test", target)])
            results.append(_result(daemon, repo, row))
            out = results[-1].output
            if out and out.endswith(".py") and (repo / out).is_file():
                aside = base / "held" / out
                aside.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(repo / out, aside)
                held.append((aside, repo / out))
        results += [_result(daemon, repo, row) for row in _wait(daemon, reviews)]
        for aside, back in held:
            shutil.move(aside, back)
        held.clear()
        docstrings = [_submit(daemon, repo, "docstring", t) for t in targets]
        results += [_result(daemon, repo, row) for row in _wait(daemon, docstrings)]
        return results
    finally:
        for aside, back in held:
            shutil.move(aside, back)
        daemon.stop()


def _submit(daemon: BenchDaemon, repo: Path, task_type: str, target: str) -> int:
    reply = daemon.request("POST", "/tasks", {"type": task_type, "target": target, "repo": str(repo),
                                              "timeout_s": TIMEOUT_S})
    if not reply or "id" not in reply:
        raise SystemExit(f"submit {task_type} {target} failed: {reply}")
    return int(reply["id"])


def _wait(daemon: BenchDaemon, ids: list[int]) -> list[dict[str, Any]]:
    deadline, last = time.monotonic() + TIMEOUT_S * max(1, len(ids)), ""
    while True:
        rows = [daemon.request("GET", f"/tasks/{i}") or {} for i in ids]
        done = sum(1 for r in rows if r.get("status") in TERMINAL)
        line = f"  {done}/{len(ids)} tasks done"
        if line != last:
            print(line, flush=True)
            last = line
        if done == len(ids):
            return rows
        if daemon.proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the daemon stopped or the tasks did not finish; see {daemon.log}")
        time.sleep(1.0)


def _result(daemon: BenchDaemon, repo: Path, row: dict[str, Any]) -> Result:
    report: dict[str, Any] = {}
    if row.get("report_path") and (repo / row["report_path"]).is_file():
        report = json.loads((repo / row["report_path"]).read_text())
    decision = report.get("decision")
    error = row.get("error")
    output = row.get("output_path")
    if row["status"] == "cancelled":
        kind = "cancelled"
    elif row["status"] == "failed":
        kind = "failed"
    elif decision == "quarantined" or (error or "").startswith("quarantined"):
        kind = "quarantined"
    elif output and output.endswith(".ohd-new"):
        kind = "ohd-new"
    elif decision == "unchanged" or (row["type"] == "docstring" and output == row["target"]
                                      and not run(["git", "diff", "--quiet", "HEAD", "--", output], repo).returncode):
        kind = "unchanged"          # nothing added (the report may still say "written")
    else:
        kind = "written"
    coverage = ((report.get("verdict") or {}).get("coverage")) if row["type"] == "unit_test" else None
    return Result(row["id"], row["type"], row["target"], row["status"], kind, output, error, coverage)


def review_lost(daemon_env: dict[str, str], repo: Path, result: Result) -> str | None:
    """Why a completed review's output does not hold the review the model gave (None: it does)."""
    if not result.output or not (repo / result.output).is_file():
        return f"no output file ({result.output})"
    text = (repo / result.output).read_text(encoding="utf-8", errors="replace").strip()
    shown = run([sys.executable, "-m", "ohd", "show", str(result.ident), "--calls", "--json"], repo, env=daemon_env)
    try:
        calls = json.loads(shown.stdout).get("calls") or []
    except ValueError:
        return f"ohd show --calls failed: {shown.stderr.strip()[-200:]}"
    if not calls:
        return "no recorded call to compare with"
    if not text or text not in (calls[-1].get("response") or ""):
        return f"{result.output} does not hold the review text (it begins {text[:60]!r})"
    return None


# -- after the run -------------------------------------------------------------------------------

def tracked_changes(repo: Path, results: list[Result]) -> tuple[list[str], int]:
    """Lines describing each changed tracked file, and how many are damaged."""
    docstring_targets = {r.target for r in results if r.type == "docstring" and r.kind == "written"}
    status = run(["git", "status", "--porcelain", "--untracked-files=no"], repo).stdout.splitlines()
    lines, damaged = [], 0
    for entry in status:
        path = entry[3:]
        if path in docstring_targets and entry[:2].strip() == "M":
            before = run(["git", "show", f"HEAD:{path}"], repo).stdout
            if only_docstrings_differ(before, (repo / path).read_text(encoding="utf-8")):
                lines.append(f"{path} (docstring target, docstrings only)")
                continue
            lines.append(f"{path}: DAMAGED (a docstring target changed outside its docstrings)")
        else:
            lines.append(f"{path}: DAMAGED ({entry[:2].strip()}, not a docstring target)")
        damaged += 1
    return lines, damaged


def written_tests(repo: Path, results: list[Result]) -> tuple[str, bool]:
    """The unit_test outputs (`.ohd-new` ones copied to a .py name for the run) under the project's pytest."""
    files, copies = [], []
    for r in results:
        if r.type != "unit_test" or r.kind not in ("written", "ohd-new", "unchanged") or not r.output:
            continue
        path = repo / r.output
        if path.suffix != ".py":
            copy = path.with_name(f"test_ohd_bench_{r.ident}.py")
            shutil.copyfile(path, copy)
            copies.append(copy)
            path = copy
        files.append(path.relative_to(repo).as_posix())
    if not files:
        return "none written", True
    try:
        with tempfile.TemporaryDirectory() as scratch:
            junit = Path(scratch) / "written.xml"
            done = run([str(repo / ".venv" / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"--junitxml={junit}", *files], repo, env=clean_env())
            counts = _junit_counts(junit)
    finally:
        for copy in copies:
            copy.unlink(missing_ok=True)
    if counts is None:
        return f"{len(files)} files: no result (exit {done.returncode}): {done.stdout.strip()[-200:]}", False
    tests, failed, skipped = counts
    ok = done.returncode == 0 and failed == 0 and tests > 0
    return f"{len(files)} files, {tests - failed - skipped} passed, {failed} failed, {skipped} skipped", ok


def compare_coverage(results: list[Result], suite: dict[str, tuple[float, int]]) -> tuple[list[str], int, int, int]:
    """Lines, and how many baselines were off by more than 1 point, compared, not measured by ohd."""
    lines, off, compared, unmeasured = [], 0, 0, 0
    for r in results:
        if r.type != "unit_test":
            continue
        direct = suite.get(r.target)
        theirs = f"{direct[0]:.1f}% of {direct[1]}" if direct else "0% (the suite does not import it)"
        cov = r.coverage or {}
        if not cov or cov.get("error") or not cov.get("statements"):
            why = cov.get("error") or ("no candidate ran green" if r.kind in ("failed", "quarantined")
                                       else "no coverage section")
            lines.append(f"{r.target}: ohd n/a ({why}); coverage.py {theirs}")
            unmeasured += 1
            continue
        ours = 100.0 * cov["before"] / cov["statements"]
        compared += 1
        ref = direct[0] if direct else 0.0
        bad = abs(ours - ref) > 1.0
        off += bad
        lines.append(f"{r.target}: ohd {ours:.1f}% of {cov['statements']}, coverage.py {theirs}"
                     f"{f'  OFF BY {abs(ours - ref):.1f} POINTS' if bad else ''}"
                     f" (ohd's baseline: {', '.join(cov.get('baseline') or ()) or 'no test file'})")
    return lines, off, compared, unmeasured


# -- printing -------------------------------------------------------------------------------------

def table(results: list[Result]) -> list[str]:
    kinds = ("written", "ohd-new", "quarantined", "failed")
    head = f"  {'type':<10} {'tasks':>5} " + " ".join(f"{k:>11}" for k in kinds)
    lines = [head]
    for task_type in (*TYPES, "total"):
        rows = [r for r in results if task_type in ("total", r.type)]
        count = Counter(r.kind for r in rows)
        lines.append(f"  {task_type:<10} {len(rows):>5} " + " ".join(f"{count[k]:>11}" for k in kinds)
                     + (f"  (+{count['unchanged']} unchanged)" if count["unchanged"] else ""))
    return lines


def report(fig: Figures) -> None:
    p = fig.project
    print(f"\n{p.name} {p.version}: {p.shape}")
    print(f"  own suite under coverage.py: {fig.suite}")
    for line in table(fig.results):
        print(line)
    outputs = Counter(str(Path(r.output).parent) for r in fig.results if r.type == "unit_test" and r.output)
    print(f"  unit_test outputs in: {', '.join(f'{d}/ ({n})' for d, n in sorted(outputs.items())) or 'none'}")
    for r in fig.results:
        if r.kind in ("quarantined", "failed", "cancelled", "ohd-new"):
            print(f"  #{r.ident} {r.type} {r.target}: {r.kind}: {(r.error or r.output or '')[:160]}")
    print(f"  written tests under the project's pytest: {fig.written_tests}")
    print("  coverage baseline, ohd against coverage.py:")
    for line in fig.coverage_lines:
        print(f"    {line}")
    print(f"  tracked files changed: {len(fig.tracked)}")
    for line in fig.tracked:
        print(f"    {line}")
    for note in fig.notes:
        print(f"  {note}")
    print(f"  invariants: false possible-bug alarms {fig.false_alarms}, lost reviews {fig.lost_reviews}, "
          f"baselines off by >1 point {fig.baselines_off} of {fig.baselines_compared} "
          f"({fig.baselines_unmeasured} not measured by ohd), tracked files damaged {fig.damaged}")


def bench(project: Project, cache: Path, quick: bool, workers: int) -> Figures:
    fig = Figures(project)
    print(f"\n== {project.name} {project.version}", flush=True)
    repo = build_repo(cache, project, sdist(cache, project))
    targets = project.targets[:2] if quick else project.targets
    with tempfile.TemporaryDirectory(prefix="ohd-realworld-") as scratch:
        fig.suite, fig.suite_ok, suite_cov, note = own_suite(repo, project, Path(scratch))
        print(f"  own suite: {fig.suite}", flush=True)
        if note:
            fig.notes.append(note)
        base = Path(scratch) / "daemon"
        fig.results = run_ohd(repo, project, targets, workers, base)
        daemon_env = {k: v for k, v in clean_env().items()}
        daemon_env.update({"OHD_STATE_DIR": str(base / "state"), "OHD_CONFIG": str(base / "none.toml")})
        for r in fig.results:
            if r.type == "review" and r.status == "completed":
                why = review_lost(daemon_env, repo, r)
                if why:
                    fig.lost_reviews += 1
                    fig.notes.append(f"LOST REVIEW #{r.ident} {r.target}: {why}")
    if fig.suite_ok:
        fig.false_alarms = sum(1 for r in fig.results if r.type == "unit_test" and r.kind == "quarantined")
    else:
        fig.notes.append("the project's own suite does not pass here: quarantines are not counted as false alarms")
    fig.tracked, fig.damaged = tracked_changes(repo, fig.results)
    fig.written_tests, fig.written_tests_ok = written_tests(repo, fig.results)
    (fig.coverage_lines, fig.baselines_off, fig.baselines_compared,
     fig.baselines_unmeasured) = compare_coverage(fig.results, suite_cov)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--projects", default="", help="comma-separated project names (default: all): "
                        + ", ".join(p.name for p in PROJECTS))
    parser.add_argument("--quick", action="store_true", help="two modules per project, not up to five")
    parser.add_argument("--workers", type=int, default=2, help="the daemon's workers (default 2)")
    parser.add_argument("--cache", type=Path, default=Path(platformdirs.user_cache_dir("ohd-bench")),
                        help="sdists, repos and venvs (default: the user cache dir's ohd-bench/)")
    args = parser.parse_args()
    chosen = [p.strip() for p in args.projects.split(",") if p.strip()]
    unknown = sorted(set(chosen) - {p.name for p in PROJECTS})
    if unknown:
        parser.error(f"unknown project(s) {', '.join(unknown)} (known: {', '.join(p.name for p in PROJECTS)})")
    projects = [p for p in PROJECTS if not chosen or p.name in chosen]
    commit = run(["git", "rev-parse", "--short", "HEAD"], ROOT).stdout.strip() or "?"
    print(f"ohd at {commit}; offline provider; {args.workers} workers; cache {args.cache}")
    start = time.monotonic()
    figures = [bench(p, args.cache, args.quick, args.workers) for p in projects]
    for fig in figures:
        report(fig)
    totals = Counter(r.kind for f in figures for r in f.results)
    alarms, lost = sum(f.false_alarms for f in figures), sum(f.lost_reviews for f in figures)
    off, compared = sum(f.baselines_off for f in figures), sum(f.baselines_compared for f in figures)
    unmeasured = sum(f.baselines_unmeasured for f in figures)
    damaged = sum(f.damaged for f in figures)
    failing_written = sum(1 for f in figures if not f.written_tests_ok)
    print(f"\ntotal: {len(figures)} projects, {sum(len(f.results) for f in figures)} tasks: "
          f"{totals['written']} written, {totals['ohd-new']} .ohd-new, {totals['quarantined']} quarantined, "
          f"{totals['failed']} failed; false possible-bug alarms {alarms}, lost reviews {lost}, "
          f"baselines off by >1 point {off} of {compared} ({unmeasured} not measured by ohd), "
          f"tracked files damaged {damaged}, projects whose written tests fail {failing_written}; "
          f"{(time.monotonic() - start) / 60:.0f} min")
    sys.exit(1 if alarms or lost or off or damaged else 0)


if __name__ == "__main__":
    main()
