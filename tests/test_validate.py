"""validate: rules, levels, score and the accept decision over real candidate texts."""

from __future__ import annotations

import ast

import pytest

from ohd.taskfile import TaskType
from ohd.validate import Level, RuleResult, Verdict, check, count_assertions, decide, imports_module

GOOD_TESTS = """\
import pytest

from app.auth import login


def test_login_accepts_valid_password():
    assert login("a", "secret")


def test_login_rejects_wrong_password():
    assert not login("a", "nope")


class TestLockout:
    def test_three_failures_lock(self):
        with pytest.raises(ValueError):
            login("a", "")
"""


def rules_of(verdict: Verdict) -> dict[str, RuleResult]:
    return {r.rule: r for r in verdict.rules}


def unit(content: str, output: str = "tests/test_auth.py", *, exists: bool = True,
         min_quality: float = 0.7) -> Verdict:
    return check(TaskType.UNIT_TEST, output, content, target_exists=exists,
                 module="app.auth", min_quality=min_quality)


def test_good_unit_test_is_accepted_with_full_score() -> None:
    verdict = unit(GOOD_TESTS)
    assert verdict.accepted
    assert verdict.score == 1.0
    assert verdict.feedback() == ()
    assert set(rules_of(verdict)) == {"file_exists", "content_not_empty", "valid_python", "test_naming",
                                      "has_assertions", "test_count", "imports_target"}
    assert rules_of(verdict)["has_assertions"].message == "3 assertion(s)"


def test_missing_target_rejects() -> None:
    verdict = unit(GOOD_TESTS, exists=False)
    assert not verdict.accepted
    assert "does not exist" in verdict.feedback()[0]


def test_empty_content_rejects() -> None:
    verdict = unit("  \n")
    assert not verdict.accepted
    assert not rules_of(verdict)["content_not_empty"].passed


def test_syntax_error_names_the_line() -> None:
    verdict = unit("def test_a():\n    assert 1\n\ndef broken(:\n    pass\n")
    rule = rules_of(verdict)["valid_python"]
    assert not rule.passed and rule.level is Level.ERROR
    assert "line 4" in rule.message
    assert not verdict.accepted
    assert "has_assertions" not in rules_of(verdict)  # nothing to count in a file that does not parse


def test_file_name_must_match_test_star() -> None:
    verdict = unit(GOOD_TESTS, output="tests/auth_tests.py")
    rule = rules_of(verdict)["test_naming"]
    assert not rule.passed and "test_*.py" in rule.message
    assert not verdict.accepted


def test_needs_at_least_one_test_function() -> None:
    verdict = unit("from app.auth import login\n\ndef helper():\n    assert login\n")
    rule = rules_of(verdict)["test_naming"]
    assert not rule.passed and "no test functions" in rule.message
    assert not verdict.accepted


def test_async_and_class_methods_count_as_tests() -> None:
    src = "import app.auth\n\nasync def test_a():\n    assert 1\n\nclass TestX:\n    def test_b(self):\n        assert 2\n"
    assert rules_of(unit(src))["test_naming"].passed
    nested = "import app.auth\n\nclass Helper:\n    def test_b(self):\n        assert 2\n"
    assert not rules_of(unit(nested))["test_naming"].passed


def test_no_assertions_is_a_warning_not_a_rejection() -> None:
    src = "from app.auth import login\n\ndef test_a():\n    login('a', 'b')\n\ndef test_b():\n    pass\n\ndef test_c():\n    pass\n"
    verdict = unit(src)
    rule = rules_of(verdict)["has_assertions"]
    assert not rule.passed and rule.level is Level.WARNING
    assert verdict.accepted
    assert verdict.score == pytest.approx(4.75 / 5.25, abs=1e-4)
    assert verdict.feedback() == (rule.message,)


def test_score_below_min_quality_rejects_even_without_errors() -> None:
    src = "def test_a():\n    pass\n"  # no import, no assert, one test
    verdict = unit(src, min_quality=0.9)
    assert all(r.passed for r in verdict.rules if r.level is Level.ERROR)
    assert verdict.score < 0.9
    assert not verdict.accepted
    assert len(verdict.feedback()) == 3


def test_imports_target_forms() -> None:
    for src in ("import app.auth", "from app.auth import login", "from app import auth",
                "import app.auth.sub as s"):
        assert imports_module(ast.parse(src), "app.auth"), src
    for src in ("import app", "from app import other", "from . import auth", "import app_auth"):
        assert not imports_module(ast.parse(src), "app.auth"), src


def test_count_assertions() -> None:
    src = "import pytest\nassert 1\nwith pytest.raises(E):\n    f()\npytest.warns(W, f)\nself.assertEqual(1, 1)\nx.raises()\n"
    assert count_assertions(ast.parse(src)) == 4


def test_review_markdown_only_checks_existence_and_content() -> None:
    verdict = check(TaskType.REVIEW, "src/app/.ohd/auth.py.review.md", "# Review\n\nfine",
                    target_exists=True, module="app.auth", min_quality=0.7)
    assert [r.rule for r in verdict.rules] == ["file_exists", "content_not_empty"]
    assert verdict.accepted and verdict.score == 1.0


def test_docstring_output_checks_python() -> None:
    ok = check(TaskType.DOCSTRING, "src/app/auth.py", '"""Doc."""\n', target_exists=True,
               module="app.auth", min_quality=0.7)
    assert [r.rule for r in ok.rules] == ["file_exists", "content_not_empty", "valid_python"]
    assert ok.accepted
    bad = check(TaskType.DOCSTRING, "src/app/auth.py", "def f(:\n", target_exists=True,
                module="app.auth", min_quality=0.0)
    assert not bad.accepted


def test_decide_weights() -> None:
    rules = (
        RuleResult("e", Level.ERROR, True, ""),
        RuleResult("w", Level.WARNING, False, "warn"),
        RuleResult("i", Level.INFO, False, "info"),
    )
    verdict = decide(rules, 0.5)
    assert verdict.score == pytest.approx(1.0 / 1.75, abs=1e-4)
    assert verdict.accepted
    assert verdict.feedback() == ("warn", "info")
    assert decide((), 0.0).score == 0.0


def test_as_dict_is_json_ready() -> None:
    data = unit(GOOD_TESTS).as_dict()
    assert data["accepted"] is True and data["score"] == 1.0
    assert data["rules"][0] == {"rule": "file_exists", "level": "error", "passed": True,
                                "message": "the target file exists"}
