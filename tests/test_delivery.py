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

from ohd.llm import Completion, ModelClient
from ohd.store import Store
from ohd.taskfile import TaskSpec
from ohd.tasktypes import Job
from ohd.worker import Pool
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
    second = enqueue(store, repo, clock, type="review")
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
    assert server.completions() == []
    assert not (repo / output).exists()


def _report(repo: Path, rel: str | None) -> dict[str, Any]:
    assert rel is not None
    data: dict[str, Any] = json.loads((repo / rel).read_text())
    return data
