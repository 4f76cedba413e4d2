"""A pool with the real ModelClient against the fake OpenRouter, and its catalogue, for one test.

Used by test_catalogue and test_budgets: a real SQLite store, a `FakeClock`, and a
`PricedOpenRouter` whose `GET /models` lists models with the prices a test gives (or any
raw answer it is told to send).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from ohd.clock import Clock
from ohd.core.routing import Policy
from ohd.core.taskfile import TaskSpec
from ohd.core.tasktypes import Job
from ohd.ladder import testrun
from ohd.ladder.ladder import Ladder
from ohd.models.catalogue import Catalogue
from ohd.models.llm import Completion, ModelClient
from ohd.service.live import Live
from ohd.store.store import Store
from ohd.work.worker import Pool
from tests.support.fake_openrouter import Answer, FakeOpenRouter

GOOD = """```python
from shop.pricing import total


def test_total_sums() -> None:
    assert total([1.0, 2.0]) == 3.0
```"""

# The static rules only, no pytest run: for tests of scheduling, quotas and routing, where the
# ladder's two pytest runs per candidate (~1.5 s of CPU each) would only cost time.
STATIC_ONLY = Ladder(tests=testrun.Options(runs=0))


class PricedOpenRouter(FakeOpenRouter):
    """`models` listed with `prices[model]` (prompt, completion) as strings (default "0", "0");
    `catalogue_answer`, when set, is sent for `GET /models` instead."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.prices: dict[str, tuple[str, str]] = {}
        self.catalogue_answer: Answer | None = None

    def _catalogue(self) -> Answer:
        if self.catalogue_answer is not None:
            return self.catalogue_answer
        data = [{"id": model, "name": model, "context_length": 32768,
                 "pricing": dict(zip(("prompt", "completion"), self.prices.get(model, ("0", "0")), strict=True))
                 | {"request": "0"}} for model in self.models]
        return Answer(json={"data": data})


def submit(store: Store, repo: Path, clock: Clock, n: int = 1, **fields: Any) -> list[int]:
    start = store.counts()["queued"] + store.counts()["completed"] + store.counts()["pending"]
    return [store.enqueue(str(repo), TaskSpec.model_validate(
        {"type": "unit_test", "target": "shop/pricing.py", "output": f"tests/test_b{start + i}.py", **fields}),
        clock.now()) for i in range(n)]


Step = Callable[[Pool, Catalogue], Awaitable[None]]


def drive(store: Store, server: FakeOpenRouter, clock: Clock, models: list[str], step: Step, *,
          policy: Policy | None = None, discover: bool = False) -> Pool:
    """Build a pool and its catalogue on a fresh HTTP client, then run `step(pool, catalogue)`."""

    async def main() -> Pool:
        async with httpx.AsyncClient() as http:
            client = ModelClient(http, server.url, "sk-test", clock, retries=0)

            async def call(model: str, messages: list[dict[str, str]], timeout_s: float, job: Job) -> Completion:
                return await client.complete(model, messages, timeout_s)

            pool = Pool(store, call, clock, models=models, size=1, policy=policy, ladder=STATIC_ONLY)
            catalogue = Catalogue(client.list_models, pool.governor, clock, pool, discover=discover,
                                  use_models=Live(pool).use_models)
            await step(pool, catalogue)
            return pool

    return asyncio.run(main())


async def run_tasks(pool: Pool, catalogue: Catalogue) -> None:
    await pool.run_until_idle()


async def refresh_then_run(pool: Pool, catalogue: Catalogue) -> None:
    await catalogue.refresh()
    await pool.run_until_idle()
