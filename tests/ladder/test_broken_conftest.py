"""A repo whose pytest cannot start is not a possible bug in its code: found by
bench/realworld.py on boltons 24.1.0, whose tests/conftest.py declares
`pytest_ignore_collect(path, config)`, which pytest 8 refuses with a traceback and exit code 1
before any test runs. ohd took that exit code for failing tests, in every run, and reported
every module as a possible bug ("quarantined")."""

from __future__ import annotations

from pathlib import Path

from ohd.ladder import testrun
from ohd.ladder.testrun import RunStatus

GOOD = "from shop.pricing import total\n\n\ndef test_total() -> None:\n    assert total([1.0, 2.0]) == 3.0\n"


def test_a_conftest_pytest_refuses_is_an_error_not_failing_tests(repo: Path) -> None:
    # a hook argument no pytest version has: pluggy's PluginValidationError, as boltons' `path` in pytest 8
    (repo / "tests" / "conftest.py").write_text("def pytest_ignore_collect(no_such_argument):\n    return None\n")
    result = testrun.run_candidate(repo, "tests/test_pricing.py", GOOD)
    assert result.status is RunStatus.ERROR, (result.status, result.output[-500:])
    assert "PluginValidationError" in result.output


def test_the_same_candidate_passes_once_the_conftest_is_fixed(repo: Path) -> None:
    (repo / "tests" / "conftest.py").write_text("def pytest_ignore_collect(collection_path, config):\n"
                                               "    return None\n")
    assert testrun.run_candidate(repo, "tests/test_pricing.py", GOOD).status is RunStatus.PASSED
