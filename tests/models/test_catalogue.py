"""The catalogue: discovery of free models from GET /models, garbage answers, revival of dead models.

Against the fake OpenRouter (a real HTTP server) with a real SQLite store and a FakeClock.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from ohd.config import DEFAULT_MODELS, load
from ohd.models.catalogue import Catalogue, Listing, parse, price
from ohd.service.assemble import discovers, models_of
from ohd.store.quotas import Governor
from ohd.store.store import Store
from ohd.work.worker import Pool
from tests.support.clock import FakeClock
from tests.support.fake_openrouter import Answer, garbage, not_found, ok
from tests.support.governed import GOOD, PricedOpenRouter, drive, refresh_then_run, run_tasks, submit

FREE_A, FREE_B = "vendor/a:free", "vendor/b:free"
ZERO_PRICED, PAID = "vendor/zero", "vendor/paid"


@pytest.fixture
def server() -> Iterator[PricedOpenRouter]:
    with PricedOpenRouter(models=[FREE_A, ZERO_PRICED, PAID, FREE_B]) as fake:
        fake.default = ok(GOOD)
        fake.prices = {PAID: ("0.000002", "0.000006"), FREE_B: ("0.0", "0")}
        yield fake


def test_parse_reads_string_prices_and_calls_free_by_suffix_or_zero_prices() -> None:
    listings = parse([
        {"id": "x/a:free", "pricing": {"prompt": "0.1", "completion": "0.1"}},   # the price wins over the name
        {"id": "x/b:free", "pricing": {"prompt": "free"}},                       # no usable price: the name
        {"id": "x/zero", "pricing": {"prompt": "0", "completion": "0.000"}},
        {"id": "x/half", "pricing": {"prompt": "0", "completion": "0.00001"}},
        {"id": "x/garbled", "pricing": {"prompt": "free", "completion": None}},
        {"id": "x/none"},
        {"name": "no id"}, "not a dict",
    ])
    assert listings is not None
    assert [(entry.model, entry.free) for entry in listings] == [
        ("x/a:free", False), ("x/b:free", True), ("x/zero", True), ("x/half", False), ("x/garbled", False), ("x/none", False)]
    assert listings[3] == Listing("x/half", Decimal(0), Decimal("0.00001"))


@pytest.mark.parametrize("data", [None, "models", {"id": "x"}, 3, [{"name": "no id"}], [1, 2]])
def test_parse_calls_a_wrong_shape_garbage(data: Any) -> None:
    assert parse(data) is None


@pytest.mark.parametrize("raw", ["0.5", 0, 1.5])
def test_price_accepts_decimal_strings_and_numbers(raw: Any) -> None:
    assert price(raw) == Decimal(str(raw))


@pytest.mark.parametrize("raw", ["-1", "NaN", "Infinity", "", "1e", True, None, [], {}])
def test_price_refuses_anything_else(raw: Any) -> None:
    assert price(raw) is None


def test_discovery_keeps_only_the_free_models_and_updates_the_pool_list_in_place(
        repo: Path, store: Store, server: PricedOpenRouter, clock: FakeClock) -> None:
    seen: dict[str, Any] = {}

    async def step(pool: Pool, catalogue: Catalogue) -> None:
        before = pool.models
        assert await catalogue.refresh()
        seen["same_list"] = pool.models is before
        seen["models"] = list(pool.models)
        [task_id] = submit(store, repo, clock, models=["auto"])
        await pool.run_until_idle()
        seen["status"] = store.get_task(task_id).status

    drive(store, server, clock, ["configured/model:free"], step, discover=True)
    assert seen == {"same_list": True, "models": [FREE_A, ZERO_PRICED, FREE_B], "status": "completed"}
    assert [r.model for r in server.completions()] == [FREE_A]
    assert server.requests_for(PAID) == []


class Recorded(list[str]):
    """A model list that notes the thread of each change made to it."""

    def __init__(self, items: list[str]) -> None:
        super().__init__(items)
        self.threads: list[int] = []

    def __setitem__(self, index: Any, value: Any) -> None:
        self.threads.append(threading.get_ident())
        super().__setitem__(index, value)


def test_the_discovered_list_is_changed_on_the_event_loop_thread(
        store: Store, server: PricedOpenRouter, clock: FakeClock) -> None:
    """The workers read the pool's list on the loop thread. A refresh reads the store in a thread of
    its own, but changes the list on the loop's (it changed it from that other thread)."""
    seen: dict[str, Any] = {}

    async def step(pool: Pool, catalogue: Catalogue) -> None:
        pool.models = recorded = Recorded(pool.models)
        assert await catalogue.refresh()
        seen.update(models=list(pool.models), threads=recorded.threads, loop=threading.get_ident())

    drive(store, server, clock, ["configured/model:free"], step, discover=True)
    assert seen["models"] == [FREE_A, ZERO_PRICED, FREE_B]
    assert seen["threads"] == [seen["loop"]]


def test_without_discovery_the_configured_list_stays(store: Store, server: PricedOpenRouter,
                                                     clock: FakeClock) -> None:
    async def step(pool: Pool, catalogue: Catalogue) -> None:
        assert await catalogue.refresh()
        assert pool.models == ["configured/model:free"]
        assert pool.governor.priced[PAID] is True and pool.governor.priced[ZERO_PRICED] is False

    drive(store, server, clock, ["configured/model:free"], step)


@pytest.mark.parametrize("answer", [
    garbage(),                                                         # HTML, not JSON
    Answer(json={"data": "nope"}),
    Answer(json={"models": []}),
    Answer(json={"data": [{"name": "no id"}, 7]}),
    Answer(status=500, json={"error": {"code": 500, "message": "down"}}),
])
def test_a_garbage_models_answer_keeps_the_previous_list(
        store: Store, server: PricedOpenRouter, clock: FakeClock, answer: Answer,
        caplog: pytest.LogCaptureFixture) -> None:
    async def step(pool: Pool, catalogue: Catalogue) -> None:
        assert await catalogue.refresh()
        server.catalogue_answer = answer
        assert not await catalogue.refresh()
        assert pool.models == [FREE_A, ZERO_PRICED, FREE_B]
        assert pool.governor.priced[PAID] is True

    drive(store, server, clock, [], step, discover=True)
    assert "keeping the previous list" in caplog.text


def test_an_empty_or_all_paid_list_does_not_empty_the_pool(store: Store, server: PricedOpenRouter,
                                                           clock: FakeClock) -> None:
    async def step(pool: Pool, catalogue: Catalogue) -> None:
        server.models = [PAID]
        assert await catalogue.refresh()
        assert pool.models == ["configured/model:free"]
        server.models = []
        assert await catalogue.refresh()
        assert pool.models == ["configured/model:free"]

    drive(store, server, clock, ["configured/model:free"], step, discover=True)


def test_a_dead_model_comes_back_when_a_refresh_lists_it_again(
        repo: Path, store: Store, server: PricedOpenRouter, clock: FakeClock) -> None:
    server.script(FREE_A, [not_found()])
    [first] = submit(store, repo, clock, models=[FREE_A, FREE_B])
    drive(store, server, clock, [FREE_A, FREE_B], run_tasks)
    assert [(e.model, e.outcome) for e in store.executions(first)] == [(FREE_A, "error"), (FREE_B, "accepted")]
    assert Governor(store).state(FREE_A).dead

    server.models = [FREE_B]                                   # withdrawn: a refresh does not revive it
    [second] = submit(store, repo, clock, models=[FREE_A, FREE_B])
    drive(store, server, clock, [FREE_A, FREE_B], refresh_then_run)
    assert Governor(store).state(FREE_A).dead
    assert [e.model for e in store.executions(second)] == [FREE_B]

    server.models = [FREE_A, FREE_B]                           # listed again
    [third] = submit(store, repo, clock, models=[FREE_A, FREE_B])
    drive(store, server, clock, [FREE_A, FREE_B], refresh_then_run)
    assert not Governor(store).state(FREE_A).dead
    assert [(e.model, e.outcome) for e in store.executions(third)] == [(FREE_A, "accepted")]


def test_the_loop_refreshes_every_interval_on_the_clock_and_stops(store: Store, clock: FakeClock) -> None:
    calls: list[datetime] = []
    stop = asyncio.Event()

    async def fetch() -> list[dict[str, Any]]:
        calls.append(clock.now())
        if len(calls) == 2:
            raise RuntimeError("a bug in a refresh is logged, not fatal")
        if len(calls) == 3:
            stop.set()
        return [{"id": FREE_A}]

    class Holder:
        models: list[str] = []

    def use_models(models: list[str]) -> None:
        holder.models = list(models)

    holder = Holder()
    catalogue = Catalogue(fetch, Governor(store), clock, holder, discover=True, refresh_s=900, use_models=use_models)
    asyncio.run(asyncio.wait_for(catalogue.run(stop), timeout=10))
    assert [(at - calls[0]).total_seconds() for at in calls] == [0, 900, 1800]
    assert holder.models == [FREE_A]


def test_auto_in_the_config_means_discovery(tmp_path: Path) -> None:
    auto = load(None, env={"OHD_MODELS": "auto"})
    assert discovers(auto) and models_of(auto) == list(DEFAULT_MODELS)
    flag = load(None, env={"OHD_DISCOVER": "true", "OHD_MODELS": "x/y:free"})
    assert discovers(flag) and models_of(flag) == ["x/y:free"]
    plain = load(None, env={})
    assert not discovers(plain) and models_of(plain) == list(DEFAULT_MODELS)
    assert plain.catalogue_refresh_s == 3600


def test_a_real_daemon_with_models_auto_takes_the_free_models_the_server_lists(
        repo: Path, tmp_path: Path) -> None:
    """`ohd daemon` with OHD_MODELS=auto against the fake server as a process: `ohd models`
    shows the discovered free models (the wiring of the refresh loop in daemon.py)."""
    import os

    from tests.e2e.helpers import DaemonProcess, daemon_env, fake_openrouter
    from tests.support.waiting import wait_for

    runtime = Path(os.environ["OHD_RUNTIME_DIR"])
    with fake_openrouter("--model", "fake/x:free", "--model", "fake/y:free") as url:
        env = daemon_env(tmp_path, runtime, OPENROUTER_API_KEY="k", OHD_BASE_URL=url, OHD_MODELS="auto")
        daemon = DaemonProcess(env, repo, tmp_path / "daemon.log").start()
        try:
            ids = wait_for(lambda: [m["id"] for m in daemon.json("models")["models"]] == ["fake/x:free", "fake/y:free"],
                           timeout=30, what="the discovered models")
        finally:
            assert daemon.stop() == 0
    assert ids


def contexts(server: PricedOpenRouter, sizes: dict[str, int]) -> None:
    """`GET /models` lists each model free, with its `context_length`."""
    server.catalogue_answer = Answer(json={"data": [
        {"id": model, "context_length": size, "pricing": {"prompt": "0", "completion": "0"}}
        for model, size in sizes.items()]})


def test_a_prompt_larger_than_a_models_listed_context_is_not_sent_to_it(
        repo: Path, store: Store, server: PricedOpenRouter, clock: FakeClock) -> None:
    contexts(server, {FREE_A: 64, FREE_B: 32768})       # the prompt is some hundreds of tokens
    [task_id] = submit(store, repo, clock)
    drive(store, server, clock, [FREE_A, FREE_B], refresh_then_run)
    assert store.get_task(task_id).status == "completed"
    assert [r.model for r in server.completions()] == [FREE_B]


def test_a_prompt_larger_than_every_candidates_context_is_refused_before_any_call(
        repo: Path, store: Store, server: PricedOpenRouter, clock: FakeClock) -> None:
    contexts(server, {FREE_A: 64})
    [task_id] = submit(store, repo, clock)
    drive(store, server, clock, [FREE_A], refresh_then_run)
    task = store.get_task(task_id)
    assert task.status == "failed" and server.completions() == []
    assert (task.error or "").startswith("the prompt (about ") and f"{FREE_A}: 64 tokens" in (task.error or "")


@pytest.mark.parametrize("message", ["the request exceeds the available context size, try increasing it",
                                     "This model's maximum context length is 8192 tokens. However, you "
                                     "requested 9000 tokens."])
def test_a_400_context_overflow_moves_to_the_next_model_and_leads_the_error_when_none_is_left(
        repo: Path, store: Store, server: PricedOpenRouter, clock: FakeClock, message: str) -> None:
    from tests.support.fake_openrouter import error
    server.script(FREE_A, [error(400, message), error(400, message)])
    [first] = submit(store, repo, clock)
    drive(store, server, clock, [FREE_A, FREE_B], run_tasks)
    task = store.get_task(first)
    assert task.status == "completed" and task.attempts == 1
    assert [e.error_class for e in store.executions(first)] == ["context_overflow", None]
    [second] = submit(store, repo, clock)
    drive(store, server, clock, [FREE_A], run_tasks)     # only the model that is too small
    task = store.get_task(second)
    assert task.status == "failed"
    assert (task.error or "").startswith("the prompt is larger than the context of every candidate model")
    assert message in (task.error or "")
