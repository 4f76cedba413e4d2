"""Repo identity (issue 15, point 2): two clones of one repo at different paths on one store.

Real git repos (an origin and two clones of it), a real SQLite file and the real PostgreSQL (a schema
per test); each "daemon" is a `Store` of its own on the shared database that adopted its clones.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from ohd.config import Settings
from ohd.core.taskfile import TaskSpec
from ohd.intake.ingest import Ingestor
from ohd.intake.rules import RuleBook
from ohd.repo.gitrepo import repo_identity
from ohd.service.assemble import identities_of
from ohd.store import schema
from ohd.store.rulestore import RuleStore
from ohd.store.store import Store, open_database

from tests.support.clock import FakeClock
from tests.support.databases import BACKENDS, database_url
from tests.support.gitrepo import git, make_repo

LEASE = timedelta(seconds=60)
SETTLE = 0.05


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "origin")


def clone(origin: Path, dest: Path) -> Path:
    git(origin.parent, "clone", "-q", str(origin), str(dest))
    (dest / "tasks.d").mkdir()      # git keeps no empty folder
    return dest.resolve()


@pytest.fixture
def clones(origin: Path, tmp_path: Path) -> tuple[Path, Path]:
    return clone(origin, tmp_path / "machine-a" / "work" / "shop"), clone(origin, tmp_path / "machine-b" / "shop")


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database_url(request.param, tmp_path) as database:
        schema.migrate(open_database(database))
        yield database


def daemon_store(url: str, *repos: Path) -> Store:
    """A daemon's store: its own connection to the shared database, serving `repos`."""
    store = Store(open_database(url))
    store.adopt_clones({str(repo): repo_identity(repo) for repo in repos})
    return store


def spec(**fields: object) -> TaskSpec:
    return TaskSpec.model_validate({"type": "review", "target": "shop/pricing.py", **fields})


# -- the identity ---------------------------------------------------------------------------

def test_two_clones_of_one_repo_have_one_identity_and_other_repos_their_own(
        origin: Path, clones: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = clones
    root = git(origin, "rev-list", "--max-parents=0", "HEAD").strip()
    assert repo_identity(a) == repo_identity(b) == f"git:{root}@{origin}"
    assert repo_identity(a, "shop") == "name:shop"
    other = make_repo(tmp_path / "other")      # no origin: its path (its only copy)
    assert repo_identity(other) == str(other)
    assert repo_identity(tmp_path / "not-a-repo") == str(tmp_path / "not-a-repo")


def test_a_repo_named_in_the_configuration_has_that_name_as_its_identity(
        clones: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = clones
    monkeypatch.chdir(a.parent)
    settings = Settings(repos=[a, b], repo_names={"shop": "shop"})     # relative to the current directory
    assert identities_of(settings, [a, b]) == {str(a): "name:shop", str(b): repo_identity(b)}
    with pytest.raises(ValueError, match="not empty"):
        Settings(repo_names={str(a): " "})


# -- claims ---------------------------------------------------------------------------------

def test_a_daemon_never_claims_a_task_of_a_repo_it_has_no_clone_of(
        url: str, clones: tuple[Path, Path], tmp_path: Path, clock: FakeClock) -> None:
    a, _ = clones
    other = make_repo(tmp_path / "elsewhere" / "other")
    theirs = daemon_store(url, other)
    foreign = theirs.enqueue(str(other), spec(), clock.now())
    ours = daemon_store(url, a)
    assert ours.claim_next("d1/w0", clock.now(), LEASE) is None
    mine = ours.enqueue(str(a), spec(), clock.now())
    claim = ours.claim_next("d1/w0", clock.now(), LEASE)
    assert claim is not None and claim.task.id == mine
    assert ours.claim_next("d1/w0", clock.now(), LEASE) is None
    assert ours.get_task(foreign).status == "queued"
    their_claim = theirs.claim_next("d2/w0", clock.now(), LEASE)
    assert their_claim is not None and their_claim.task.id == foreign and their_claim.task.repo == str(other)


def test_each_daemon_runs_a_shared_task_in_its_own_clone(
        url: str, clones: tuple[Path, Path], clock: FakeClock) -> None:
    a, b = clones
    on_a, on_b = daemon_store(url, a), daemon_store(url, b)
    made = [on_a.enqueue(str(a), spec(), clock.now()) for _ in range(2)]   # both made in clone A
    first = on_b.claim_next("b/w0", clock.now(), LEASE)
    second = on_a.claim_next("a/w0", clock.now(), LEASE)
    assert first is not None and second is not None
    assert sorted([first.task.id, second.task.id]) == made
    assert first.task.repo == str(b) and second.task.repo == str(a)
    assert on_a.get_task(first.task.id).repo == str(b)            # the store says where it ran
    assert first.task.repo_id == second.task.repo_id == repo_identity(a)


def test_rows_of_before_the_identities_are_adopted_by_the_daemon_that_has_their_path(
        url: str, clones: tuple[Path, Path], clock: FakeClock) -> None:
    a, b = clones
    legacy = Store(open_database(url))       # no clones adopted: the identity of a row is its path
    old = legacy.enqueue(str(a), spec(), clock.now())
    assert legacy.get_task(old).repo_id == str(a)
    on_b = daemon_store(url, b)
    assert on_b.claim_next("b/w0", clock.now(), LEASE) is None    # clone A's path is no repo of B's yet
    daemon_store(url, a)                                          # A's daemon starts: the row gets A's identity
    claim = on_b.claim_next("b/w0", clock.now(), LEASE)
    assert claim is not None and claim.task.id == old and claim.task.repo == str(b)


# -- once per fleet -------------------------------------------------------------------------

def ingest(ingestor: Ingestor, clock: FakeClock, repo: Path, name: str) -> int:
    ingestor.submit_path(repo, repo / "tasks.d" / name)
    clock.advance(SETTLE + 0.01)
    return asyncio.run(ingestor.run_once())


def test_the_same_task_file_in_two_clones_is_one_task(
        url: str, clones: tuple[Path, Path], clock: FakeClock) -> None:
    a, b = clones
    on_a, on_b = daemon_store(url, a), daemon_store(url, b)
    text = "type: review\ntarget: shop/pricing.py\n"
    for repo in (a, b):
        (repo / "tasks.d" / "review.yaml").write_text(text)
    assert ingest(Ingestor(on_a, clock, settle_s=SETTLE), clock, a, "review.yaml") == 1
    assert ingest(Ingestor(on_b, clock, settle_s=SETTLE), clock, b, "review.yaml") == 1   # linked, not new
    assert sum(on_a.counts().values()) == 1
    for repo in (a, b):     # each clone's file went to .done/
        assert not (repo / "tasks.d" / "review.yaml").exists()
        assert [p.name for p in (repo / "tasks.d" / ".done").iterdir()] == ["review.yaml"]
    (a / "tasks.d" / "review.yaml").write_text(text)           # dropped again: a new task, once per fleet too
    assert ingest(Ingestor(on_a, clock, settle_s=SETTLE), clock, a, "review.yaml") == 1
    (b / "tasks.d" / "review.yaml").write_text(text)
    assert ingest(Ingestor(on_b, clock, settle_s=SETTLE), clock, b, "review.yaml") == 1
    assert sum(on_a.counts().values()) == 2
    (b / "tasks.d" / "other.yaml").write_text(text)             # another name: another task file
    assert ingest(Ingestor(on_b, clock, settle_s=SETTLE), clock, b, "other.yaml") == 1
    assert sum(on_a.counts().values()) == 3


def test_a_schedule_firing_is_one_task_whichever_daemon_sees_it_first(
        url: str, clones: tuple[Path, Path], clock: FakeClock) -> None:
    a, b = clones
    books = []
    for repo in (a, b):
        store = daemon_store(url, repo)
        book = RuleBook(store, clock, timezone=UTC, grace=timedelta(hours=1))
        (repo / "tasks.d" / "nightly.yaml").write_text("type: review\ntarget: shop/pricing.py\nschedule: '0 3 * * *'\n")
        assert ingest(Ingestor(store, clock, settle_s=SETTLE, on_rule=book.register), clock, repo, "nightly.yaml") == 0
        books.append(book)
    assert [book.due(clock.now()) for book in books] == [[], []]          # 2026-01-01 12:00: first sighting
    clock.advance(15 * 3600)                                              # 03:00 the next day
    fired_b = books[1].due(clock.now())
    fired_a = books[0].due(clock.now())
    assert len(fired_b) == 1 and fired_a == []
    task = books[0].store.get_task(fired_b[0])
    assert task.repo == str(b) and task.source == "rule:tasks.d/nightly.yaml"
    assert books[0].next_firing(clock.now()) == datetime(2026, 1, 3, 3, 0, tzinfo=UTC)   # the clock is shared
    assert sum(books[0].store.counts().values()) == 1


def test_a_schedule_firing_recorded_by_another_daemon_meanwhile_makes_no_second_task(
        url: str, clones: tuple[Path, Path], clock: FakeClock) -> None:
    """The race itself: both daemons decided to fire (each read the old clock) before either wrote."""
    a, b = clones
    on_a, on_b = RuleStore(daemon_store(url, a)), RuleStore(daemon_store(url, b))
    at = datetime(2026, 1, 2, 3, 0, tzinfo=UTC)
    made = on_b.fire_schedule(b, "tasks.d/nightly.yaml", spec(), at, clock.now())
    again = on_a.fire_schedule(a, "tasks.d/nightly.yaml", spec(), at.astimezone(timezone(timedelta(hours=1))),
                               clock.now())     # the same instant, in another daemon's zone
    assert made is not None and again is None
    later = on_a.fire_schedule(a, "tasks.d/nightly.yaml", spec(), at + timedelta(days=1), clock.now())
    assert later is not None and sum(on_a.store.counts().values()) == 2


def test_two_daemons_ingesting_one_task_file_at_the_same_moment_make_one_task(
        url: str, clones: tuple[Path, Path], clock: FakeClock) -> None:
    """The insert-or-ignore itself: both ingest each file at once (a barrier), neither saw the other's."""
    a, b = clones
    stores = {a: daemon_store(url, a), b: daemon_store(url, b)}
    files = 12
    barrier = threading.Barrier(2)
    made: dict[Path, list[int]] = {a: [], b: []}

    def ingest_all(repo: Path) -> None:
        for n in range(files):
            barrier.wait(timeout=60)
            made[repo].append(stores[repo].ingest_file(str(repo), f"tasks.d/t{n}.yaml", f"{n:064x}",
                                                       spec(), clock.now()))

    threads = [threading.Thread(target=ingest_all, args=(repo,)) for repo in (a, b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert made[a] == made[b] and len(set(made[a])) == files
    assert sum(stores[a].counts().values()) == files
