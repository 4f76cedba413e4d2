"""The webhook outbox in SQL: events written with the state change that causes them, and their delivery.

`record` is called by the store and the governor inside the write transaction of a task's end, a
model's cooldown or a quota used up, so an event row exists if and only if its state change
committed (one row per hook that takes the event; no hook configured, no row). `Outbox` is the
sender's side: the rows due now, one per subject (a task, a model) and the oldest undelivered one
of it, so a subject's later event never overtakes an earlier one; then delivered, tried again
later, or dead once older than the bound; a week after that it is deleted (`prune`). Nothing here
sends HTTP or reads configuration.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import peewee

from ohd.core.events import Hook
from ohd.store import schema
from ohd.store.schema import Tables
from ohd.store.transactions import LOCK_WAIT_S, atomic_write, connect

SCAN = 500   # undelivered rows of one hook read per round, oldest first (their subjects' heads are among them)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One outbox row to send."""

    id: int
    hook: str
    event: str
    task_id: int | None
    model: str | None
    payload: dict[str, Any]
    created_at: datetime
    attempts: int


def record(m: Tables, hooks: Iterable[Hook], event: str, now: datetime, data: dict[str, Any], *,
           task_id: int | None = None, model: str | None = None) -> int:
    """One row per hook that takes `event`; call it inside the write transaction of the state change."""
    rows = [{"hook": hook.key, "event": event, "task_id": task_id, "model": model, "payload": data,
             "created_at": now, "next_try_at": now} for hook in hooks if event in hook.events]
    if rows:
        m.webhook_outbox.insert_many(rows).execute()
    return len(rows)


class Outbox:
    """The sender's reads and writes of `webhook_outbox`; safe to call from any thread."""

    def __init__(self, db: peewee.Database, lock_wait_s: float = LOCK_WAIT_S) -> None:
        self.db = db
        self.rows = schema.bind(db).webhook_outbox
        self.lock_wait_s = lock_wait_s

    def _undelivered(self, hook: str) -> Any:
        o = self.rows
        return (o.hook == hook) & o.delivered_at.is_null() & o.dead_at.is_null()

    def _heads(self, hook: str) -> list[Any]:
        """The oldest undelivered row of each subject (a task, else a model) of `hook`."""
        connect(self.db)
        o = self.rows
        heads: dict[tuple[int | None, str | None], Any] = {}
        for row in o.select().where(self._undelivered(hook)).order_by(o.id).limit(SCAN):
            heads.setdefault((row.task_id, None if row.task_id is not None else row.model), row)
        return list(heads.values())

    def due(self, hook: str, now: datetime) -> list[Delivery]:
        """The head of each subject's queue of `hook` whose next try has come, oldest first."""
        return [Delivery(row.id, row.hook, row.event, row.task_id, row.model, row.payload, row.created_at,
                         row.attempts) for row in self._heads(hook) if row.next_try_at <= now]

    def next_try(self, hook: str) -> datetime | None:
        """When the earliest head of `hook`'s subjects may be tried (None: nothing to send)."""
        return min((row.next_try_at for row in self._heads(hook)), default=None)

    def delivered(self, delivery_id: int, now: datetime) -> None:
        o = self.rows
        with atomic_write(self.db, self.lock_wait_s):
            o.update(delivered_at=now, attempts=o.attempts + 1).where(o.id == delivery_id).execute()

    def failed(self, delivery_id: int, now: datetime, error: str, retry_at: datetime | None) -> None:
        """A try failed with `error`: tried again at `retry_at`, or (None) dead with it."""
        o = self.rows
        changes: dict[str, Any] = {"attempts": o.attempts + 1, "last_error": error[:2000], "last_try_at": now}
        changes.update({"next_try_at": retry_at} if retry_at is not None else {"dead_at": now})
        with atomic_write(self.db, self.lock_wait_s):
            o.update(**changes).where(o.id == delivery_id).execute()

    def prune(self, hook: str, before: datetime) -> int:
        """Rows of `hook` delivered or dead before `before` are deleted (the outbox is not a log); how many."""
        o = self.rows
        done = (o.hook == hook) & ((o.delivered_at < before) | (o.dead_at < before))
        connect(self.db)
        if not o.select(o.id).where(done).exists():
            return 0    # the common case: a read, no writer lock
        with atomic_write(self.db, self.lock_wait_s):
            return int(o.delete().where(done).execute())

    def summary(self, hooks: Sequence[str]) -> list[dict[str, Any]]:
        """Per hook key: rows pending, delivered and dead, the last error and when, the last delivery."""
        connect(self.db)
        o, fn = self.rows, peewee.fn
        views = []
        for hook in hooks:
            counts: dict[str, Any] = o.select(fn.COUNT(o.id).alias("n"), fn.COUNT(o.delivered_at).alias("delivered"),
                              fn.COUNT(o.dead_at).alias("dead"), fn.MAX(o.delivered_at).alias("last")
                              ).where(o.hook == hook).dicts().get()  # type: ignore[assignment]
            error = (o.select(o.last_error, o.last_try_at).where((o.hook == hook) & o.last_error.is_null(False))
                     .order_by(o.last_try_at.desc(), o.id.desc()).first())
            last = counts["last"]
            views.append({
                "key": hook, "pending": int(counts["n"]) - int(counts["delivered"]) - int(counts["dead"]),
                "delivered": int(counts["delivered"]), "dead": int(counts["dead"]),
                "last_delivered_at": None if last is None else o.delivered_at.python_value(last).isoformat(),
                "last_error": None if error is None else error.last_error,
                "last_error_at": None if error is None else error.last_try_at.isoformat()})
        return views
