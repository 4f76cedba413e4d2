"""A PostgreSQL connection the server ended (a restart, pg_terminate_backend): the store names it,
and comes back on a new connection (issue 15, point 5). Real connections to the real server; each
test ends only its own backends (pg_terminate_backend of their pids), never the server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import psycopg2
import pytest
from tests.support.databases import POSTGRES_URL, database_url

from ohd.core.taskfile import TaskSpec
from ohd.errors import StorageUnavailable, http_answer
from ohd.store.store import Store, open_database
from ohd.store.transactions import atomic_write

pytestmark = pytest.mark.skipif(not POSTGRES_URL, reason="OHD_TEST_POSTGRES_URL is not set")
NOW = datetime(2026, 5, 1, tzinfo=UTC)
SPEC = TaskSpec.model_validate({"type": "docstring", "target": "a.py"})


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with database_url("postgresql", tmp_path) as url:
        store = Store(open_database(url))
        store.migrate()
        yield store
        store.close()


def backend_pid(store: Store) -> int:
    """This thread's connection's server process."""
    return int(cast(Any, store.db).execute_sql("SELECT pg_backend_pid()").fetchone()[0])


def terminate(*pids: int) -> None:
    """The server ends these backends, as a restart ends every one."""
    admin = psycopg2.connect(POSTGRES_URL)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            for pid in pids:
                cur.execute("SELECT pg_terminate_backend(%s, 60000)", (pid,))   # returns once it is gone
    finally:
        admin.close()


def test_a_read_on_a_connection_the_server_ended_is_named_and_the_next_one_reconnects(store: Store) -> None:
    store.enqueue("/repo", SPEC, NOW)
    terminate(backend_pid(store))
    with pytest.raises(StorageUnavailable) as failed:
        store.counts()
    assert failed.value.reason == StorageUnavailable.UNREACHABLE
    assert "its server cannot be reached" in str(failed.value)
    assert http_answer(failed.value)[0] == 503          # the API: try again later, not 507
    assert store.trouble is not None and store.trouble.unreachable   # what `ohd status` shows meanwhile
    assert store.counts()["queued"] == 1                 # a new connection, without being asked
    store.enqueue("/repo", SPEC, NOW)                    # a write commits again: the trouble is over
    assert store.trouble is None


def test_a_write_on_a_connection_gone_stale_begins_again_on_a_new_one(store: Store) -> None:
    """BEGIN on a connection the server ended did nothing: the write goes on on a new connection
    instead of failing the task it belongs to."""
    store.enqueue("/repo", SPEC, NOW)
    before = backend_pid(store)
    terminate(before)
    store.enqueue("/repo", SPEC, NOW)
    assert store.counts()["queued"] == 2 and store.trouble is None
    assert backend_pid(store) != before


def test_once_one_thread_saw_the_server_go_the_other_threads_connections_are_renewed(store: Store) -> None:
    """A restart ends every thread's connection; the first thread to find out tells the others, whose
    next statement opens a new connection instead of failing once each."""
    pids: list[int] = []
    errors: list[BaseException] = []
    opened, go, done = threading.Event(), threading.Event(), threading.Event()

    def other() -> None:
        try:
            pids.append(backend_pid(store))
            opened.set()
            go.wait(60)
            store.counts()           # no StorageUnavailable: its stale connection was dropped first
        except BaseException as exc:
            errors.append(exc)
        finally:
            store.close()
            done.set()

    thread = threading.Thread(target=other)
    thread.start()
    assert opened.wait(60)
    terminate(backend_pid(store), *pids)
    with pytest.raises(StorageUnavailable):
        store.counts()               # this thread finds out first
    go.set()
    assert done.wait(60)
    thread.join(60)
    assert errors == []


def test_a_transaction_open_while_another_thread_finds_the_server_gone_still_commits(store: Store) -> None:
    """The renewal of stale connections waits for a transaction's end: a thread whose connection is
    fine commits what it wrote even though another thread found the server gone meanwhile (before,
    its COMMIT found its connection dropped: 'Cannot commit, database connection not open')."""
    errors: list[BaseException] = []
    inside, go = threading.Event(), threading.Event()

    def writer() -> None:
        try:
            with atomic_write(store.db):
                store.enqueue("/repo", SPEC, NOW)
                inside.set()
                go.wait(60)
        except BaseException as exc:
            errors.append(exc)
        finally:
            store.close()

    thread = threading.Thread(target=writer)
    thread.start()
    assert inside.wait(60)
    terminate(backend_pid(store))
    with pytest.raises(StorageUnavailable):
        store.counts()               # this thread finds the server gone: the writer's connection is older
    go.set()
    thread.join(60)
    assert errors == []
    assert store.counts()["queued"] == 1
