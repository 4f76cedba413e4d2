"""Records: the values the store hands out besides the task (`schema.Task`), and small row helpers.

Values only: the rows they are read from are declared in `schema`; datetimes are aware UTC.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, cast

from ohd.store.schema import Task, iso


@dataclass(frozen=True, slots=True)
class Claim:
    task: Task
    worker_id: str
    lease_until: datetime


@dataclass(frozen=True, slots=True)
class Execution:
    id: int
    task_id: int
    attempt: int
    model: str
    started_at: datetime
    finished_at: datetime
    latency_ms: int
    prompt_tokens: int
    completion_tokens: int
    cost: float | None
    outcome: str
    error_class: str | None
    error: str | None
    score: float | None = None        # the validation score, when the result got a verdict
    validation_ms: int | None = None  # how long judging the answer took (latency_ms is the call's own)
    source_sha256: str | None = None  # the target text an answer was judged against (None: no answer)
    cached: bool = False              # a replayed answer (the replay cache): no request was sent

    def as_dict(self) -> dict[str, Any]:
        return {f.name: iso(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class Written:
    """What ohd wrote at a path: `sha256`, its last (or current) write; `previous_sha256`, until the
    task of that write finished (a kill may have come between its record and its rename), what the
    file held before it ('' for no file), else None; `task_id`, the task that wrote it."""

    sha256: str
    previous_sha256: str | None
    task_id: int | None

    def holds(self, sha256: str | None) -> bool:
        """Whether a file of this hash is what ohd wrote there (the write, or what it replaces)."""
        return sha256 is not None and sha256 in (self.sha256, self.previous_sha256)

    @property
    def landing(self) -> bool:
        """The write was recorded and its task has not finished since."""
        return self.previous_sha256 is not None


def dict_rows(query: Any) -> list[dict[str, Any]]:
    """A select's rows as dicts (the peewee stubs type `.dicts()` as model instances)."""
    return cast(list[dict[str, Any]], list(query.dicts()))


def tuple_rows(query: Any) -> list[tuple[Any, ...]]:
    return cast(list[tuple[Any, ...]], list(query.tuples()))


def pending_key(repo: str, sha256: str) -> str:
    return f"{sha256}:{repo}"


def fleet_key(repo_id: str, relpath: str, sha256: str, drop: int) -> str:
    """The fleet-wide key of a task file: the `drop`-th time this content came to `relpath` in a
    clone of the repo `repo_id` (every clone's n-th drop of it is the one task of that key)."""
    return f"{repo_id}\x1f{relpath}\x1f{sha256}\x1f{drop}"


def firing_key(repo_id: str, rule: str, instant: str) -> str:
    """The fleet-wide key of one firing of a schedule rule: its repo's identity, rule file, instant."""
    return f"{repo_id}\x1f{rule}\x1f{instant}"
