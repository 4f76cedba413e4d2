"""The validation room: rules over a candidate output, a quality score, accept or reject.

Pure: the candidate arrives as text, the facts about the repo as arguments. Invariant:
a `Verdict` is accepted only if no error-level rule failed and its score reaches
`min_quality`; every failed rule carries a message fit to be sent back to the model.
"""

from __future__ import annotations

import ast
import fnmatch
import logging
import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from ohd.core import pyparse
from ohd.ladder import astrules, screen

log = logging.getLogger("ohd.validate")

_UNIT_TEST = "unit_test"
_DOCSTRING = "docstring"
_REVIEW = "review"
_REVIEW_MIN_WORDS = 8      # prose outside code blocks: "I'm ready to help. What's the problem?" has 7
_REVIEW_CODE_RATIO = 3     # code-block lines per line of prose above which a review is code
_MIN_TESTS = 3  # below this a unit_test output earns a little less (info rule test_count)
FEEDBACK_OUTPUT_CHARS = 3000   # pytest output sent back to the model


class Level(StrEnum):
    """How much a failed rule matters: errors reject, the rest lower the score."""

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"

    @property
    def weight(self) -> float:
        """Share of the score: error 1.0, warning 0.5, info 0.25."""
        return {"error": 1.0, "warning": 0.5, "info": 0.25}[self.value]


E, W, I = Level.ERROR, Level.WARNING, Level.INFO  # noqa: E741 (the table below reads as E/W/I)
# The level of each rule per task type ("*": every type); None switches a rule off.
LEVELS: dict[str, dict[str, Level | None]] = {
    "*": {"file_exists": E, "content_not_empty": E, "valid_python": E, "lint": W},
    _UNIT_TEST: {"test_naming": E, "imports_target": E, "not_vacuous": E, "safe_tests": E, "runs_green": E,
                 "has_assertions": W, "exercises_target": W, "test_count": I, "coverage_delta": I},
    _DOCSTRING: {"docstring_only": E},
    _REVIEW: {"review_is_prose": E, "review_names_target": E},
}
RULES = frozenset(rule for table in LEVELS.values() for rule in table)
LEVEL_NAMES = ("error", "warning", "info", "off")

LevelTable = Mapping[str, Mapping[str, "Level | None"]]   # task type (or "*") -> rule -> level


def levels_for(task_type: str, overrides: LevelTable | None = None) -> dict[str, Level | None]:
    """The level of every rule for `task_type` (None: off): the defaults, then `overrides`
    ("*" first, then the task type's own entries)."""
    overrides = overrides or {}
    return {**LEVELS["*"], **LEVELS.get(task_type, {}), **overrides.get("*", {}), **overrides.get(task_type, {})}


def unknown_rules(names: Iterable[str]) -> list[str]:
    """The names among `names` that are no rule (sorted), for a clear error."""
    return sorted(set(names) - RULES)


def parse_levels(raw: Mapping[str, Mapping[str, str]],
                 task_types: tuple[str, ...]) -> dict[str, dict[str, Level | None]]:
    """The `rule_levels` setting as a level table; ValueError names the unknown type, rule or level."""
    table: dict[str, dict[str, Level | None]] = {}
    for task_type, rules in raw.items():
        if task_type != "*" and task_type not in task_types:
            raise ValueError(f"rule_levels: unknown task type {task_type!r} (one of *, {', '.join(task_types)})")
        table[task_type] = {}
        for rule, level in rules.items():
            if rule not in RULES:
                raise ValueError(f"rule_levels.{task_type}: unknown rule {rule!r} (one of {', '.join(sorted(RULES))})")
            if level not in LEVEL_NAMES:
                raise ValueError(f"rule_levels.{task_type}.{rule}: {level!r} is not one of {', '.join(LEVEL_NAMES)}")
            table[task_type][rule] = None if level == "off" else Level(level)
    return table


class RunStatus(StrEnum):
    """How a pytest run (or a series of runs) of a candidate ended."""

    PASSED = "passed"
    FAILED = "failed"
    FLAKY = "flaky"      # some runs passed, some failed
    ERROR = "error"      # pytest could not collect or run the file (exit code 2..5)
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True)
class PytestRun:
    """The candidate test file run N times with pytest in the user's repo (from `ohd.ladder.testrun`)."""

    status: RunStatus
    outcomes: tuple[RunStatus, ...]   # one per run
    output: str                       # the most telling run's output (the first that did not pass), cut
    failed_tests: tuple[str, ...] = ()
    timeout_s: float = 0.0
    python: str = ""                  # the interpreter that ran pytest
    reason: str = ""                  # why a run that exited 0 or 1 is an error (pytest's report disagrees)
    sandbox: str = ""                 # the isolation level the tests ran in (`ohd.ladder.sandbox.Level`)

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status.value, "outcomes": [o.value for o in self.outcomes],
                "output": self.output, "failed_tests": list(self.failed_tests), "timeout_s": self.timeout_s,
                "python": self.python, "reason": self.reason, "sandbox": self.sandbox}


@dataclass(frozen=True, slots=True)
class LintRun:
    """Ruff's findings on a candidate (from `ohd.ladder.lintrun`); `error` when ruff could not check it."""

    tool: str                      # "ruff 0.x.y"
    findings: tuple[str, ...]      # "line:col CODE message"
    error: str = ""
    preexisting: int = 0           # findings the original file already had (a docstring task), not counted

    def as_dict(self) -> dict[str, Any]:
        return {"tool": self.tool, "findings": list(self.findings), "error": self.error,
                "preexisting": self.preexisting}


@dataclass(frozen=True, slots=True)
class CoverageRun:
    """Lines of the target run by the repo's tests without and with the candidate (from `ohd.ladder.testrun`)."""

    target: str
    statements: int
    before: int                        # lines run by the repo's test suite (the output file as it is now included)
    after: int                         # ... with the candidate added (in place of the output when `replaces`)
    baseline: tuple[str, ...] = ()     # what was measured for `before`
    error: str = ""                    # why it could not be measured
    suite: int = 0                     # lines run by the suite without the output file
    replaces: bool = False             # the candidate replaces the output file (ohd's own earlier output)

    @staticmethod
    def percent(lines: int, statements: int) -> float:
        return round(100.0 * lines / statements, 1) if statements else 100.0

    @property
    def gain(self) -> float:
        """Percentage points of the target's statements the candidate adds."""
        return round(self.percent(self.after, self.statements) - self.percent(self.before, self.statements), 1)

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "statements": self.statements, "before": self.before, "after": self.after,
                "before_percent": self.percent(self.before, self.statements),
                "after_percent": self.percent(self.after, self.statements), "gain": self.gain,
                "suite": self.suite, "suite_percent": self.percent(self.suite, self.statements),
                "replaces": self.replaces, "baseline": list(self.baseline), "error": self.error}


def cut(text: str, limit: int) -> str:
    """`text` within about `limit` characters: its head and its tail (pytest's summary)."""
    if len(text) <= limit:
        return text
    head, tail = limit // 3, limit - limit // 3
    return f"{text[:head]}\n[... {len(text) - head - tail} characters cut ...]\n{text[-tail:]}"


@dataclass(frozen=True, slots=True)
class Check:
    """What a rule found in one candidate, before it has a level: the rules say only what they
    found; the level of each comes from one place, `levels_for` (LEVELS and the user's overrides)."""

    rule: str
    passed: bool
    message: str


@dataclass(frozen=True, slots=True)
class RuleResult:
    """One rule applied to one candidate, at the level it has for the task."""

    rule: str
    level: Level
    passed: bool
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "level": self.level.value, "passed": self.passed, "message": self.message}


@dataclass(frozen=True, slots=True)
class Verdict:
    """Every rule's result, the weighted score (0..1) and the decision."""

    rules: tuple[RuleResult, ...]
    score: float
    accepted: bool
    test_run: PytestRun | None = None
    lint: LintRun | None = None
    coverage: CoverageRun | None = None

    def feedback(self) -> tuple[str, ...]:
        """Messages of the failed rules, for the next prompt."""
        return tuple(r.message for r in self.rules if not r.passed)

    def prompt_feedback(self) -> tuple[str, ...]:
        """The failed rules' messages and, when the tests did not pass, pytest's output (cut)."""
        run = self.test_run
        if run is None or run.status is RunStatus.PASSED:
            return self.feedback()
        return (*self.feedback(), f"pytest's output:\n```text\n{cut(run.output, FEEDBACK_OUTPUT_CHARS)}\n```")

    def errors_passed(self, *, but: str = "") -> bool:
        """Whether every error-level rule (except `but`) passed."""
        return all(r.passed for r in self.rules if r.level is Level.ERROR and r.rule != but)

    def possible_bug(self) -> bool:
        """Quarantine: all else holds, but the tests fail against the current code in every run."""
        run = self.test_run
        return (run is not None and run.status is RunStatus.FAILED and self.errors_passed(but="runs_green")
                and any(r.rule == "runs_green" and not r.passed for r in self.rules))

    def as_dict(self) -> dict[str, Any]:
        return {"rules": [r.as_dict() for r in self.rules], "score": self.score, "accepted": self.accepted,
                "test_run": self.test_run.as_dict() if self.test_run else None,
                "lint": self.lint.as_dict() if self.lint else None,
                "coverage": self.coverage.as_dict() if self.coverage else None}


def check(task_type: str, output: str, content: str, *, target_exists: bool,
          module: str, min_quality: float, original: str | None = None, target: str = "",
          test_run: PytestRun | None = None, levels: Mapping[str, Level | None] | None = None,
          lint: LintRun | None = None, coverage: CoverageRun | None = None) -> Verdict:
    """Apply the rules that fit this task type and output, and decide.

    `task_type` is a `taskfile.TaskType` value (a str); taskfile is a sibling room, not imported.
    `original` is the target's text (docstring: the code must stay the same); `test_run`,
    `lint` and `coverage` are what the edges measured (None: not measured, so `runs_green`,
    `lint` and `coverage_delta` are left out, as is a lint or coverage that could not run);
    `levels` overrides the levels of `levels_for(task_type)` for this check (None: rule off).
    `target` is the target's path (a review of a `.py` target must name its definitions or lines).
    """
    rules: list[Check] = [_file_exists(target_exists), _content_not_empty(output, content)]
    tree: ast.Module | None = None
    if output.endswith(".py") or task_type in (_UNIT_TEST, _DOCSTRING):
        parsed = _parse(content)
        if output.endswith(".py"):
            rules.append(_valid_python(output, parsed))
        tree = parsed if isinstance(parsed, ast.Module) else None
    if task_type == _UNIT_TEST:
        rules.extend(_unit_test_rules(output, tree, module))
        if tree is not None:
            rules.append(_safe_tests(tree, original, module))
        if test_run is not None:
            rules.append(_runs_green(test_run))
        if coverage is not None and not coverage.error:
            rules.append(_coverage_delta(coverage))
    if task_type == _DOCSTRING and original is not None and tree is not None:
        rules.append(_docstring_only(original, content, tree))
    if task_type == _REVIEW and original is not None:
        rules.extend(_review_rules(content, original, target))
    if lint is not None and not lint.error:
        rules.append(_lint(output, lint))
    table = {**levels_for(task_type), **(levels or {})}
    leveled = tuple(RuleResult(c.rule, level, c.passed, c.message)
                    for c in rules if (level := table[c.rule]) is not None)
    return replace(decide(leveled, min_quality, test_run), lint=lint, coverage=coverage)


def decide(rules: tuple[RuleResult, ...], min_quality: float, test_run: PytestRun | None = None) -> Verdict:
    """Score = weighted share of passed rules; accepted = no failed error and score >= min_quality."""
    total = sum(r.level.weight for r in rules)
    earned = sum(r.level.weight for r in rules if r.passed)
    score = round(earned / total, 4) if total else 0.0
    no_errors = all(r.passed for r in rules if r.level is Level.ERROR)
    return Verdict(rules=rules, score=score, accepted=no_errors and score >= min_quality, test_run=test_run)


def _file_exists(target_exists: bool) -> Check:
    message = "the target file exists" if target_exists else "the target file does not exist"
    return Check("file_exists", target_exists, message)


def _content_not_empty(output: str, content: str) -> Check:
    if content.strip():
        return Check("content_not_empty", True, f"{output} has content")
    return Check("content_not_empty", False, f"the content for {output} is empty")


def _parse(content: str) -> ast.Module | SyntaxError:
    try:
        return pyparse.parse(content)
    except SyntaxError as exc:
        return exc
    except ValueError as exc:  # e.g. a NUL byte in the source
        return SyntaxError(str(exc))


def _valid_python(output: str, parsed: ast.Module | SyntaxError) -> Check:
    if isinstance(parsed, ast.Module):
        return Check("valid_python", True, f"{output} is valid Python")
    where = f" at line {parsed.lineno}" if parsed.lineno else ""
    detail = parsed.msg or str(parsed)
    return Check("valid_python", False, f"{output} is not valid Python: {detail}{where}")


def _unit_test_rules(output: str, tree: ast.Module | None, module: str) -> list[Check]:
    if tree is None:
        return [Check("test_naming", False,
                      f"{output} must be a pytest module, but it does not parse")]
    tests = collected_tests(tree)
    rules = [_test_naming(output, tests), _has_assertions(tree), _test_count(tests)]
    if module:
        rules.append(_imports_target(tree, module))
        rules.append(_not_vacuous(tree, module))
        rules.append(_exercises_target(tree, module))
    return rules


def _safe_tests(tree: ast.Module, original: str | None, module: str) -> Check:
    """The static screen (`ohd.ladder.screen`): nothing a unit test should not need, unless the target uses it too."""
    target = _parse(original) if original is not None else None
    found = screen.screen(tree, target if isinstance(target, ast.Module) else None)
    if not found:
        return Check("safe_tests", True, "the tests start no process, open no socket and "
                     "touch no system path")
    shown = "; ".join(map(str, found[:20])) + (f"; and {len(found) - 20} more" if len(found) > 20 else "")
    return Check("safe_tests", False,
                 f"refused by the static screen before running: {shown}. A unit test of {module or 'the code'} "
                 "needs none of this unless the code under test does: no processes, sockets, system or "
                 "home paths or dynamic code; use tmp_path and monkeypatch")


def _not_vacuous(tree: ast.Module, module: str) -> Check:
    checks = astrules.test_checks(tree, module)
    if not checks:
        return Check("not_vacuous", False,
                     f"there is no test to check {module}: define `def test_...` functions that assert on it")
    problems = [f"{c.name} asserts nothing" for c in checks if not c.checks]
    problems += [f"{c.name} never checks anything from {module}" for c in checks if c.checks and not c.uses_target]
    problems += [f"`assert <constant>` at line {line} can never fail" for line in astrules.trivial_asserts(tree)]
    if not problems:
        return Check("not_vacuous", True, f"each of the {len(checks)} test(s) checks {module}")
    return Check("not_vacuous", False,
                 "vacuous tests: " + "; ".join(problems) + ". Every test must assert on what the code "
                 "under test returns, raises or changes (assert ... or pytest.raises)")


def _exercises_target(tree: ast.Module, module: str) -> Check:
    checks = astrules.test_checks(tree, module)
    calling = [c.name for c in checks if c.calls_target]
    if calling:
        return Check("exercises_target", True,
                     f"{len(calling)} of the {len(checks)} test(s) call code from {module}")
    return Check("exercises_target", False,
                 f"no test calls anything from {module}: checking that the module or its names exist "
                 "(inspect.ismodule, callable, hasattr) is not a test of what the code does")


def _runs_green(run: PytestRun) -> Check:
    n = len(run.outcomes)
    names = f": {', '.join(run.failed_tests[:10])}" if run.failed_tests else ""
    if run.status is RunStatus.PASSED:
        return Check("runs_green", True, f"pytest passed in each of {n} run(s)")
    messages = {
        RunStatus.FAILED: f"the tests fail against the current code in every run ({n} of {n}){names}. "
                          "Fix the expected values to what the code really does; if you are sure the code "
                          "is wrong, keep the test (it is reported as a possible bug, not written)",
        RunStatus.FLAKY: f"the tests are flaky: the runs gave {', '.join(o.value for o in run.outcomes)}{names}; "
                         "remove any dependence on order, time, randomness or leftover files",
        RunStatus.ERROR: (f"{run.reason}{f' with {run.python}' if run.python else ''}; see pytest's output"
                          if run.reason else
                          "pytest could not collect or run the file (an import error, a fixture that does "
                          f"not exist, or no tests){f' with {run.python}' if run.python else ''}; see pytest's output"),
        RunStatus.TIMEOUT: f"the tests did not finish within {run.timeout_s:g}s; no sleeping, "
                           "no network, no endless loops",
    }
    return Check("runs_green", False, messages[run.status])


def _lint(output: str, run: LintRun) -> Check:
    if not run.findings:
        already = f" ({run.preexisting} already in the original, not counted)" if run.preexisting else ""
        return Check("lint", True, f"{run.tool}: no findings{already}")
    shown = "; ".join(run.findings[:10]) + (f"; and {len(run.findings) - 10} more" if len(run.findings) > 10 else "")
    already = f" ({run.preexisting} more already in the original, not counted)" if run.preexisting else ""
    return Check("lint", False,
                 f"{run.tool} finds {len(run.findings)} problem(s) in {output}: {shown}{already}")


def _coverage_delta(cov: CoverageRun) -> Check:
    before, after = cov.percent(cov.before, cov.statements), cov.percent(cov.after, cov.statements)
    these = "with these in place of the current output" if cov.replaces else "with these added"
    figures = (f"coverage of {cov.target}: {before:g}% ({cov.before}/{cov.statements} lines) with the repo's "
               f"tests, {after:g}% ({cov.after}/{cov.statements}) {these} ({cov.gain:+g} points)")
    if cov.after < cov.before:
        return Check("coverage_delta", False,
                     f"{figures}: the tests run fewer lines of {cov.target} than the file they replace")
    if cov.after > cov.before or cov.before >= cov.statements:
        return Check("coverage_delta", True, figures)
    return Check("coverage_delta", False,
                 f"{figures}: the tests run no line of {cov.target} that the repo's tests do not already run")


def _docstring_only(original: str, content: str, tree: ast.Module) -> Check:
    before = _parse(original)
    if not isinstance(before, ast.Module):
        return Check("docstring_only", True, "the original does not parse; code not compared")
    where = astrules.first_difference(astrules.code_shape(before), astrules.code_shape(tree))
    if where is not None:
        return Check("docstring_only", False,
                     f"the code changed outside docstrings (first at {where}); add or change docstrings "
                     "only and return the rest of the module exactly as it was")
    layout = astrules.layout_difference(original, content)
    if layout is not None:
        return Check("docstring_only", False,
                     f"outside docstrings {layout}; add or change docstrings only and return the rest "
                     "of the module exactly as it was, comments and formatting included")
    return Check("docstring_only", True,
                 "only docstrings changed; the code, comments and layout are the same")


_FENCED = re.compile(r"^ {0,3}(`{3,}|~{3,})[^\n]*\n.*?(?:^ {0,3}\1[`~]*[ \t]*$|\Z)", re.MULTILINE | re.DOTALL)
_LINE_REF = re.compile(r"\b(?:lines?|L)\s*(\d+)(?:\s*(?:-|–|to|and)\s*(\d+))?|\.\w+:(\d+)\b", re.IGNORECASE)
_SPAN = re.compile(r"`([^`\n]+)`")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CALLED = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)\s*\(")


def _review_rules(content: str, original: str, target: str) -> list[Check]:
    """A review is Markdown prose (not code) that names things that exist in the target."""
    prose = _FENCED.sub("", content)
    code_lines = sum(m.group(0).count("\n") for m in _FENCED.finditer(content))
    prose_lines = [line for line in prose.splitlines() if line.strip()]
    words = len(re.findall(r"[\w'’]+", prose))
    if _is_code(content):
        shape = Check("review_is_prose", False,
                      "the answer is code, not a review: write the review in Markdown prose")
    elif words < _REVIEW_MIN_WORDS or code_lines > _REVIEW_CODE_RATIO * max(len(prose_lines), 1):
        shape = Check("review_is_prose", False,
                      f"the review is {words} word(s) of prose and {code_lines} line(s) of code blocks: "
                      "a review explains, in Markdown prose, what is wrong or right in the target and why")
    else:
        shape = Check("review_is_prose", True, f"Markdown prose ({words} words)")
    named = review_mentions(prose, original, target)
    name = target or "the target"
    if named:
        shown = ", ".join(named[:8]) + (f" and {len(named) - 8} more" if len(named) > 8 else "")
        grounded = Check("review_names_target", True, f"the review names {shown} in {name}")
    else:
        grounded = Check("review_names_target", False,
                         f"the review names nothing that exists in {name}: cite its functions, classes or "
                         f"lines (as `name` or line N, within its {len(original.splitlines())} lines)")
    return [shape, grounded]


def review_mentions(prose: str, original: str, target: str = "") -> list[str]:
    """What the review's prose cites that exists in the target: line numbers in range, and
    (a Python target) its definitions written as `name`, `a.b`, `name(` or a name with `_`;
    (another file) code spans that occur in it verbatim."""
    count = len(original.splitlines())
    found: list[str] = []
    for match in _LINE_REF.finditer(prose):
        numbers = [int(n) for n in match.groups() if n]
        if numbers and all(1 <= n <= count for n in numbers):
            found.append(f"line {numbers[0]}")
    tree = _parse(original) if target.endswith((".py", ".pyi")) or not target else None
    if isinstance(tree, ast.Module):
        defined = astrules.defined_names(tree)
        spans = {ident for span in _SPAN.findall(prose) for ident in _IDENTIFIER.findall(span)}
        loose = {word for word in _IDENTIFIER.findall(prose) if "_" in word.strip("_")}
        found += sorted(f"`{n}`" for n in (spans | loose | set(_CALLED.findall(prose))) & defined)
    else:
        found += sorted({f"`{span.strip()}`" for span in _SPAN.findall(prose)
                         if len(span.strip()) >= 3 and span.strip() in original and span.strip() != target})
    return list(dict.fromkeys(found))


def _is_code(content: str) -> bool:
    """Whether the answer is Python source rather than prose (it parses, with a statement)."""
    parsed = _parse(content)
    return isinstance(parsed, ast.Module) and any(not isinstance(node, ast.Expr) for node in parsed.body)


def collected_tests(tree: ast.Module) -> list[str]:
    """Top-level `test_*` functions and `test_*` methods of top-level `Test*` classes."""
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
            names.append(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            names.extend(
                f"{node.name}.{item.name}"
                for item in node.body
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name.startswith("test_")
            )
    return names


def _test_naming(output: str, tests: list[str]) -> Check:
    base = posixpath.basename(output)
    if not fnmatch.fnmatchcase(base, "test_*.py"):
        return Check("test_naming", False,
                     f"{base} is not collected by pytest: the file name must match test_*.py")
    if not tests:
        return Check("test_naming", False,
                     "no test functions found: define `def test_...` at top level "
                     "or `test_...` methods in a `Test...` class")
    return Check("test_naming", True, f"{len(tests)} test(s) collected by name")


def count_assertions(tree: ast.Module) -> int:
    """`assert` statements, `pytest.raises`/`pytest.warns` calls and unittest `self.assert*` calls."""
    count = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert):
            count += 1
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner, attr = node.func.value, node.func.attr
            if isinstance(owner, ast.Name) and (
                (owner.id == "pytest" and attr in ("raises", "warns"))
                or (owner.id == "self" and attr.startswith("assert"))
            ):
                count += 1
    return count


def _has_assertions(tree: ast.Module) -> Check:
    n = count_assertions(tree)
    if n:
        return Check("has_assertions", True, f"{n} assertion(s)")
    return Check("has_assertions", False,
                 "the tests assert nothing: add assert statements or pytest.raises checks")


def _test_count(tests: list[str]) -> Check:
    if len(tests) >= _MIN_TESTS:
        return Check("test_count", True, f"{len(tests)} tests")
    return Check("test_count", False,
                 f"only {len(tests)} test(s); cover more of the module's behaviour")


def _imports_target(tree: ast.Module, module: str) -> Check:
    if imports_module(tree, module):
        return Check("imports_target", True, f"the tests import {module}")
    return Check("imports_target", False,
                 f"the tests never import the module under test: use `import {module}` "
                 f"or `from {module} import ...`")


def imports_module(tree: ast.Module, module: str) -> bool:
    """Whether any import statement in `tree` reaches `module` (or something inside it)."""
    parent, _, leaf = module.rpartition(".")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            if any(_within(alias.name, module) for alias in node.names):
                return True
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if _within(node.module, module):
                return True
            if node.module == parent and any(alias.name == leaf for alias in node.names):
                return True
    return any(_within(imported, module) for _, imported in astrules.dynamic_imports(tree))


def _within(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")
