"""A real daemon with the offline provider on each real-project shape of tests/projects/
(src layout, relative imports, tests inside the package, a re-exporting `__init__` whose name
clashes with its module, a `__version__` re-export, a 5,600-line module): the invariants
bench/realworld.py checks on the real projects, on small copies of their shapes.

Per shape, one daemon runs unit_test and review tasks on the shape's modules, then docstring
tasks; the shape's own suite passes, and coverage.py measured it before the daemon started.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import DaemonProcess, daemon_env
from tests.support.gitrepo import git
from tests.support.projects import MODULES, SHAPES, copy_project, only_docstrings_differ
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(900)   # a fixture runs a whole shape (up to 6 tasks with pytest runs)

TERMINAL = ("completed", "failed", "cancelled")


@dataclass
class ShapeRun:
    shape: str
    repo: Path
    coverage_py: dict[str, tuple[float, int]]          # file -> (percent, statements) of the shape's own suite
    tasks: list[dict[str, Any]] = field(default_factory=list)    # `ohd show --json`, plus "report" and "calls"

    def of(self, task_type: str) -> list[dict[str, Any]]:
        found = [t for t in self.tasks if t["type"] == task_type]
        assert len(found) == len(MODULES[self.shape]), self.tasks
        return found


def _own_coverage(repo: Path, scratch: Path) -> dict[str, tuple[float, int]]:
    """coverage.py on the shape's own suite, run directly (an empty rcfile, as ohd runs it)."""
    rc, data, out = scratch / "rc", scratch / "data", scratch / "cov.json"
    rc.write_text("")
    ran = subprocess.run([sys.executable, "-m", "coverage", "run", f"--rcfile={rc}", f"--data-file={data}", "-m",
                          "pytest", "-q", "-p", "no:cacheprovider"], cwd=repo, capture_output=True, text=True,
                         timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    subprocess.run([sys.executable, "-m", "coverage", "json", f"--rcfile={rc}", f"--data-file={data}", "-o",
                    str(out)], cwd=repo, check=True, capture_output=True, timeout=120)
    files = json.loads(out.read_text())["files"]
    return {Path(name).as_posix(): (float(f["summary"]["percent_covered"]), int(f["summary"]["num_statements"]))
            for name, f in files.items()}


@pytest.fixture(scope="module", params=SHAPES)
def shape_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShapeRun]:
    shape: str = request.param
    tmp = tmp_path_factory.mktemp(shape)
    repo = copy_project(shape, tmp / "repo")
    run = ShapeRun(shape, repo, _own_coverage(repo, tmp))
    runtime = Path(tempfile.mkdtemp(prefix="ohd-rt-"))
    env = daemon_env(tmp, runtime, OHD_OFFLINE="true", OHD_WORKERS="2")
    env.pop("PYTHONPATH")       # the shape's tests run as a user's would: nothing of ohd's tree on the path
    daemon = DaemonProcess(env, repo, tmp / "daemon.log").start()
    try:
        for types in (("unit_test", "review"), ("docstring",)):    # docstrings last: they change the targets
            ids = []
            for module in MODULES[shape]:
                for task_type in types:
                    done = daemon.ohd("submit", "--repo", str(repo), "--type", task_type, "--target", module)
                    assert done.returncode == 0, done.stderr
                    ids.append(int(done.stdout.split()[-1]))
            for ident in ids:
                task = wait_for(lambda i=ident: (t := daemon.json("show", str(i)))["status"] in TERMINAL and t,
                                timeout=800, interval=0.5, what=f"task {ident} to finish")
                task["report"] = (json.loads((repo / task["report_path"]).read_text())
                                  if task.get("report_path") else {})
                task["calls"] = daemon.json("show", str(ident), "--calls")["calls"]
                run.tasks.append(task)
    finally:
        assert daemon.stop() == 0, (tmp / "daemon.log").read_text()
    yield run


def test_tests_of_correct_code_are_not_reported_as_a_possible_bug(shape_run: ShapeRun) -> None:
    for task in shape_run.of("unit_test"):
        assert task["status"] == "completed", task
        assert task["report"]["decision"] in ("written", "written_as_ohd_new"), (task["error"], task["report"])


def test_written_tests_pass_under_the_repos_own_pytest(shape_run: ShapeRun) -> None:
    files = []
    for task in shape_run.of("unit_test"):
        if not task["output_path"]:
            continue                    # nothing written (the test above says why)
        path = shape_run.repo / task["output_path"]
        if path.suffix != ".py":        # `<output>.ohd-new`: run under a name pytest collects
            path = path.with_name(f"test_ohd_new_{task['id']}.py")
            path.write_bytes((shape_run.repo / task["output_path"]).read_bytes())
        files.append(path.relative_to(shape_run.repo).as_posix())
    assert files, "no unit_test task wrote a test file"
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
                              cwd=shape_run.repo, capture_output=True, text=True, timeout=300)
    finally:
        for rel in files:
            if rel.rpartition("/")[2].startswith("test_ohd_new_"):
                (shape_run.repo / rel).unlink()
    assert done.returncode == 0 and " passed" in done.stdout and "failed" not in done.stdout, done.stdout


def test_every_review_is_in_its_output_file(shape_run: ShapeRun) -> None:
    for task in shape_run.of("review"):
        assert task["status"] == "completed", task
        text = (shape_run.repo / task["output_path"]).read_text().strip()
        assert text and text in task["calls"][-1]["response"], (task["output_path"], text[:200])


def test_the_coverage_baseline_is_what_coverage_py_measures_for_the_repos_suite(shape_run: ShapeRun) -> None:
    for task in shape_run.of("unit_test"):
        measured = task["report"]["verdict"]["coverage"]
        assert measured and not measured.get("error"), measured
        percent, statements = shape_run.coverage_py[task["target"]]
        assert measured["statements"] == statements
        assert abs(100.0 * measured["before"] / statements - percent) <= 1.0, (task["target"], measured, percent)


def test_tracked_files_change_only_in_the_docstrings_of_docstring_targets(shape_run: ShapeRun) -> None:
    changed = git(shape_run.repo, "diff", "--name-only", "HEAD").split()
    assert set(changed) <= set(MODULES[shape_run.shape]), changed
    for rel in changed:
        before = git(shape_run.repo, "show", f"HEAD:{rel}")
        assert only_docstrings_differ(before, (shape_run.repo / rel).read_text()), rel
