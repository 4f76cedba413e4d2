"""The store's schema, declared once: every table's peewee model, the task row's value, the migrations.

Every query in `store/` runs on these models, bound to one database by `bind(db)` (copies, so two
stores on two databases never share state; nothing is bound at module level). The tables are made
by `MIGRATIONS`, applied by `migrate(db)`; each step describes its tables as they were then (the
shipped ones live in `migrations`), and `tests/store/test_migrations.py` checks that these models name
exactly the migrated columns. Adding a task column: the column here, its `Task` field here, a step
at the end of `MIGRATIONS`; the insert and the row -> `Task` mapping follow from the fields.
Datetimes are stored one way (`fields.UtcDateTimeField`): aware UTC in, naive UTC in the database.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, fields
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar, cast

import peewee

from ohd.core.taskfile import TaskSpec
from ohd.errors import StorageUnavailable
from ohd.store import migrations
from ohd.store.fields import JsonField, UtcDateTimeField
from ohd.store.transactions import atomic_write, connect

log = logging.getLogger("ohd.migrations")

_MIGRATE_LOCK = 0x6F6864  # "ohd": the advisory lock taken while migrating PostgreSQL


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


def iso(value: Any) -> Any:
    """A value as JSON carries it: datetimes in ISO text, tuples as lists."""
    if isinstance(value, datetime):
        return value.isoformat()
    return list(value) if isinstance(value, tuple) else value


# -- the tables --------------------------------------------------------------------------
# Unbound: `bind` makes copies bound to one database. Each names its table (`table_name`).

class TaskRow(peewee.Model):
    id = peewee.AutoField()
    repo = peewee.TextField()
    type = peewee.CharField()
    target = peewee.TextField()
    description = peewee.TextField()
    priority = peewee.CharField()
    rank = peewee.IntegerField()
    output = peewee.TextField(null=True)
    models = JsonField(load=tuple)                   # a list of model ids
    min_quality = peewee.FloatField()
    max_attempts = peewee.IntegerField()
    timeout_s = peewee.FloatField()
    prompt = peewee.TextField(null=True)
    source = peewee.TextField(null=True)
    status = peewee.CharField(default=TaskStatus.QUEUED.value)
    attempts = peewee.IntegerField(default=0)
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
    cancel_requested = peewee.BooleanField(default=False)
    rule_levels = JsonField(null=True, sort_keys=True, empty=dict)   # rule -> level; NULL: none
    crashes = peewee.IntegerField(default=0)
    runner = peewee.CharField(default="llm")          # llm, or the coding agent that runs it
    check_command = JsonField(null=True, load=tuple)  # an argv run in an agent's worktree after it
    deliver = peewee.CharField(default="patch")       # where an agent's diff goes
    base_commit = peewee.CharField(null=True)         # the repo's HEAD at creation (agent runners only)
    cache = peewee.BooleanField(default=True)         # false: no answer is replayed for it (replay cache)
    repo_id = peewee.TextField(null=True)             # the repo's identity (every clone's); `repo`: a clone's path

    class Meta:
        table_name = "task"


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
    cached = peewee.BooleanField(default=False)       # a replayed answer: no request was sent

    class Meta:
        table_name = "execution"


class IngestedFileRow(peewee.Model):
    id = peewee.AutoField()
    repo = peewee.TextField()
    relpath = peewee.TextField()
    sha256 = peewee.CharField()
    task_id = peewee.IntegerField(null=True)
    ingested_at = UtcDateTimeField()
    pending_key = peewee.TextField(null=True)   # `pending_key(repo, sha256)` until moved to .done/
    repo_id = peewee.TextField(null=True)       # the repo's identity; `repo` is the clone's path
    fleet_key = peewee.TextField(null=True)     # unique: `fleet_key(...)` on the row that made the task

    class Meta:
        table_name = "ingested_file"


class WrittenFileRow(peewee.Model):
    id = peewee.AutoField()
    repo = peewee.TextField()
    path = peewee.TextField()
    sha256 = peewee.CharField()
    task_id = peewee.IntegerField(null=True)
    written_at = UtcDateTimeField()
    previous_sha256 = peewee.CharField(null=True)

    class Meta:
        table_name = "written_file"


class ModelCallRow(peewee.Model):
    id = peewee.AutoField()
    task_id = peewee.IntegerField()
    model = peewee.CharField()
    started_at = UtcDateTimeField()
    prompt = peewee.TextField()
    response = peewee.TextField()
    execution_id = peewee.IntegerField(null=True)
    pending = JsonField(null=True)
    request_key = peewee.CharField(null=True)     # the replay cache's key (`calls.request_key`)
    replay_of = peewee.IntegerField(null=True)    # the call whose answer this one replays

    class Meta:
        table_name = "model_call"


class ModelStateRow(peewee.Model):
    model = peewee.CharField(primary_key=True)
    state = peewee.CharField()
    cooldown_until = UtcDateTimeField(null=True)
    dead = peewee.BooleanField()
    failures = peewee.IntegerField()
    updated_at = UtcDateTimeField(null=True)
    opened_at = UtcDateTimeField(null=True)
    rpm_limit = peewee.IntegerField(null=True)

    class Meta:
        table_name = "model_state"


class ModelRequestRow(peewee.Model):
    id = peewee.AutoField()
    model = peewee.CharField()
    key_id = peewee.CharField()
    free = peewee.BooleanField()
    at = UtcDateTimeField()

    class Meta:
        table_name = "model_request"


class RuleFiringRow(peewee.Model):
    id = peewee.AutoField()
    repo = peewee.TextField()
    rule = peewee.TextField()
    path = peewee.TextField()
    sha256 = peewee.CharField(null=True)
    task_id = peewee.IntegerField()
    origin = peewee.CharField()
    fired_at = UtcDateTimeField()
    firing_key = peewee.TextField(null=True)    # unique: a schedule's firing (identity, rule, instant)

    class Meta:
        table_name = "rule_firing"


class RuleClockRow(peewee.Model):
    repo = peewee.TextField()
    rule = peewee.TextField()
    last_fire = UtcDateTimeField()

    class Meta:
        table_name = "rule_clock"
        primary_key = peewee.CompositeKey("repo", "rule")


class AgentRunRow(peewee.Model):
    id = peewee.AutoField()
    task_id = peewee.IntegerField()
    attempt = peewee.IntegerField()
    runner = peewee.CharField()
    argv = JsonField(load=tuple)     # never holds the proxy token (it travels in the agent's environment)
    worktree = peewee.TextField()
    started_at = UtcDateTimeField()
    ended_at = UtcDateTimeField(null=True)
    pid = peewee.IntegerField(null=True)      # the agent's process group while it runs (a restart kills it)
    exit_code = peewee.IntegerField(null=True)
    outcome = peewee.CharField(null=True)     # accepted, rejected, failed, timed_out, cancelled; NULL: running
    error = peewee.TextField(null=True)
    stdout = peewee.TextField(default="")
    stderr = peewee.TextField(default="")
    diff = peewee.TextField(null=True)
    diff_stat = peewee.TextField(null=True)
    requests = peewee.IntegerField(default=0)  # model requests through the proxy
    models = JsonField(null=True, load=tuple)   # the models that answered them

    class Meta:
        table_name = "agent_run"


class DaemonRow(peewee.Model):
    id = peewee.CharField(primary_key=True)     # `<host>-<pid>-<8 hex>`, fresh each start; prefixes its lease owners
    host = peewee.CharField()
    pid = peewee.IntegerField()
    version = peewee.CharField()
    state_dir = peewee.TextField()              # with host: the identity a restart finds its predecessor by
    repos = JsonField(load=tuple)               # a list of repo paths
    workers = peewee.IntegerField()
    started_at = UtcDateTimeField()
    heartbeat_at = UtcDateTimeField()
    stopped_at = UtcDateTimeField(null=True)    # a clean stop; NULL while it runs (or after a crash)

    class Meta:
        table_name = "daemon"


class WebhookOutboxRow(peewee.Model):
    """One event for one hook (`store/outbox.py`); its id is the delivery id a receiver sees."""

    id = peewee.AutoField()
    hook = peewee.CharField()                  # `events.hook_key` of the hook's URL (never the URL)
    event = peewee.CharField()
    task_id = peewee.IntegerField(null=True)   # what it is about: a task, or a model
    model = peewee.CharField(null=True)
    payload = JsonField()                      # the event's data (a JSON object)
    created_at = UtcDateTimeField()
    attempts = peewee.IntegerField(default=0)
    next_try_at = UtcDateTimeField()
    delivered_at = UtcDateTimeField(null=True)
    dead_at = UtcDateTimeField(null=True)      # given up: older than the bound, its last error kept
    last_error = peewee.TextField(null=True)
    last_try_at = UtcDateTimeField(null=True)

    class Meta:
        table_name = "webhook_outbox"


class SchemaMigrationRow(peewee.Model):
    """The ledger of applied migrations; `migrate` makes it (its default is the database's clock)."""

    name = peewee.CharField(max_length=255, primary_key=True)
    applied_at = peewee.DateTimeField(constraints=[peewee.SQL("DEFAULT CURRENT_TIMESTAMP")])

    class Meta:
        table_name = "schema_migrations"


@dataclass(frozen=True, slots=True)
class Tables:
    """Every table's model, bound to one database; the field names are the table names."""

    task: type[TaskRow]
    execution: type[ExecutionRow]
    ingested_file: type[IngestedFileRow]
    written_file: type[WrittenFileRow]
    model_call: type[ModelCallRow]
    model_state: type[ModelStateRow]
    model_request: type[ModelRequestRow]
    rule_firing: type[RuleFiringRow]
    rule_clock: type[RuleClockRow]
    agent_run: type[AgentRunRow]
    daemon: type[DaemonRow]
    webhook_outbox: type[WebhookOutboxRow]
    schema_migrations: type[SchemaMigrationRow]


MODELS: tuple[type[peewee.Model], ...] = (
    TaskRow, ExecutionRow, IngestedFileRow, WrittenFileRow, ModelCallRow, ModelStateRow, ModelRequestRow,
    RuleFiringRow, RuleClockRow, AgentRunRow, DaemonRow, WebhookOutboxRow, SchemaMigrationRow)

M = TypeVar("M", bound=peewee.Model)


def _bound(model: type[M], db: peewee.Database) -> type[M]:
    meta = type("Meta", (), {"database": db, "table_name": model._meta.table_name})
    return cast(type[M], type(model.__name__, (model,), {"Meta": meta, "__module__": __name__}))


def bind(db: peewee.Database) -> Tables:
    """The models bound to `db` alone (the tables themselves are made by `migrate`)."""
    bound: dict[str, Any] = {model._meta.table_name: _bound(model, db) for model in MODELS}
    return Tables(**bound)


# -- the task row's value ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Task:
    """A task as its row holds it (every column but `rank`, the priority's order), as `task_from_row` reads it."""

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
    runner: str = "llm"  # llm (one model call) or a coding agent (openhands, aider, command)
    check_command: tuple[str, ...] | None = None   # run in an agent's worktree after it; must exit 0
    deliver: str = "patch"   # an agent's diff: patch, branch or apply
    base_commit: str | None = None   # the repo's HEAD when the task was created (agent runners)
    cache: bool = True   # an answer accepted for the same request may be replayed (README: Replay cache)
    repo_id: str | None = None   # the repo's identity, shared by its clones; `repo` is the clone that runs it

    @property
    def agent(self) -> bool:
        """Run by a coding agent in a worktree, not one model call."""
        return self.runner != "llm"

    @property
    def quarantined(self) -> bool:
        """Completed without an output: the tests fail against the code (a possible bug, reported)."""
        return self.status == TaskStatus.COMPLETED and (self.error or "").startswith(QUARANTINED)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ISO datetimes, models as a list; `quarantined` beside `status`."""
        return {**{f.name: iso(getattr(self, f.name)) for f in fields(self)}, "quarantined": self.quarantined}


TASK_FIELDS = tuple(f.name for f in fields(Task))
# the task columns that take the task file's value of the same name (the others: `task_row`)
SPEC_COLUMNS = tuple(name for name in TaskRow._meta.fields
                     if name in TaskSpec.model_fields and name not in ("type", "target", "priority"))


def task_row(repo: str, spec: TaskSpec, now: datetime, source: str | None,
             base_commit: str | None = None, repo_id: str | None = None) -> dict[str, Any]:
    """The row of a new task: the spec's values of `SPEC_COLUMNS` (their fields store them; enums as
    their values), these, and the columns' defaults (queued, no attempt, no crash)."""
    spec_values = {name: getattr(spec, name) for name in SPEC_COLUMNS}
    return {**{k: v.value if isinstance(v, StrEnum) else v for k, v in spec_values.items()},
            "repo": repo, "type": spec.type.value, "target": spec.file, "priority": spec.priority.value,
            "rank": spec.priority.rank, "source": source, "created_at": now, "updated_at": now,
            "base_commit": base_commit, "repo_id": repo_id or repo}


def task_from_row(row: dict[str, Any]) -> Task:
    """A `task` row (a select's dict, its fields' values) as a Task."""
    return Task(**{name: row[name] for name in TASK_FIELDS})


# -- the migrations ------------------------------------------------------------------------

# The history, oldest first. Append only; a new column is one step: `migrations.add_column(...)`.
MIGRATIONS: tuple[tuple[str, migrations.Migration], ...] = (
    ("0001_initial_schema", migrations.initial_schema),
    ("0002_governor_state", migrations.governor_state),
    ("0003_standing_rules", migrations.standing_rules),
    ("0004_execution_score", migrations.execution_score),
    ("0005_model_call", migrations.model_call),
    ("0006_task_rule_levels", migrations.task_rule_levels),
    ("0007_execution_validation_ms", migrations.execution_validation_ms),
    ("0008_crash_recovery", migrations.crash_recovery),
    ("0009_execution_source", migrations.execution_source),
    ("0010_written_previous", migrations.written_previous),
    ("0011_agent_runs", migrations.agent_runs),
    ("0012_daemons", migrations.daemons),
    ("0013_webhook_outbox", migrations.webhook_outbox),
    ("0014_replay_cache", migrations.replay_cache),
    ("0015_read_indexes", migrations.read_indexes),
    ("0016_repo_identity", migrations.repo_identity),
)


def applied(db: peewee.Database) -> list[str]:
    """Names already recorded, in the order they were applied."""
    connect(db)
    if not db.table_exists(SchemaMigrationRow._meta.table_name):
        return []
    ledger = _bound(SchemaMigrationRow, db)
    return [row.name for row in ledger.select(ledger.name).order_by(ledger.applied_at, ledger.name)]


def migrate(db: peewee.Database, steps: Sequence[tuple[str, migrations.Migration]] = MIGRATIONS) -> list[str]:
    """Apply every step not yet recorded, each in one transaction with its record; returns the names
    applied now (idempotent). One process migrates at a time: on SQLite each step holds the writer
    lock; on PostgreSQL the whole run holds a session advisory lock (`pg_advisory_lock`, keyed by the
    schema), so a daemon starting beside another that migrates waits for it, then finds nothing
    left to do. `steps` is the history; tests pass a longer one to prove atomicity."""
    connect(db)
    if all(name in applied(db) for name, _ in steps):
        return []    # a read first: every command migrates, and an up-to-date schema must not queue for a lock
    with _migrating(db):
        ledger = _bound(SchemaMigrationRow, db)
        done_now: list[str] = []
        for name, step in steps:
            if name in applied(db):
                continue
            with atomic_write(db):
                ledger.create_table(safe=True)
                if ledger.select().where(ledger.name == name).exists():
                    continue
                step(db)
                ledger.insert(name=name).execute()
            log.info("schema migration %s applied", name)
            done_now.append(name)
        return done_now


@contextmanager
def _migrating(db: peewee.Database) -> Iterator[None]:
    """PostgreSQL: hold the migrations' advisory lock of this schema for the block (waiting for
    another process that holds it, with a log line); SQLite: nothing (each step takes the writer lock)."""
    if isinstance(db, peewee.SqliteDatabase):
        yield
        return
    run = cast(Any, db).execute_sql
    key = (_MIGRATE_LOCK,)     # with the schema's hash: the tests' schemas on one database do not wait for each other
    if not run("SELECT pg_try_advisory_lock(%s, hashtext(current_schema()))", key).fetchone()[0]:
        log.info("another process is migrating this schema; waiting for it")
        run("SELECT pg_advisory_lock(%s, hashtext(current_schema()))", key)
    try:
        yield
    finally:
        with suppress(StorageUnavailable):    # the connection is gone, and its session's lock with it
            run("SELECT pg_advisory_unlock(%s, hashtext(current_schema()))", key)
