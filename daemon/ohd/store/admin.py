"""The database as a whole (`ohd db`): copy every table to another database, and check integrity.

`copy` moves a store to another database (SQLite to PostgreSQL, the move to a fleet, or back): the
target is migrated to the same schema, must hold no row (unless `replace`: its rows are deleted
first), and gets every row of every table, ids kept, in one transaction, read from one snapshot of
the source; PostgreSQL's id sequences then continue after the copied ids. The per-table counts of
the target are compared with the source's afterwards. `check` reads a store and lists what is
wrong: the schema's version, references to rows that do not exist, leases no live daemon holds,
statuses ohd does not know. Neither changes the source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

import peewee

from ohd.store import schema
from ohd.store.fleet import ALIVE, Fleet, daemon_of
from ohd.store.records import dict_rows
from ohd.store.schema import TaskStatus
from ohd.store.transactions import atomic_write, connect

BATCH = 500   # rows per INSERT
# every table with its rows, parents first (the foreign keys of execution, ingested_file and
# written_file name task); the migration ledger is the target's own
TABLES = tuple(model._meta.table_name for model in schema.MODELS if model is not schema.SchemaMigrationRow)
# (table, column, the table whose id it names): the references `check` follows
REFERENCES = (("execution", "task_id", "task"), ("ingested_file", "task_id", "task"),
              ("written_file", "task_id", "task"), ("model_call", "task_id", "task"),
              ("model_call", "execution_id", "execution"), ("model_call", "replay_of", "model_call"),
              ("agent_run", "task_id", "task"),
              ("rule_firing", "task_id", "task"), ("webhook_outbox", "task_id", "task"))


class TargetNotEmpty(Exception):
    """The copy's target holds rows (`tables`: table -> count); `replace` deletes them first."""

    def __init__(self, tables: dict[str, int]) -> None:
        self.tables = tables
        super().__init__(", ".join(f"{name} {count}" for name, count in tables.items()))


@dataclass(frozen=True, slots=True)
class Copied:
    """What a copy moved: rows per table in the source's snapshot and in the target after it."""

    source: dict[str, int]
    target: dict[str, int]

    @property
    def verified(self) -> bool:
        return self.source == self.target

    @property
    def rows(self) -> int:
        return sum(self.target.values())


def counts(db: peewee.Database) -> dict[str, int]:
    """Rows per table (every table but the migration ledger)."""
    connect(db)
    tables = schema.bind(db)
    return {name: int(getattr(tables, name).select().count()) for name in TABLES}


def copy(source: peewee.Database, target: peewee.Database, replace: bool = False) -> Copied:
    """Every row of `source` into `target` (both migrated first; see the module's docstring).
    TargetNotEmpty when the target has rows and not `replace`."""
    schema.migrate(source)
    schema.migrate(target)
    src, dst = schema.bind(source), schema.bind(target)
    connect(source)
    with source.atomic():      # one snapshot (SQLite: a read transaction; PostgreSQL: its first statement's)
        if not isinstance(source, peewee.SqliteDatabase):
            cast(Any, source).execute_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        before = counts(source)
        with atomic_write(target):
            present = {name: count for name, count in counts(target).items() if count}
            if present and not replace:
                raise TargetNotEmpty(present)
            for name in reversed(TABLES):
                getattr(dst, name).delete().execute()
            for name in TABLES:
                _copy_table(getattr(src, name), getattr(dst, name))
            if not isinstance(target, peewee.SqliteDatabase):
                _continue_sequences(target, dst)
    return Copied(before, counts(target))


def _copy_table(source: type[peewee.Model], target: type[peewee.Model]) -> None:
    key = source._meta.primary_key
    order = [source._meta.fields[name] for name in key.field_names] if isinstance(key, peewee.CompositeKey) else [key]
    batch: list[dict[str, Any]] = []
    for row in source.select().order_by(*order).dicts().iterator():
        batch.append(row)
        if len(batch) >= BATCH:
            target.insert_many(batch).execute()
            batch = []
    if batch:
        target.insert_many(batch).execute()


def _continue_sequences(db: peewee.Database, tables: schema.Tables) -> None:
    """PostgreSQL: each id sequence goes on after the largest id copied (a copied id is never given again)."""
    for name in TABLES:
        model = getattr(tables, name)
        if isinstance(model._meta.primary_key, peewee.AutoField):
            cast(Any, db).execute_sql(
                f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), COALESCE(MAX(id), 1), MAX(id) IS NOT NULL) "
                f'FROM "{name}"')


@dataclass(frozen=True, slots=True)
class Checked:
    """What `check` found: the schema's applied and missing steps, rows per table, the problems."""

    applied: list[str]
    missing: list[str]
    unknown: list[str]            # applied steps this ohd does not know (a newer ohd migrated it)
    counts: dict[str, int]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "version": self.applied[-1] if self.applied else None, "applied": self.applied,
                "missing": self.missing, "unknown": self.unknown, "counts": self.counts, "problems": self.problems}


def check(db: peewee.Database, now: datetime, lost_after: timedelta) -> Checked:
    """The store's integrity at `now` (a daemon silent for `lost_after` is lost); changes nothing."""
    done = schema.applied(db)
    known = [name for name, _ in schema.MIGRATIONS]
    missing = [name for name in known if name not in done]
    unknown = [name for name in done if name not in known]
    if missing:
        problem = (f"the schema is not up to date: {len(missing)} migration(s) not applied ({', '.join(missing)}); "
                   "run `ohd db migrate`")
        return Checked(done, missing, unknown, {}, [problem])
    problems = [f"migration(s) {', '.join(unknown)} applied by a newer ohd than this one"] if unknown else []
    problems += _dangling(db) + _statuses(db) + _leases(db, now, lost_after)
    return Checked(done, missing, unknown, counts(db), problems)


def _dangling(db: peewee.Database) -> list[str]:
    tables = schema.bind(db)
    problems = []
    for child, column, parent in REFERENCES:
        model, target = getattr(tables, child), getattr(tables, parent)
        ref = getattr(model, column)
        rows = [row[column] for row in dict_rows(model.select(ref).where(
            ref.is_null(False) & ref.not_in(target.select(target.id))).order_by(ref))]
        if rows:
            shown = ", ".join(map(str, sorted(set(rows))[:5])) + (", ..." if len(set(rows)) > 5 else "")
            problems.append(f"{len(rows)} {child} row(s) name a {parent} that does not exist ({column} {shown})")
    return problems


def _statuses(db: peewee.Database) -> list[str]:
    t = schema.bind(db).task
    known = [status.value for status in TaskStatus]
    bad = [row["id"] for row in dict_rows(t.select(t.id).where(t.status.not_in(known)).order_by(t.id))]
    return [f"task(s) {', '.join(map(str, bad))} have a status ohd does not know"] if bad else []


def _leases(db: peewee.Database, now: datetime, lost_after: timedelta) -> list[str]:
    """Running tasks without a lease, with an expired one, or leased to a daemon that is not alive."""
    t = schema.bind(db).task
    states = {info.id: info.state for info in Fleet(db).daemons(now, lost_after)}
    problems = []
    rows = dict_rows(t.select(t.id, t.lease_owner, t.lease_until).where(t.status == TaskStatus.RUNNING.value)
                     .order_by(t.id))
    for row in rows:
        owner, daemon = row["lease_owner"], daemon_of(row["lease_owner"])
        if owner is None or row["lease_until"] is None:
            problems.append(f"task {row['id']} is running without a lease")
        elif daemon is not None and states.get(daemon) != ALIVE:
            state = states.get(daemon, "unknown (no row)")
            problems.append(f"task {row['id']} is leased to daemon {daemon}, which is {state}: the next daemon "
                            "to heartbeat returns it to the queue")
        elif row["lease_until"] < now:
            problems.append(f"task {row['id']}'s lease ({owner}) expired at {row['lease_until'].isoformat()}: "
                            "a running daemon returns it to the queue")
    return problems
