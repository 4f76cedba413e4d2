"""The ladder's optional rules and their levels: `lint` with the real ruff, `coverage_delta`
with the real coverage.py (both installed by the test extra), `rule_levels` from the
configuration. Real git repos, real subprocesses; a fake ruff (a real executable script)
only where the real one cannot show the case (its environment, a garbled answer)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ohd import config
from ohd.core.taskfile import TaskSpec, TaskType
from ohd.core.tasktypes import Job
from ohd.errors import ConfigError
from ohd.ladder import ladder, lintrun, sandbox, testrun, validate
from ohd.ladder.validate import Level, RunStatus
from ohd.models.llm import Completion
from ohd.repo import outputs
from ohd.service import assemble, daemon
from ohd.service.live import Live
from ohd.store.store import Store
from ohd.work import report
from ohd.work.worker import Pool
from tests.support.clock import FakeClock
from tests.support.gitrepo import git

GOOD = """from shop.pricing import Cart, total


def test_total_applies_the_discount() -> None:
    assert total([100.0], discount=0.25) == 75.0


def test_cart_totals_its_items() -> None:
    cart = Cart()
    cart.add(2.0)
    assert cart.total() == 2.0
"""
UNUSED_IMPORT = "import os\n\n" + GOOD
ONLY_TOTAL = """from shop.pricing import total


def test_total_sums() -> None:
    assert total([1.0, 2.0]) == 3.0
"""
ONLY_IS_FREE = """from shop.pricing import is_free


def test_zero_is_free() -> None:
    assert is_free(0) is True
"""


def job(output: str = "tests/test_pricing.py", task_type: TaskType = TaskType.UNIT_TEST) -> Job:
    return Job(task_type=task_type, target="shop/pricing.py", source="", module="shop.pricing", output=output)


def rules(verdict: validate.Verdict) -> dict[str, validate.RuleResult]:
    return {r.rule: r for r in verdict.rules}


@pytest.fixture
def ruff() -> str:
    found = lintrun.find_ruff()
    assert found, "ruff is in the test extra"
    return found


# These tests watch the runs through a file outside the repo: only the `process` level lets a test write there
WATCHED = sandbox.Jail(sandbox.Level.PROCESS)


def tools(ruff: str | None = None, coverage: bool = False, runs: int = 1,
          levels: dict[str, dict[str, Level | None]] | None = None, jail: sandbox.Jail | None = None) -> ladder.Ladder:
    return ladder.Ladder(tests=testrun.Options(runs=runs, jail=jail), levels=levels or {}, ruff=ruff,
                         coverage=coverage)


# -- lint ---------------------------------------------------------------------------------------


def test_lint_findings_are_a_warning_that_lowers_the_score_but_does_not_reject(repo: Path, ruff: str) -> None:
    verdict = ladder.judge(repo, job(), UNUSED_IMPORT, 0.5, tools(ruff))
    lint = rules(verdict)["lint"]
    assert not lint.passed and lint.level is Level.WARNING
    assert "F401" in lint.message and "`os` imported but unused" in lint.message
    assert verdict.accepted and verdict.score < 1.0
    assert verdict.lint is not None and verdict.lint.tool.startswith("ruff ")
    assert any("F401" in m for m in verdict.feedback())

    clean = ladder.judge(repo, job(), GOOD, 0.5, tools(ruff))
    assert rules(clean)["lint"].passed and clean.score > verdict.score


def test_lint_uses_the_repos_own_ruff_configuration(repo: Path, ruff: str) -> None:
    (repo / "pyproject.toml").write_text('[tool.ruff]\nline-length = 40\n[tool.ruff.lint]\nselect = ["E501"]\n')
    verdict = ladder.judge(repo, job(), GOOD, 0.5, tools(ruff))
    assert "E501" in rules(verdict)["lint"].message


def test_lint_level_error_rejects_and_off_does_not_run_ruff(repo: Path, ruff: str) -> None:
    strict = ladder.judge(repo, job(), UNUSED_IMPORT, 0.5, tools(ruff, levels={"*": {"lint": Level.ERROR}}))
    assert not strict.accepted and rules(strict)["lint"].level is Level.ERROR

    off = ladder.judge(repo, job(), UNUSED_IMPORT, 0.5, tools(ruff, levels={"unit_test": {"lint": None}}))
    assert "lint" not in rules(off) and off.lint is None and off.accepted


def test_lint_covers_every_python_output_but_not_a_review(repo: Path, ruff: str) -> None:
    docstring = ladder.judge(repo, job("shop/pricing.py", TaskType.DOCSTRING), "import os\n", 0.0, tools(ruff))
    assert "F401" in rules(docstring)["lint"].message
    review = ladder.judge(repo, job(".ohd/pricing.review.md", TaskType.REVIEW), "import os\n", 0.0, tools(ruff))
    assert "lint" not in rules(review)


def test_a_docstring_answer_is_not_blamed_for_the_users_own_findings(repo: Path, ruff: str) -> None:
    (repo / "ruff.toml").write_text('[lint]\nselect = ["F", "W605"]\n')
    original = "import os\nimport sys\n\n\ndef f():\n    return 1\n"                 # two F401s of the user's
    (repo / "shop" / "mine.py").write_text(original)
    doc = Job(task_type=TaskType.DOCSTRING, target="shop/mine.py", source=original, module="shop.mine",
              output="shop/mine.py")
    documented = original.replace("def f():\n", 'def f():\n    """Return one."""\n')
    verdict = ladder.judge(repo, doc, documented, 0.5, tools(ruff))
    lint = rules(verdict)["lint"]
    assert lint.passed and "2 already in the original, not counted" in lint.message, lint.message
    assert verdict.score == 1.0 and verdict.lint is not None and verdict.lint.preexisting == 2
    escaped = original.replace("def f():\n", 'def f():\n    """Return \\d one."""\n')   # W605: the answer's own
    worse = ladder.judge(repo, doc, escaped, 0.0, tools(ruff))
    assert not rules(worse)["lint"].passed and "W605" in rules(worse)["lint"].message
    assert "F401" not in rules(worse)["lint"].message


def test_a_ruff_that_cannot_check_is_reported_not_counted(repo: Path, ruff: str) -> None:
    (repo / "pyproject.toml").write_text("[tool.ruff]\nline-length = 'long'\n")
    verdict = ladder.judge(repo, job(), UNUSED_IMPORT, 0.5, tools(ruff))
    assert "lint" not in rules(verdict)
    assert verdict.lint is not None and verdict.lint.error
    assert verdict.as_dict()["lint"]["error"] == verdict.lint.error
    markdown = report.render_markdown({"task": {"id": 1}, "verdict": verdict.as_dict(), "decision": "written"})
    assert f"`lint` not counted: {verdict.lint.error}" in markdown


def fake_ruff(tmp_path: Path, stdout: str) -> str:
    script = tmp_path / "bin" / "ruff"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(f"#!/bin/sh\nenv > '{tmp_path / 'ruff-env.txt'}'\ncat > /dev/null\nprintf '%s' '{stdout}'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_ruff_never_sees_the_api_key_and_garbage_from_it_is_an_error(
        repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-or-secret")
    monkeypatch.setenv("MY_KEY", "sk-mine")
    ladder_ = ladder.Ladder(tests=testrun.Options(runs=1, secret_env=("MY_KEY",)), ruff=fake_ruff(tmp_path, "no json"))
    verdict = ladder.judge(repo, job(), GOOD, 0.5, ladder_)
    env = (tmp_path / "ruff-env.txt").read_text()
    assert "sk-or-secret" not in env and "sk-mine" not in env and "PATH=" in env
    assert verdict.lint is not None and "unreadable ruff output" in verdict.lint.error
    assert "lint" not in rules(verdict)


def test_find_ruff_looks_beside_the_interpreter_then_on_path(tmp_path: Path) -> None:
    assert lintrun.find_ruff({"PATH": ""}) is not None      # the venv's own ruff (the test extra)
    assert lintrun.find_ruff({"PATH": str(Path(fake_ruff(tmp_path, "[]")).parent)}) is not None


# -- coverage_delta -------------------------------------------------------------------------------


def commit_test(repo: Path, name: str, content: str) -> None:
    (repo / "tests" / name).write_text(content)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", f"add {name}")


def test_coverage_gain_over_the_repos_tests_is_reported(repo: Path) -> None:
    commit_test(repo, "test_existing.py", ONLY_TOTAL)
    (repo / "tests" / "test_unrelated.py").write_text("def test_nothing() -> None:\n    assert 1 + 1 == 2\n")
    verdict = ladder.judge(repo, job(), GOOD, 0.5, tools(coverage=True))
    cov = verdict.coverage
    assert cov is not None and not cov.error, cov
    assert cov.baseline == ("the repo's test suite (2 test(s))",)       # tests/test_pricing.py does not exist
    assert 0 < cov.before < cov.after <= cov.statements
    assert cov.gain > 0
    delta = rules(verdict)["coverage_delta"]
    assert delta.passed and delta.level is Level.INFO
    assert f"{cov.before}/{cov.statements}" in delta.message and f"{cov.after}/{cov.statements}" in delta.message
    markdown = report.render_markdown({"task": {"id": 1}, "verdict": verdict.as_dict(), "decision": "written"})
    assert "coverage_delta" in markdown and f"+{cov.gain:g} points" in markdown


def test_tests_that_add_no_coverage_fail_the_info_rule_but_are_still_accepted(repo: Path) -> None:
    commit_test(repo, "test_existing.py", GOOD)
    verdict = ladder.judge(repo, job("tests/test_more.py"), ONLY_TOTAL, 0.5, tools(coverage=True))
    cov = verdict.coverage
    assert cov is not None and cov.after == cov.before and cov.gain == 0
    delta = rules(verdict)["coverage_delta"]
    assert not delta.passed and "already run" in delta.message
    assert verdict.accepted


def test_a_replaced_output_counts_in_before_but_not_after(repo: Path) -> None:
    commit_test(repo, "test_pricing.py", GOOD)          # ohd's own earlier output, which the candidate replaces
    verdict = ladder.judge(repo, job(), ONLY_IS_FREE, 0.0, tools(coverage=True), replaces_output=True)
    cov = verdict.coverage
    assert cov is not None and not cov.error
    assert cov.baseline == ("the repo's test suite (0 test(s), without tests/test_pricing.py)",
                            "tests/test_pricing.py") and cov.replaces
    assert cov.after < cov.before and cov.gain < 0
    delta = rules(verdict)["coverage_delta"]
    assert not delta.passed and "in place of the current output" in delta.message and "fewer lines" in delta.message


def test_the_users_own_output_file_stays_in_the_figure_with_these(repo: Path) -> None:
    commit_test(repo, "test_pricing.py", GOOD)          # the user's file: the candidate goes beside it (.ohd-new)
    verdict = ladder.judge(repo, job(), ONLY_IS_FREE, 0.0, tools(coverage=True))
    cov = verdict.coverage
    assert cov is not None and not cov.error and not cov.replaces
    assert cov.after >= cov.before > 0                  # the user's tests plus the candidate, never instead
    assert "with these added" in rules(verdict)["coverage_delta"].message


def test_coverage_is_measured_only_for_tests_that_pass_and_when_switched_on(repo: Path) -> None:
    failing = ONLY_TOTAL.replace("== 3.0", "== 4.0")
    assert ladder.judge(repo, job(), failing, 0.5, tools(coverage=True)).coverage is None
    off = ladder.judge(repo, job(), GOOD, 0.5, tools(coverage=True, levels={"unit_test": {"coverage_delta": None}}))
    assert off.coverage is None and "coverage_delta" not in rules(off)
    assert ladder.judge(repo, job(), GOOD, 0.5, tools(coverage=False)).coverage is None


def test_the_users_coverage_settings_do_not_skew_the_figures(repo: Path) -> None:
    (repo / ".coveragerc").write_text("[run]\nomit = shop/*\n")
    verdict = ladder.judge(repo, job(), GOOD, 0.5, tools(coverage=True))
    assert verdict.coverage is not None and verdict.coverage.after > 0, verdict.coverage


def test_a_baseline_that_hangs_is_reported_not_counted_and_not_run_again(repo: Path, tmp_path: Path) -> None:
    started = tmp_path / "started.txt"
    commit_test(repo, "test_slow.py", "import time\nimport shop.pricing\n\n\ndef test_slow() -> None:\n"
                                      f"    with open({str(started)!r}, 'a') as out:\n        out.write('start\\n')\n"
                                      "    time.sleep(600)\n    assert shop.pricing\n")
    slow = ladder.Ladder(tests=testrun.Options(runs=1, timeout_s=20.0, jail=WATCHED), coverage=True)
    verdict = ladder.judge(repo, job(), GOOD, 0.5, slow)
    assert verdict.coverage is not None and "did not finish within 20s" in verdict.coverage.error
    assert "coverage_delta" not in rules(verdict) and verdict.accepted
    markdown = report.render_markdown({"task": {"id": 1}, "verdict": verdict.as_dict(), "decision": "written"})
    assert "`coverage_delta` not counted: pytest under coverage did not finish within 20s" in markdown
    again = ladder.judge(repo, job(), ONLY_TOTAL, 0.5, slow)          # the next attempt: nothing changed
    assert again.coverage is not None and again.coverage.error == verdict.coverage.error
    assert started.read_text().split() == ["start"]                   # the suite was not run again


def test_coverage_leaves_nothing_behind(repo: Path) -> None:
    commit_test(repo, "test_existing.py", ONLY_TOTAL)
    before = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if ".git" not in p.parts)
    ladder.judge(repo, job(), GOOD, 0.5, tools(coverage=True))
    after = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if ".git" not in p.parts)
    assert after == before


# -- levels from the configuration ---------------------------------------------------------------


def test_rule_levels_come_from_the_config_file_and_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[rule_levels.unit_test]\nlint = "error"\ncoverage_delta = "off"\n[rule_levels."*"]\n'
                    'valid_python = "error"\n')
    settings = config.load(path, env={})
    assert settings.rule_levels == {"unit_test": {"lint": "error", "coverage_delta": "off"},
                                    "*": {"valid_python": "error"}}
    table = assemble.ladder_of(settings).levels
    assert validate.levels_for("unit_test", table)["lint"] is Level.ERROR
    assert validate.levels_for("unit_test", table)["coverage_delta"] is None
    assert validate.levels_for("docstring", table)["lint"] is Level.WARNING

    from_env = config.load(env={"OHD_RULE_LEVELS": json.dumps({"docstring": {"docstring_only": "warning"}})})
    assert validate.levels_for("docstring", assemble.ladder_of(from_env).levels)["docstring_only"] is Level.WARNING


@pytest.mark.parametrize(("raw", "says"), [
    ({"unit_tests": {"lint": "error"}}, "unknown task type 'unit_tests'"),
    ({"unit_test": {"lynt": "error"}}, "unknown rule 'lynt'"),
])
def test_an_unknown_task_type_or_rule_is_a_clear_config_error(raw: dict[str, dict[str, str]], says: str) -> None:
    settings = config.Settings(rule_levels=raw)   # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=says):
        assemble.ladder_of(settings)


def test_an_unknown_level_is_refused_when_the_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[rule_levels.unit_test]\nlint = "fatal"\n')
    with pytest.raises(ConfigError, match="rule_levels.unit_test.lint"):
        config.load(path, env={})


def test_a_rule_switched_off_is_not_measured(repo: Path) -> None:
    verdict = ladder.judge(repo, job(), ONLY_TOTAL.replace("== 3.0", "== 4.0"), 0.5,
                           tools(runs=2, levels={"unit_test": {"runs_green": None}}))
    assert verdict.test_run is None and "runs_green" not in rules(verdict) and verdict.accepted


def test_the_daemon_finds_the_installed_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    built = assemble.ladder_of(config.Settings())
    assert built.ruff and built.coverage             # both are in the test extra
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(lintrun.sysconfig, "get_path", lambda name: os.devnull)
    assert assemble.ladder_of(config.Settings()).ruff is None


def test_a_reload_applies_rule_levels_and_keeps_the_running_ones_when_invalid(
        caplog: pytest.LogCaptureFixture) -> None:
    settings = config.load()
    running = daemon.Daemon(settings)
    pool = Pool(running.store, call=None, clock=FakeClock(), models=["m"])  # type: ignore[arg-type]
    try:
        running.reloader.apply(settings.model_copy(update={"rule_levels": {"unit_test": {"lint": "error"}},
                                                   "test_runs": 1}), Live(pool))
        assert validate.levels_for("unit_test", pool.ladder.levels)["lint"] is Level.ERROR
        assert pool.ladder.tests.runs == 1 and running.settings.test_runs == 1
        applied = pool.ladder
        with caplog.at_level("ERROR"):
            running.reloader.apply(running.settings.model_copy(update={"rule_levels": {"unit_tst": {"lint": "off"}}}), Live(pool))
        assert "keeping the running validation settings: rule_levels: unknown task type 'unit_tst'" in caplog.text
        assert pool.ladder is applied and running.settings.rule_levels == {"unit_test": {"lint": "error"}}
    finally:
        running.store.close()


# -- which Python runs the tests ------------------------------------------------------------------


def make_venv(where: Path, with_pytest: bool) -> Path:
    """A real virtualenv (no pip: quick); with pytest = this environment's site-packages on its path."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    if with_pytest:
        site = next(where.glob("lib/python*/site-packages"))
        (site / "borrowed.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")
    return where / "bin" / "python"


def test_auto_runs_the_tests_and_coverage_with_the_repos_own_virtualenv(repo: Path) -> None:
    make_venv(repo / ".venv", with_pytest=True)
    (repo / ".gitignore").write_text(".venv/\n")
    where = GOOD + f"\n\ndef test_runs_in_the_repos_venv() -> None:\n    import sys\n\n" \
                   f"    assert sys.prefix == {str(repo / '.venv')!r} and total([1.0]) == 1.0\n"
    verdict = ladder.judge(repo, job(), where, 0.5, tools(coverage=True))
    assert verdict.test_run is not None and verdict.test_run.status is RunStatus.PASSED, verdict.test_run
    assert verdict.coverage is not None and not verdict.coverage.error and verdict.coverage.after > 0
    assert testrun.interpreter(repo).path == str(repo / ".venv" / "bin" / "python")
    assert verdict.test_run.python == str(repo / ".venv" / "bin" / "python")
    markdown = report.render_markdown({"task": {"id": 1}, "verdict": verdict.as_dict(), "decision": "written"})
    assert f"passed (passed) with {repo / '.venv' / 'bin' / 'python'}" in markdown


def test_auto_falls_back_to_ohds_python_when_the_repo_venv_has_no_pytest(repo: Path) -> None:
    make_venv(repo / "venv", with_pytest=False)
    chosen = testrun.interpreter(repo)
    assert chosen.path == sys.executable and chosen.pytest
    assert testrun.interpreter(repo, "venv/bin/python") == testrun.Interpreter(
        str(repo / "venv" / "bin" / "python"), pytest=False, coverage=False)
    assert not testrun.interpreter(repo, "/nowhere/python").pytest


def test_a_task_whose_python_has_no_pytest_fails_before_any_model_is_asked(
        repo: Path, store: Store, clock: FakeClock) -> None:
    bare = make_venv(repo.parent / "bare", with_pytest=False)
    task_id = store.enqueue(str(repo), TaskSpec.model_validate({"type": "unit_test", "target": "shop/pricing.py"}),
                            clock.now())
    asked: list[str] = []

    async def call(model: str, messages: list[dict[str, str]], timeout_s: float, job_: Job) -> Completion:
        asked.append(model)
        raise AssertionError("no model should be asked")

    pool = Pool(store, call, clock, models=["m"], ladder=ladder.Ladder(tests=testrun.Options(python=str(bare))))
    asyncio.run(pool.run_until_idle())
    task = store.get_task(task_id)
    assert task.status == "failed" and asked == []
    assert f"pytest cannot be imported by {bare}" in (task.error or "")
    assert "test_runs = 0" in (task.error or "")


def test_test_processes_wait_for_a_free_slot_and_the_wait_is_not_run_time(repo: Path, tmp_path: Path) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    log = tmp_path / "order.txt"
    candidate = ("import os\nimport time\n\nfrom shop.pricing import total\n\n\n"
                 "def test_one_at_a_time() -> None:\n"
                 f"    with open({str(log)!r}, 'a') as out:\n        out.write('start\\n')\n"
                 "    time.sleep(0.3)\n"
                 f"    with open({str(log)!r}, 'a') as out:\n        out.write('end\\n')\n"
                 "    assert total([1.0]) == 1.0\n")
    slots = threading.BoundedSemaphore(1)
    options = testrun.Options(runs=1, timeout_s=60.0, slots=slots, jail=WATCHED)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda n: testrun.run_candidate(repo, f"tests/test_slot{n}.py", candidate,
                                                                 options=options), range(4)))
    assert [r.status for r in results] == [RunStatus.PASSED] * 4
    assert log.read_text().split() == ["start", "end"] * 4      # never two at once
    # a run that waits longer than its time limit for a slot is not timed out: the limit counts from
    # its start (a limit of a few seconds against runs waiting for each other timed out at load 40)
    waiting = testrun.Options(runs=1, timeout_s=15.0, slots=slots, jail=WATCHED)
    with ThreadPoolExecutor(1) as pool:
        with slots:
            late = pool.submit(testrun.run_candidate, repo, "tests/test_slot_late.py", candidate, options=waiting)
            time.sleep(16.0)
        assert late.result().status is RunStatus.PASSED
    assert testrun.Options().slots is None                     # tests and tools: no limit by default
    settings = config.load(env={"OHD_TEST_PARALLEL": "3"})
    slots = assemble.ladder_of(settings).tests.slots
    assert slots is not None and [slots.acquire(blocking=False) for _ in range(4)] == [True, True, True, False]


# -- the coverage baseline on a package that re-exports -----------------------------------------

REEXPORTED = '''def mod(x: int) -> int:
    return x + 1


def double(x: int) -> int:
    if x < 0:
        raise ValueError("negative")
    return 2 * x


__all__ = ["mod", "double"]
'''
SUITE = '''import pytest

import pkg as p


def test_double() -> None:
    assert p.double(2) == 4
    with pytest.raises(ValueError):
        p.double(-1)


def test_mod() -> None:
    assert p.mod(1) == 2
'''
ONLY_DOUBLE = "from pkg.mod import double\n\n\ndef test_double() -> None:\n    assert double(3) == 6\n"


def reexporting_repo(root: Path, suite: str = SUITE) -> Path:
    """`pkg/__init__.py` re-exports `pkg/mod.py` (`from .mod import *`); the tests `import pkg as p`."""
    root.mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    (root / "pkg").mkdir()
    (root / "pkg" / "__init__.py").write_text("from .mod import *\n")
    (root / "pkg" / "mod.py").write_text(REEXPORTED)
    (root / "tests").mkdir()
    (root / "tests" / "test_pkg.py").write_text(suite)
    git(root, "add", "-A")
    git(root, "-c", "user.email=t@example.com", "-c", "user.name=T", "commit", "-q", "-m", "initial")
    return root


def mod_job(output: str = "tests/test_mod.py") -> Job:
    return Job(task_type=TaskType.UNIT_TEST, target="pkg/mod.py", source=REEXPORTED, module="pkg.mod", output=output)


def direct_percent(repo: Path) -> float:
    """coverage.py run directly on the repo's suite: the line figure of pkg/mod.py."""
    data, out = repo.parent / "direct.data", repo.parent / "direct.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OHD_", "COV"))}
    env["PYTHONPATH"] = str(repo)
    subprocess.run([sys.executable, "-m", "coverage", "run", f"--data-file={data}", "-m", "pytest", "-q",
                    "-p", "no:cacheprovider"], cwd=repo, env=env, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "coverage", "json", f"--data-file={data}", "-o", str(out)],
                   cwd=repo, env=env, check=True, capture_output=True)
    files = json.loads(out.read_text())["files"]
    summary = files["pkg/mod.py"]["summary"]
    return float(100.0 * summary["covered_lines"] / summary["num_statements"])


def test_the_baseline_counts_tests_that_import_the_package_not_the_submodule(tmp_path: Path) -> None:
    repo = reexporting_repo(tmp_path / "proj")
    verdict = ladder.judge(repo, mod_job(), ONLY_DOUBLE, 0.5, tools(coverage=True))
    cov = verdict.coverage
    assert cov is not None and not cov.error, cov
    assert cov.percent(cov.before, cov.statements) == 100.0 and cov.suite == cov.before, cov
    assert abs(cov.percent(cov.before, cov.statements) - direct_percent(repo)) <= 1.0
    assert cov.gain == 0 and verdict.as_dict()["coverage"]["suite_percent"] == 100.0
    assert "+0 points" in rules(verdict)["coverage_delta"].message


def test_a_coverage_drop_never_passes_even_from_full_coverage(tmp_path: Path) -> None:
    repo = reexporting_repo(tmp_path / "proj", suite="def test_nothing() -> None:\n    assert True is not False\n")
    (repo / "tests" / "test_mod.py").write_text(SUITE)       # ohd's earlier output: covers all of pkg/mod.py
    verdict = ladder.judge(repo, mod_job(), ONLY_DOUBLE, 0.0, tools(coverage=True), replaces_output=True)
    cov = verdict.coverage
    assert cov is not None and cov.percent(cov.before, cov.statements) == 100.0 and cov.after < cov.before, cov
    assert not rules(verdict)["coverage_delta"].passed


def test_the_suite_is_measured_once_per_content(tmp_path: Path) -> None:
    runs = tmp_path / "suite-runs.txt"
    counted = SUITE + f"\n\ndef test_count() -> None:\n    with open({str(runs)!r}, 'a') as out:\n" \
                      "        out.write('run\\n')\n    assert p.mod(0) == 1\n"
    repo = reexporting_repo(tmp_path / "proj", suite=counted)
    first = ladder.judge(repo, mod_job(), ONLY_DOUBLE, 0.5, tools(coverage=True, jail=WATCHED))
    again = ladder.judge(repo, mod_job(), ONLY_DOUBLE.replace("(3) == 6", "(4) == 8"), 0.5,
                         tools(coverage=True, jail=WATCHED))
    assert first.coverage is not None and not first.coverage.error and first.coverage == again.coverage
    assert runs.read_text().split() == ["run"]                # the second candidate reused the suite's figure
    (repo / "tests" / "test_pkg.py").write_text(counted + "\n")
    ladder.judge(repo, mod_job(), ONLY_DOUBLE, 0.5, tools(coverage=True, jail=WATCHED))
    assert runs.read_text().split() == ["run", "run"]         # a test file changed: measured again


def test_a_test_python_without_coverage_is_reported_not_silent(repo: Path, tmp_path: Path) -> None:
    bare = tmp_path / "nocov"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    shelf = tmp_path / "shelf"        # everything ohd's venv has, coverage.py left out
    shelf.mkdir()
    site = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "pytest").is_dir())
    for entry in site.iterdir():
        if not entry.name.startswith("coverage") and not entry.name.endswith(".pth"):
            (shelf / entry.name).symlink_to(entry)
    (next(bare.glob("lib/python*/site-packages")) / "shelf.pth").write_text(f"{shelf}\n")
    python = bare / "bin" / "python"
    assert testrun.probe(str(python)) == testrun.Interpreter(str(python), pytest=True, coverage=False)
    lad = ladder.Ladder(tests=testrun.Options(runs=1, python=str(python)), coverage=True)
    verdict = ladder.judge(repo, job(), GOOD, 0.5, lad)
    assert verdict.accepted and verdict.coverage is not None
    assert f"coverage.py cannot be imported by {python}" in verdict.coverage.error
    markdown = report.render_markdown({"task": {"id": 1}, "verdict": verdict.as_dict(), "decision": "written"})
    assert "`coverage_delta` not counted: coverage.py cannot be imported" in markdown


def test_the_pool_tells_the_ladder_when_the_candidate_replaces_ohds_own_output(
        repo: Path, store: Store, clock: FakeClock) -> None:
    commit_test(repo, "test_pricing.py", GOOD)

    async def call(model: str, messages: list[dict[str, str]], timeout_s: float, job_: Job) -> Completion:
        return Completion(model, f"```python\n{ONLY_IS_FREE}```", 1, 1, None, 1, "stop", None)

    task_id = store.enqueue(str(repo), TaskSpec.model_validate(
        {"type": "unit_test", "target": "shop/pricing.py", "min_quality": 0.0, "max_attempts": 1}), clock.now())
    store.record_written(str(repo), "tests/test_pricing.py", outputs.sha256_text(GOOD), task_id, clock.now())
    pool = Pool(store, call, clock, models=["m"], ladder=ladder.Ladder(tests=testrun.Options(runs=1), coverage=True))
    asyncio.run(pool.run_until_idle())
    task = store.get_task(task_id)
    assert task.report_path, task.error
    cov = json.loads((repo / task.report_path).read_text())["verdict"]["coverage"]
    assert cov["replaces"] and cov["after"] < cov["before"], cov     # ohd's own file: replaced, and the drop shows
