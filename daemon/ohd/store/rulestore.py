"""SQL of the standing rules: their firings and their schedule clocks.

Two tables of `schema` (migration `0003_standing_rules`): `rule_firing` (one row per task a rule
created: rule file, changed path, content hash at firing time, task id, origin) and
`rule_clock` (per schedule rule, the last firing acted on). Invariant: the checks that
decide whether a change fires (an open task for the same (rule, path), the hash of the
last accepted run) and the task it creates are one writer transaction, so two callers
(the watcher and the hook spool) never queue the same (rule, path) twice. Both tables name a rule's
repo by its identity (`Store.identity_of`, issue 15), so the clones of one repo share their rules'
clocks and firings, and one schedule's firing is one task (`firing_key`, unique) whichever daemon
of the fleet sees it first.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import peewee

from ohd.core.taskfile import TaskSpec
from ohd.store.records import dict_rows, firing_key
from ohd.store.schema import Task, TaskStatus, task_from_row
from ohd.store.store import Store
from ohd.store.transactions import atomic_write, connect

log = logging.getLogger("ohd.rulestore")

OPEN = (TaskStatus.PENDING.value, TaskStatus.QUEUED.value)
HOLD_MARGIN_S = 5.0   # after a running task's time limit, before its re-run may start


def source_of(rule: str) -> str:
    """The `source` of tasks a rule creates, e.g. `rule:tasks.d/tests.yaml`."""
    return f"rule:{rule}"


class RuleStore:
    """Reads and writes of the rule tables, on the `Store`'s database (any thread)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.db = store.db
        self.firing = store.m.rule_firing
        self.clocks = store.m.rule_clock

    @contextmanager
    def _write(self) -> Iterator[None]:
        with atomic_write(self.db, self.store.lock_wait_s):
            yield

    def _id(self, repo: Path) -> str:
        """The rule tables' name of the repo at `repo`: its identity."""
        return self.store.identity_of(str(repo))

    # -- schedules ------------------------------------------------------------------

    def last_fire(self, repo: Path, rule: str) -> datetime | None:
        """The last firing acted on (or the rule's first sighting), if recorded."""
        connect(self.db)
        c = self.clocks
        row = c.select(c.last_fire).where((c.repo == self._id(repo)) & (c.rule == rule)).first()
        return None if row is None else row.last_fire

    def baseline(self, repo: Path, rule: str, now: datetime) -> datetime:
        """`last_fire`, recording `now` first for a rule never seen (no firing before it counts)."""
        known = self.last_fire(repo, rule)
        if known is not None:
            return known
        self.set_last_fire(repo, rule, now)
        return now

    def set_last_fire(self, repo: Path, rule: str, when: datetime) -> None:
        c = self.clocks
        with self._write():
            (c.insert(repo=self._id(repo), rule=rule, last_fire=when)
             .on_conflict(conflict_target=[c.repo, c.rule], update={c.last_fire: when})
             .execute())

    def fire_schedule(self, repo: Path, rule: str, spec: TaskSpec, fire_time: datetime,
                      now: datetime, base_commit: str | None = None) -> int | None:
        """The task of one firing, its record and the new `last_fire`, in one transaction; None when
        a daemon of the fleet (another clone's, or ours) made this firing's task already."""
        key = firing_key(self._id(repo), rule, fire_time.astimezone(UTC).isoformat())
        try:
            with self._write():
                if self.firing.select(self.firing.id).where(self.firing.firing_key == key).exists():
                    return None
                task_id = self.store.enqueue(str(repo), spec, now, source=source_of(rule), base_commit=base_commit)
                self._record(self._id(repo), rule, spec.file, None, task_id, "schedule", fire_time, key)
                self.set_last_fire(repo, rule, fire_time)
        except peewee.IntegrityError:      # another daemon recorded this firing just now
            return None
        return task_id

    # -- changes --------------------------------------------------------------------

    def fire_change(self, repo: Path, rule: str, spec: TaskSpec, sha256: str, origin: str,
                    now: datetime, base_commit: str | None = None) -> tuple[int, TaskStatus] | None:
        """Queue the task of a changed file unless it would be redundant; its id and status
        (pending when it waits for the running one), or None.

        Redundant: a pending/queued task for the same (rule, path) exists (it will read
        the newest content); the running one was fired for this very content; or,
        nothing running, the last accepted run was for this content.
        """
        with self._write():
            open_, running, running_until = self._open(self._id(repo), rule, spec.file)
            if open_:
                # The queued task will read the newest content: remember that one for it.
                self.firing.update(sha256=sha256).where(self.firing.id.in_(open_)).execute()
                return None
            if running is not None:
                if running == sha256:
                    return None
            elif self._last_accepted(self._id(repo), rule, spec.file) == sha256:
                return None
            task_id = self.store.enqueue(str(repo), spec, now, source=source_of(rule), base_commit=base_commit)
            self._record(self._id(repo), rule, spec.file, sha256, task_id, origin, now)
            if running_until is not None:
                self._hold(task_id, running_until, now)
        return task_id, TaskStatus.PENDING if running_until is not None else TaskStatus.QUEUED

    def _hold(self, task_id: int, until: datetime, now: datetime) -> None:
        """The re-run waits (pending) until the running task's time limit has surely passed,
        so it follows that task instead of running beside it; `promote_due` queues it then."""
        t = self.store.m.task
        (t.update(status=TaskStatus.PENDING.value, not_before=max(until, now), updated_at=now)
         .where(t.id == task_id).execute())

    def release_held(self, now: datetime) -> list[int]:
        """Held re-runs whose running task has ended become due now (not at its time limit);
        their ids. Held = pending, from a rule, never started (a task the governor deferred
        has started and keeps its own time)."""
        f, t = self.firing, self.store.m.task
        connect(self.db)
        held = dict_rows(f.select(f.task_id, f.repo, f.rule, f.path).join(t, on=(f.task_id == t.id))
                         .where((t.status == TaskStatus.PENDING.value) & t.started_at.is_null()
                                & (t.not_before > now)))
        released = []
        for row in held:
            ahead = self._firings(row["repo"], row["rule"], row["path"]).where(
                t.status == TaskStatus.RUNNING.value)
            if ahead.exists():
                continue
            with self._write():
                changed = (t.update(not_before=now, updated_at=now)
                           .where((t.id == row["task_id"]) & (t.status == TaskStatus.PENDING.value)
                                  & t.started_at.is_null()).execute())
            if changed:
                released.append(int(row["task_id"]))
        return released

    def _open(self, repo: str, rule: str, path: str) -> tuple[list[int], str | None, datetime | None]:
        """(firings whose task is pending/queued, the content hash of a running one, the time
        by which that one has ended: started_at + its time limit)."""
        rows = self._firings(repo, rule, path).where(
            self.store.m.task.status.in_([*OPEN, TaskStatus.RUNNING.value]))
        open_: list[int] = []
        running, until = None, None
        for row in dict_rows(rows):
            if row["status"] in OPEN:
                open_.append(row["id"])
            else:
                running = row["sha256"] or ""
                started = row["started_at"]
                until = None if started is None else started + timedelta(seconds=row["timeout_s"] + HOLD_MARGIN_S)
        return open_, running, until

    def _last_accepted(self, repo: str, rule: str, path: str) -> str | None:
        t = self.store.m.task
        rows = dict_rows(self._firings(repo, rule, path).where(t.status == TaskStatus.COMPLETED.value)
                         .order_by(self.firing.id.desc()).limit(1))
        return rows[0]["sha256"] if rows else None

    def _firings(self, repo: str, rule: str, path: str) -> Any:
        """The firings of (rule, path) in the repo of identity `repo`, with their tasks."""
        f, t = self.firing, self.store.m.task
        return (f.select(f.id, f.sha256, t.status, t.started_at, t.timeout_s).join(t, on=(f.task_id == t.id))
                .where((f.repo == repo) & (f.rule == rule) & (f.path == path)))

    def _record(self, repo: str, rule: str, path: str, sha256: str | None, task_id: int,
                origin: str, fired_at: datetime, key: str | None = None) -> None:
        self.firing.insert(repo=repo, rule=rule, path=path, sha256=sha256, task_id=task_id,
                           origin=origin, fired_at=fired_at, firing_key=key).execute()

    # -- listing --------------------------------------------------------------------

    def last_task(self, repo: Path, rule: str) -> Task | None:
        """The newest task the rule created."""
        connect(self.db)
        f = self.firing
        row = (f.select(f.task_id).where((f.repo == self._id(repo)) & (f.rule == rule))
               .order_by(f.id.desc()).first())
        if row is None:
            return None
        t = self.store.m.task
        tasks = dict_rows(t.select().where(t.id == row.task_id))
        return task_from_row(tasks[0]) if tasks else None
