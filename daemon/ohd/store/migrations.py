"""The schema's history: the migration steps that have shipped, each a function of the database.

Each step describes the tables as they were at that step (its own snapshot models), never through
the store's query models, so an old step never changes meaning; `schema.MIGRATIONS` lists them in
order and `schema.migrate(db)` applies the missing ones, each in one transaction with its record in
`schema_migrations`, on SQLite or PostgreSQL. Never edit a step that has shipped; a new column is
`add_column(...)` at the end of `schema.MIGRATIONS`, a bigger change a new function here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import peewee

Migration = Callable[[peewee.Database], None]


def add_column(table: str, column: str, declared: peewee.Field) -> Migration:
    """The step that adds one column to `table` as `declared` (a fresh field: this step's snapshot)."""

    def step(db: peewee.Database) -> None:
        from playhouse.migrate import SchemaMigrator
        from playhouse.migrate import migrate as alter

        alter(SchemaMigrator.from_database(db).add_column(table, column, declared))

    step.__doc__ = f"{table} gains {column}."
    return step


def initial_schema(db: peewee.Database) -> None:
    """Tables task, execution, ingested_file, written_file, model_state."""

    class Base(peewee.Model):
        class Meta:
            database = db

    class Task(Base):
        repo = peewee.TextField()
        type = peewee.CharField(max_length=32)
        target = peewee.TextField()
        description = peewee.TextField(default="")
        priority = peewee.CharField(max_length=16)
        rank = peewee.IntegerField()
        output = peewee.TextField(null=True)
        models = peewee.TextField()                      # JSON list of model ids
        min_quality = peewee.FloatField()
        max_attempts = peewee.IntegerField()
        timeout_s = peewee.FloatField()
        prompt = peewee.TextField(null=True)
        source = peewee.TextField(null=True)
        status = peewee.CharField(max_length=16)
        attempts = peewee.IntegerField(default=0)
        error = peewee.TextField(null=True)
        output_path = peewee.TextField(null=True)
        report_path = peewee.TextField(null=True)
        created_at = peewee.DateTimeField()
        updated_at = peewee.DateTimeField()
        started_at = peewee.DateTimeField(null=True)
        finished_at = peewee.DateTimeField(null=True)
        not_before = peewee.DateTimeField(null=True)
        lease_owner = peewee.CharField(max_length=128, null=True)
        lease_until = peewee.DateTimeField(null=True)
        cancel_requested = peewee.BooleanField(default=False)

        class Meta:
            table_name = "task"
            indexes = ((("status", "rank", "id"), False), (("status", "lease_until"), False))

    class Execution(Base):
        task = peewee.ForeignKeyField(Task, column_name="task_id", on_delete="CASCADE", index=True)
        attempt = peewee.IntegerField()
        model = peewee.CharField(max_length=255)
        started_at = peewee.DateTimeField(index=True)
        finished_at = peewee.DateTimeField()
        latency_ms = peewee.IntegerField()
        prompt_tokens = peewee.IntegerField()
        completion_tokens = peewee.IntegerField()
        cost = peewee.FloatField(null=True)
        outcome = peewee.CharField(max_length=32)
        error_class = peewee.CharField(max_length=64, null=True)
        error = peewee.TextField(null=True)

        class Meta:
            table_name = "execution"

    class IngestedFile(Base):
        repo = peewee.TextField()
        relpath = peewee.TextField()
        sha256 = peewee.CharField(max_length=64)
        task = peewee.ForeignKeyField(Task, column_name="task_id", null=True, on_delete="CASCADE")
        ingested_at = peewee.DateTimeField()
        # repo + sha256 while the file still waits for its move to .done/, NULL after:
        # one pending row per content, yet the same content dropped again later is new.
        pending_key = peewee.TextField(null=True, unique=True)

        class Meta:
            table_name = "ingested_file"
            indexes = ((("repo", "sha256"), False),)

    class WrittenFile(Base):
        repo = peewee.TextField()
        path = peewee.TextField()
        sha256 = peewee.CharField(max_length=64)
        task = peewee.ForeignKeyField(Task, column_name="task_id", null=True, on_delete="SET NULL")
        written_at = peewee.DateTimeField()

        class Meta:
            table_name = "written_file"
            indexes = ((("repo", "path"), True),)

    class ModelState(Base):
        model = peewee.CharField(max_length=255, primary_key=True)
        state = peewee.CharField(max_length=16, default="ready")
        cooldown_until = peewee.DateTimeField(null=True)
        dead = peewee.BooleanField(default=False)
        failures = peewee.IntegerField(default=0)
        updated_at = peewee.DateTimeField(null=True)

        class Meta:
            table_name = "model_state"

    db.create_tables([Task, Execution, IngestedFile, WrittenFile, ModelState], safe=False)


def governor_state(db: peewee.Database) -> None:
    """model_state gains opened_at (breaker) and rpm_limit (learned); model_request: one row per request."""
    from playhouse.migrate import SchemaMigrator
    from playhouse.migrate import migrate as alter

    migrator = SchemaMigrator.from_database(db)
    alter(migrator.add_column("model_state", "opened_at", peewee.DateTimeField(null=True)),
          migrator.add_column("model_state", "rpm_limit", peewee.IntegerField(null=True)))

    class ModelRequest(peewee.Model):
        model = peewee.CharField(max_length=255)
        key_id = peewee.CharField(max_length=64)
        free = peewee.BooleanField(default=False)
        at = peewee.DateTimeField(index=True)

        class Meta:
            database = db
            table_name = "model_request"
            indexes = ((("model", "at"), False), (("key_id", "at"), False))

    db.create_tables([ModelRequest], safe=False)


def standing_rules(db: peewee.Database) -> None:
    """rule_firing: one row per task a standing rule created; rule_clock: a schedule's last firing."""

    class Base(peewee.Model):
        class Meta:
            database = db

    class RuleFiring(Base):
        repo = peewee.TextField()
        rule = peewee.TextField()
        path = peewee.TextField()
        sha256 = peewee.CharField(max_length=64, null=True)
        task_id = peewee.IntegerField()
        origin = peewee.CharField(max_length=32)
        fired_at = peewee.DateTimeField()

        class Meta:
            table_name = "rule_firing"
            indexes = ((("repo", "rule", "path"), False),)

    class RuleClock(Base):
        repo = peewee.TextField()
        rule = peewee.TextField()
        last_fire = peewee.DateTimeField()

        class Meta:
            table_name = "rule_clock"
            primary_key = peewee.CompositeKey("repo", "rule")

    db.create_tables([RuleFiring, RuleClock], safe=False)


def execution_score(db: peewee.Database) -> None:
    """execution gains score: the validation score of the result (NULL when there was no verdict)."""
    from playhouse.migrate import SchemaMigrator
    from playhouse.migrate import migrate as alter

    alter(SchemaMigrator.from_database(db).add_column("execution", "score", peewee.FloatField(null=True)))


def model_call(db: peewee.Database) -> None:
    """Table model_call: each model call's prompt and response (`ohd show ID --calls`)."""

    class ModelCall(peewee.Model):
        task_id = peewee.IntegerField(index=True)
        model = peewee.CharField(max_length=255)
        started_at = peewee.DateTimeField()
        prompt = peewee.TextField()
        response = peewee.TextField()

        class Meta:
            database = db
            table_name = "model_call"

    db.create_tables([ModelCall], safe=False)


def task_rule_levels(db: peewee.Database) -> None:
    """task gains rule_levels: the task file's own validation rule levels (JSON; NULL: none)."""
    from playhouse.migrate import SchemaMigrator
    from playhouse.migrate import migrate as alter

    alter(SchemaMigrator.from_database(db).add_column("task", "rule_levels", peewee.TextField(null=True)))


def execution_validation_ms(db: peewee.Database) -> None:
    """execution gains validation_ms: how long judging its answer took (NULL when it got no verdict),
    so latency_ms is the model call's own time."""
    from playhouse.migrate import SchemaMigrator
    from playhouse.migrate import migrate as alter

    alter(SchemaMigrator.from_database(db).add_column("execution", "validation_ms", peewee.IntegerField(null=True)))


def crash_recovery(db: peewee.Database) -> None:
    """task gains crashes: how many times a daemon's crash (or an expired lease) interrupted its run,
    so a task that kills ohd is failed after a bounded number; model_call gains execution_id (the
    execution that judged the answer) and pending (JSON: the call's usage and the source it was
    asked about, while the answer may still be judged or delivered after a crash; NULL after)."""
    from playhouse.migrate import SchemaMigrator
    from playhouse.migrate import migrate as alter

    migrator = SchemaMigrator.from_database(db)
    alter(migrator.add_column("task", "crashes", peewee.IntegerField(default=0)),
          migrator.add_column("model_call", "execution_id", peewee.IntegerField(null=True)),
          migrator.add_column("model_call", "pending", peewee.TextField(null=True)))


def execution_source(db: peewee.Database) -> None:
    """execution gains source_sha256: the hash of the target text an answer was judged against, so
    an answer accepted for a text that changed since (the task runs again on the new one, or a
    crash came between) is never delivered from the call history against the new text."""
    from playhouse.migrate import SchemaMigrator
    from playhouse.migrate import migrate as alter

    alter(SchemaMigrator.from_database(db).add_column("execution", "source_sha256", peewee.CharField(null=True)))


def written_previous(db: peewee.Database) -> None:
    """written_file gains previous_sha256: while a write ohd recorded is under way, the hash of what
    the file held before it ('' for no file; NULL once its task finished). A kill between recording
    the new hash and the rename leaves the old bytes, which are then still known as ohd's (or as
    replaceable), not taken for the user's edit."""
    from playhouse.migrate import SchemaMigrator
    from playhouse.migrate import migrate as alter

    alter(SchemaMigrator.from_database(db).add_column("written_file", "previous_sha256",
                                                      peewee.CharField(max_length=64, null=True)))


def agent_runs(db: peewee.Database) -> None:
    """task gains runner (who does it: `llm` or a coding agent), check_command (JSON argv run after an
    agent), deliver (where an agent's diff goes) and base_commit (the repo's HEAD when the task was
    created: an agent's worktree starts there); table agent_run: one row per agent attempt (its argv,
    never holding the proxy token; worktree, times, pid (its process group, killed at a restart),
    exit code, outcome, capped output, diff and requests)."""
    from playhouse.migrate import SchemaMigrator
    from playhouse.migrate import migrate as alter

    class AgentRun(peewee.Model):
        task_id = peewee.IntegerField(index=True)
        attempt = peewee.IntegerField()
        runner = peewee.CharField(max_length=32)
        argv = peewee.TextField()                       # JSON list
        worktree = peewee.TextField()
        started_at = peewee.DateTimeField()
        ended_at = peewee.DateTimeField(null=True)
        pid = peewee.IntegerField(null=True)
        exit_code = peewee.IntegerField(null=True)
        outcome = peewee.CharField(max_length=32, null=True)
        error = peewee.TextField(null=True)
        stdout = peewee.TextField(default="")
        stderr = peewee.TextField(default="")
        diff = peewee.TextField(null=True)
        diff_stat = peewee.TextField(null=True)
        requests = peewee.IntegerField(default=0)
        models = peewee.TextField(null=True)            # JSON list

        class Meta:
            database = db
            table_name = "agent_run"

    migrator = SchemaMigrator.from_database(db)
    alter(migrator.add_column("task", "runner", peewee.CharField(max_length=16, default="llm")),
          migrator.add_column("task", "check_command", peewee.TextField(null=True)),
          migrator.add_column("task", "deliver", peewee.CharField(max_length=16, default="patch")),
          migrator.add_column("task", "base_commit", peewee.CharField(max_length=64, null=True)))
    AgentRun.create_table()


def daemons(db: peewee.Database) -> None:
    """Table daemon: one row per daemon start (a fleet on one database, issue 15). Its id (fresh
    each start) prefixes its workers' lease owners (`<id>/w0`); host, pid, version, state_dir (with
    host, the identity a restart finds its previous instance by), repos (JSON list), workers, when it
    started, its last heartbeat, and when it stopped cleanly (NULL while it runs or after a crash)."""

    class Daemon(peewee.Model):
        id = peewee.CharField(max_length=255, primary_key=True)
        host = peewee.CharField(max_length=255)
        pid = peewee.IntegerField()
        version = peewee.CharField(max_length=64)
        state_dir = peewee.TextField()
        repos = peewee.TextField()                      # JSON list
        workers = peewee.IntegerField()
        started_at = peewee.DateTimeField()
        heartbeat_at = peewee.DateTimeField()
        stopped_at = peewee.DateTimeField(null=True)

        class Meta:
            database = db
            table_name = "daemon"

    Daemon.create_table()


def webhook_outbox(db: peewee.Database) -> None:
    """Table webhook_outbox: one row per (event, hook), written in the transaction of the state change
    that causes it; the sender marks it delivered, or tries it again later, or dead past its age."""

    class WebhookOutbox(peewee.Model):
        hook = peewee.CharField(max_length=64)
        event = peewee.CharField(max_length=64)
        task_id = peewee.IntegerField(null=True)
        model = peewee.CharField(max_length=255, null=True)
        payload = peewee.TextField()                    # JSON object
        created_at = peewee.DateTimeField()
        attempts = peewee.IntegerField(default=0)
        next_try_at = peewee.DateTimeField()
        delivered_at = peewee.DateTimeField(null=True)
        dead_at = peewee.DateTimeField(null=True)
        last_error = peewee.TextField(null=True)
        last_try_at = peewee.DateTimeField(null=True)

        class Meta:
            database = db
            table_name = "webhook_outbox"
            indexes = ((("hook", "delivered_at", "dead_at", "id"), False),)

    WebhookOutbox.create_table()


def replay_cache(db: peewee.Database) -> None:
    """The replay cache (issue 16): model_call gains request_key (the hash of the request's model,
    messages and parameters; NULL when the response was cut, so it is never replayed) and replay_of
    (the model_call whose answer it replays; NULL for an answer the model gave), indexed on the key;
    execution gains cached (a replayed answer: no request was sent); task gains cache (false: never
    replay an answer for it)."""
    from playhouse.migrate import SchemaMigrator
    from playhouse.migrate import migrate as alter

    migrator = SchemaMigrator.from_database(db)
    alter(migrator.add_column("model_call", "request_key", peewee.CharField(max_length=64, null=True)),
          migrator.add_column("model_call", "replay_of", peewee.IntegerField(null=True)),
          migrator.add_column("execution", "cached", peewee.BooleanField(default=False)),
          migrator.add_column("task", "cache", peewee.BooleanField(default=True)),
          migrator.add_index("model_call", ("request_key",), False))


def read_indexes(db: peewee.Database) -> None:
    """Indexes for the status and the dashboard's charts (issue 14): task (status, finished_at), so
    tasks finished in a window are counted from the index alone; task (status, the first 13
    characters of error in lower case: the length of "quarantined: "), so the quarantined
    completions are counted from the index (the expression keeps the entries short: an error can
    be long, and PostgreSQL's btree entries are bounded); execution (started_at, model,
    outcome, prompt_tokens, completion_tokens, cost, cached), so a window's calls (today's totals,
    the per-model chart) are summed from the index alone."""
    from playhouse.migrate import SchemaMigrator
    from playhouse.migrate import migrate as alter

    migrator = SchemaMigrator.from_database(db)
    alter(migrator.add_index("task", ("status", "finished_at")),
          migrator.add_index("execution", ("started_at", "model", "outcome", "prompt_tokens", "completion_tokens",
                                           "cost", "cached")))
    cast(Any, db).execute_sql("CREATE INDEX task_status_error_prefix ON task (status, lower(substr(error, 1, 13)))")


def repo_identity(db: peewee.Database) -> None:
    """Repo identities (issue 15): task and ingested_file gain repo_id (the repo's identity, shared by
    its clones; every row so far gets its path, which a daemon serving that path replaces with the
    repo's identity at start-up), indexed on task (status, repo_id) for the claims; ingested_file
    gains fleet_key and rule_firing firing_key, each unique (NULL allowed many times), so one task
    file in two clones and one schedule's firing seen by two daemons make one task."""
    from playhouse.migrate import SchemaMigrator
    from playhouse.migrate import migrate as alter

    migrator = SchemaMigrator.from_database(db)
    alter(migrator.add_column("task", "repo_id", peewee.TextField(null=True)),
          migrator.add_column("ingested_file", "repo_id", peewee.TextField(null=True)),
          migrator.add_column("ingested_file", "fleet_key", peewee.TextField(null=True)),
          migrator.add_column("rule_firing", "firing_key", peewee.TextField(null=True)),
          migrator.add_index("task", ("status", "repo_id")),
          migrator.add_index("ingested_file", ("fleet_key",), True),
          migrator.add_index("rule_firing", ("firing_key",), True))
    run = cast(Any, db).execute_sql
    run("UPDATE task SET repo_id = repo")
    run("UPDATE ingested_file SET repo_id = repo")
