"""The fleet's rows (`store/fleet.py`) and the leases of lost daemons (`Store.return_leases`), on each backend."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from ohd.core.taskfile import TaskSpec
from ohd.store.fleet import Fleet, daemon_of, new_daemon_id, worker_prefix
from ohd.store.store import Store, TaskStatus

from tests.support.clock import FakeClock
from tests.support.databases import BACKENDS, store_on

LEASE = timedelta(seconds=60)
LOST = timedelta(seconds=30)


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with store_on(request.param, tmp_path) as migrated:
        yield migrated


def spec() -> TaskSpec:
    return TaskSpec.model_validate({"type": "review", "target": "a.py"})


def register(fleet: Fleet, daemon_id: str, clock: FakeClock, *, host: str = "h1", state_dir: str = "/s1") -> None:
    fleet.register(daemon_id, host=host, pid=1, version="0.test", state_dir=state_dir, repos=["/r"], workers=2,
                   now=clock.now())


def states(fleet: Fleet, clock: FakeClock) -> dict[str, str]:
    return {info.id: info.state for info in fleet.daemons(clock.now(), LOST)}


def test_a_daemon_is_alive_while_it_heartbeats_lost_after_the_limit_and_stopped_after_a_clean_stop(
        store: Store, clock: FakeClock) -> None:
    fleet = Fleet(store.db)
    register(fleet, "a", clock)
    register(fleet, "b", clock, host="h2")
    clock.advance(20)
    assert fleet.heartbeat("a", clock.now(), workers=3)
    assert states(fleet, clock) == {"a": "alive", "b": "alive"}
    clock.advance(15)             # b silent for 35 s, a for 15 s
    assert states(fleet, clock) == {"a": "alive", "b": "lost"}
    fleet.deregister("a", clock.now())
    [a, b] = fleet.daemons(clock.now(), LOST)
    assert (a.state, a.workers, a.repos, a.stopped_at) == ("stopped", 3, ("/r",), clock.now())
    assert (b.host, b.heartbeat_age_s) == ("h2", 35.0)
    assert not fleet.heartbeat("a", clock.now(), workers=3)    # a stopped daemon's row stays stopped


def test_a_later_start_on_the_same_host_and_state_dir_makes_the_earlier_one_lost_at_once(
        store: Store, clock: FakeClock) -> None:
    """Its state dir's lock is held by the later one, so the earlier one is dead, whatever its heartbeat."""
    fleet = Fleet(store.db)
    register(fleet, "old", clock)
    register(fleet, "other-dir", clock, state_dir="/s2")
    clock.advance(1)
    register(fleet, "new", clock)
    assert states(fleet, clock) == {"old": "lost", "other-dir": "alive", "new": "alive"}


def test_rows_silent_for_a_day_are_dropped_at_a_registration(store: Store, clock: FakeClock) -> None:
    fleet = Fleet(store.db)
    register(fleet, "ancient", clock)
    clock.advance(timedelta(days=1, seconds=1).total_seconds())
    register(fleet, "now", clock, host="h2")
    assert states(fleet, clock) == {"now": "alive"}


def test_the_leases_of_a_lost_daemon_return_at_once_and_those_of_a_live_one_stay(
        store: Store, clock: FakeClock) -> None:
    fleet = Fleet(store.db)
    lost, alive = "h1-1", "h1-10"      # the lost one's id begins the live one's: its owners are not matched
    register(fleet, lost, clock, state_dir="/s1")
    register(fleet, alive, clock, state_dir="/s2")
    ids = [store.enqueue("/r", spec(), clock.now()) for _ in range(3)]
    for owner in (worker_prefix(lost) + "0", worker_prefix(lost) + "1", worker_prefix(alive) + "0"):
        assert store.claim_next(owner, clock.now(), LEASE) is not None
    assert {info.id: info.running for info in fleet.daemons(clock.now(), LOST)} == {lost: 2, alive: 1}
    assert fleet.gone(clock.now(), LOST) == []
    clock.advance(31)
    fleet.heartbeat(alive, clock.now(), workers=2)
    gone = fleet.gone(clock.now(), LOST)
    assert gone == [lost]
    assert store.return_leases(gone, clock.now()) == ids[:2]       # 29 s before their leases expire
    assert [store.get_task(i).status for i in ids] == ["queued", "queued", "running"]
    assert [store.get_task(i).crashes for i in ids] == [1, 1, 0]
    assert store.return_leases(gone, clock.now()) == []
    assert fleet.gone(clock.now(), LOST) == []                     # lost, but holds nothing any more
    assert daemon_of(store.get_task(ids[2]).lease_owner) == alive


def test_each_start_gets_a_fresh_id_naming_its_host_and_pid() -> None:
    first, second = new_daemon_id("box", 42), new_daemon_id("box", 42)
    assert first.startswith("box-42-") and len(first) == len("box-42-") + 8 and first != second
    assert daemon_of(worker_prefix(first) + "3") == first and daemon_of("w0") is None


def test_the_leases_of_a_cleanly_stopped_daemon_are_returned_too(store: Store, clock: FakeClock) -> None:
    """A stop that could not release a task (its store write was refused) leaves nothing held for a lease period."""
    fleet = Fleet(store.db)
    register(fleet, "a", clock)
    task_id = store.enqueue("/r", spec(), clock.now())
    store.claim_next(worker_prefix("a") + "0", clock.now(), LEASE)
    fleet.deregister("a", clock.now())
    assert store.return_leases(fleet.gone(clock.now(), LOST), clock.now()) == [task_id]
    assert store.get_task(task_id).status == TaskStatus.QUEUED


def test_a_worker_of_another_daemon_cannot_renew_or_finish_a_lease(store: Store, clock: FakeClock) -> None:
    """Lease owners name their daemon: the `w0` of daemon b is not the `w0` of daemon a."""
    a, b = worker_prefix("a") + "0", worker_prefix("b") + "0"
    task_id = store.enqueue("/r", spec(), clock.now())
    store.claim_next(a, clock.now(), LEASE)
    assert not store.renew(task_id, b, clock.now(), LEASE)
    assert not store.finish(task_id, b, TaskStatus.COMPLETED, clock.now())
    assert store.renew(task_id, a, clock.now(), LEASE)
    assert store.finish(task_id, a, TaskStatus.COMPLETED, clock.now())
