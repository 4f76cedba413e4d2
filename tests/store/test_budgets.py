"""Budgets: strict free-only mode (paid models refused unless allowed) and daily caps on requests and cost.

Against the fake OpenRouter with a real SQLite store and a FakeClock (12:00 UTC at the
start, so the next UTC midnight is 12 hours ahead).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ohd.config import load
from ohd.core import routing
from ohd.core.routing import Policy
from ohd.models.catalogue import Catalogue
from ohd.service.assemble import policy_of
from ohd.store.store import Store
from ohd.work.worker import Pool
from tests.support.clock import FakeClock
from tests.support.fake_openrouter import ok
from tests.support.governed import GOOD, PricedOpenRouter, drive, refresh_then_run, run_tasks, submit

FREE, PAID, ZERO_PRICED = "vendor/a:free", "vendor/paid", "vendor/zero"
STRICT = Policy(allow_paid=False)
MIDNIGHT = datetime(2026, 1, 2, tzinfo=UTC)


@pytest.fixture
def server() -> Iterator[PricedOpenRouter]:
    with PricedOpenRouter(models=[FREE, PAID, ZERO_PRICED]) as fake:
        fake.default = ok(GOOD)
        fake.prices = {PAID: ("0.000001", "0.000002")}
        yield fake


def test_paid_means_priced_by_the_catalogue_else_no_free_suffix() -> None:
    assert routing.paid("x/y", {}) and not routing.paid("x/y:free", {})
    assert not routing.paid("x/y", {"x/y": False}) and routing.paid("x/y:free", {"x/y:free": True})
    assert routing.refused("x/y", STRICT, {}) and not routing.refused("x/y", Policy(), {})
    assert not routing.refused("x/y", Policy(allow_paid=False, paid_models=frozenset({"x/y"})), {})


def test_over_budget_holds_until_the_next_utc_midnight() -> None:
    now = datetime(2026, 3, 4, 23, 59, tzinfo=UTC)
    caps = Policy(request_cap=10, cost_cap=0.5)
    assert routing.over_budget(9, 0.49, now, caps) is None
    held = routing.over_budget(10, 0.0, now, caps)
    assert held is not None and held.model is None and held.at == datetime(2026, 3, 5, tzinfo=UTC)
    assert held.reason is not None and "daily_request_cap" in held.reason
    cost = routing.over_budget(0, 0.5, now, caps)
    assert cost is not None and cost.reason is not None and "daily_cost_cap_usd" in cost.reason


def test_a_paid_model_is_refused_in_strict_mode(repo: Path, store: Store, server: PricedOpenRouter,
                                               clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    [task_id] = submit(store, repo, clock, models=[PAID])
    drive(store, server, clock, [FREE], refresh_then_run, policy=STRICT)
    task = store.get_task(task_id)
    assert task.status == "failed" and task.error is not None
    assert "strict free-only mode" in task.error and PAID in task.error
    assert server.completions() == []
    assert f"model {PAID} refused" in caplog.text


def test_a_free_named_model_listed_with_a_price_is_refused_in_strict_mode(
        repo: Path, store: Store, server: PricedOpenRouter, clock: FakeClock) -> None:
    server.prices = {FREE: ("0.000001", "0")}          # `:free` in its id, a price in the catalogue
    [task_id] = submit(store, repo, clock, models=[FREE])
    drive(store, server, clock, [], refresh_then_run, policy=STRICT)
    task = store.get_task(task_id)
    assert task.status == "failed" and "strict free-only mode" in (task.error or "")
    assert server.completions() == []


def test_a_refused_model_is_skipped_when_another_candidate_is_free(
        repo: Path, store: Store, server: PricedOpenRouter, clock: FakeClock) -> None:
    [task_id] = submit(store, repo, clock, models=[PAID, ZERO_PRICED])
    drive(store, server, clock, [], refresh_then_run, policy=STRICT)
    assert store.get_task(task_id).status == "completed"
    assert [r.model for r in server.completions()] == [ZERO_PRICED]   # free by its zero prices


def test_without_catalogue_prices_an_id_without_free_suffix_is_paid(
        repo: Path, store: Store, server: PricedOpenRouter, clock: FakeClock) -> None:
    [task_id] = submit(store, repo, clock, models=[ZERO_PRICED])
    drive(store, server, clock, [], run_tasks, policy=STRICT)           # no refresh: prices unknown
    assert store.get_task(task_id).status == "failed"
    assert server.completions() == []


@pytest.mark.parametrize("policy", [Policy(allow_paid=False, paid_models=frozenset({PAID})), Policy(allow_paid=True)])
def test_a_paid_model_runs_when_allowed(repo: Path, store: Store, server: PricedOpenRouter, clock: FakeClock,
                                       policy: Policy) -> None:
    [task_id] = submit(store, repo, clock, models=[PAID])
    drive(store, server, clock, [], refresh_then_run, policy=policy)
    assert store.get_task(task_id).status == "completed"
    assert [r.model for r in server.completions()] == [PAID]


def test_request_cap_reached_holds_tasks_pending_until_midnight_then_they_run(
        repo: Path, store: Store, server: PricedOpenRouter, clock: FakeClock) -> None:
    policy = Policy(request_cap=2)
    ids = submit(store, repo, clock, n=3, models=[FREE])
    drive(store, server, clock, [FREE], run_tasks, policy=policy)
    assert [store.get_task(i).status for i in ids] == ["completed", "completed", "pending"]
    held = store.get_task(ids[2])
    assert held.not_before == MIDNIGHT and held.attempts == 0
    assert held.error is not None and "daily_request_cap reached (2 of 2" in held.error
    assert len(server.completions()) == 2

    clock.advance((MIDNIGHT - clock.now()).total_seconds() - 1)       # one second before: still held
    drive(store, server, clock, [FREE], run_tasks, policy=policy)
    assert store.get_task(ids[2]).status == "pending" and len(server.completions()) == 2

    clock.advance(1)
    drive(store, server, clock, [FREE], run_tasks, policy=policy)
    assert store.get_task(ids[2]).status == "completed" and len(server.completions()) == 3


def test_cost_cap_reached_holds_tasks_pending_until_midnight_then_they_run(
        repo: Path, store: Store, server: PricedOpenRouter, clock: FakeClock) -> None:
    server.default = ok(GOOD, cost=0.6)
    policy = Policy(allow_paid=True, cost_cap=1.0)
    ids = submit(store, repo, clock, n=3, models=[PAID])
    drive(store, server, clock, [], run_tasks, policy=policy)
    assert [store.get_task(i).status for i in ids] == ["completed", "completed", "pending"]
    held = store.get_task(ids[2])
    assert held.not_before == MIDNIGHT
    assert held.error is not None and "daily_cost_cap_usd reached ($1.2000 of $1 spent today)" in held.error

    clock.advance((MIDNIGHT - clock.now()).total_seconds())
    drive(store, server, clock, [], run_tasks, policy=policy)
    assert store.get_task(ids[2]).status == "completed" and len(server.completions()) == 3


def test_a_capped_pool_sends_nothing_more_and_still_reports_its_models(
        repo: Path, store: Store, server: PricedOpenRouter, clock: FakeClock) -> None:
    seen: list[int] = []

    async def step(pool: Pool, catalogue: Catalogue) -> None:
        await pool.run_until_idle()
        seen.append(len(pool.model_states()))

    submit(store, repo, clock, n=2, models=[FREE])
    drive(store, server, clock, [FREE], step, policy=Policy(request_cap=1))
    assert seen == [1] and len(server.completions()) == 1


def test_the_configuration_is_strict_by_default_and_caps_are_off() -> None:
    policy = policy_of(load(None, env={"OPENROUTER_API_KEY": "sk-x"}))
    assert not policy.allow_paid and policy.paid_models == frozenset()
    assert policy.request_cap is None and policy.cost_cap is None
    assert policy_of(load(None, env={})).allow_paid                      # offline: nothing to pay
    tuned = policy_of(load(None, env={"OPENROUTER_API_KEY": "sk-x", "OHD_PAID_MODELS": "a/b,c/d",
                                      "OHD_DAILY_REQUEST_CAP": "100", "OHD_DAILY_COST_CAP_USD": "0.5",
                                      "OHD_ALLOW_PAID": "true"}))
    assert tuned.allow_paid and tuned.paid_models == frozenset({"a/b", "c/d"})
    assert tuned.request_cap == 100 and tuned.cost_cap == 0.5
    assert timedelta(0) < MIDNIGHT - FakeClock().now() <= timedelta(days=1)
