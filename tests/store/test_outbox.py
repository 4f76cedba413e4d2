"""The webhook outbox: events written in the transaction of their state change, and the sender's reads."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from ohd.core import events
from ohd.core.events import Hook
from ohd.core.routing import Policy
from ohd.core.taskfile import TaskSpec
from ohd.store.outbox import Outbox
from ohd.store.quotas import Governor
from ohd.store.schema import QUARANTINED
from ohd.store.store import Store, TaskStatus
from ohd.store.transactions import atomic_write

from tests.support.clock import FakeClock
from tests.support.databases import BACKENDS, store_on

LEASE = timedelta(seconds=60)
REPO = "/home/me/project"
ALL = Hook("all", frozenset(events.EVENTS))
FAILURES = Hook("failures", frozenset({events.TASK_FAILED}))


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with store_on(request.param, tmp_path) as st:
        st.hooks = (ALL, FAILURES)
        yield st


def spec(**fields: Any) -> TaskSpec:
    return TaskSpec.model_validate({"type": "unit_test", "target": "src/app/auth.py", **fields})


def running(store: Store, clock: FakeClock) -> int:
    store.enqueue(REPO, spec(), clock.now())
    claim = store.claim_next("w1", clock.now(), LEASE)
    assert claim is not None
    return claim.task.id


def rows(store: Store) -> list[tuple[str, str, int | None, str | None]]:
    o = store.m.webhook_outbox
    return [(r.hook, r.event, r.task_id, r.model) for r in o.select().order_by(o.id)]


def test_a_task_end_writes_one_row_per_hook_that_takes_its_event(store: Store, clock: FakeClock) -> None:
    done, failed, quarantined, cancelled = (running(store, clock) for _ in range(4))
    store.finish(done, "w1", TaskStatus.COMPLETED, clock.now(), output_path="tests/test_auth.py")
    store.finish(failed, "w1", TaskStatus.FAILED, clock.now(), error="rejected")
    store.finish(quarantined, "w1", TaskStatus.COMPLETED, clock.now(), error=QUARANTINED + "tests fail")
    store.finish(cancelled, "w1", TaskStatus.CANCELLED, clock.now())
    assert rows(store) == [("all", events.TASK_COMPLETED, done, None), ("all", events.TASK_FAILED, failed, None),
                           ("failures", events.TASK_FAILED, failed, None),
                           ("all", events.TASK_QUARANTINED, quarantined, None)]
    payload = store.m.webhook_outbox.select().first().payload
    assert (payload["id"], payload["status"], payload["output_path"]) == (done, "completed", "tests/test_auth.py")


def test_a_finish_that_changes_nothing_writes_no_event(store: Store, clock: FakeClock) -> None:
    task_id = running(store, clock)
    assert store.finish(task_id, "w1", TaskStatus.COMPLETED, clock.now())
    assert not store.finish(task_id, "w1", TaskStatus.COMPLETED, clock.now())   # already terminal
    assert len(rows(store)) == 1


def test_a_state_change_rolled_back_leaves_no_event(store: Store, clock: FakeClock) -> None:
    task_id = running(store, clock)
    with pytest.raises(RuntimeError), atomic_write(store.db):
        store.finish(task_id, "w1", TaskStatus.COMPLETED, clock.now())
        raise RuntimeError("the transaction fails after the finish")
    assert store.get_task(task_id).status == TaskStatus.RUNNING
    assert rows(store) == []


def test_an_event_that_cannot_be_written_rolls_its_state_change_back(store: Store, clock: FakeClock) -> None:
    task_id = running(store, clock)
    store.m.webhook_outbox.drop_table()
    with pytest.raises(Exception):    # noqa: B017 (the backend's own error for a missing table)
        store.finish(task_id, "w1", TaskStatus.COMPLETED, clock.now())
    assert store.get_task(task_id).status == TaskStatus.RUNNING


def test_a_task_failed_after_too_many_crashes_has_its_event(store: Store, clock: FakeClock) -> None:
    task_id = running(store, clock)
    store.recover(clock.now(), crash_limit=1)
    assert rows(store)[0] == ("all", events.TASK_FAILED, task_id, None)


def test_a_new_cooldown_is_one_event_and_a_longer_one_none(store: Store, clock: FakeClock) -> None:
    gov = Governor(store, Policy())
    gov.rate_limited("m", clock.now() + timedelta(seconds=60), 20, clock.now())
    gov.rate_limited("m", clock.now() + timedelta(seconds=90), 20, clock.now())   # a second worker's 429
    clock.advance(120)
    gov.rate_limited("m", clock.now() + timedelta(seconds=60), None, clock.now())  # the cooldown had ended
    assert rows(store) == [("all", events.MODEL_COOLDOWN, None, "m")] * 2


def test_the_request_that_uses_a_daily_quota_up_writes_quota_exhausted(store: Store, clock: FakeClock) -> None:
    gov = Governor(store, Policy(free_rpm=None, free_rpd=None, rpd={"m": 2}, request_cap=3))
    assert gov.reserve("m", clock.now()) is None
    assert rows(store) == []
    assert gov.reserve("m", clock.now()) is None
    assert gov.reserve("other", clock.now()) is None     # the third request of the day: the cap
    assert rows(store) == [("all", events.QUOTA_EXHAUSTED, None, "m"), ("all", events.QUOTA_EXHAUSTED, None, "*")]
    assert gov.reserve("m", clock.now()) is not None      # refused: no request, no event
    assert len(rows(store)) == 2


def test_due_gives_each_subject_its_oldest_undelivered_event_only(store: Store, clock: FakeClock) -> None:
    outbox = Outbox(store.db)
    first, second = running(store, clock), running(store, clock)
    store.finish(first, "w1", TaskStatus.FAILED, clock.now(), error="x")
    store.retry(first, clock.now())
    assert store.claim_next("w1", clock.now(), LEASE) is not None
    store.finish(first, "w1", TaskStatus.COMPLETED, clock.now())
    store.finish(second, "w1", TaskStatus.COMPLETED, clock.now())
    due = outbox.due("all", clock.now())
    assert [(d.task_id, d.event) for d in due] == [(first, events.TASK_FAILED), (second, events.TASK_COMPLETED)]
    outbox.failed(due[0].id, clock.now(), "HTTP 500", clock.now() + timedelta(seconds=10))
    assert [d.task_id for d in outbox.due("all", clock.now())] == [second]   # the first task's next event waits
    assert outbox.next_try("all") == clock.now()
    outbox.delivered(due[1].id, clock.now())
    assert outbox.next_try("all") == clock.now() + timedelta(seconds=10)
    clock.advance(10)
    outbox.delivered(outbox.due("all", clock.now())[0].id, clock.now())
    assert [(d.task_id, d.event) for d in outbox.due("all", clock.now())] == [(first, events.TASK_COMPLETED)]


def test_summary_counts_and_keeps_the_last_error(store: Store, clock: FakeClock) -> None:
    outbox = Outbox(store.db)
    for _ in range(3):
        store.finish(running(store, clock), "w1", TaskStatus.FAILED, clock.now(), error="x")
    a, b, c = outbox.due("failures", clock.now())
    outbox.delivered(a.id, clock.now())
    outbox.failed(b.id, clock.now(), "HTTP 500: no", None)
    clock.advance(5)
    outbox.failed(c.id, clock.now(), "ConnectError: refused", clock.now() + timedelta(seconds=5))
    [view] = outbox.summary(["failures"])
    assert (view["delivered"], view["dead"], view["pending"]) == (1, 1, 1)
    assert (view["last_error"], view["last_error_at"]) == ("ConnectError: refused", clock.now().isoformat())


def test_prune_deletes_the_rows_done_before_the_instant_only(store: Store, clock: FakeClock) -> None:
    outbox = Outbox(store.db)
    for _ in range(3):
        store.finish(running(store, clock), "w1", TaskStatus.FAILED, clock.now(), error="x")
    a, b, c = outbox.due("failures", clock.now())
    outbox.delivered(a.id, clock.now())
    outbox.failed(b.id, clock.now(), "HTTP 500", None)
    clock.advance(60)
    assert outbox.prune("failures", clock.now() - timedelta(seconds=61)) == 0
    assert outbox.prune("failures", clock.now()) == 2
    assert [d.id for d in outbox.due("failures", clock.now())] == [c.id]     # the pending one stays
    assert outbox.summary(["all"])[0]["pending"] == 3                       # another hook's rows too
