"""The validation ladder: one candidate through every rule that applies, cheapest first.

The worker's one call. Static rules (`ohd.ladder.validate`) first; ruff on a Python output
(`ohd.ladder.lintrun`, when installed); for a unit_test that passed the static rules, pytest
runs in the user's repo (`ohd.ladder.testrun`); for tests that pass, their coverage gain
(`ohd.ladder.testrun.measure_coverage`, when coverage.py is installed). A rule switched off in
the level table is not measured at all. The verdict carries what each step measured.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from ohd.core import tasktypes
from ohd.core.taskfile import TaskType
from ohd.core.tasktypes import Job
from ohd.errors import TaskFileError, TestEnvironmentError
from ohd.ladder import lintrun, testrun, validate
from ohd.ladder.validate import CoverageRun, LintRun, PytestRun, RunStatus

log = logging.getLogger("ohd.ladder")


@dataclass(frozen=True, slots=True)
class Ladder:
    """How candidates are judged: pytest runs, the rule levels per task type, the optional tools."""

    tests: testrun.Options = testrun.Options()
    levels: validate.LevelTable = field(default_factory=dict)    # task type (or "*") -> rule -> level
    ruff: str | None = None        # the ruff executable (None: no lint rule)
    coverage: bool = False         # measure coverage_delta where the test interpreter has coverage.py

    @classmethod
    def detect(cls, tests: testrun.Options, levels: validate.LevelTable) -> Ladder:
        """With ruff if it is installed here, and coverage_delta wherever coverage.py is."""
        return cls(tests=tests, levels=levels, ruff=lintrun.find_ruff(), coverage=True)


def judge(repo: Path, job: Job, content: str, min_quality: float, ladder: Ladder,
          replaces_output: bool = False) -> validate.Verdict:
    """The verdict on one candidate; each measuring step runs only when the steps before it hold.
    `replaces_output`: the output file now holds ohd's own earlier output, which the candidate
    replaces (so it counts in the coverage before, not after); else an existing output is the
    user's and stays."""
    levels = validate.levels_for(job.task_type, ladder.levels)

    def check(test_run: PytestRun | None = None, lint: LintRun | None = None,
              coverage: CoverageRun | None = None) -> validate.Verdict:
        return validate.check(job.task_type, job.output, content, target_exists=True, module=job.module,
                              min_quality=min_quality, original=job.source, target=job.target, levels=levels,
                              test_run=test_run, lint=lint, coverage=coverage)

    verdict = check()
    lint = None
    if ladder.ruff and levels.get("lint") and job.output.endswith(".py") and _passed(verdict, "valid_python"):
        env = testrun.clean_env(os.environ, ladder.tests.secret_env, [])
        lint = lintrun.lint(ladder.ruff, repo, job.output, content, env)
        if job.task_type is TaskType.DOCSTRING and job.source:   # the user's own findings are not the answer's
            lint = lintrun.introduced(lint, lintrun.lint(ladder.ruff, repo, job.output, job.source, env))
        if lint.error:
            log.warning("lint of %s not counted: %s", job.output, lint.error)
    if (job.task_type is not TaskType.UNIT_TEST or not verdict.errors_passed() or ladder.tests.runs < 1
            or not levels.get("runs_green")):
        return check(lint=lint) if lint else verdict
    python = testrun.interpreter(repo, ladder.tests.python)
    root = tasktypes.import_root(job.target, lambda rel: (repo / rel / "__init__.py").is_file())
    result = testrun.run_candidate(repo, job.output, content, import_root=root, options=ladder.tests,
                                   python=python.path)
    log.info("candidate for %s: pytest %s (%s)", job.output, result.status.value,
             ", ".join(o.value for o in result.outcomes))
    coverage = None
    if result.status is RunStatus.PASSED and ladder.coverage and levels.get("coverage_delta") and not python.coverage:
        coverage = CoverageRun(target=job.target, statements=0, before=0, after=0,
                               error=f"coverage.py cannot be imported by {python.path}, which runs the tests: "
                                     "install it there (pip install coverage) or switch the rule off")
    elif result.status is RunStatus.PASSED and ladder.coverage and levels.get("coverage_delta"):
        coverage = testrun.measure_coverage(repo, job.output, content, target=job.target, import_root=root,
                                            options=ladder.tests, python=python.path,
                                            replaces_output=replaces_output)
        log.info("candidate for %s: %s", job.output,
                 coverage.error or f"coverage {coverage.before} -> {coverage.after} of {coverage.statements} lines")
    return check(test_run=result, lint=lint, coverage=coverage)


def for_task(ladder: Ladder, task_type: str, levels: Mapping[str, str]) -> Ladder:
    """`ladder` with a task file's own rule levels over the configuration's for its type;
    TaskFileError (field rule_levels) names an unknown rule or level."""
    if not levels:
        return ladder
    try:
        own = validate.parse_levels({task_type: levels}, (task_type,))[task_type]
    except ValueError as exc:
        raise TaskFileError("the task", str(exc).split(": ", 1)[-1], field="rule_levels") from None
    return replace(ladder, levels={**ladder.levels, task_type: {**ladder.levels.get(task_type, {}), **own}})


def ready(repo: Path, job: Job, ladder: Ladder) -> None:
    """Before any model is asked: a unit_test whose tests will be run needs pytest in the
    interpreter that runs them (TestEnvironmentError says which and what to do)."""
    levels = validate.levels_for(job.task_type, ladder.levels)
    if job.task_type is not TaskType.UNIT_TEST or ladder.tests.runs < 1 or not levels.get("runs_green"):
        return
    python = testrun.interpreter(repo, ladder.tests.python)
    if not python.pytest:
        raise TestEnvironmentError(
            f"pytest cannot be imported by {python.path} (test_python = {ladder.tests.python!r}), so the "
            "generated tests cannot be run: install pytest there, point test_python at the Python of "
            "your project's virtualenv, or set test_runs = 0 to keep the static rules only")


def _passed(verdict: validate.Verdict, rule: str) -> bool:
    return all(r.passed for r in verdict.rules if r.rule == rule)
