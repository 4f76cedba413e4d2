"""How the store reaches its database: this thread's connection, and write transactions that wait
while another process writes. Every read of the store begins with `connect(db)`, every write is
`with atomic_write(db):` (nothing else in ohd opens a connection or a transaction).

SQLite has one writer at a time. A write transaction here begins with `BEGIN IMMEDIATE`, so
it holds the writer lock from its first statement and cannot fail half-way for want of it;
only the BEGIN can find the lock taken. SQLite's busy_timeout waits inside one attempt; when
it runs out, tenacity begins again (a warning per retry) until `LOCK_WAIT_S` have passed, so a
burst of writers (50 `ohd` processes, the daemon's workers, ingest, a user's `sqlite3`) queues
instead of failing with "database is locked". A lock still held after that is raised as the store
names it (`StorageUnavailable`, locked: a plain message from the CLI, 503 on the socket).
PostgreSQL locks rows, not the database: a plain transaction, which takes an advisory transaction
lock first when the writer names one (`lock`: the governor's, the migrations'), so the writers of
one kind run one at a time there as on SQLite. Nothing here reads or writes rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, cast

import peewee
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_random,
)

from ohd.clock import pause
from ohd.errors import StorageUnavailable, unwritable_reason

log = logging.getLogger("ohd.transactions")

LOCK_WAIT_S = 30.0    # how long a write waits for another process's writer lock, in all (the
# `store_lock_wait_s` setting): below the CLI's 60 s wait for an answer, so a submit learns why


def is_busy(exc: BaseException) -> bool:
    """Another connection holds the lock (SQLite's SQLITE_BUSY), as the store classifies failures."""
    return unwritable_reason(exc) == StorageUnavailable.LOCKED


def connect(db: peewee.Database) -> None:
    """This thread's connection to `db`, opened if it is not (peewee keeps one per thread)."""
    db.connect(reuse_if_open=True)


@contextmanager
def atomic_write(db: peewee.Database, wait_s: float = LOCK_WAIT_S, lock: int | None = None) -> Iterator[None]:
    """One transaction holding the writer lock from its first statement (nested: a savepoint).
    `lock`: on PostgreSQL, the key of an advisory lock held until the transaction ends."""
    connect(db)
    if not isinstance(db, peewee.SqliteDatabase):
        with db.atomic():
            if lock is not None:
                cast(Any, db).execute_sql("SELECT pg_advisory_xact_lock(%s)", (lock,))
            yield
        return
    if db.in_transaction():
        with db.atomic():
            yield
        return
    with ExitStack() as stack:
        for attempt in _retrying(wait_s):
            with attempt:       # only BEGIN IMMEDIATE can be busy: enter_context keeps no failed one
                stack.enter_context(db.atomic("IMMEDIATE"))
        yield


def _retrying(wait_s: float) -> Retrying:
    return Retrying(retry=retry_if_exception(is_busy), stop=stop_after_delay(wait_s),
                    wait=wait_random(0, 0.05), sleep=pause, before_sleep=_log_retry, reraise=True)


def _log_retry(state: RetryCallState) -> None:
    log.warning("the store is busy (another process holds its writer lock); beginning again, attempt %d",
                state.attempt_number + 1)
