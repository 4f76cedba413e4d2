"""The store: tasks, executions, ingested and written files — the truth of ohd.

The only code that writes SQL (with `migrations`). Invariant: every state change is
one committed transaction before anything acts on it; a claim moves exactly one
`queued` task to `running` under a lease (SQLite: `BEGIN IMMEDIATE`; PostgreSQL:
`FOR UPDATE SKIP LOCKED`), so two workers never run the same task and an expired
lease returns the task to the queue. The tables are `schema`'s, bound per `Store` to the
database it was given (no module-level database); a read connects its own thread if needed
and a write is one `atomic_write` (`transactions`).
"""

from __future__ import annotations

import functools
import logging
import operator
import os
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import peewee

from ohd.core import events
from ohd.core.events import Hook
from ohd.core.taskfile import Priority, TaskSpec
from ohd.errors import ConfigError, InvalidTransition, NotFound, StorageUnavailable, unwritable_reason
from ohd.store import outbox, schema
from ohd.store.records import Claim, Execution, Written, dict_rows, fleet_key, pending_key, tuple_rows
from ohd.store.schema import QUARANTINED, TERMINAL, Task, TaskStatus, task_from_row, task_row
from ohd.store.transactions import LOCK_WAIT_S, atomic_write, connect

__all__ = ["Claim", "Execution", "Store", "Task", "TaskStatus", "Written", "open_database"]

log = logging.getLogger("ohd.store")

# what a task's webhook event says of it (`events.envelope`'s data)
_EVENT_FIELDS = frozenset({"id", "repo", "type", "target", "runner", "status", "quarantined", "attempts", "error",
                           "output_path", "report_path", "created_at", "finished_at"})
CRASH_LIMIT = 3   # runs of one task a crash may interrupt before it is failed (a task that kills ohd)


def poison_reason(crashes: int) -> str:
    return (f"interrupted by {crashes} daemon crashes while running (it may be what kills ohd); "
            "not run again automatically: `ohd retry` runs it once more")


def sqlite_path(url: str) -> Path | None:
    """The file of a `sqlite:///` URL (`/~` expands to the home dir); None for other databases."""
    if urlsplit(url).scheme != "sqlite":
        return None
    rest = unquote(url[len("sqlite://"):].split("?", 1)[0])
    return Path(rest[1:]).expanduser() if rest.startswith("/~") else Path("/" + rest.lstrip("/"))


def disk_reason(folder: Path) -> str | None:
    """What the file system of `folder` says: full (no block left for us) or mounted read-only; None
    when neither (or it cannot tell). SQLite names a -shm it cannot grow on a full disk an I/O error."""
    try:
        fs = os.statvfs(folder)
    except OSError:
        return None
    if fs.f_flag & os.ST_RDONLY:
        return StorageUnavailable.READ_ONLY
    return StorageUnavailable.FULL if fs.f_bavail == 0 else None


class _Guarded:
    """A peewee database whose storage failures (a full disk, a read-only file system, a lock, an
    I/O error) are raised as `StorageUnavailable`, from any statement, BEGIN, COMMIT, ROLLBACK or
    connect, whoever runs it (the store, the migrations, the governor, the rules). `trouble` is the
    last such failure of a write, until a transaction that changed something commits again."""

    where: str
    trouble: StorageUnavailable | None = None
    generation = 0    # one more each time a thread finds the server gone (`_drop_broken`)

    def _storage(self, exc: Exception) -> Exception:
        reason = unwritable_reason(exc)
        if reason is None:
            return exc
        if reason == StorageUnavailable.IO and os.path.isabs(self.where):
            reason = disk_reason(Path(self.where).parent) or reason
        failure = StorageUnavailable(self.where, reason, str(exc))
        if reason == StorageUnavailable.UNREACHABLE and getattr(self._state, "ohd_generation", None) == self.generation:
            self.generation += 1     # the server went away: every thread's connection of before is stale
        if reason != StorageUnavailable.LOCKED or self.trouble is None:
            if self.trouble is None or self.trouble.reason != reason:
                log.warning("%s", failure)
            self.trouble = failure
        return failure

    def _guard(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except (peewee.DatabaseError, OSError) as exc:
            failure = self._storage(exc)
            if failure is exc:
                raise
            raise failure from exc

    def connect(self, reuse_if_open: bool = False) -> bool:
        self._drop_broken()
        opened = bool(self._guard(super().connect, reuse_if_open))   # type: ignore[misc]
        if opened:
            self._state.ohd_generation = self.generation
        return opened

    def is_closed(self) -> bool:
        self._drop_broken()
        return bool(super().is_closed())   # type: ignore[misc]

    def _drop_broken(self) -> None:
        """This thread's connection is forgotten once its driver saw it break (PostgreSQL restarted,
        or the network cut it: psycopg2's `closed`), or once any thread's did after it was opened
        (`generation`), outside a transaction: the next statement opens a new one, so the threads'
        connections come back with the server without each failing once first. SQLite's never break so."""
        if (self._state.transactions or getattr(self._state, "ohd_open", False)
                or getattr(self._state, "conn", None) is None):
            return     # within a transaction (up to its COMMIT or ROLLBACK, which peewee runs after popping it)
        if _broken(self._state):
            self._state.reset()
        elif getattr(self._state, "ohd_generation", self.generation) != self.generation:
            with suppress(Exception):     # opened before another thread saw the server go: stale too
                self._state.conn.close()
            self._state.reset()

    def execute_sql(self, sql: str, params: Any = None) -> Any:
        return self._guard(super().execute_sql, sql, params)   # type: ignore[misc]

    def begin(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().begin(*args, **kwargs)   # type: ignore[misc]
        except (peewee.DatabaseError, OSError) as exc:
            if not (unwritable_reason(exc) == StorageUnavailable.UNREACHABLE and _broken(self._state)):
                failure = self._storage(exc)
                if failure is exc:
                    raise
                raise failure from exc
            # the connection had gone stale (the server restarted since): BEGIN did nothing; a new one, once
            self._state.reset()
            self._guard(super().begin, *args, **kwargs)   # type: ignore[misc]
        self._state.ohd_open = True      # a transaction is open on this connection until its commit or rollback
        self._state.ohd_changes = self._total_changes()    # per thread, as peewee's connection state

    def commit(self) -> None:
        self._guard(super().commit)   # type: ignore[misc]  # (failed: peewee rolls back next)
        self._state.ohd_open = False
        after = self._total_changes()
        if self.trouble is not None and (after is None or after != getattr(self._state, "ohd_changes", None)):
            log.info("%s can be written again", self.where)
            self.trouble = None

    def rollback(self) -> None:
        try:
            if _broken(self._state):
                self._state.reset()     # the server ended the transaction with the connection: nothing to roll back
                return
            self._guard(super().rollback)   # type: ignore[misc]
        finally:
            self._state.ohd_open = False

    def _total_changes(self) -> int | None:
        """Rows this thread's connection changed so far (SQLite); None where it is not known (any
        commit then counts as a write)."""
        conn = getattr(self._state, "conn", None)
        changes = getattr(conn, "total_changes", None)
        return changes if isinstance(changes, int) else None

    _state: Any


def _broken(state: Any) -> bool:
    """The connection of peewee's connection state `state` broke (psycopg2 sets `closed` non-zero)."""
    conn = getattr(state, "conn", None)
    return conn is not None and bool(getattr(conn, "closed", False))


class GuardedSqlite(_Guarded, peewee.SqliteDatabase):
    pass


class GuardedPostgres(_Guarded, peewee.PostgresqlDatabase):
    pass


def open_database(url: str, busy_timeout_s: float = 5.0) -> peewee.Database:
    """`sqlite:///abs/path.db` (WAL, busy timeout, foreign keys) or `postgresql://...`; StorageUnavailable
    when the SQLite file cannot be created (its disk full or read-only)."""
    parts = urlsplit(url)
    path = sqlite_path(url)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # created private (SQLite gives its -wal and -shm the database's mode), also by the CLI
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError as exc:
            if (reason := unwritable_reason(exc)) is None:
                raise
            raise StorageUnavailable(str(path), reason, str(exc)) from exc
        pragmas = {"journal_mode": "wal", "busy_timeout": int(busy_timeout_s * 1000), "foreign_keys": 1,
                   "synchronous": "normal"}
        sqlite = GuardedSqlite(str(path), pragmas=pragmas, timeout=busy_timeout_s)
        sqlite.where = str(path)
        return sqlite
    if parts.scheme in ("postgresql", "postgres"):
        params: dict[str, Any] = {"user": parts.username, "password": parts.password,
                                  "host": parts.hostname, "port": parts.port}
        params = {k: unquote(v) if isinstance(v, str) else v for k, v in params.items() if v is not None}
        params.update(parse_qsl(parts.query))
        params.setdefault("connect_timeout", "10")   # a server cut off fails a connect in 10 s, not the TCP timeout
        postgres = GuardedPostgres(unquote(parts.path.lstrip("/")), **params)
        postgres.where = f"{parts.scheme}://{parts.hostname or ''}/{unquote(parts.path.lstrip('/'))}"
        return postgres
    raise ConfigError(f"unsupported database URL {parts.scheme}://... (use sqlite:/// or postgresql://)")



class Store:
    """All reads and writes of ohd's state; safe to call from any thread."""

    def __init__(self, db: peewee.Database, lock_wait_s: float = LOCK_WAIT_S, hooks: Sequence[Hook] = ()) -> None:
        self.db = db
        self.m = schema.bind(db)
        self.lock_wait_s = lock_wait_s   # a write waits this long for another process's writer lock
        self.hooks = tuple(hooks)        # the webhooks: a task's end writes their outbox rows with it
        self._sqlite = isinstance(db, peewee.SqliteDatabase)
        # the clones this process serves: repo identity -> its path here (`adopt_clones`); empty: none
        # given, and a claim takes any repo's task (the tools and tests that are no daemon)
        self.clones: dict[str, str] = {}
        self._identities: dict[str, str] = {}     # a clone's path -> its repo's identity

    def identity_of(self, repo: str) -> str:
        """The identity of the repo at path `repo` (`adopt_clones`); a path not adopted is its own."""
        return self._identities.get(repo, repo)

    def adopt_clones(self, identities: dict[str, str]) -> None:
        """Serve these clones (path -> repo identity, `gitrepo.repo_identity`): from now on a claim takes
        only their repos' tasks and runs each in its clone here, and the rows that still name one of
        these paths as their identity (older rows, or made by a process that knew no identity) get
        the repo's, in one transaction."""
        clones = {identity: path for path, identity in identities.items()}
        t, files, f, c = self.m.task, self.m.ingested_file, self.m.rule_firing, self.m.rule_clock
        with self._write():
            for path, identity in identities.items():
                if identity == path:
                    continue
                t.update(repo_id=identity).where(t.repo_id == path).execute()
                files.update(repo_id=identity).where(files.repo_id == path).execute()
                f.update(repo=identity).where(f.repo == path).execute()
                known = c.select(c.rule).where(c.repo == identity)
                c.delete().where((c.repo == path) & c.rule.in_(known)).execute()   # another clone's clock wins
                c.update(repo=identity).where(c.repo == path).execute()
        self._identities, self.clones = dict(identities), clones

    @property
    def trouble(self) -> StorageUnavailable | None:
        """Why the last write failed (a full disk, read-only, locked...), until a write succeeds again."""
        return getattr(self.db, "trouble", None)

    def probe(self) -> None:
        """A write that changes no value (the migration ledger's first row set to itself): it commits
        only if the store takes writes again, and then clears `trouble`; StorageUnavailable if not."""
        with self._write():
            cast(Any, self.db).execute_sql("UPDATE schema_migrations SET name = name "
                                "WHERE name = (SELECT MIN(name) FROM schema_migrations)")

    def migrate(self) -> None:
        """Bring the schema up to date (idempotent)."""
        schema.migrate(self.db)

    def close(self) -> None:
        """Close this thread's connection."""
        if not self.db.is_closed():
            self.db.close()

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One transaction holding the writer lock from its first statement (SQLite), waiting for it."""
        with atomic_write(self.db, self.lock_wait_s):
            yield

    def _read(self) -> None:
        connect(self.db)

    # -- creating tasks --------------------------------------------------------------

    def enqueue(self, repo: str, spec: TaskSpec, now: datetime, source: str | None = None,
                base_commit: str | None = None) -> int:
        """Queue one task from a spec; returns its id. `base_commit`: the repo's HEAD now (an agent
        runner's worktree starts there; the caller reads it, git being the repo's room)."""
        with self._write():
            return self._insert_task(repo, spec, now, source, base_commit)

    def _insert_task(self, repo: str, spec: TaskSpec, now: datetime, source: str | None,
                     base_commit: str | None = None) -> int:
        row = task_row(repo, spec, now, source, base_commit, self.identity_of(repo))
        return int(self.m.task.insert(**row).execute())

    def ingest_file(self, repo: str, relpath: str, sha256: str, spec: TaskSpec, now: datetime,
                    base_commit: str | None = None) -> int:
        """The ingested_file row and its task in one transaction; a pending duplicate returns its task,
        and so does the same file (content at `relpath`, as many drops of it) in another clone of the
        repo (`records.fleet_key`): one task per fleet, ingested by whichever daemon came first."""
        try:
            return self._ingest(repo, relpath, sha256, spec, now, base_commit)
        except peewee.IntegrityError:      # another process ingested the same content just now
            existing = self.pending_ingest(repo, sha256)
            if existing is not None:
                return existing
            return self._ingest(repo, relpath, sha256, spec, now, base_commit)   # another clone's: linked

    def _ingest(self, repo: str, relpath: str, sha256: str, spec: TaskSpec, now: datetime,
                base_commit: str | None) -> int:
        files, key, repo_id = self.m.ingested_file, pending_key(repo, sha256), self.identity_of(repo)
        with self._write():
            existing = files.select(files.task_id).where(files.pending_key == key).first()
            if existing is not None and existing.task_id is not None:
                return int(existing.task_id)
            drops = files.select().where((files.repo == repo) & (files.repo_id == repo_id) & (files.relpath == relpath)
                                         & (files.sha256 == sha256)).count()
            fleet = fleet_key(repo_id, relpath, sha256, drops + 1)
            twin = files.select(files.task_id).where(files.fleet_key == fleet).first()
            row = {"repo": repo, "repo_id": repo_id, "relpath": relpath, "sha256": sha256, "ingested_at": now,
                   "pending_key": key}
            if twin is not None and twin.task_id is not None:    # another clone's copy of this file: its task
                files.insert(**row, task_id=twin.task_id).execute()
                return int(twin.task_id)
            file_id = files.insert(**row, fleet_key=fleet).execute()
            task_id = self._insert_task(repo, spec, now, relpath, base_commit)
            files.update(task_id=task_id).where(files.id == file_id).execute()
            return task_id

    def pending_ingest(self, repo: str, sha256: str) -> int | None:
        """The task id of this content if its file has not been moved to .done/ yet."""
        self._read()
        files = self.m.ingested_file
        row = files.select(files.task_id).where(files.pending_key == pending_key(repo, sha256)).first()
        return None if row is None else row.task_id

    def pending_files(self, repo: str) -> list[tuple[str, str]]:
        """(relpath, sha256) of every ingested file of `repo` not yet marked moved."""
        self._read()
        files = self.m.ingested_file
        rows = files.select(files.relpath, files.sha256).where(files.pending_key.is_null(False), files.repo == repo)
        return [(row.relpath, row.sha256) for row in rows]

    def mark_moved(self, repo: str, sha256: str) -> None:
        """The file went to .done/: the same content dropped again is a new task."""
        files = self.m.ingested_file
        with self._write():
            files.update(pending_key=None).where(files.pending_key == pending_key(repo, sha256)).execute()

    # -- the lease cycle -------------------------------------------------------------

    def claim_next(self, worker_id: str, now: datetime, lease: timedelta) -> Claim | None:
        """Take the highest-priority, oldest ready task of a repo we have a clone of (`adopt_clones`;
        none adopted: any repo's) and lease it to `worker_id`; its `repo` becomes our clone's path,
        where it runs and writes."""
        t = self.m.task
        is_ready = (t.status == TaskStatus.QUEUED.value) & (t.not_before.is_null() | (t.not_before <= now))
        clones = self.clones
        if clones:
            is_ready &= t.repo_id.in_(list(clones))
        self._read()
        if not t.select(t.id).where(is_ready).exists():
            return None            # a plain read: idle workers never queue for the writer lock
        with self._write():
            ready = t.select(t.id, t.repo_id).where(is_ready).order_by(t.rank.desc(), t.id).limit(1)
            if not self._sqlite:
                ready = ready.for_update(skip_locked=True)
            row = ready.first()
            if row is None:
                return None
            until = now + lease
            here = {"repo": clones[row.repo_id]} if clones else {}
            t.update(status=TaskStatus.RUNNING.value, lease_owner=worker_id, lease_until=until,
                     started_at=now, updated_at=now, **here).where(t.id == row.id).execute()
            return Claim(self.get_task(row.id), worker_id, until)

    def renew(self, task_id: int, worker_id: str, now: datetime, lease: timedelta) -> bool:
        """Extend our lease; False if it is no longer ours or the task was cancelled."""
        t = self.m.task
        with self._write():
            changed = (t.update(lease_until=now + lease, updated_at=now)
                       .where((t.id == task_id) & (t.status == TaskStatus.RUNNING.value)
                              & (t.lease_owner == worker_id) & (t.cancel_requested == False))  # noqa: E712 (peewee: SQL, not Python)
                       .execute())
        return bool(changed)

    def reap(self, now: datetime, crash_limit: int = CRASH_LIMIT, keep: Collection[int] = ()) -> list[int]:
        """Running tasks whose lease expired go back to queued (cancelled if asked; failed when
        interrupted `crash_limit` times, see `recover`); their ids. `keep`: tasks a live worker of
        the caller still runs (their renewals were refused, e.g. by a full disk): not reaped."""
        t = self.m.task
        expired = (t.status == TaskStatus.RUNNING.value) & (t.lease_until < now)
        if keep:
            expired &= t.id.not_in(list(keep))
        return self._interrupted(expired, now, crash_limit, "lease expired")

    def return_leases(self, daemons: Collection[str], now: datetime, crash_limit: int = CRASH_LIMIT) -> list[int]:
        """Running tasks leased to a worker of one of `daemons` (ids of daemons that are lost or
        stopped, `fleet`; their workers' owners are `<id>/w<n>`) go back to the queue at once, their
        leases unexpired; each counts a crash, as in `reap`. Their ids."""
        t = self.m.task
        if not daemons:
            return []
        held = functools.reduce(operator.or_, (peewee.fn.SUBSTR(t.lease_owner, 1, len(d) + 1) == f"{d}/"
                                               for d in daemons))
        where = (t.status == TaskStatus.RUNNING.value) & held
        self._read()
        if not t.select(t.id).where(where).exists():
            return []      # a plain read first: every heartbeat asks
        return self._interrupted(where, now, crash_limit, "its daemon was lost")

    def recover(self, now: datetime, crash_limit: int = CRASH_LIMIT) -> list[int]:
        """Every running task goes back to queued at once, its lease unexpired: call only when no
        other process can hold a lease (SQLite: the daemon holds the state dir's lock). Each counts
        one crash; a task whose runs `crash_limit` crashes interrupted (a task that kills ohd) is
        failed with that reason instead. Their ids."""
        return self._interrupted(self.m.task.status == TaskStatus.RUNNING.value, now, crash_limit,
                                 "interrupted by the daemon's crash")

    def _interrupted(self, where: Any, now: datetime, crash_limit: int, why: str) -> list[int]:
        t = self.m.task
        with self._write():
            query = t.select(t.id, t.cancel_requested, t.crashes).where(where).order_by(t.id)
            rows = list(query if self._sqlite else query.for_update())
            ends = [self._end_interrupted(row.id, row.crashes + 1, row.cancel_requested, now, crash_limit)
                    for row in rows]
        for row, status in zip(rows, ends, strict=True):
            then = {TaskStatus.CANCELLED: "cancelled as requested", TaskStatus.QUEUED: "back to the queue",
                    TaskStatus.FAILED: f"failed: {poison_reason(row.crashes + 1)}"}[status]
            log.warning("task %d: %s; %s", row.id, why, then, extra={"task_id": row.id, "status": status.value})
        return [row.id for row in rows]

    def _end_interrupted(self, task_id: int, crashes: int, cancel_requested: bool, now: datetime,
                         crash_limit: int) -> TaskStatus:
        t = self.m.task
        t.update(crashes=crashes).where(t.id == task_id).execute()
        if crashes >= crash_limit and not cancel_requested:
            t.update(status=TaskStatus.FAILED.value, error=poison_reason(crashes), finished_at=now, updated_at=now,
                     lease_owner=None, lease_until=None).where(t.id == task_id).execute()
            self._close_calls(task_id)
            self._task_event(task_id, now)
            return TaskStatus.FAILED
        return self._leave_running(task_id, now, TaskStatus.QUEUED, cancel_requested)

    def promote_due(self, now: datetime, every: bool = False) -> int:
        """Pending tasks whose not_before has come (`every`: all pending tasks, to decide again now
        that what they wait for changed) become queued, each logged; how many."""
        t = self.m.task
        due = t.status == TaskStatus.PENDING.value
        if not every:
            due &= t.not_before <= now
        self._read()
        if not t.select(t.id).where(due).exists():
            return 0
        with self._write():
            query = t.select(t.id).where(due).order_by(t.id)
            ids = [row.id for row in (query if self._sqlite else query.for_update())]
            (t.update(status=TaskStatus.QUEUED.value, not_before=None, updated_at=now)
             .where(t.id.in_(ids) & due).execute())
        for task_id in ids:
            log.info("task %d due: back in the queue", task_id, extra={"task_id": task_id, "status": "queued"})
        return len(ids)

    def defer(self, task_id: int, worker_id: str, not_before: datetime, now: datetime,
              reason: str) -> TaskStatus | None:
        """Running → pending until `not_before` (every model cools down); lease released.
        Returns the new status (cancelled if a cancel was requested), None if not ours."""
        return self._give_back(task_id, worker_id, now, TaskStatus.PENDING, not_before=not_before, error=reason)

    def release(self, task_id: int, worker_id: str, now: datetime) -> TaskStatus | None:
        """Running → queued (graceful stop); cancelled instead if a cancel was requested.
        Returns the new status, None if the lease is not `worker_id`'s."""
        return self._give_back(task_id, worker_id, now, TaskStatus.QUEUED)

    def finish(self, task_id: int, worker_id: str | None, status: TaskStatus, now: datetime,
               error: str | None = None, output_path: str | None = None,
               report_path: str | None = None) -> bool:
        """Record a terminal state and clear the lease (only ours, when `worker_id` is given);
        False if the task was not changed (already terminal, or not held by `worker_id`)."""
        if status not in TERMINAL:
            raise ValueError(f"finish needs a terminal status, not {status}")
        t = self.m.task
        where = (t.id == task_id) & t.status.not_in([s.value for s in TERMINAL])
        if worker_id is not None:
            where &= (t.status == TaskStatus.RUNNING.value) & (t.lease_owner == worker_id)
        with self._write():
            changed = (t.update(status=status.value, error=error, output_path=output_path,
                                report_path=report_path, finished_at=now, updated_at=now,
                                lease_owner=None, lease_until=None).where(where).execute())
            if changed:
                self._close_calls(task_id)
                self._writes_landed(task_id)
                self._task_event(task_id, now)
        if not changed:
            log.warning("task %d: not finished as %s; it is no longer held by %s", task_id, status, worker_id)
        return bool(changed)

    def _task_event(self, task_id: int, now: datetime) -> None:
        """In the transaction that ended the task: its webhook event (completed, quarantined or failed;
        a cancel is the user's own doing and has none), one outbox row per hook that takes it."""
        if not self.hooks:
            return
        task = self.get_task(task_id)
        name = {TaskStatus.COMPLETED: events.TASK_QUARANTINED if task.quarantined else events.TASK_COMPLETED,
                TaskStatus.FAILED: events.TASK_FAILED}.get(TaskStatus(task.status))
        if name is not None:
            data = {key: value for key, value in task.as_dict().items() if key in _EVENT_FIELDS}
            outbox.record(self.m, self.hooks, name, now, data, task_id=task_id)

    def _writes_landed(self, task_id: int) -> None:
        """The task ended after its writes: what they replaced is no longer ohd's there."""
        w = self.m.written_file
        w.update(previous_sha256=None).where((w.task_id == task_id) & w.previous_sha256.is_null(False)).execute()

    def _close_calls(self, task_id: int) -> None:
        """The task's answers are history only from now on: none is judged or delivered again."""
        c = self.m.model_call
        c.update(pending=None).where((c.task_id == task_id) & c.pending.is_null(False)).execute()

    def _give_back(self, task_id: int, worker_id: str, now: datetime, status: TaskStatus,
                   **changes: Any) -> TaskStatus | None:
        t = self.m.task
        with self._write():
            row = (t.select(t.cancel_requested)
                   .where((t.id == task_id) & (t.status == TaskStatus.RUNNING.value) & (t.lease_owner == worker_id))
                   .first())
            if row is None:
                log.warning("task %d: %s by %s ignored; the lease is not theirs", task_id, status, worker_id)
                return None
            return self._leave_running(task_id, now, status, row.cancel_requested, **changes)

    def _leave_running(self, task_id: int, now: datetime, status: TaskStatus, cancel_requested: bool,
                       **changes: Any) -> TaskStatus:
        if cancel_requested:
            status, changes = TaskStatus.CANCELLED, {"finished_at": now, "error": "cancelled by the user"}
            self._close_calls(task_id)
        t = self.m.task
        t.update(status=status.value, lease_owner=None, lease_until=None, updated_at=now,
                 **changes).where(t.id == task_id).execute()
        return status

    def add_attempt(self, task_id: int, now: datetime) -> int:
        """attempts += 1; returns the new count."""
        t = self.m.task
        with self._write():
            t.update(attempts=t.attempts + 1, updated_at=now).where(t.id == task_id).execute()
            return self.get_task(task_id).attempts

    def record_execution(self, task_id: int, attempt: int, model: str, started_at: datetime,
                         finished_at: datetime, prompt_tokens: int, completion_tokens: int,
                         cost: float | None, outcome: str, error_class: str | None = None,
                         error: str | None = None, score: float | None = None, *,
                         latency_ms: int | None = None, validation_ms: int | None = None,
                         counts: bool = False, source_sha256: str | None = None, cached: bool = False) -> int:
        """One model call, successful or not. `latency_ms` is the call's own time (None: derived
        from the two instants); `score` and `validation_ms` are its result's validation score and
        how long judging it took (None when it got no verdict). `counts`: an answer that spends an
        attempt; task.attempts goes up in the same transaction and the row gets the new number, so
        attempts are recorded executions and a crash before the verdict spends none; the task's pending
        call (`calls`) is closed and linked to this row in that transaction. `source_sha256`: the
        target text the answer was judged against. `cached`: the answer was replayed from the call
        history (the replay cache): no request was sent, so it is no call of today's nor a request."""
        if latency_ms is None:
            latency_ms = round((finished_at - started_at).total_seconds() * 1000)
        t = self.m.task
        with self._write():
            if counts:
                t.update(attempts=t.attempts + 1, updated_at=finished_at).where(t.id == task_id).execute()
                attempt = self.get_task(task_id).attempts
            execution_id = int(self.m.execution.insert(
                task_id=task_id, attempt=attempt, model=model, started_at=started_at,
                finished_at=finished_at, latency_ms=max(0, latency_ms), prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens, cost=cost, outcome=outcome,
                error_class=error_class, error=error, score=score,
                validation_ms=None if validation_ms is None else max(0, validation_ms),
                source_sha256=source_sha256, cached=cached).execute())
            if counts:      # the answer has its verdict: never judged again after a crash
                c = self.m.model_call
                c.update(pending=None, execution_id=execution_id).where(
                    (c.task_id == task_id) & c.pending.is_null(False)).execute()
            return execution_id

    # -- user actions ----------------------------------------------------------------

    def cancel(self, task_id: int, now: datetime) -> Task:
        """pending/queued → cancelled; running → cancel_requested; terminal → InvalidTransition."""
        t = self.m.task
        with self._write():
            task = self.get_task(task_id)
            if task.status in (TaskStatus.PENDING, TaskStatus.QUEUED):
                changes: dict[str, Any] = {"status": TaskStatus.CANCELLED.value, "finished_at": now,
                                           "error": "cancelled by the user"}
                self._close_calls(task_id)
            elif task.status == TaskStatus.RUNNING:
                changes = {"cancel_requested": True}
            else:
                raise InvalidTransition(task_id, task.status, "cancel")
            t.update(updated_at=now, **changes).where(t.id == task_id).execute()
            return self.get_task(task_id)

    def record_report(self, task_id: int, status: TaskStatus, report_path: str | None, error: str,
                      now: datetime) -> bool:
        """A terminal task's report, written after its status was committed (or why none could be):
        its path and error; False if the task is no longer `status` or already has a report."""
        t = self.m.task
        with self._write():
            changed = (t.update(report_path=report_path, error=error, updated_at=now)
                       .where((t.id == task_id) & (t.status == status.value) & t.report_path.is_null()).execute())
        return bool(changed)

    def retry(self, task_id: int, now: datetime) -> Task:
        """failed/cancelled → queued with a clean slate; pending → queued now, to decide again (its
        attempts kept); anything else → InvalidTransition."""
        t = self.m.task
        with self._write():
            task = self.get_task(task_id)
            if task.status == TaskStatus.PENDING:
                t.update(status=TaskStatus.QUEUED.value, not_before=None, error=None, updated_at=now).where(
                    (t.id == task_id) & (t.status == TaskStatus.PENDING.value)).execute()
                return self.get_task(task_id)
            if task.status not in (TaskStatus.FAILED, TaskStatus.CANCELLED):
                raise InvalidTransition(task_id, task.status, "retry")
            self._close_calls(task_id)
            t.update(status=TaskStatus.QUEUED.value, attempts=0, crashes=0, error=None, cancel_requested=False,
                     report_path=None, output_path=None, not_before=None, started_at=None, finished_at=None,
                     lease_owner=None, lease_until=None, updated_at=now).where(t.id == task_id).execute()
            return self.get_task(task_id)

    # -- reading ---------------------------------------------------------------------

    def get_task(self, task_id: int) -> Task:
        self._read()
        t = self.m.task
        rows = dict_rows(t.select().where(t.id == task_id))
        if not rows:
            raise NotFound("task", task_id)
        return task_from_row(rows[0])

    def list_tasks(self, status: str | None = None, limit: int = 100) -> list[Task]:
        """Newest first."""
        self._read()
        t = self.m.task
        query = t.select().order_by(t.id.desc()).limit(limit)
        if status is not None:
            query = query.where(t.status == status)
        return [task_from_row(row) for row in dict_rows(query)]

    def running(self) -> list[Task]:
        self._read()
        t = self.m.task
        query = t.select().where(t.status == TaskStatus.RUNNING.value).order_by(t.id)
        return [task_from_row(row) for row in dict_rows(query)]

    def executions(self, task_id: int) -> list[Execution]:
        self._read()
        e = self.m.execution
        return [Execution(**row) for row in dict_rows(e.select().where(e.task_id == task_id).order_by(e.id))]

    def waits_before(self, task: Task, at: datetime) -> bool:
        """An older pending task of at least `task`'s priority may run by `at`: it goes first (FIFO)."""
        self._read()
        t = self.m.task
        return bool(t.select(t.id).where(
            (t.status == TaskStatus.PENDING.value) & (t.not_before <= at) & (t.rank >= _rank_of(task))
            & (t.id < task.id)).exists())

    def last_wait(self) -> datetime | None:
        """The latest `not_before` of a pending task (when the last waiting task may run), None if none."""
        self._read()
        t = self.m.task
        row = (t.select(t.not_before).where((t.status == TaskStatus.PENDING.value) & t.not_before.is_null(False))
               .order_by(t.not_before.desc()).first())
        return None if row is None else row.not_before

    def counts(self) -> dict[str, int]:
        """Tasks per status; every status present."""
        self._read()
        t = self.m.task
        counts = {status.value: 0 for status in TaskStatus}
        for status, count in tuple_rows(t.select(t.status, peewee.fn.COUNT(t.id)).group_by(t.status)):
            counts[status] = int(count)
        return counts

    def quarantined_count(self) -> int:
        """Completed tasks whose tests fail against the code (`Task.quarantined`)."""
        self._read()
        t, fn = self.m.task, peewee.fn
        # the expression of migration 0015's index, constants inline (a parameter would not match it):
        # the same prefix test as a case-insensitive LIKE, counted from the index
        prefix = fn.lower(fn.substr(t.error, peewee.SQL("1"), peewee.SQL(str(len(QUARANTINED)))))
        return int(t.select(fn.COUNT(t.id)).where((t.status == TaskStatus.COMPLETED.value)
                                                  & (prefix == QUARANTINED.lower())).scalar())

    def totals_today(self, now: datetime) -> dict[str, Any]:
        """Model calls, tokens and cost since UTC midnight of `now`; `saved`: the answers replayed
        instead (the replay cache), which are no calls."""
        self._read()
        e = self.m.execution
        midnight = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        fn = peewee.fn
        [(calls, prompt, completion, cost)] = tuple_rows(
            e.select(fn.COUNT(e.id), fn.SUM(e.prompt_tokens), fn.SUM(e.completion_tokens), fn.SUM(e.cost))
            .where((e.started_at >= midnight) & (e.cached == False)))  # noqa: E712 (SQL, not Python)
        saved = e.select().where((e.started_at >= midnight) & (e.cached == True)).count()  # noqa: E712
        return {"calls": int(calls), "prompt_tokens": int(prompt or 0),
                "completion_tokens": int(completion or 0), "cost": float(cost or 0.0), "saved": int(saved)}

    # -- files ohd wrote -------------------------------------------------------------

    def written_hash(self, repo: str, path: str) -> str | None:
        """sha256 of what ohd last wrote at `path` in `repo`, if it ever did."""
        self._read()
        w = self.m.written_file
        row = w.select(w.sha256).where((w.repo == repo) & (w.path == path)).first()
        return None if row is None else row.sha256

    def written(self, repo: str, path: str) -> Written | None:
        """What ohd wrote at `path` in `repo` (and, while that write may not have landed, what it replaces)."""
        self._read()
        w = self.m.written_file
        row = w.select(w.sha256, w.previous_sha256, w.task_id).where((w.repo == repo) & (w.path == path)).first()
        return None if row is None else Written(row.sha256, row.previous_sha256, row.task_id)

    def record_written(self, repo: str, path: str, sha256: str, task_id: int, now: datetime,
                       replacing: str | None = None) -> None:
        """Committed before ohd writes `sha256` at `path`. `replacing`: the hash of what the file holds
        now ('' for no file), kept as ohd's too until the task finishes, since a kill before the rename
        leaves it there; None: nothing but `sha256` is ohd's there."""
        w = self.m.written_file
        with self._write():
            (w.insert(repo=repo, path=path, sha256=sha256, task_id=task_id, written_at=now, previous_sha256=replacing)
             .on_conflict(conflict_target=[w.repo, w.path],
                          update={w.sha256: sha256, w.task_id: task_id, w.written_at: now,
                                  w.previous_sha256: replacing})
             .execute())



def _rank_of(task: Task) -> int:
    return Priority(task.priority).rank
