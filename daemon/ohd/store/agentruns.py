"""The history of agent runs: one `agent_run` row per attempt of a task an agent runner does.

An edge room beside `store`, on the same database (migration `0011_agent_runs`). A run is recorded
when its agent starts (so a crash leaves a row without an end: the daemon's start-up removes its
worktree) and completed when it ends: exit code, outcome, the agent's stdout and stderr and the
diff, each capped like the call history (`calls.cap`). The argv is stored as run; the proxy's
per-run token travels in the agent's environment only, so it is never in a row. `ohd show ID
--diff` and `ohd apply ID` read the diff back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, cast

import peewee

from ohd.store import schema
from ohd.store.calls import DEFAULT_MAX_BYTES, cap
from ohd.store.transactions import atomic_write, connect

# a diff is kept whole up to this size (it is the task's result); bigger ones are refused by the run
MAX_DIFF_BYTES = 5_000_000


@dataclass(frozen=True, slots=True)
class AgentRun:
    """One agent attempt as its row holds it."""

    id: int
    task_id: int
    attempt: int
    runner: str
    argv: tuple[str, ...]
    worktree: str
    started_at: datetime
    ended_at: datetime | None
    pid: int | None
    exit_code: int | None
    outcome: str | None
    error: str | None
    stdout: str
    stderr: str
    diff: str | None
    diff_stat: str | None
    requests: int
    models: tuple[str, ...] | None

    def as_dict(self) -> dict[str, Any]:
        return {f.name: schema.iso(getattr(self, f.name)) for f in fields(self)}


class AgentRuns:
    """Writes and reads `agent_run` rows."""

    def __init__(self, db: peewee.Database, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.db = db
        self.max_bytes = max_bytes
        self.row = schema.bind(db).agent_run

    def start(self, task_id: int, attempt: int, runner: str, argv: Sequence[str], worktree: str,
              now: datetime) -> int:
        """The row of an agent that starts now; its id."""
        with atomic_write(self.db):
            return int(self.row.insert(task_id=task_id, attempt=attempt, runner=runner, argv=list(argv),
                                       worktree=worktree, started_at=now).execute())

    def started(self, run_id: int, pid: int) -> None:
        """The agent's process (and process group) id, while it runs."""
        with atomic_write(self.db):
            self.row.update(pid=pid).where(self.row.id == run_id).execute()

    def finish(self, run_id: int, now: datetime, *, outcome: str, exit_code: int | None = None,
               error: str | None = None, stdout: str = "", stderr: str = "", diff: str | None = None,
               diff_stat: str | None = None, requests: int = 0, models: Sequence[str] = ()) -> None:
        """The run's end: what the agent printed (capped), its diff, its outcome."""
        with atomic_write(self.db):
            self.row.update(
                ended_at=now, outcome=outcome, exit_code=exit_code, error=error,
                stdout=cap(stdout, self.max_bytes), stderr=cap(stderr, self.max_bytes),
                diff=diff, diff_stat=diff_stat, requests=requests, models=list(models) or None,
            ).where(self.row.id == run_id).execute()

    def for_task(self, task_id: int) -> list[AgentRun]:
        """The task's runs, oldest first."""
        connect(self.db)
        r = self.row
        rows = r.select().where(r.task_id == task_id).order_by(r.id).dicts()
        return [AgentRun(**cast(dict[str, Any], row)) for row in rows]

    def accepted_diff(self, task_id: int) -> str | None:
        """The diff of the task's accepted run (the last one), or None."""
        accepted = [run for run in self.for_task(task_id) if run.outcome == "accepted" and run.diff]
        return accepted[-1].diff if accepted else None

    def unfinished(self, under: str) -> list[AgentRun]:
        """Runs with no end recorded whose worktree is under the folder `under` (their daemon stopped
        or crashed while the agent ran)."""
        connect(self.db)
        r = self.row
        rows = r.select().where(r.ended_at.is_null() & r.worktree.startswith(under.rstrip("/") + "/")).order_by(
            r.id).dicts()
        return [AgentRun(**cast(dict[str, Any], row)) for row in rows]

    def end_unfinished(self, now: datetime, why: str, under: str) -> int:
        """Mark ended every unfinished run whose worktree is under the folder `under` (one daemon's:
        at its start, after their worktrees are gone; another daemon may share the database); how many."""
        r = self.row
        with atomic_write(self.db):
            return int(r.update(ended_at=now, outcome="interrupted", error=why)
                       .where(r.ended_at.is_null() & r.worktree.startswith(under.rstrip("/") + "/")).execute())
