"""validate: rules, levels, score and the accept decision over real candidate texts."""

from __future__ import annotations

import ast

import pytest

from ohd.core.taskfile import TaskType
from ohd.ladder.validate import (Level, PytestRun, RuleResult, RunStatus, Verdict, check, count_assertions, decide,
                          imports_module, levels_for)

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
         min_quality: float = 0.7, run: PytestRun | None = None) -> Verdict:
    return check(TaskType.UNIT_TEST, output, content, target_exists=exists,
                 module="app.auth", min_quality=min_quality, test_run=run)


def test_good_unit_test_is_accepted_with_full_score() -> None:
    verdict = unit(GOOD_TESTS)
    assert verdict.accepted
    assert verdict.score == 1.0
    assert verdict.feedback() == ()
    assert set(rules_of(verdict)) == {"file_exists", "content_not_empty", "valid_python", "test_naming",
                                      "has_assertions", "test_count", "imports_target", "not_vacuous", "exercises_target",
                                      "safe_tests"}
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


def test_no_assertions_is_a_warning_and_the_vacuous_tests_reject() -> None:
    src = "from app.auth import login\n\ndef test_a():\n    login('a', 'b')\n\ndef test_b():\n    pass\n\ndef test_c():\n    pass\n"
    verdict = unit(src)
    rule = rules_of(verdict)["has_assertions"]
    assert not rule.passed and rule.level is Level.WARNING
    vacuous = rules_of(verdict)["not_vacuous"]
    assert not vacuous.passed and vacuous.level is Level.ERROR
    assert "test_a asserts nothing" in vacuous.message and "test_c asserts nothing" in vacuous.message
    assert not verdict.accepted
    assert verdict.feedback() == (rule.message, vacuous.message)


def test_score_below_min_quality_rejects_even_without_errors() -> None:
    src = "from app.auth import login\n\ndef test_a():\n    assert login('a', 'b')\n"  # one test only
    verdict = unit(src, min_quality=0.99)
    assert all(r.passed for r in verdict.rules if r.level is Level.ERROR)
    assert verdict.score < 0.99
    assert not verdict.accepted
    assert verdict.feedback() == (rules_of(verdict)["test_count"].message,)


def test_imports_target_forms() -> None:
    for src in ("import app.auth", "from app.auth import login", "from app import auth",
                "import app.auth.sub as s", "t = importlib.import_module('app.auth')",
                "t = import_module('app.auth.sub')"):
        assert imports_module(ast.parse(src), "app.auth"), src
    for src in ("import app", "from app import other", "from . import auth", "import app_auth",
                "t = importlib.import_module('app')", "t = importlib.import_module(name)"):
        assert not imports_module(ast.parse(src), "app.auth"), src


def test_count_assertions() -> None:
    src = "import pytest\nassert 1\nwith pytest.raises(E):\n    f()\npytest.warns(W, f)\nself.assertEqual(1, 1)\nx.raises()\n"
    assert count_assertions(ast.parse(src)) == 4


AUTH = """\
def login(user, password):
    if not password:
        raise ValueError("empty password")
    return password == "secret"


class Session:
    def close(self):
        return None
"""


def review_of(content: str, target: str = "src/app/auth.py", original: str = AUTH) -> Verdict:
    return check(TaskType.REVIEW, "src/app/.ohd/auth.py.review.md", content, target_exists=True,
                 module="app.auth", min_quality=0.7, original=original, target=target)


def test_a_review_must_be_prose_that_names_what_is_in_the_target() -> None:
    good = review_of("# Review\n\n`login` compares the password in plain text (line 4); "
                     "use `hmac.compare_digest`. `Session.close` does nothing yet.\n")
    assert good.accepted and good.score == 1.0, good.rules
    assert {r.rule for r in good.rules} >= {"review_is_prose", "review_names_target"}
    assert "`login`" in rules_of(good)["review_names_target"].message
    assert "line 4" in rules_of(good)["review_names_target"].message


@pytest.mark.parametrize("answer, failed", [
    ("I'm ready to help. What's the problem?", {"review_is_prose", "review_names_target"}),
    ("Here is a better version:\n\n```python\ndef authenticate(name, secret):\n    import hmac\n"
     "    return hmac.compare_digest(secret, 'x')\n\n\nclass Vault:\n    pass\n```\n",
     {"review_is_prose", "review_names_target"}),
    ("def login(user, password):\n    return True\n", {"review_is_prose"}),
    ("# Review\n\nThe code looks clean and well structured overall; nothing to add here at all.\n",
     {"review_names_target"}),
    ("# Review\n\nSee line 400 of the file: it has a subtle off-by-one error in the loop bound.\n",
     {"review_names_target"}),
])
def test_a_vacuous_or_code_or_invented_review_is_rejected(answer: str, failed: set[str]) -> None:
    verdict = review_of(answer)
    assert {r.rule for r in verdict.rules if not r.passed} == failed
    assert not verdict.accepted and verdict.score < 1.0


def test_a_review_of_another_file_names_what_occurs_in_it_verbatim() -> None:
    notes = "# Deploy\n\nRun `make release` then tag.\n"
    ok = review_of("The step `make release` has no rollback; document how to undo a bad tag.", "docs/deploy.md", notes)
    assert ok.accepted, ok.rules
    made_up = review_of("The step `npm publish` has no rollback; document how to undo a bad tag.", "docs/deploy.md",
                        notes)
    assert not made_up.accepted and not rules_of(made_up)["review_names_target"].passed


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


# -- the ladder: not_vacuous, runs_green, docstring_only, levels -------------------------------

PASSED = PytestRun(RunStatus.PASSED, (RunStatus.PASSED, RunStatus.PASSED), "2 passed")


@pytest.mark.parametrize("src", [
    "import app.auth as a\n\ndef test_x():\n    result = a.login('u', 'p')\n    assert result is None\n",
    "from app import auth\n\ndef test_x():\n    with pytest.raises(ValueError):\n        auth.login('', '')\n",
    "import doctest\nimport app.auth as t\n\ndef test_x():\n    r = doctest.testmod(t)\n    assert r.failed == 0\n",
    "from app.auth import User\n\n@pytest.fixture\ndef user():\n    return User()\n\n"
    "def test_x(user):\n    assert user.name == ''\n",
    "from app.auth import login\n\ndef test_x(conftest_thing):\n    assert conftest_thing\n",
    "from app.auth import login\n\ndef check(v):\n    assert v\n\ndef test_x():\n    check(login('a', 'b'))\n",
    "import app.auth\n\nclass TestX:\n    def setup_method(self):\n        self.u = app.auth.User()\n\n"
    "    def test_x(self):\n        assert self.u\n",
    "from app.auth import login\n\ndef test_x():\n    pytest.raises(ValueError, login, '', '')\n",
])
def test_tests_that_check_the_target_are_not_vacuous(src: str) -> None:
    rule = rules_of(unit(src))["not_vacuous"]
    assert rule.passed, rule.message


@pytest.mark.parametrize(("src", "says"), [
    ("from app.auth import login\n\ndef test_x():\n    assert True\n", "can never fail"),
    ("from app.auth import login\n\ndef test_x():\n    login('a', 'b')\n", "test_x asserts nothing"),
    ("from app.auth import login\n\ndef test_x():\n    assert 1 + 1 == 2\n", "never checks anything from app.auth"),
    ("from app.auth import login\n\n@pytest.mark.parametrize('n', [1, 2])\ndef test_x(n):\n    assert n > 0\n",
     "never checks anything from app.auth"),
    ("from app.auth import login\n\ndef test_x(tmp_path):\n    assert tmp_path.exists()\n",
     "never checks anything"),
    ("from app.auth import login\n\ndef test_x():\n    with pytest.raises(ValueError):\n        int('x')\n",
     "never checks anything"),
])
def test_vacuous_tests_are_an_error_with_a_reason(src: str, says: str) -> None:
    verdict = unit(src)
    rule = rules_of(verdict)["not_vacuous"]
    assert not rule.passed and rule.level is Level.ERROR and says in rule.message
    assert not verdict.accepted


def test_a_test_that_never_imports_the_target_is_rejected() -> None:
    verdict = unit("def test_a():\n    assert 1 + 1 == 2\n")
    assert rules_of(verdict)["imports_target"].level is Level.ERROR
    assert not verdict.accepted


def test_runs_green_decides_and_feeds_back_pytest_output() -> None:
    assert unit(GOOD_TESTS, run=PASSED).accepted
    assert rules_of(unit(GOOD_TESTS, run=PASSED))["runs_green"].passed
    failed = PytestRun(RunStatus.FAILED, (RunStatus.FAILED,) * 2, "E   assert 3 == 4\n1 failed",
                       ("tests/test_auth.py::test_x",))
    verdict = unit(GOOD_TESTS, run=failed)
    assert not verdict.accepted and verdict.possible_bug()
    assert "tests/test_auth.py::test_x" in rules_of(verdict)["runs_green"].message
    assert "assert 3 == 4" in verdict.prompt_feedback()[-1]
    assert all("assert 3 == 4" not in m for m in verdict.feedback())
    assert verdict.as_dict()["test_run"]["status"] == "failed"
    flaky = unit(GOOD_TESTS, run=PytestRun(RunStatus.FLAKY, (RunStatus.PASSED, RunStatus.FAILED), "1 failed"))
    assert not flaky.accepted and not flaky.possible_bug()
    assert "flaky" in rules_of(flaky)["runs_green"].message
    for status in (RunStatus.ERROR, RunStatus.TIMEOUT):
        verdict = unit(GOOD_TESTS, run=PytestRun(status, (status,), "boom", timeout_s=5))
        assert not verdict.accepted and not verdict.possible_bug()


def test_a_failing_but_vacuous_test_is_no_possible_bug() -> None:
    failed = PytestRun(RunStatus.FAILED, (RunStatus.FAILED,) * 2, "1 failed")
    verdict = unit("from app.auth import login\n\ndef test_x():\n    assert 1 == 2\n", run=failed)
    assert not verdict.possible_bug()


def test_levels_are_configurable_per_check() -> None:
    src = "def test_a():\n    assert 1 + 1 == 2\n"
    relaxed = check(TaskType.UNIT_TEST, "tests/test_auth.py", src, target_exists=True, module="app.auth",
                    min_quality=0.0, levels={"imports_target": Level.WARNING, "not_vacuous": Level.INFO})
    assert relaxed.accepted
    assert levels_for("unit_test")["runs_green"] is Level.ERROR
    assert levels_for("docstring")["docstring_only"] is Level.ERROR


MODULE = '''"""Shop."""


def total(prices, discount=0.0):
    if discount:
        return sum(prices) * (1 - discount)
    return sum(prices)


class Cart:
    def add(self, price):
        pass
'''


def docstring(content: str) -> Verdict:
    return check(TaskType.DOCSTRING, "shop.py", content, target_exists=True, module="shop",
                 min_quality=0.7, original=MODULE)


def test_a_docstring_answer_may_only_change_docstrings() -> None:
    documented = MODULE.replace("def total(prices, discount=0.0):\n",
                                'def total(prices, discount=0.0):\n    """Sum, less a discount."""\n')
    documented = documented.replace("    def add(self, price):\n        pass\n",
                                    '    def add(self, price):\n        """Add one price."""\n')
    documented = documented.replace('"""Shop."""', '"""A small shop.\n\nWith prices."""\n')
    verdict = docstring(documented)
    assert rules_of(verdict)["docstring_only"].passed and verdict.accepted


@pytest.mark.parametrize(("change", "where"), [
    (("return sum(prices)\n\n\nclass", "return sum(prices) + 1\n\n\nclass"), "def total"),
    (("    def add(self, price):\n        pass\n", "    def add(self, price):\n        return price\n"), "class Cart"),
    (("class Cart:", "def extra():\n    pass\n\n\nclass Cart:"), "extra"),
])
def test_a_docstring_answer_that_changes_code_is_refused(change: tuple[str, str], where: str) -> None:
    verdict = docstring(MODULE.replace(*change))
    rule = rules_of(verdict)["docstring_only"]
    assert not rule.passed and rule.level is Level.ERROR and where in rule.message
    assert not verdict.accepted


COMMENTED = '''import os  # the os


def total(prices, discount=0.0):
    # the discount is a fraction
    if discount:
        return sum(prices) * (1 - discount)
    return sum(
        prices)


class Error(Exception): pass


def café(x): ...
'''


def commented(content: str) -> RuleResult:
    verdict = check(TaskType.DOCSTRING, "shop.py", content, target_exists=True, module="shop",
                    min_quality=0.7, original=COMMENTED)
    return rules_of(verdict)["docstring_only"]


def test_docstrings_added_everywhere_keep_comments_and_layout() -> None:
    documented = ('"""A shop: prices and errors."""\n\n' + COMMENTED)
    documented = documented.replace("discount=0.0):\n", 'discount=0.0):\n    """Sum «prices», less a discount."""\n\n')
    documented = documented.replace("class Error(Exception): pass\n",
                                    'class Error(Exception):\n    """A shop error."""\n')
    documented = documented.replace("def café(x): ...\n", 'def café(x):\n    """Café!"""\n')
    rule = commented(documented)
    assert rule.passed, rule.message


@pytest.mark.parametrize(("change", "says"), [
    (("# the discount is a fraction\n", "# the discount is a fraction (0..1)\n"), "a comment changed (line 5"),
    (("    # the discount is a fraction\n", ""), "a comment was removed (line 5 of the original"),
    (("import os  # the os\n", "import os\n"), "a comment was removed (line 1 of the original"),
    (("    if discount:\n", "    # why?\n    if discount:\n"), "a comment was added (line 6"),
    (("sum(prices) * (1 - discount)", "sum(prices)*(1 - discount)"), "the layout changed (line 7"),
    (("return sum(\n        prices)", "return sum(prices)"), "the layout changed (line 8"),
    (("def total(prices, discount=0.0):", "def total(prices,\n          discount=0.0):"),
     "the layout changed (line 4"),
    (("\n\nclass Error", "\n\n\nclass Error"), "the layout changed (line 12, a blank line"),
])
def test_a_docstring_answer_that_changes_comments_or_layout_is_refused(change: tuple[str, str], says: str) -> None:
    answer = COMMENTED.replace(*change)
    assert answer != COMMENTED
    assert ast.dump(ast.parse(answer)) == ast.dump(ast.parse(COMMENTED))   # the AST check alone passes it
    rule = commented(answer)
    assert not rule.passed and rule.level is Level.ERROR
    assert says in rule.message


@pytest.mark.parametrize(("original", "answer"), [
    ("class A:\n\n    def f(self):\n        return 1\n",                      # docstring after the blank line
     'class A:\n\n    """An A."""\n    def f(self):\n        return 1\n'),
    ("x = 1\n\n\n", '"""Module."""\n\nx = 1\n'),                              # trailing blank lines dropped
    ('"""Old."""\n\n\nimport os\n', '"""New,\nlonger."""\nimport os\n'),     # its blank lines go with it
    ("def f():\n    # why\n    return 1\n", 'def f():\n    """Doc."""\n    # why\n    return 1\n'),
])
def test_docstrings_may_bring_or_take_their_blank_lines(original: str, answer: str) -> None:
    verdict = check(TaskType.DOCSTRING, "m.py", answer, target_exists=True, module="m", min_quality=0.7,
                    original=original)
    rule = rules_of(verdict)["docstring_only"]
    assert rule.passed, rule.message


def test_not_vacuous_does_not_pass_a_file_without_tests() -> None:
    verdict = unit("from app.auth import login\n\nLOGIN = login\n", min_quality=0.0)
    vacuous = rules_of(verdict)["not_vacuous"]
    assert not vacuous.passed and "no test" in vacuous.message and "each of the 0" not in vacuous.message


def test_a_lone_ismodule_test_scores_below_tests_that_call_the_code() -> None:
    exists = unit("import inspect\n\nimport app.auth as target\n\n\ndef test_module_imports() -> None:\n"
                  "    assert inspect.ismodule(target)\n", min_quality=0.0)
    calls = unit("import app.auth as target\n\n\ndef test_login() -> None:\n"
                 "    assert target.login('a', 'secret')\n", min_quality=0.0)
    assert not rules_of(exists)["exercises_target"].passed and rules_of(calls)["exercises_target"].passed
    assert "ismodule" in rules_of(exists)["exercises_target"].message
    assert rules_of(exists)["exercises_target"].level is Level.WARNING
    assert exists.score < calls.score
    assert rules_of(unit(GOOD_TESTS))["exercises_target"].passed


def test_a_crlf_module_answered_with_lf_line_endings_is_still_docstrings_only() -> None:
    original = "def f(x):\r\n\r\n    return x\r\n"
    verdict = check(TaskType.DOCSTRING, "m.py", 'def f(x):\n    """Doc."""\n\n    return x\n', target_exists=True,
                    module="m", min_quality=0.7, original=original)
    rule = rules_of(verdict)["docstring_only"]
    assert rule.passed, rule.message
