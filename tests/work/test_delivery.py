"""Delivery through the real pool: where outputs and reports land, and when a file is replaced.

A real SQLite store, a real git repo, the real ModelClient against the fake OpenRouter
server, and the real ladder (pytest runs for unit tests).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ohd.core.taskfile import TaskSpec
from ohd.core.tasktypes import Job
from ohd.models.llm import Completion, ModelClient
from ohd.store.store import Store
from ohd.work import delivery
from ohd.work.worker import Pool
from tests.support.clock import FakeClock
from tests.support.fake_openrouter import FakeOpenRouter, ok

REVIEW = """# Review of shop/pricing.py

- `total` (line 4) rejects a discount of 1.0; say so in its docstring.
- `Cart.add` (line 33) has no docstring.
"""


@pytest.fixture
def server() -> Iterator[FakeOpenRouter]:
    with FakeOpenRouter() as fake:
        yield fake


def enqueue(store: Store, repo: Path, clock: FakeClock, **fields: Any) -> int:
    spec = TaskSpec.model_validate({"type": "unit_test", "target": "shop/pricing.py", **fields})
    return store.enqueue(str(repo), spec, clock.now())


def run_pool(store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    async def main() -> None:
        async with httpx.AsyncClient() as http:
            client = ModelClient(http, server.url, "sk-test", clock, retries=0)

            async def call(model: str, messages: list[dict[str, str]], timeout_s: float, job: Job) -> Completion:
                return await client.complete(model, messages, timeout_s)

            await Pool(store, call, clock, models=["m"], size=1).run_until_idle()

    asyncio.run(main())


# --- outputs and reports never share a path --------------------------------------------------


def test_a_default_review_is_kept_beside_its_report_and_the_next_review_replaces_it(
        repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    server.default = ok(REVIEW)
    first = enqueue(store, repo, clock, type="review")
    run_pool(store, server, clock)
    task = store.get_task(first)
    assert task.status == "completed", task.error
    assert task.output_path is not None and task.report_path is not None
    review = repo / task.output_path
    assert review.read_text() == REVIEW                      # the report did not replace it
    assert review.resolve() not in {(repo / task.report_path).resolve(),
                                    (repo / task.report_path).with_suffix(".md").resolve()}
    server.default = ok(REVIEW + "- `is_free` (line 17) is fine.\n")
    second = enqueue(store, repo, clock, type="review", cache=False)   # else the first review is replayed
    run_pool(store, server, clock)
    again = store.get_task(second)
    assert again.status == "completed", again.error
    assert again.output_path == task.output_path           # ohd's own review: replaced, not .ohd-new
    assert "is_free" in review.read_text()


@pytest.mark.parametrize(("task_type", "output"), [
    ("review", "shop/.ohd/pricing.py.review.md"),
    ("custom", "shop/.ohd/pricing.py.custom.json"),
    ("unit_test", "shop/.ohd/pricing.py.unit_test.md"),
    ("review", "shop/.ohd/other.py.docstring.md"),           # another target's report is one too
    ("review", "shop/.ohd/pricing.py.review.7.md"),          # so is an older task's
])
def test_an_output_on_a_report_path_fails_before_any_model_is_asked(
        repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock, task_type: str, output: str) -> None:
    extra = {"prompt": "Write JSON."} if task_type == "custom" else {}
    task_id = enqueue(store, repo, clock, type=task_type, output=output, **extra)
    run_pool(store, server, clock)
    task = store.get_task(task_id)
    assert task.status == "failed"
    assert output in (task.error or "") and "report" in (task.error or "")
    assert server.completions() == [] and task.output_path is None


def _report(repo: Path, rel: str | None) -> dict[str, Any]:
    assert rel is not None
    data: dict[str, Any] = json.loads((repo / rel).read_text())
    return data


# --- which case a .ohd-new is, and when a user's module may be replaced ----------------------

DOCUMENTED = '''```python
{}
```'''


def documented(source: str) -> str:
    """The module with one more docstring (Cart.add has none) and nothing else changed."""
    return source.replace("    def add(self, price: float) -> None:\n",
                          '    def add(self, price: float) -> None:\n        """Add one price (not negative)."""\n')


def test_an_existing_file_ohd_never_wrote_is_not_said_to_be_edited(
        repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    mine = repo / "tests" / "test_pricing.py"
    mine.write_text("# my own tests\n")
    task_id = enqueue(store, repo, clock)
    run_pool(store, server, clock)
    task = store.get_task(task_id)
    assert task.output_path == "tests/test_pricing.py.ohd-new" and mine.read_text() == "# my own tests\n"
    assert _report(repo, task.report_path)["conflict"] == "not_written_by_ohd"
    page = (repo / (task.report_path or "")).with_suffix(".md").read_text()
    assert "tests/test_pricing.py exists and was not written by ohd" in page
    assert "edited" not in page


def test_a_file_changed_since_ohd_wrote_it_says_so(
        repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    first = enqueue(store, repo, clock)
    run_pool(store, server, clock)
    assert store.get_task(first).output_path == "tests/test_pricing.py"
    written = repo / "tests" / "test_pricing.py"
    written.write_text(written.read_text() + "# mine now\n")
    second = enqueue(store, repo, clock)
    run_pool(store, server, clock)
    task = store.get_task(second)
    assert task.output_path == "tests/test_pricing.py.ohd-new" and "# mine now" in written.read_text()
    assert _report(repo, task.report_path)["conflict"] == "edited_since_ohd_wrote"
    assert "was changed since ohd last wrote it" in (repo / (task.report_path or "")).with_suffix(".md").read_text()


def test_docstrings_only_are_written_into_the_users_module(
        repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    module = repo / "shop" / "pricing.py"
    original = module.read_text()
    server.default = ok(DOCUMENTED.format(documented(original).rstrip("\n")))
    task_id = enqueue(store, repo, clock, type="docstring")
    run_pool(store, server, clock)
    task = store.get_task(task_id)
    assert task.status == "completed", task.error
    assert task.output_path == "shop/pricing.py"
    assert module.read_text() == documented(original)
    assert not (repo / "shop" / "pricing.py.ohd-new").exists()
    assert _report(repo, task.report_path)["decision"] == "written"


@pytest.mark.parametrize("answer", [
    lambda src: documented(src).replace("return total(self.items)", "return total(self.items)  # the sum"),
    lambda src: documented(src).replace("self.items.append(price)", "self.items.append(price * 1)"),
])
def test_a_docstring_answer_that_changes_more_never_replaces_the_users_module(
        repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock, answer: Any) -> None:
    module = repo / "shop" / "pricing.py"
    original = module.read_text()
    server.default = ok(DOCUMENTED.format(answer(original).rstrip("\n")))
    task_id = enqueue(store, repo, clock, type="docstring", max_attempts=1,
                      rule_levels={"docstring_only": "off"})     # accepted, but not proven docstrings-only
    run_pool(store, server, clock)
    task = store.get_task(task_id)
    assert task.status == "completed", task.error
    assert module.read_text() == original
    assert task.output_path == "shop/pricing.py.ohd-new"
    assert _report(repo, task.report_path)["conflict"] == "not_written_by_ohd"


# --- each task keeps its own report -----------------------------------------------------------


def test_an_older_tasks_report_still_describes_that_task(
        repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    server.default = ok(REVIEW)
    first = enqueue(store, repo, clock, type="review")
    run_pool(store, server, clock)
    server.default = ok("I'm ready to help. What's the problem?")     # a different outcome, same (target, type)
    second = enqueue(store, repo, clock, type="review", max_attempts=1, description="second")
    run_pool(store, server, clock)
    older, newer = store.get_task(first), store.get_task(second)
    assert older.report_path != newer.report_path
    assert _report(repo, older.report_path)["task"]["id"] == first
    assert _report(repo, newer.report_path)["task"]["id"] == second
    assert f"# ohd task {first}:" in (repo / (older.report_path or "")).with_suffix(".md").read_text()
    latest = repo / "shop" / ".ohd" / "pricing.py.review.json"          # the conventional path: the latest
    assert json.loads(latest.read_text())["task"]["id"] == second
    assert f"# ohd task {second}:" in latest.with_suffix(".md").read_text()


# --- smaller: what the report says -----------------------------------------------------------


def test_a_docstring_task_that_adds_nothing_says_nothing_was_written(
        repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    module = repo / "shop" / "pricing.py"
    original = module.read_text()
    server.default = ok(DOCUMENTED.format(original.rstrip("\n")))
    task_id = enqueue(store, repo, clock, type="docstring")
    run_pool(store, server, clock)
    task = store.get_task(task_id)
    assert task.status == "completed", task.error
    assert _report(repo, task.report_path)["decision"] == "unchanged"
    page = (repo / (task.report_path or "")).with_suffix(".md").read_text()
    assert "shop/pricing.py already holds this content; nothing was written." in page
    assert "Wrote" not in page and module.read_text() == original


def test_pytest_colours_from_the_repos_addopts_stay_out_of_the_report_and_the_prompt(
        repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    (repo / "pytest.ini").write_text("[pytest]\naddopts = --color=yes\n")
    server.default = ok("```python\nfrom shop.pricing import total\n\n\n"
                        "def test_total_is_wrong() -> None:\n    assert total([1.0]) == 2.0\n```")
    server.script("m", [ok("```python\nfrom shop.pricing import total\n\n\n"
                           "def test_total_fails() -> None:\n    assert total([1.0]) == 3.0\n```")])
    task_id = enqueue(store, repo, clock, max_attempts=2)
    run_pool(store, server, clock)
    task = store.get_task(task_id)
    page = (repo / (task.report_path or "")).with_suffix(".md").read_text()
    assert "test_total_is_wrong" in page and "## pytest" in page       # pytest's output is there ...
    assert "\x1b" not in page                                          # ... without its colour codes
    assert "\\u001b" not in (repo / (task.report_path or "")).read_text()    # nor in the JSON
    second_prompt = server.completions()[1].body["messages"][-1]["content"]
    assert "test_total_fails" in second_prompt and "\x1b" not in second_prompt   # nor in the feedback


def test_a_unit_test_goes_beside_the_repos_tests_inside_the_package(
        repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    (repo / "tests" / "__init__.py").unlink()          # no top-level tests/: they live in the package
    (repo / "tests").rmdir()
    (repo / "shop" / "tests").mkdir()
    (repo / "shop" / "tests" / "__init__.py").write_text("")
    (repo / "shop" / "tests" / "test_cart.py").write_text(
        "from shop.pricing import Cart\n\n\ndef test_empty() -> None:\n    assert Cart().total() == 0\n")
    server.default = ok("```python\nfrom shop.pricing import total\n\n\n"
                        "def test_total_sums() -> None:\n    assert total([1.0, 2.0]) == 3.0\n```")
    task_id = enqueue(store, repo, clock)
    run_pool(store, server, clock)
    task = store.get_task(task_id)
    assert task.status == "completed", task.error
    assert task.output_path == "shop/tests/test_pricing.py"
    assert not (repo / "shop" / "test_pricing.py").exists()


def test_a_docstring_answer_never_rewrites_the_line_endings_of_the_users_module(
        repo: Path, store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    module = repo / "shop" / "pricing.py"
    crlf = module.read_text().replace("\n", "\r\n").encode()
    module.write_bytes(crlf)
    server.default = ok(DOCUMENTED.format(documented(module.read_bytes().decode().replace("\r\n", "\n")).rstrip("\n")))
    task_id = enqueue(store, repo, clock, type="docstring")
    run_pool(store, server, clock)
    task = store.get_task(task_id)
    assert task.status == "completed", task.error
    assert module.read_bytes() == crlf                          # the answer has LF line endings
    assert task.output_path == "shop/pricing.py.ohd-new"


# --- a cancelled task's report -----------------------------------------------------------------


def test_a_cancelled_task_whose_report_cannot_be_written_says_why_and_stays_cancelled(
        repo: Path, store: Store, clock: FakeClock) -> None:
    task_id = enqueue(store, repo, clock, target="gone/away.py")
    store.cancel(task_id, clock.now())
    for _ in range(2):      # idempotent: the second call changes nothing
        task = delivery.report_cancel(store, task_id, clock.now())
        assert (task.status, task.report_path) == ("cancelled", None)
        assert task.error == ("cancelled by the user, before any model answered; no report was written "
                              "(gone/away.py: its folder gone/ does not exist)")
    assert not (repo / "gone").exists()


def test_a_cancel_whose_report_fails_in_ohd_still_stands(repo: Path, store: Store, clock: FakeClock,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    task_id = enqueue(store, repo, clock)
    store.cancel(task_id, clock.now())

    def broken(task_id: int) -> list[Any]:
        raise RuntimeError("a defect")

    monkeypatch.setattr(store, "executions", broken)    # nothing real fails here on demand
    task = delivery.report_cancel(store, task_id, clock.now())
    assert (task.status, task.error) == ("cancelled", "cancelled by the user")


def test_a_pending_task_cancelled_says_what_its_last_call_was(repo: Path, store: Store, clock: FakeClock) -> None:
    task_id = enqueue(store, repo, clock)
    store.record_execution(task_id, 0, "m", clock.now(), clock.now(), 0, 0, None, "rate_limited", "RateLimited",
                           "m: rate limited until 13:00")
    store.cancel(task_id, clock.now())
    task = delivery.report_cancel(store, task_id, clock.now())
    assert task.error == "cancelled by the user, after 0 attempt(s); the last call: m rate_limited: m: rate limited until 13:00"
    report = json.loads((repo / str(task.report_path)).read_text())
    assert (report["decision"], report["error"], [a["outcome"] for a in report["attempts"]]) == (
        "cancelled", task.error, ["rate_limited"])
