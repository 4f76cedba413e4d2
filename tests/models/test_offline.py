"""The offline provider: its generated tests really pass under pytest; its docstrings change no code."""

from __future__ import annotations

import ast
import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ohd.core import views
from ohd.core.taskfile import TaskSpec, TaskType
from ohd.core.tasktypes import Job, extract
from ohd.errors import MalformedAnswer
from ohd.ladder import ladder, sandbox, testrun, validate
from ohd.models import offline
from ohd.models.llm import Completion, OfflineProvider
from ohd.store.store import Store
from ohd.work.worker import Pool
from tests.support.clock import FakeClock
from tests.support.gitrepo import PRICING, git


def unit_job(source: str, module: str = "mod", output: str = "test_mod.py") -> Job:
    return Job(task_type=TaskType.UNIT_TEST, target=f"{module.replace('.', '/')}.py", source=source,
               module=module, output=output)


def generate(source: str, module: str = "mod") -> str:
    """The extracted test module the worker would write."""
    return extract(TaskType.UNIT_TEST, offline.answer(unit_job(source, module)))


def run_generated(tmp_path: Path, source: str) -> tuple[str, subprocess.CompletedProcess[str]]:
    """Write `mod.py` and its generated tests into tmp_path and run pytest there for real."""
    (tmp_path / "mod.py").write_text(source)
    tests = generate(source)
    (tmp_path / "test_mod.py").write_text(tests)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_mod.py"],
                          cwd=tmp_path, check=False, capture_output=True, text=True, timeout=120)
    return tests, done


def collected_names(tests: str) -> list[str]:
    return [n.name for n in ast.parse(tests).body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]




def every_test_asserts(tests: str) -> bool:
    functions = [n for n in ast.parse(tests).body if isinstance(n, ast.FunctionDef)]
    return bool(functions) and all(validate.count_assertions(ast.Module(body=[f], type_ignores=[])) > 0
                                   for f in functions)


# --- unit_test: the generated module passes against the real module ------------------------


def test_tests_for_the_demo_module_pass_in_the_real_repo(repo: Path) -> None:
    job = unit_job(PRICING, module="shop.pricing", output="tests/test_pricing.py")
    tests = extract(TaskType.UNIT_TEST, offline.answer(job))
    (repo / "tests" / "test_pricing.py").write_text(tests)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_pricing.py"],
                          cwd=repo, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "target = importlib.import_module('shop.pricing')" in tests and every_test_asserts(tests)
    assert {"test_total_guard_raises_valueerror", "test_Cart_add_guard_raises_valueerror",
            "test_Cart_instantiates_without_arguments"} <= set(collected_names(tests))
    assert f"{len(collected_names(tests))} passed" in done.stdout
    verdict = validate.check(TaskType.UNIT_TEST, job.output, tests, target_exists=True,
                             module=job.module, min_quality=0.7)
    assert verdict.accepted, verdict.feedback()


ASYNC_AND_FRIENDS = '''
"""Odds and ends.

>>> double(2)
4
"""
import functools


def double(x):
    """Twice x.

    >>> double(3)
    6
    """
    return x * 2


async def fetch(url, *, timeout=5.0):
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    return url


@functools.lru_cache(maxsize=None)
def cached(n):
    return n


def split(a, /, b, *rest, c, d=1, **extra):
    return a


def numbers(limit):
    if limit < 0:
        raise ValueError("negative")
    yield from range(limit)


class Base:
    pass


class Child(Base):
    def name(self):
        return "child"


class Opens:
    def __init__(self, path="config.toml"):
        self.text = open(path).read()

    def size(self):
        return len(self.text)
'''


def test_tests_for_async_doctests_decorators_and_classes_pass(tmp_path: Path) -> None:
    tests, done = run_generated(tmp_path, ASYNC_AND_FRIENDS)
    assert done.returncode == 0, tests + done.stdout + done.stderr
    names = set(collected_names(tests))
    assert {"test_fetch_signature", "test_cached_exists", "test_split_signature", "test_Child_name_signature",
            "test_doctest_examples", "test_Opens_size_signature"} <= names
    assert "inspect.iscoroutinefunction(target.fetch)" in tests
    assert "['a', 'b', 'rest', 'c', 'd', 'extra']" in tests
    # never called: a coroutine, a generator, a class with a base, an __init__ that does I/O
    assert not {"test_fetch_guard_raises_valueerror", "test_numbers_guard_raises_valueerror",
                "test_Child_instantiates_without_arguments", "test_Opens_instantiates_without_arguments"} & names
    assert "target.Opens()" not in tests and every_test_asserts(tests)


GUARDS = '''
def need(x):
    if x is None:
        raise TypeError("x is required")
    return x


def pick(mode, other):
    """Choose."""
    if mode not in ("fast", "slow"):
        raise ValueError(f"unknown mode {mode!r}")
    return mode


def first(items):
    if not items:
        raise IndexError("empty")
    return items[0]


def ranged(n):
    if n < 0 or n > 10:
        raise ValueError
    return n


def keyword(*, level):
    if level >= 3:
        raise ValueError("too deep")
    return level


def posonly(a, b=2, /):
    if b == 0:
        raise ZeroDivisionError("b")
    return a / b


def message_reads_another_argument(n, user):
    if n < 0:
        raise ValueError(f"{user.name}: negative")
    return n


def two_names(a, b):
    if a < b:
        raise ValueError("order")
    return a


def calls_something(s):
    if len(s) > 3:
        raise ValueError("long")
    return s


class Counter:
    """Counts."""

    limit: int = 3

    def __init__(self, start=0, *, step=1):
        self.count = start
        self.step = step
        self.seen: list[int] = []
        self.label = "counter"

    def bump(self, by):
        if by <= 0:
            raise ValueError(f"by must be positive, got {by}")
        self.count += by
'''


def test_guard_clauses_are_tripped_only_when_that_is_certain(tmp_path: Path) -> None:
    tests, done = run_generated(tmp_path, GUARDS)
    assert done.returncode == 0, tests + done.stdout + done.stderr
    names = set(collected_names(tests))
    assert {"test_need_guard_raises_typeerror", "test_pick_guard_raises_valueerror",
            "test_first_guard_raises_indexerror", "test_ranged_guard_raises_valueerror",
            "test_keyword_guard_raises_valueerror", "test_posonly_guard_raises_zerodivisionerror",
            "test_Counter_bump_guard_raises_valueerror"} <= names
    assert not {"test_message_reads_another_argument_guard_raises_valueerror",
                "test_two_names_guard_raises_valueerror", "test_calls_something_guard_raises_valueerror"} & names
    for literal in ("obj.count == 0", "obj.step == 1", "obj.seen == []", "obj.label == 'counter'"):
        assert f"assert {literal}" in tests


def test_module_without_public_names_gets_one_import_test_that_passes(tmp_path: Path) -> None:
    tests, done = run_generated(tmp_path, "_CACHE = {}\n\n\ndef _helper():\n    return 1\n")
    assert done.returncode == 0, done.stdout + done.stderr
    assert collected_names(tests) == ["test_module_imports"]
    assert "assert inspect.ismodule(target)" in tests and "1 passed" in done.stdout


def test_names_bound_twice_or_shadowed_builtins_are_not_trusted(tmp_path: Path) -> None:
    source = ("def twice():\n    return 1\n\n\ntwice = 3\n\n\nValueError = KeyError\n\n\n"
              "def guarded(n):\n    if n < 0:\n        raise ValueError('x')\n    return n\n")
    tests, done = run_generated(tmp_path, source)
    assert done.returncode == 0, tests + done.stdout + done.stderr
    assert "twice" not in tests and "test_guarded_guard" not in tests


def test_a_target_that_does_not_parse_gets_prose_that_extraction_rejects() -> None:
    reply = offline.answer(unit_job("def broken(:\n    pass\n"))
    assert "```" not in reply and "does not parse" in reply
    with pytest.raises(MalformedAnswer):
        extract(TaskType.UNIT_TEST, reply)


@pytest.mark.parametrize("module", ["", "my-mod", "pkg.class"])
def test_a_module_that_cannot_be_imported_by_name_gets_prose(module: str) -> None:
    job = Job(task_type=TaskType.UNIT_TEST, target="t.py", source="x = 1\n", module=module, output="test_t.py")
    reply = offline.answer(job)
    assert "not an importable module name" in reply and "```" not in reply


def test_answers_are_deterministic() -> None:
    job = unit_job(GUARDS)
    assert offline.answer(job) == offline.answer(job)


# --- docstring -----------------------------------------------------------------------------


def without_docstrings(source: str) -> str:
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


DOCUMENT_ME = textwrap.dedent('''\
    import functools


    def add(a, b=1, *args, key, **kw):
        # a comment first
        return a + b


    def documented():
        """Already says what it does."""
        return 1


    def one_liner(x): return x


    def _private():
        return 2


    async def fetch(url):
        return url


    class Shape(object):
        @functools.cache
        def area(self):
            return 0

        @staticmethod
        def unit():
            ...

        class Inner:
            def run(self, n):
                \x0c
                return n
    ''')


def test_docstrings_are_added_without_changing_the_code() -> None:
    job = Job(task_type=TaskType.DOCSTRING, target="mod.py", source=DOCUMENT_ME, module="mod", output="mod.py")
    result = extract(TaskType.DOCSTRING, offline.answer(job))
    assert without_docstrings(result) == without_docstrings(DOCUMENT_ME)
    tree = ast.parse(result)
    docs = {n.name: ast.get_docstring(n) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    assert docs == {
        "add": "add: function, parameters a, b, *args, key, **kw.",
        "documented": "Already says what it does.",
        "one_liner": None, "_private": None,
        "fetch": "fetch: coroutine function, parameters url.",
        "Shape": "Shape: class based on object.",
        "area": "area: function, no parameters.", "unit": "unit: function, no parameters.",
        "Inner": "Inner: class.", "run": "run: function, parameters n.",
    }
    assert "\x0c" in result and "# a comment first" in result


def test_docstring_keeps_crlf_line_endings() -> None:
    source = "def f(x):\r\n    return x\r\n"
    job = Job(task_type=TaskType.DOCSTRING, target="m.py", source=source, module="m", output="m.py")
    assert '    """f: function, parameters x."""\r\n' in offline.answer(job)


def test_docstring_of_an_unparsable_module_is_refused() -> None:
    job = Job(task_type=TaskType.DOCSTRING, target="m.py", source="def (", module="m", output="m.py")
    with pytest.raises(MalformedAnswer):
        extract(TaskType.DOCSTRING, offline.answer(job))


# --- review and custom ---------------------------------------------------------------------

LONG = "def long():\n" + "".join(f"    x{i} = {i}\n" for i in range(50)) + "    return 0\n"
REVIEW_ME = textwrap.dedent('''\
    """A module."""


    def ok():
        """Fine."""
        try:
            return 1
        except:  # noqa
            return 2


    class Thing:
        def go(self):
            pass  # TODO: make it go
    # FIXME later
    ''') + LONG


def review(source: str, target: str = "pkg/mod.py") -> str:
    job = Job(task_type=TaskType.REVIEW, target=target, source=source, module="pkg.mod",
              output="pkg/.ohd/mod.py.review.md")
    return extract(TaskType.REVIEW, offline.answer(job))


def test_review_lists_measured_facts() -> None:
    text = review(REVIEW_ME)
    assert text.startswith("# Review of `pkg/mod.py`") and "offline provider" in text
    assert f"- Lines: {len(REVIEW_ME.splitlines())} (" in text
    assert "- Functions and methods: 3; classes: 1" in text
    assert "without a docstring: 3 — `Thing` (line 12), `Thing.go` (line 13), `long` (line 16)" in text
    assert "- Functions longer than 50 lines: 1 — `long` (line 16, 52 lines)" in text
    assert "- Bare `except:` clauses: 1 — line 8" in text
    assert "- TODO/FIXME lines: 2 — line 14: `pass  # TODO: make it go`, line 15: `# FIXME later`" in text


@pytest.mark.parametrize("source, target", [
    (REVIEW_ME, "pkg/mod.py"),
    ('"""Documented."""\n\nVERSION = "1.0"\n\n\ndef _helper():\n    """Fine."""\n    return 1\n', "pkg/mod.py"),
    ("# Notes\n\nNothing to do.\n", "README.md"),
])
def test_the_offline_review_passes_the_review_rules(source: str, target: str) -> None:
    verdict = validate.check(TaskType.REVIEW, "pkg/.ohd/mod.py.review.md", review(source, target),
                             target_exists=True, module="pkg.mod", min_quality=0.7, original=source, target=target)
    assert verdict.accepted and verdict.score == 1.0, verdict.rules


def test_review_of_unparsable_or_non_python_targets_keeps_to_line_facts() -> None:
    assert "does not parse as Python: " in review("def (\n")
    text = review("# Notes\n\nTODO: write\n", target="README.md")
    assert "- TODO/FIXME lines: 1 — line 3" in text and "Functions" not in text


def test_custom_task_gets_a_note_that_free_prompts_need_a_model() -> None:
    job = Job(task_type=TaskType.CUSTOM, target="pkg/mod.py", source="x = 1\n", module="pkg.mod",
              output="docs/summary.md", prompt="Summarise this ```module``` for new people")
    reply = offline.answer(job)
    assert "cannot answer free prompts" in reply and "Summarise this '''module''' for new people" in reply
    assert extract(TaskType.CUSTOM, reply) == reply.strip() + "\n"


# --- through the ladder: a real repo, real pytest, the worker pool -------------------------


REEXPORTS = {
    # `from .mod import *` binds the function `mod` over the submodule's attribute
    "star": ({"star/__init__.py": "from .mod import *\n",
              "star/mod.py": "def mod(x):\n    if x is None:\n        raise ValueError('x')\n    return x\n"},
             "star/mod.py"),
    # `from .__version__ import __version__` binds the string over the submodule
    "version": ({"version/__init__.py": "from .__version__ import __version__\n",
                 "version/__version__.py": '__version__ = "1.2.3"\n\n\ndef parts(v):\n    return v.split(".")\n'},
                "version/__version__.py"),
}


def run_offline_pool(store: Store, clock: FakeClock, runs: int = 2, jail: sandbox.Jail | None = None) -> Pool:
    """The pool with the offline provider, as the daemon wires it without an API key; the
    ladder runs each candidate `runs` times."""
    provider = OfflineProvider(clock)

    async def call(model: str, messages: list[dict[str, str]], timeout_s: float, job: Job) -> Completion:
        return await provider.complete(model, messages, timeout_s, job)

    async def main() -> Pool:
        pool = Pool(store, call, clock, models=["offline"], size=1,
                    ladder=ladder.Ladder(tests=testrun.Options(runs=runs, jail=jail)))
        await pool.run_until_idle()
        return pool

    return asyncio.run(main())


@pytest.mark.parametrize("shape", sorted(REEXPORTS))
def test_a_package_that_reexports_the_submodules_name_gets_passing_tests(
        shape: str, repo: Path, store: Store, clock: FakeClock) -> None:
    files, target = REEXPORTS[shape]
    for rel, text in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", shape)
    task_id = store.enqueue(str(repo), TaskSpec.model_validate({"type": "unit_test", "target": target}),
                            clock.now())
    run_offline_pool(store, clock)
    task = store.get_task(task_id)
    assert (task.status, task.error) == ("completed", None)
    assert task.output_path is not None and (repo / task.output_path).is_file()
    assert [e.outcome for e in store.executions(task_id)] == ["accepted"]


# Imported once per pytest run of the candidate: the log counts how often it was judged.
WRONG_DOCTEST = '''"""Doubling.

>>> double(2)
5
"""
import pathlib

with open(pathlib.Path(__file__).with_name("imports.log"), "a") as log:
    log.write("imported\\n")


def double(x):
    return x * 2
'''
# the module above counts its imports in a file beside it: only the `process` level lets a test write there
WATCHED = sandbox.Jail(sandbox.Level.PROCESS)


def test_the_same_answer_twice_is_not_judged_again_nor_given_more_attempts(
        repo: Path, store: Store, clock: FakeClock) -> None:
    (repo / "shop" / "double.py").write_text(WRONG_DOCTEST)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "double")
    task_id = store.enqueue(str(repo), TaskSpec.model_validate(
        {"type": "unit_test", "target": "shop/double.py", "max_attempts": 5}), clock.now())
    run_offline_pool(store, clock, runs=1, jail=WATCHED)
    task = store.get_task(task_id)
    # the module's own doctest is wrong: a possible bug, found once and reported once
    assert task.status == "completed" and task.error is not None and "quarantined" in task.error
    assert task.attempts == 2 and [e.outcome for e in store.executions(task_id)] == ["rejected", "rejected"]
    assert (repo / "shop" / "imports.log").read_text() == "imported\n"   # one pytest run, not five


def test_a_quarantine_reads_completed_quarantined_wherever_status_is_shown(
        repo: Path, store: Store, clock: FakeClock) -> None:
    (repo / "shop" / "double.py").write_text(WRONG_DOCTEST)
    task_id = store.enqueue(str(repo), TaskSpec.model_validate({"type": "unit_test", "target": "shop/double.py"}),
                            clock.now())
    store.enqueue(str(repo), TaskSpec.model_validate({"type": "review", "target": "shop/pricing.py"}), clock.now())
    run_offline_pool(store, clock, runs=1, jail=WATCHED)
    data = store.get_task(task_id).as_dict()
    assert (data["status"], data["quarantined"]) == ("completed", True)   # the API keeps the status
    assert "status:   completed (quarantined)" in views.task_text(data)
    listing = views.tasks_text([t.as_dict() for t in store.list_tasks(None, 10)]).splitlines()
    assert [line.split()[1:3] for line in listing[1:]] == [["completed", "normal"], ["completed", "(quarantined)"]]
    assert store.quarantined_count() == 1
    status = views.status_text({"queue": store.counts(), "quarantined": store.quarantined_count()})
    assert "completed 2 (1 quarantined)" in status
    report = json.loads((repo / data["report_path"]).read_text())
    assert report["task"]["quarantined"] is True
    markdown = (repo / data["report_path"]).with_suffix(".md").read_text()
    assert "- status: completed (quarantined)" in markdown
