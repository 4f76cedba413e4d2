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
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

log = logging.getLogger(__name__)

_UNIT_TEST = "unit_test"
_MIN_TESTS = 3  # below this a unit_test output earns a little less (info rule test_count)


class Level(StrEnum):
    """How much a failed rule matters: errors reject, the rest lower the score."""

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"

    @property
    def weight(self) -> float:
        """Share of the score: error 1.0, warning 0.5, info 0.25."""
        return {"error": 1.0, "warning": 0.5, "info": 0.25}[self.value]


@dataclass(frozen=True, slots=True)
class RuleResult:
    """One rule applied to one candidate."""

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

    def feedback(self) -> tuple[str, ...]:
        """Messages of the failed rules, for the next prompt."""
        return tuple(r.message for r in self.rules if not r.passed)

    def as_dict(self) -> dict[str, Any]:
        return {"rules": [r.as_dict() for r in self.rules], "score": self.score, "accepted": self.accepted}


def check(task_type: str, output: str, content: str, *, target_exists: bool,
          module: str, min_quality: float) -> Verdict:
    """Apply the rules that fit this task type and output, and decide.

    `task_type` is a `taskfile.TaskType` value (a str); taskfile is a sibling room, not imported.
    """
    rules = [_file_exists(target_exists), _content_not_empty(output, content)]
    tree: ast.Module | None = None
    if output.endswith(".py") or task_type == _UNIT_TEST:
        parsed = _parse(content)
        if output.endswith(".py"):
            rules.append(_valid_python(output, parsed))
        tree = parsed if isinstance(parsed, ast.Module) else None
    if task_type == _UNIT_TEST:
        rules.extend(_unit_test_rules(output, tree, module))
    return decide(tuple(rules), min_quality)


def decide(rules: tuple[RuleResult, ...], min_quality: float) -> Verdict:
    """Score = weighted share of passed rules; accepted = no failed error and score >= min_quality."""
    total = sum(r.level.weight for r in rules)
    earned = sum(r.level.weight for r in rules if r.passed)
    score = round(earned / total, 4) if total else 0.0
    no_errors = all(r.passed for r in rules if r.level is Level.ERROR)
    return Verdict(rules=rules, score=score, accepted=no_errors and score >= min_quality)


def _file_exists(target_exists: bool) -> RuleResult:
    message = "the target file exists" if target_exists else "the target file does not exist"
    return RuleResult("file_exists", Level.ERROR, target_exists, message)


def _content_not_empty(output: str, content: str) -> RuleResult:
    if content.strip():
        return RuleResult("content_not_empty", Level.ERROR, True, f"{output} has content")
    return RuleResult("content_not_empty", Level.ERROR, False, f"the content for {output} is empty")


def _parse(content: str) -> ast.Module | SyntaxError:
    try:
        return ast.parse(content)
    except SyntaxError as exc:
        return exc
    except ValueError as exc:  # e.g. a NUL byte in the source
        return SyntaxError(str(exc))


def _valid_python(output: str, parsed: ast.Module | SyntaxError) -> RuleResult:
    if isinstance(parsed, ast.Module):
        return RuleResult("valid_python", Level.ERROR, True, f"{output} is valid Python")
    where = f" at line {parsed.lineno}" if parsed.lineno else ""
    detail = parsed.msg or str(parsed)
    return RuleResult("valid_python", Level.ERROR, False, f"{output} is not valid Python: {detail}{where}")


def _unit_test_rules(output: str, tree: ast.Module | None, module: str) -> list[RuleResult]:
    if tree is None:
        return [RuleResult("test_naming", Level.ERROR, False,
                           f"{output} must be a pytest module, but it does not parse")]
    tests = collected_tests(tree)
    rules = [_test_naming(output, tests), _has_assertions(tree), _test_count(tests)]
    if module:
        rules.append(_imports_target(tree, module))
    return rules


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


def _test_naming(output: str, tests: list[str]) -> RuleResult:
    base = posixpath.basename(output)
    if not fnmatch.fnmatchcase(base, "test_*.py"):
        return RuleResult("test_naming", Level.ERROR, False,
                          f"{base} is not collected by pytest: the file name must match test_*.py")
    if not tests:
        return RuleResult("test_naming", Level.ERROR, False,
                          "no test functions found: define `def test_...` at top level "
                          "or `test_...` methods in a `Test...` class")
    return RuleResult("test_naming", Level.ERROR, True, f"{len(tests)} test(s) collected by name")


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


def _has_assertions(tree: ast.Module) -> RuleResult:
    n = count_assertions(tree)
    if n:
        return RuleResult("has_assertions", Level.INFO, True, f"{n} assertion(s)")
    return RuleResult("has_assertions", Level.WARNING, False,
                      "the tests assert nothing: add assert statements or pytest.raises checks")


def _test_count(tests: list[str]) -> RuleResult:
    if len(tests) >= _MIN_TESTS:
        return RuleResult("test_count", Level.INFO, True, f"{len(tests)} tests")
    return RuleResult("test_count", Level.INFO, False,
                      f"only {len(tests)} test(s); cover more of the module's behaviour")


def _imports_target(tree: ast.Module, module: str) -> RuleResult:
    if imports_module(tree, module):
        return RuleResult("imports_target", Level.WARNING, True, f"the tests import {module}")
    return RuleResult("imports_target", Level.WARNING, False,
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
    return False


def _within(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")
