"""Records: the values the store hands out and the peewee query models they are read from.

Split from `store.py` (which holds the queries and transactions). Invariant: the
query models are unbound; `bind_models(db)` makes copies bound to one database, so
two stores on two databases never share state. The tables themselves are created by
`migrations` (its snapshot models); `tests/test_migrations.py` checks that these
query models name exactly the migrated columns. Datetimes: aware UTC in and out,
naive UTC in the database.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar, cast

import peewee

_SQLITE_FORMAT = "%Y-%m-%d %H:%M:%S.%f"   # fixed width, so text order is time order


class TaskStatus(StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})
# how the error of a quarantined completion begins: ohd's tests fail against the code, a possible bug
QUARANTINED = "quarantined: "


def _iso(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True, slots=True)
class Task:
    id: int
    repo: str
    type: str
    target: str
    description: str
    priority: str
    output: str | None
    models: tuple[str, ...]
    min_quality: float
    max_attempts: int
    timeout_s: float
    prompt: str | None
    source: str | None
    status: str
    attempts: int
    error: str | None
    output_path: str | None
    report_path: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    not_before: datetime | None
    lease_owner: str | None
    lease_until: datetime | None
    cancel_requested: bool
    rule_levels: dict[str, str] = field(default_factory=dict)   # rule -> level, over the configuration's
    crashes: int = 0     # runs a daemon's crash (or an expired lease) interrupted; at the limit it fails

    @property
    def quarantined(self) -> bool:
        """Completed without an output: the tests fail against the code (a possible bug, reported)."""
        return self.status == TaskStatus.COMPLETED and (self.error or "").startswith(QUARANTINED)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ISO datetimes, models as a list; `quarantined` beside `status`."""
        return {**{f.name: _iso(getattr(self, f.name)) for f in fields(self)}, "quarantined": self.quarantined}


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

    def as_dict(self) -> dict[str, Any]:
        return {f.name: _iso(getattr(self, f.name)) for f in fields(self)}


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


# -- query models (unbound; `bind_models` makes per-database copies) -------------------

if TYPE_CHECKING:
    _DateTimeField = peewee.DateTimeField[datetime | None]
else:
    _DateTimeField = peewee.DateTimeField   # the stubs' generic is not subscriptable at run time


class UtcDateTimeField(_DateTimeField):
    """Aware datetimes in, naive UTC in the database, aware UTC out."""

    def db_value(self, value: Any) -> Any:
        if not isinstance(value, datetime):
            return value
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}; ohd stores timezone-aware UTC only")
        naive = value.astimezone(UTC).replace(tzinfo=None)
        if isinstance(self.model._meta.database, peewee.SqliteDatabase):
            return naive.strftime(_SQLITE_FORMAT)
        return naive

    def python_value(self, value: Any) -> Any:
        value = cast(Any, super()).python_value(value)
        if isinstance(value, datetime):
            return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value


class TaskRow(peewee.Model):
    id = peewee.AutoField()
    repo = peewee.TextField()
    type = peewee.CharField()
    target = peewee.TextField()
    description = peewee.TextField()
    priority = peewee.CharField()
    rank = peewee.IntegerField()
    output = peewee.TextField(null=True)
    models = peewee.TextField()
    min_quality = peewee.FloatField()
    max_attempts = peewee.IntegerField()
    timeout_s = peewee.FloatField()
    prompt = peewee.TextField(null=True)
    source = peewee.TextField(null=True)
    status = peewee.CharField()
    attempts = peewee.IntegerField()
    error = peewee.TextField(null=True)
    output_path = peewee.TextField(null=True)
    report_path = peewee.TextField(null=True)
    created_at = UtcDateTimeField()
    updated_at = UtcDateTimeField()
    started_at = UtcDateTimeField(null=True)
    finished_at = UtcDateTimeField(null=True)
    not_before = UtcDateTimeField(null=True)
    lease_owner = peewee.CharField(null=True)
    lease_until = UtcDateTimeField(null=True)
    cancel_requested = peewee.BooleanField()
    rule_levels = peewee.TextField(null=True)
    crashes = peewee.IntegerField()


class ExecutionRow(peewee.Model):
    id = peewee.AutoField()
    task_id = peewee.IntegerField()
    attempt = peewee.IntegerField()
    model = peewee.CharField()
    started_at = UtcDateTimeField()
    finished_at = UtcDateTimeField()
    latency_ms = peewee.IntegerField()
    prompt_tokens = peewee.IntegerField()
    completion_tokens = peewee.IntegerField()
    cost = peewee.FloatField(null=True)
    outcome = peewee.CharField()
    error_class = peewee.CharField(null=True)
    error = peewee.TextField(null=True)
    score = peewee.FloatField(null=True)
    validation_ms = peewee.IntegerField(null=True)
    source_sha256 = peewee.CharField(null=True)


class IngestedFileRow(peewee.Model):
    id = peewee.AutoField()
    repo = peewee.TextField()
    relpath = peewee.TextField()
    sha256 = peewee.CharField()
    task_id = peewee.IntegerField(null=True)
    ingested_at = UtcDateTimeField()
    pending_key = peewee.TextField(null=True)


class WrittenFileRow(peewee.Model):
    id = peewee.AutoField()
    repo = peewee.TextField()
    path = peewee.TextField()
    sha256 = peewee.CharField()
    task_id = peewee.IntegerField(null=True)
    written_at = UtcDateTimeField()
    previous_sha256 = peewee.CharField(null=True)


class ModelCallRow(peewee.Model):
    id = peewee.AutoField()
    task_id = peewee.IntegerField()
    model = peewee.CharField()
    started_at = peewee.DateTimeField()
    prompt = peewee.TextField()
    response = peewee.TextField()
    execution_id = peewee.IntegerField(null=True)
    pending = peewee.TextField(null=True)


class ModelStateRow(peewee.Model):
    model = peewee.CharField(primary_key=True)
    state = peewee.CharField()
    cooldown_until = UtcDateTimeField(null=True)
    dead = peewee.BooleanField()
    failures = peewee.IntegerField()
    updated_at = UtcDateTimeField(null=True)
    opened_at = UtcDateTimeField(null=True)
    rpm_limit = peewee.IntegerField(null=True)


M = TypeVar("M", bound=peewee.Model)


def _bind(model: type[M], db: peewee.Database, table: str) -> type[M]:
    meta = type("Meta", (), {"database": db, "table_name": table})
    return cast(type[M], type(model.__name__, (model,), {"Meta": meta, "__module__": __name__}))


@dataclass(frozen=True, slots=True)
class Models:
    task: type[TaskRow]
    execution: type[ExecutionRow]
    ingested_file: type[IngestedFileRow]
    written_file: type[WrittenFileRow]
    model_state: type[ModelStateRow]
    model_call: type[ModelCallRow]


def bind_models(db: peewee.Database) -> Models:
    """Query models bound to `db` alone (the tables themselves are made by `migrations`)."""
    return Models(task=_bind(TaskRow, db, "task"), execution=_bind(ExecutionRow, db, "execution"),
                  ingested_file=_bind(IngestedFileRow, db, "ingested_file"),
                  written_file=_bind(WrittenFileRow, db, "written_file"),
                  model_state=_bind(ModelStateRow, db, "model_state"),
                  model_call=_bind(ModelCallRow, db, "model_call"))


_TASK_FIELDS = tuple(f.name for f in fields(Task))


def task_from_row(row: dict[str, Any]) -> Task:
    values = {name: row[name] for name in _TASK_FIELDS}
    values["models"] = tuple(json.loads(row["models"]))
    values["cancel_requested"] = bool(row["cancel_requested"])
    values["rule_levels"] = json.loads(row["rule_levels"]) if row.get("rule_levels") else {}
    return Task(**values)


def dict_rows(query: Any) -> list[dict[str, Any]]:
    """A select's rows as dicts (the peewee stubs type `.dicts()` as model instances)."""
    return cast(list[dict[str, Any]], list(query.dicts()))


def tuple_rows(query: Any) -> list[tuple[Any, ...]]:
    return cast(list[tuple[Any, ...]], list(query.tuples()))


def pending_key(repo: str, sha256: str) -> str:
    return f"{sha256}:{repo}"
