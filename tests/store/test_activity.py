"""History.activity: the dashboard's charts' data, from a real store (SQLite, and PostgreSQL when
configured) holding tasks and executions at injected times."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tests.support.databases import BACKENDS, store_on

from ohd.core.taskfile import TaskSpec
from ohd.store.history import History, HourCount, ModelActivity
from ohd.store.ledger import KeptHistory
from ohd.store.store import Store, TaskStatus

REPO = "/home/me/project"
NOW = datetime(2026, 12, 7, 15, 40, 12, tzinfo=UTC)
HOUR = timedelta(hours=1)


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with store_on(request.param, tmp_path) as st:
        yield st


def finished(store: Store, at: datetime, status: TaskStatus = TaskStatus.COMPLETED) -> int:
    task_id = store.enqueue(REPO, TaskSpec.model_validate({"type": "unit_test", "target": "app.py"}),
                            at - timedelta(minutes=5))
    store.finish(task_id, None, status, at)
    return task_id


def call(store: Store, task_id: int, model: str, at: datetime, outcome: str, cost: float | None = None,
         tokens: tuple[int, int] = (100, 20)) -> None:
    store.record_execution(task_id, 1, model, at, at + timedelta(seconds=2), *tokens, cost, outcome)


def test_tasks_are_counted_in_the_clock_hour_they_finished(store: Store) -> None:
    this_hour = NOW.replace(minute=0, second=0, microsecond=0)
    finished(store, this_hour)                                         # the current hour's first instant
    finished(store, NOW)
    finished(store, this_hour - timedelta(microseconds=1))             # the hour before, its last instant
    finished(store, this_hour - 2 * HOUR + timedelta(minutes=30), TaskStatus.FAILED)
    finished(store, this_hour - 3 * HOUR)                              # the first hour of a 4-hour window
    finished(store, this_hour - 3 * HOUR - timedelta(seconds=1))       # before it: not counted
    finished(store, this_hour - HOUR, TaskStatus.CANCELLED)            # neither completed nor failed
    store.enqueue(REPO, TaskSpec.model_validate({"type": "unit_test", "target": "app.py"}), NOW)   # not finished
    activity = History(store.db, store.m).activity(NOW, 4)
    assert activity.since == this_hour - 3 * HOUR and activity.until == NOW
    assert activity.hours == (HourCount(this_hour - 3 * HOUR, 1, 0), HourCount(this_hour - 2 * HOUR, 0, 1),
                              HourCount(this_hour - HOUR, 1, 0), HourCount(this_hour, 2, 0))


def test_an_empty_store_has_every_hour_at_zero_and_no_models(store: Store) -> None:
    activity = History(store.db, store.m).activity(NOW, 24)
    assert len(activity.hours) == 24 and {(h.completed, h.failed) for h in activity.hours} == {(0, 0)}
    assert [h.start for h in activity.hours] == [activity.since + n * HOUR for n in range(24)]
    assert activity.models == ()


def test_each_models_calls_since_the_window_began_are_summed(store: Store) -> None:
    task = finished(store, NOW)
    since = NOW.replace(minute=0, second=0, microsecond=0) - HOUR          # a 2-hour window
    call(store, task, "b/model:free", since, "accepted", 0.25, (1000, 200))
    call(store, task, "b/model:free", NOW, "rejected", 0.5, (10, 2))
    call(store, task, "b/model:free", NOW, "rate_limited", None, (0, 0))
    call(store, task, "b/model:free", NOW, "malformed", None, (5, 5))
    call(store, task, "a/model:free", NOW - timedelta(minutes=1), "accepted")
    call(store, task, "a/model:free", since - timedelta(seconds=1), "accepted", 9.0)   # before the window
    activity = History(store.db, store.m).activity(NOW, 2)
    assert activity.models == (ModelActivity("a/model:free", 1, 0, 0, 100, 20, 0.0),
                               ModelActivity("b/model:free", 1, 1, 2, 1015, 207, 0.75))
    data = activity.as_dict()
    assert data["models"][1] == {"model": "b/model:free", "calls": 4, "accepted": 1, "rejected": 1, "other": 2,
                                 "prompt_tokens": 1015, "completion_tokens": 207, "cost": 0.75}
    assert data["hours"][1] == {"start": "2026-12-07T15:00:00+00:00", "completed": 1, "failed": 0}


# -- KeptHistory: the whole-history sums kept up to date, the same answers as reading them -----


def same_as_read(store: Store, kept: KeptHistory) -> None:
    read = History(store.db, store.m)
    assert [(u.model, u.task_type, u.outcome, u.calls, u.prompt_tokens, u.completion_tokens, round(u.cost, 10))
            for u in kept.usage()] == \
        [(u.model, u.task_type, u.outcome, u.calls, u.prompt_tokens, u.completion_tokens, round(u.cost, 10))
         for u in read.usage()]
    assert kept.latencies() == read.latencies()
    assert kept.efficiency() == read.efficiency()


def test_kept_sums_follow_every_new_execution(store: Store) -> None:
    kept = KeptHistory(store.db, store.m)
    same_as_read(store, kept)                                    # empty
    task = finished(store, NOW)
    review = store.enqueue(REPO, TaskSpec.model_validate({"type": "review", "target": "app.py"}), NOW)
    for n in range(7):
        call(store, task, f"m/{n % 2}", NOW, ("accepted", "rejected", "rate_limited")[n % 3], 0.001 * n, (n, 2 * n))
        store.record_execution(task, 1, "m/0", NOW, NOW + timedelta(milliseconds=100 * (7 - n)), 1, 1, None,
                               "accepted")
    same_as_read(store, kept)
    call(store, review, "m/1", NOW, "accepted", 0.5)              # a new task type
    call(store, task, "m/2", NOW, "error")                        # no answer: no latency
    store.record_execution(task, 1, "m/0", NOW, NOW, 5, 5, 0.5, "accepted", cached=True)   # a replay: not counted
    same_as_read(store, kept)
    assert kept.latencies()[("m/0", "unit_test")] == sorted(kept.latencies()[("m/0", "unit_test")])


def test_an_execution_committed_late_with_a_lower_id_is_counted(store: Store) -> None:
    """Several daemons on PostgreSQL: a lower id may commit after a higher one was read."""
    kept = KeptHistory(store.db, store.m)
    task = finished(store, NOW)
    for _ in range(3):
        call(store, task, "m/a", NOW, "accepted")
    store.m.execution.delete().where(store.m.execution.id == 2).execute()   # id 2 "not committed yet"
    same_as_read(store, kept)
    row = {"task_id": task, "attempt": 1, "model": "m/late", "started_at": NOW, "finished_at": NOW,
           "latency_ms": 5, "prompt_tokens": 1, "completion_tokens": 1, "cost": None, "outcome": "accepted"}
    store.m.execution.insert(id=2, **row).execute()                            # now it commits
    same_as_read(store, kept)
    assert ("m/late", "unit_test") in kept.latencies()


def test_kept_activity_is_read_again_when_a_task_ends_or_a_call_is_recorded(store: Store) -> None:
    kept, read = KeptHistory(store.db, store.m), History(store.db, store.m)
    assert kept.activity(NOW, 3) == read.activity(NOW, 3)
    task = finished(store, NOW - HOUR, TaskStatus.FAILED)
    assert kept.activity(NOW, 3) == read.activity(NOW, 3)            # a task failed
    store.retry(task, NOW)
    assert kept.activity(NOW, 3) == read.activity(NOW, 3)            # ... and queued again
    store.finish(task, None, TaskStatus.COMPLETED, NOW)
    assert kept.activity(NOW, 3) == read.activity(NOW, 3)            # ... and completed in another hour
    call(store, task, "m/a", NOW, "accepted")
    assert kept.activity(NOW, 3) == read.activity(NOW, 3)            # a call
    later = NOW + 2 * HOUR
    assert kept.activity(later, 3) == read.activity(later, 3)        # the window moved on
    assert kept.activity(later, 3).until == later


def test_quarantined_completions_are_counted_from_the_error_prefix(store: Store) -> None:
    """Store.quarantined_count reads migration 0015's expression index; the answer is the prefix test's."""
    spec = TaskSpec.model_validate({"type": "unit_test", "target": "app.py"})
    for status, error in ((TaskStatus.COMPLETED, "quarantined: 2 tests fail against the code " + "x" * 5000),
                          (TaskStatus.COMPLETED, "Quarantined: as LIKE matched it, whatever the case"),
                          (TaskStatus.COMPLETED, None), (TaskStatus.COMPLETED, "quarantine"),
                          (TaskStatus.FAILED, "quarantined: a failed task is not counted")):
        store.finish(store.enqueue(REPO, spec, NOW), None, status, NOW, error=error)
    assert store.quarantined_count() == 2
