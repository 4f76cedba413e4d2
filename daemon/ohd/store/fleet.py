"""The fleet: one `daemon` row per daemon start on this database (issue 15, migration `0012_daemons`).

A daemon registers as it starts (a fresh id, `<host>-<pid>-<8 hex>`, which prefixes its workers'
lease owners: `<id>/w0`), heartbeats while it runs and sets `stopped_at` on a clean stop. A daemon
is *lost* when its heartbeat is older than the limit the caller gives, or when a later daemon
started on its host with its state dir: that one holds the state dir's lock, so its predecessor is
dead. The leases of a lost or stopped daemon are nobody's: any daemon returns them
(`Store.return_leases`) at once, not at their expiry. Rows whose heartbeat is older than a day are
dropped at each registration (their leases were returned long before).
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any

import peewee

from ohd.store import schema
from ohd.store.records import dict_rows
from ohd.store.schema import TaskStatus
from ohd.store.transactions import atomic_write, connect

KEEP = timedelta(days=1)   # a row whose heartbeat is older than this is dropped
ALIVE, LOST, STOPPED = "alive", "lost", "stopped"


def new_daemon_id(host: str, pid: int) -> str:
    """A fresh id for one daemon start: `<host>-<pid>-<8 hex>` (unique even when a pid is reused)."""
    return f"{host}-{pid}-{secrets.token_hex(4)}"


def worker_prefix(daemon_id: str) -> str:
    """What a daemon's worker ids begin with (the pool adds 0, 1, ...): each lease owner names its daemon."""
    return f"{daemon_id}/w"


def daemon_of(lease_owner: str | None) -> str | None:
    """The daemon id a lease owner (`<id>/w<n>`) names; None for an owner of no daemon (a test's)."""
    if lease_owner is None or "/" not in lease_owner:
        return None
    return lease_owner.rsplit("/", 1)[0]


@dataclass(frozen=True, slots=True)
class DaemonInfo:
    """One daemon's row, with its state as read at one instant."""

    id: str
    host: str
    pid: int
    version: str
    state_dir: str
    repos: tuple[str, ...]
    workers: int
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None
    state: str             # alive, lost or stopped
    heartbeat_age_s: float
    running: int           # tasks its workers hold a lease on

    def as_dict(self) -> dict[str, Any]:
        return {f.name: schema.iso(getattr(self, f.name)) for f in fields(self)}


class Fleet:
    """Writes and reads `daemon` rows."""

    def __init__(self, db: peewee.Database) -> None:
        self.db = db
        self.m = schema.bind(db)

    def register(self, daemon_id: str, *, host: str, pid: int, version: str, state_dir: str,
                 repos: Sequence[str], workers: int, now: datetime) -> None:
        """Our row, heartbeat now; rows silent for over a day go."""
        d = self.m.daemon
        with atomic_write(self.db):
            d.delete().where(d.heartbeat_at < now - KEEP).execute()
            d.insert(id=daemon_id, host=host, pid=pid, version=version, state_dir=state_dir, repos=tuple(repos),
                     workers=workers, started_at=now, heartbeat_at=now).execute()

    def heartbeat(self, daemon_id: str, now: datetime, workers: int) -> bool:
        """Our heartbeat (and worker count) now; False if our row is gone (pruned while we were stalled
        a day) or was marked stopped."""
        d = self.m.daemon
        with atomic_write(self.db):
            changed = (d.update(heartbeat_at=now, workers=workers)
                       .where((d.id == daemon_id) & d.stopped_at.is_null()).execute())
        return bool(changed)

    def deregister(self, daemon_id: str, now: datetime) -> None:
        """A clean stop: our row says when."""
        d = self.m.daemon
        with atomic_write(self.db):
            d.update(stopped_at=now, heartbeat_at=now).where(d.id == daemon_id).execute()

    def daemons(self, now: datetime, lost_after: timedelta) -> list[DaemonInfo]:
        """Every daemon row, oldest start first, with its state at `now` and the tasks it runs."""
        connect(self.db)
        d, t = self.m.daemon, self.m.task
        rows = dict_rows(d.select().order_by(d.started_at, d.id))
        owners = [row.lease_owner for row in t.select(t.lease_owner).where(t.status == TaskStatus.RUNNING.value)]
        running = Counter(daemon_of(owner) for owner in owners)
        latest: dict[tuple[str, str], datetime] = {}
        for row in rows:
            key = (row["host"], row["state_dir"])
            latest[key] = max(latest.get(key, row["started_at"]), row["started_at"])
        infos = []
        for row in rows:
            superseded = latest[(row["host"], row["state_dir"])] > row["started_at"]
            age = (now - row["heartbeat_at"]).total_seconds()
            state = (STOPPED if row["stopped_at"] is not None
                     else LOST if superseded or age > lost_after.total_seconds() else ALIVE)
            infos.append(DaemonInfo(**{f.name: row[f.name] for f in fields(DaemonInfo)
                                       if f.name not in ("state", "heartbeat_age_s", "running")},
                                    state=state, heartbeat_age_s=round(max(0.0, age), 1),
                                    running=running.get(row["id"], 0)))
        return infos

    def gone(self, now: datetime, lost_after: timedelta) -> list[str]:
        """The ids of the daemons whose leases are nobody's: lost or stopped, holding a task still."""
        return [info.id for info in self.daemons(now, lost_after) if info.state != ALIVE and info.running]
