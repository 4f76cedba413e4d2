"""The store against a real SQLite file (and PostgreSQL when OHD_TEST_POSTGRES_URL is set)."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import peewee
import pytest
from ohd.core.taskfile import TaskSpec
from ohd.errors import ConfigError, InvalidTransition, NotFound, StorageUnavailable
from ohd.store.store import Store, TaskStatus, Written, open_database

from tests.support.clock import FakeClock
from tests.support.databases import BACKENDS, store_on

LEASE = timedelta(seconds=60)
REPO = "/home/me/project"


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with store_on(request.param, tmp_path) as st:
        yield st


def spec(**fields: Any) -> TaskSpec:
    return TaskSpec.model_validate({"type": "unit_test", "target": "src/app/auth.py", **fields})


def claimed(store: Store, clock: FakeClock, worker: str = "w1") -> int:
    claim = store.claim_next(worker, clock.now(), LEASE)
    assert claim is not None
    return claim.task.id


# -- queue order ------------------------------------------------------------------------

def test_claim_takes_highest_priority_then_oldest(store: Store, clock: FakeClock) -> None:
    low = store.enqueue(REPO, spec(priority="low"), clock.now())
    normal1 = store.enqueue(REPO, spec(), clock.now())
    high = store.enqueue(REPO, spec(priority="high"), clock.now())
    normal2 = store.enqueue(REPO, spec(), clock.now())
    critical = store.enqueue(REPO, spec(priority="critical"), clock.now())
    order = [claimed(store, clock) for _ in range(5)]
    assert order == [critical, high, normal1, normal2, low]
    assert store.claim_next("w1", clock.now(), LEASE) is None


def test_a_claim_leases_the_task_to_the_worker(store: Store, clock: FakeClock) -> None:
    task_id = store.enqueue(REPO, spec(), clock.now(), source="cli")
    claim = store.claim_next("w7", clock.now(), LEASE)
    assert claim is not None
    assert (claim.worker_id, claim.lease_until) == ("w7", clock.now() + LEASE)
    task = store.get_task(task_id)
    assert (task.status, task.lease_owner, task.lease_until, task.started_at) == (
        "running", "w7", clock.now() + LEASE, clock.now())
    assert claim.task == task
    assert [t.id for t in store.running()] == [task_id]


def test_the_task_keeps_what_the_spec_said(store: Store, clock: FakeClock) -> None:
    task = store.get_task(store.enqueue(REPO, spec(
        description="cover login", priority="high", output="tests/test_auth.py", models=["a/b", "c/d"],
        min_quality=0.8, max_attempts=5, timeout_s=30), clock.now(), source="tasks.d/auth.yaml"))
    assert (task.repo, task.type, task.target, task.description, task.priority, task.output) == (
        REPO, "unit_test", "src/app/auth.py", "cover login", "high", "tests/test_auth.py")
    assert (task.models, task.min_quality, task.max_attempts, task.timeout_s, task.source) == (
        ("a/b", "c/d"), 0.8, 5, 30.0, "tasks.d/auth.yaml")
    assert (task.status, task.attempts, task.cancel_requested) == ("queued", 0, False)
    assert json.loads(json.dumps(task.as_dict()))["models"] == ["a/b", "c/d"]
    assert task.as_dict()["created_at"] == "2026-01-01T12:00:00+00:00"


def test_claimers_in_many_threads_never_share_a_task(store: Store, clock: FakeClock) -> None:
    ids = {store.enqueue(REPO, spec(), clock.now()) for _ in range(120)}
    start = threading.Barrier(4)
    taken: list[list[int]] = [[] for _ in range(4)]
    failures: list[Exception] = []

    def claimer(index: int) -> None:
        try:
            start.wait()
            while (claim := store.claim_next(f"w{index}", clock.now(), LEASE)) is not None:
                taken[index].append(claim.task.id)
        except Exception as exc:  # noqa: BLE001 - reported to the test thread below
            failures.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []
    everything = [task_id for batch in taken for task_id in batch]
    assert len(everything) == len(set(everything)) == len(ids)
    assert set(everything) == ids
    assert store.counts()["running"] == 120


def test_a_thread_that_never_connected_can_use_the_store(store: Store, clock: FakeClock) -> None:
    task_id = store.enqueue(REPO, spec(), clock.now())
    seen: list[str] = []
    thread = threading.Thread(target=lambda: seen.append(store.get_task(task_id).status))
    thread.start()
    thread.join(timeout=30)
    assert seen == ["queued"]


# -- leases -------------------------------------------------------------------------------

def test_renew_extends_only_our_own_lease(store: Store, clock: FakeClock) -> None:
    task_id = store.enqueue(REPO, spec(), clock.now())
    claimed(store, clock, "w1")
    clock.advance(30)
    assert store.renew(task_id, "w1", clock.now(), LEASE)
    assert store.get_task(task_id).lease_until == clock.now() + LEASE
    assert not store.renew(task_id, "w2", clock.now(), LEASE)
    assert store.get_task(task_id).lease_owner == "w1"


def test_an_expired_lease_is_reaped_back_to_the_queue(store: Store, clock: FakeClock) -> None:
    task_id = store.enqueue(REPO, spec(), clock.now())
    live = store.enqueue(REPO, spec(), clock.now())
    claimed(store, clock, "w1")
    clock.advance(30)
    claimed(store, clock, "w2")
    clock.advance(31)                       # w1's lease is over, w2's is not
    assert store.reap(clock.now()) == [task_id]
    task = store.get_task(task_id)
    assert (task.status, task.lease_owner, task.lease_until) == ("queued", None, None)
    assert store.get_task(live).status == "running"
    assert not store.renew(task_id, "w1", clock.now(), LEASE)
    assert claimed(store, clock, "w3") == task_id
    assert store.reap(clock.now()) == []


def test_a_lease_that_ends_exactly_now_is_not_reaped(store: Store, clock: FakeClock) -> None:
    store.enqueue(REPO, spec(), clock.now())
    claimed(store, clock)
    clock.advance(LEASE.total_seconds())
    assert store.reap(clock.now()) == []


def test_recover_returns_every_running_lease_at_once_and_counts_a_crash(store: Store, clock: FakeClock) -> None:
    """At start-up under the state dir's lock no other daemon can hold a lease: none is waited for."""
    first = store.enqueue(REPO, spec(), clock.now())
    second = store.enqueue(REPO, spec(), clock.now())
    queued = store.enqueue(REPO, spec(), clock.now())
    claimed(store, clock, "w1")
    claimed(store, clock, "w2")
    cancelled = store.get_task(second)
    store.cancel(cancelled.id, clock.now())
    clock.advance(1)                                   # both leases have 59 s to go
    assert store.recover(clock.now()) == [first, second]
    task = store.get_task(first)
    assert (task.status, task.lease_owner, task.lease_until, task.crashes) == ("queued", None, None, 1)
    assert store.get_task(second).status == "cancelled"
    assert store.get_task(queued).crashes == 0
    assert store.recover(clock.now()) == []


def test_a_task_interrupted_crash_limit_times_is_failed_with_that_reason(store: Store, clock: FakeClock) -> None:
    task_id = store.enqueue(REPO, spec(), clock.now())
    for crash in (1, 2):
        claimed(store, clock)
        assert store.recover(clock.now(), crash_limit=3) == [task_id]
        assert (store.get_task(task_id).status, store.get_task(task_id).crashes) == ("queued", crash)
    claimed(store, clock)
    clock.advance(LEASE.total_seconds() + 1)           # an expired lease counts the same
    assert store.reap(clock.now(), crash_limit=3) == [task_id]
    task = store.get_task(task_id)
    assert (task.status, task.crashes, task.lease_owner, task.finished_at) == ("failed", 3, None, clock.now())
    assert task.error is not None and task.error.startswith("interrupted by 3 daemon crashes while running")
    assert store.retry(task_id, clock.now()).crashes == 0    # `ohd retry` gives it a clean slate


def test_release_returns_a_running_task_to_the_queue(store: Store, clock: FakeClock) -> None:
    task_id = store.enqueue(REPO, spec(), clock.now())
    claimed(store, clock, "w1")
    store.release(task_id, "w2", clock.now())           # not w2's: ignored
    assert store.get_task(task_id).status == "running"
    store.release(task_id, "w1", clock.now())
    task = store.get_task(task_id)
    assert (task.status, task.lease_owner) == ("queued", None)


def test_defer_parks_the_task_until_promote_due(store: Store, clock: FakeClock) -> None:
    task_id = store.enqueue(REPO, spec(), clock.now())
    claimed(store, clock, "w1")
    resume = clock.now() + timedelta(minutes=5)
    store.defer(task_id, "w1", resume, clock.now(), "every model is cooling down")
    task = store.get_task(task_id)
    assert (task.status, task.not_before, task.error, task.lease_owner) == (
        "pending", resume, "every model is cooling down", None)
    assert store.claim_next("w1", clock.now(), LEASE) is None
    clock.advance(299)
    assert store.promote_due(clock.now()) == 0
    clock.advance(1)
    assert store.promote_due(clock.now()) == 1
    assert claimed(store, clock) == task_id


def test_finish_records_the_outcome_and_clears_the_lease(store: Store, clock: FakeClock) -> None:
    task_id = store.enqueue(REPO, spec(), clock.now())
    claimed(store, clock, "w1")
    clock.advance(3)
    store.finish(task_id, "w2", TaskStatus.COMPLETED, clock.now())     # not w2's: ignored
    assert store.get_task(task_id).status == "running"
    store.finish(task_id, "w1", TaskStatus.COMPLETED, clock.now(), output_path="tests/test_auth.py",
                 report_path="src/app/.ohd/auth.py.unit_test.md")
    task = store.get_task(task_id)
    assert (task.status, task.output_path, task.report_path, task.finished_at, task.lease_owner) == (
        "completed", "tests/test_auth.py", "src/app/.ohd/auth.py.unit_test.md", clock.now(), None)
    with pytest.raises(ValueError):
        store.finish(task_id, None, TaskStatus.QUEUED, clock.now())


def test_add_attempt_counts_up(store: Store, clock: FakeClock) -> None:
    task_id = store.enqueue(REPO, spec(), clock.now())
    assert [store.add_attempt(task_id, clock.now()) for _ in range(3)] == [1, 2, 3]
    assert store.get_task(task_id).attempts == 3


# -- cancel and retry ---------------------------------------------------------------------

def test_cancel_a_queued_task_at_once(store: Store, clock: FakeClock) -> None:
    task_id = store.enqueue(REPO, spec(), clock.now())
    task = store.cancel(task_id, clock.now())
    assert (task.status, task.finished_at) == ("cancelled", clock.now())
    assert store.claim_next("w1", clock.now(), LEASE) is None


def test_cancel_a_running_task_asks_its_worker_to_stop(store: Store, clock: FakeClock) -> None:
    task_id = store.enqueue(REPO, spec(), clock.now())
    claimed(store, clock, "w1")
    task = store.cancel(task_id, clock.now())
    assert (task.status, task.cancel_requested) == ("running", True)
    assert not store.renew(task_id, "w1", clock.now(), LEASE)        # the worker learns of it
    store.release(task_id, "w1", clock.now())                       # a stop does not requeue it
    assert store.get_task(task_id).status == "cancelled"


def test_a_reaped_task_that_was_cancelled_stays_cancelled(store: Store, clock: FakeClock) -> None:
    task_id = store.enqueue(REPO, spec(), clock.now())
    claimed(store, clock, "w1")
    store.cancel(task_id, clock.now())
    clock.advance(61)
    assert store.reap(clock.now()) == [task_id]
    assert store.get_task(task_id).status == "cancelled"


@pytest.mark.parametrize("final", [TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED])
def test_cancel_a_finished_task_is_an_invalid_transition(store: Store, clock: FakeClock,
                                                          final: TaskStatus) -> None:
    task_id = store.enqueue(REPO, spec(), clock.now())
    store.finish(task_id, None, final, clock.now())
    with pytest.raises(InvalidTransition) as caught:
        store.cancel(task_id, clock.now())
    assert (caught.value.task_id, caught.value.status, caught.value.action) == (task_id, final.value, "cancel")


def test_retry_requeues_a_failed_task_with_a_clean_slate(store: Store, clock: FakeClock) -> None:
    task_id = store.enqueue(REPO, spec(), clock.now())
    claimed(store, clock, "w1")
    store.add_attempt(task_id, clock.now())
    store.finish(task_id, "w1", TaskStatus.FAILED, clock.now(), error="every model failed")
    task = store.retry(task_id, clock.now())
    assert (task.status, task.attempts, task.error, task.cancel_requested, task.finished_at) == (
        "queued", 0, None, False, None)
    assert claimed(store, clock) == task_id


def test_retry_of_a_pending_task_queues_it_now_to_decide_again(store: Store, clock: FakeClock) -> None:
    task_id = store.enqueue(REPO, spec(), clock.now())
    claimed(store, clock, "w1")
    store.add_attempt(task_id, clock.now())
    store.defer(task_id, "w1", clock.now() + timedelta(hours=11), clock.now(), "free_rpd spent; until midnight")
    task = store.retry(task_id, clock.now())
    assert (task.status, task.not_before, task.error, task.attempts) == ("queued", None, None, 1)
    assert claimed(store, clock) == task_id


def test_last_wait_is_the_latest_not_before_of_a_pending_task(store: Store, clock: FakeClock) -> None:
    assert store.last_wait() is None
    ids = [store.enqueue(REPO, spec(), clock.now()) for _ in range(2)]
    for task_id, hours in zip(ids, (11, 2), strict=True):
        claimed(store, clock, "w1")
        store.defer(task_id, "w1", clock.now() + timedelta(hours=hours), clock.now(), "waiting")
    assert store.last_wait() == clock.now() + timedelta(hours=11)


@pytest.mark.parametrize("state", ["queued", "running", "completed"])
def test_retry_anything_but_failed_or_cancelled_is_invalid(store: Store, clock: FakeClock, state: str) -> None:
    task_id = store.enqueue(REPO, spec(), clock.now())
    if state != "queued":
        claimed(store, clock)
    if state == "completed":
        store.finish(task_id, None, TaskStatus.COMPLETED, clock.now())
    with pytest.raises(InvalidTransition):
        store.retry(task_id, clock.now())


def test_unknown_task_ids_are_not_found(store: Store, clock: FakeClock) -> None:
    for call in (lambda: store.get_task(999), lambda: store.cancel(999, clock.now()),
                 lambda: store.retry(999, clock.now())):
        with pytest.raises(NotFound):
            call()


# -- ingest, exactly once -------------------------------------------------------------------

def test_ingesting_the_same_pending_content_twice_is_one_task(store: Store, clock: FakeClock) -> None:
    first = store.ingest_file(REPO, "tasks.d/auth.yaml", "ab" * 32, spec(), clock.now())
    again = store.ingest_file(REPO, "tasks.d/auth.yaml", "ab" * 32, spec(), clock.now())
    assert again == first
    assert [t.id for t in store.list_tasks()] == [first]
    assert store.get_task(first).source == "tasks.d/auth.yaml"
    assert store.pending_ingest(REPO, "ab" * 32) == first
    assert store.pending_ingest("/other/repo", "ab" * 32) is None


def test_after_the_move_the_same_content_is_a_new_task(store: Store, clock: FakeClock) -> None:
    first = store.ingest_file(REPO, "tasks.d/auth.yaml", "ab" * 32, spec(), clock.now())
    store.mark_moved(REPO, "ab" * 32)
    assert store.pending_ingest(REPO, "ab" * 32) is None
    second = store.ingest_file(REPO, "tasks.d/auth.yaml", "ab" * 32, spec(), clock.now())
    assert second != first
    assert store.pending_ingest(REPO, "ab" * 32) == second
    assert len(store.list_tasks()) == 2


def test_a_fault_inside_ingest_leaves_no_half_row(store: Store, clock: FakeClock) -> None:
    """The task insert fails after the ingested_file row: the transaction takes both back."""
    db = store.db
    db.execute_sql("ALTER TABLE task RENAME TO task_gone")
    try:
        with pytest.raises(peewee.DatabaseError):
            store.ingest_file(REPO, "tasks.d/auth.yaml", "cd" * 32, spec(), clock.now())
    finally:
        db.execute_sql("ALTER TABLE task_gone RENAME TO task")
    assert db.execute_sql("SELECT COUNT(*) FROM ingested_file").fetchone()[0] == 0
    assert store.pending_ingest(REPO, "cd" * 32) is None
    task_id = store.ingest_file(REPO, "tasks.d/auth.yaml", "cd" * 32, spec(), clock.now())
    assert store.pending_ingest(REPO, "cd" * 32) == task_id


# -- reading ---------------------------------------------------------------------------------

def test_counts_name_every_status(store: Store, clock: FakeClock) -> None:
    assert store.counts() == {s.value: 0 for s in TaskStatus}
    ids = [store.enqueue(REPO, spec(), clock.now()) for _ in range(4)]
    claimed(store, clock)
    store.cancel(ids[3], clock.now())
    assert store.counts() == {"pending": 0, "queued": 2, "running": 1, "completed": 0, "failed": 0,
                              "cancelled": 1}


def test_list_tasks_newest_first_with_a_status_filter(store: Store, clock: FakeClock) -> None:
    ids = [store.enqueue(REPO, spec(), clock.now()) for _ in range(3)]
    store.cancel(ids[1], clock.now())
    assert [t.id for t in store.list_tasks()] == ids[::-1]
    assert [t.id for t in store.list_tasks(status="queued")] == [ids[2], ids[0]]
    assert [t.id for t in store.list_tasks(limit=1)] == [ids[2]]


def test_executions_are_recorded_with_derived_latency(store: Store, clock: FakeClock) -> None:
    task_id = store.enqueue(REPO, spec(), clock.now())
    started = clock.now()
    clock.advance(1.25)
    store.record_execution(task_id, 1, "a/b", started, clock.now(), 100, 50, None, "rate_limited",
                           "rate_limited", "a/b: rate_limited")
    store.record_execution(task_id, 1, "c/d", clock.now(), clock.now() + timedelta(seconds=2), 120, 80,
                           0.0012, "accepted")
    first, second = store.executions(task_id)
    assert (first.model, first.latency_ms, first.outcome, first.error_class, first.cost) == (
        "a/b", 1250, "rate_limited", "rate_limited", None)
    assert (second.model, second.latency_ms, second.prompt_tokens, second.completion_tokens, second.cost) == (
        "c/d", 2000, 120, 80, 0.0012)
    assert first.started_at == started and first.started_at.tzinfo == UTC
    assert json.loads(json.dumps(second.as_dict()))["task_id"] == task_id
    assert store.executions(task_id + 1) == []


def test_totals_today_count_since_utc_midnight(store: Store, clock: FakeClock) -> None:
    task_id = store.enqueue(REPO, spec(), clock.now())
    yesterday = clock.now() - timedelta(days=1)
    store.record_execution(task_id, 1, "a", yesterday, yesterday, 1000, 1000, 1.0, "accepted")
    store.record_execution(task_id, 1, "a", clock.now(), clock.now(), 10, 20, 0.5, "accepted")
    store.record_execution(task_id, 2, "b", clock.now(), clock.now(), 1, 2, None, "error")
    store.record_execution(task_id, 3, "a", clock.now(), clock.now(), 0, 0, 0.0, "accepted", cached=True)
    assert store.totals_today(clock.now()) == {"calls": 2, "prompt_tokens": 11, "completion_tokens": 22,
                                               "cost": 0.5, "saved": 1}   # a replay is no call


def test_written_hash_is_the_last_thing_ohd_wrote(store: Store, clock: FakeClock) -> None:
    task_id = store.enqueue(REPO, spec(), clock.now())
    assert store.written_hash(REPO, "tests/test_auth.py") is None
    store.record_written(REPO, "tests/test_auth.py", "11" * 32, task_id, clock.now())
    store.record_written(REPO, "tests/test_auth.py", "22" * 32, task_id, clock.now())
    assert store.written_hash(REPO, "tests/test_auth.py") == "22" * 32
    assert store.written_hash("/another/repo", "tests/test_auth.py") is None


def test_a_recorded_write_keeps_what_it_replaces_until_its_task_finishes(store: Store, clock: FakeClock) -> None:
    first, second = (store.enqueue(REPO, spec(), clock.now()) for _ in range(2))
    assert store.written(REPO, "t.py") is None
    store.record_written(REPO, "t.py", "11" * 32, first, clock.now(), replacing="")
    assert store.written(REPO, "t.py") == Written("11" * 32, "", first)
    store.finish(first, None, TaskStatus.COMPLETED, clock.now())
    done = store.written(REPO, "t.py")
    assert done == Written("11" * 32, None, first) and not done.landing
    store.record_written(REPO, "t.py", "22" * 32, second, clock.now(), replacing="11" * 32)
    during = store.written(REPO, "t.py")
    assert during is not None and during.landing and during.holds("11" * 32) and during.holds("22" * 32)
    store.finish(first, None, TaskStatus.COMPLETED, clock.now())    # another task (and done): no change
    assert store.written(REPO, "t.py") == during
    store.finish(second, None, TaskStatus.COMPLETED, clock.now())
    after = store.written(REPO, "t.py")
    assert after is not None and not after.holds("11" * 32) and after.holds("22" * 32)


def test_datetimes_come_back_aware_utc(store: Store) -> None:
    paris = timezone(timedelta(hours=1))
    local_noon = datetime(2026, 3, 1, 13, 0, 0, 123456, tzinfo=paris)
    task = store.get_task(store.enqueue(REPO, spec(), local_noon))
    assert task.created_at == local_noon
    assert task.created_at.tzinfo == UTC and task.created_at.hour == 12
    with pytest.raises(ValueError):
        store.enqueue(REPO, spec(), datetime(2026, 3, 1, 12, 0))


# -- opening ---------------------------------------------------------------------------------

def test_sqlite_url_opens_a_wal_database_and_creates_its_directory(tmp_path: Path) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'deep' / 'dir' / 'ohd.db'}")
    db.connect()
    assert db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute_sql("PRAGMA busy_timeout").fetchone()[0] == 5000
    assert db.execute_sql("PRAGMA foreign_keys").fetchone()[0] == 1
    db.close()
    assert (tmp_path / "deep" / "dir" / "ohd.db").is_file()


def test_postgresql_url_gives_a_postgres_database() -> None:
    db = open_database("postgresql://ohd:s%40cret@db.example:5433/ohd?sslmode=require")
    assert isinstance(db, peewee.PostgresqlDatabase)
    assert db.database == "ohd"
    assert db.connect_params == {"user": "ohd", "password": "s@cret", "host": "db.example", "port": 5433,
                                 "sslmode": "require", "connect_timeout": "10"}   # a cut-off server fails in 10 s
    assert open_database("postgresql://db.example/ohd?connect_timeout=3").connect_params["connect_timeout"] == "3"


def test_an_unknown_url_scheme_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        open_database("mysql://localhost/ohd")


# -- a full store (SQLite's max_page_count: a real SQLITE_FULL, without a small disk) ----------


def _full(store: Store) -> int:
    """Cap the database at its current size (this thread's connection); returns the old cap."""
    store.db.connect(reuse_if_open=True)
    cap = int(store.db.execute_sql("PRAGMA max_page_count").fetchone()[0])
    pages = int(store.db.execute_sql("PRAGMA page_count").fetchone()[0])
    store.db.execute_sql(f"PRAGMA max_page_count = {pages}")
    return cap


def test_a_full_store_raises_storage_unavailable_keeps_its_rows_and_writes_again_once_there_is_room(
        tmp_path: Path, clock: FakeClock) -> None:
    """Before: peewee's OperationalError 'database or disk is full' (or, from the transaction's
    rollback that SQLite had already done, 'cannot rollback - no transaction is active')."""

    store = Store(open_database(f"sqlite:///{tmp_path / 'ohd.db'}"))
    store.migrate()
    first = store.enqueue("/repo", spec(), clock.now())
    cap = _full(store)
    long = spec(description="x" * 19_000)       # needs pages the cap does not allow
    with pytest.raises(StorageUnavailable) as full:
        store.enqueue("/repo", long, clock.now())
    assert full.value.reason == StorageUnavailable.FULL and str(tmp_path / "ohd.db") in str(full.value)
    assert store.trouble is not None and store.trouble.reason == StorageUnavailable.FULL
    assert [t.id for t in store.list_tasks()] == [first]       # reads go on; nothing half-written
    store.get_task(first)
    store.db.execute_sql(f"PRAGMA max_page_count = {cap}")
    second = store.enqueue("/repo", long, clock.now())
    assert store.trouble is None
    assert [t.id for t in store.list_tasks()] == [second, first]
    assert store.db.execute_sql("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_read_only_transaction_on_a_full_store_does_not_say_it_can_be_written_again(
        tmp_path: Path, clock: FakeClock) -> None:
    from ohd.errors import StorageUnavailable

    store = Store(open_database(f"sqlite:///{tmp_path / 'ohd.db'}"))
    store.migrate()
    _full(store)
    with pytest.raises(StorageUnavailable):
        store.enqueue("/repo", spec(description="x" * 19_000), clock.now())
    assert store.reap(clock.now()) == []       # BEGIN IMMEDIATE ... COMMIT, nothing changed
    assert store.trouble is not None


def test_the_reason_is_found_anywhere_in_the_chain() -> None:
    from ohd.errors import StorageUnavailable, unwritable_reason

    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise peewee.OperationalError("cannot rollback - no transaction is active")
    except peewee.OperationalError as exc:
        assert unwritable_reason(exc) == StorageUnavailable.FULL
    assert unwritable_reason(OSError(30, "Read-only file system")) == StorageUnavailable.READ_ONLY
    assert unwritable_reason(ValueError("no")) is None


@pytest.fixture
def writer_elsewhere(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """Another process's connection to the store's SQLite file (a busy daemon, a user's `sqlite3`)."""
    other = sqlite3.connect(tmp_path / "ohd.db", isolation_level=None, check_same_thread=False)
    yield other
    other.close()


def busy_store(tmp_path: Path, **options: Any) -> Store:
    st = Store(open_database(f"sqlite:///{tmp_path / 'ohd.db'}", busy_timeout_s=0.05), **options)
    st.migrate()
    return st


def test_a_write_waits_for_a_writer_that_holds_the_lock_past_busy_timeout(
        tmp_path: Path, clock: FakeClock, writer_elsewhere: sqlite3.Connection) -> None:
    """SQLite's busy_timeout is one attempt: the store begins again (tenacity) instead of raising
    "database is locked" to a worker, to the socket API or to a CLI command."""
    st = busy_store(tmp_path)
    writer_elsewhere.execute("BEGIN IMMEDIATE")
    release = threading.Timer(1.0, writer_elsewhere.execute, ("ROLLBACK",))   # 20 busy timeouts later
    release.start()
    try:
        task_id = st.enqueue(REPO, spec(), clock.now())
    finally:
        release.join()
    assert st.get_task(task_id).status == TaskStatus.QUEUED


def test_a_writer_lock_held_past_the_wait_is_a_clear_storage_error(
        tmp_path: Path, clock: FakeClock, writer_elsewhere: sqlite3.Connection) -> None:
    st = busy_store(tmp_path, lock_wait_s=0.3)
    writer_elsewhere.execute("BEGIN IMMEDIATE")        # held until the end of the test
    with pytest.raises(StorageUnavailable) as caught:
        st.enqueue(REPO, spec(), clock.now())
    assert caught.value.locked and str(tmp_path / "ohd.db") in str(caught.value)
    writer_elsewhere.execute("ROLLBACK")
    assert st.list_tasks() == []
