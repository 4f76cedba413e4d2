"""Migrations: the final schema, idempotence, one transaction per step, no drift from the store."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import peewee
import pytest
from ohd.store import schema
from ohd.store.store import open_database

from tests.support.databases import BACKENDS, database_url

SCHEMA = {
    "task": {"id", "repo", "type", "target", "description", "priority", "rank", "output", "models",
             "min_quality", "max_attempts", "timeout_s", "prompt", "source", "status", "attempts",
             "error", "output_path", "report_path", "created_at", "updated_at", "started_at",
             "finished_at", "not_before", "lease_owner", "lease_until", "cancel_requested", "rule_levels", "crashes",
             "runner", "check_command", "deliver", "base_commit", "cache", "repo_id"},
    "execution": {"id", "task_id", "attempt", "model", "started_at", "finished_at", "latency_ms",
                  "prompt_tokens", "completion_tokens", "cost", "outcome", "error_class", "error",
                  "score", "validation_ms", "source_sha256", "cached"},
    "ingested_file": {"id", "repo", "relpath", "sha256", "task_id", "ingested_at", "pending_key", "repo_id",
                      "fleet_key"},
    "written_file": {"id", "repo", "path", "sha256", "task_id", "written_at", "previous_sha256"},
    "model_state": {"model", "state", "cooldown_until", "dead", "failures", "updated_at", "opened_at",
                    "rpm_limit"},
    "model_request": {"id", "model", "key_id", "free", "at"},
    "rule_firing": {"id", "repo", "rule", "path", "sha256", "task_id", "origin", "fired_at", "firing_key"},
    "rule_clock": {"repo", "rule", "last_fire"},
    "model_call": {"id", "task_id", "model", "started_at", "prompt", "response", "execution_id", "pending",
                   "request_key", "replay_of"},
    "agent_run": {"id", "task_id", "attempt", "runner", "argv", "worktree", "started_at", "ended_at", "pid", "exit_code",
                  "outcome", "error", "stdout", "stderr", "diff", "diff_stat", "requests", "models"},
    "daemon": {"id", "host", "pid", "version", "state_dir", "repos", "workers", "started_at", "heartbeat_at",
               "stopped_at"},
    "webhook_outbox": {"id", "hook", "event", "task_id", "model", "payload", "created_at", "attempts", "next_try_at",
                       "delivered_at", "dead_at", "last_error", "last_try_at"},
    "schema_migrations": {"name", "applied_at"},
}


@pytest.fixture(params=BACKENDS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[peewee.Database]:
    with database_url(request.param, tmp_path) as url:
        database = open_database(url)
        yield database
        database.close()


def columns(db: peewee.Database) -> dict[str, set[str]]:
    return {table: {c.name for c in db.get_columns(table)} for table in db.get_tables()}


def test_migrate_builds_the_final_schema(db: peewee.Database) -> None:
    assert schema.migrate(db) == [name for name, _ in schema.MIGRATIONS]
    assert columns(db) == SCHEMA


def test_migrate_is_idempotent_and_records_each_name(db: peewee.Database) -> None:
    schema.migrate(db)
    assert schema.migrate(db) == []
    assert schema.applied(db) == [name for name, _ in schema.MIGRATIONS]
    assert columns(db) == SCHEMA


def test_an_up_to_date_database_is_migrated_without_the_writer_lock(tmp_path: Path) -> None:
    """Every command that opens the store migrates it first (`ohd tasks` too): on a current schema
    that is a read, so it never waits for a writer nor makes 50 readers queue for the lock."""
    path = tmp_path / "ohd.db"
    schema.migrate(open_database(f"sqlite:///{path}"))
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")         # another process is writing, for longer than busy_timeout
    try:
        assert schema.migrate(open_database(f"sqlite:///{path}")) == []
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_a_fresh_database_has_nothing_applied(db: peewee.Database) -> None:
    assert schema.applied(db) == []


def test_a_failing_step_leaves_neither_its_changes_nor_its_record(db: peewee.Database) -> None:
    def broken(database: peewee.Database) -> None:
        database.execute_sql("CREATE TABLE half_done (x INTEGER)")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        schema.migrate(db, (*schema.MIGRATIONS, ("0099_broken", broken)))
    assert "half_done" not in db.get_tables()
    assert schema.applied(db) == [name for name, _ in schema.MIGRATIONS]
    assert columns(db) == SCHEMA


def test_the_store_query_models_name_exactly_the_migrated_columns(db: peewee.Database) -> None:
    """Every table has one model in `schema` (bound under its table's name), naming its columns."""
    schema.migrate(db)
    tables = schema.bind(db)
    assert {f.name for f in dataclasses.fields(tables)} == set(SCHEMA)
    for name, migrated in SCHEMA.items():
        model = getattr(tables, name)
        assert model._meta.table_name == name and model._meta.database is db
        assert {f.column_name for f in model._meta.sorted_fields} == migrated, name


def test_migration_names_are_unique_and_ordered() -> None:
    names = [name for name, _ in schema.MIGRATIONS]
    assert names == sorted(set(names))


def test_crash_recovery_gives_existing_tasks_no_crash_and_existing_calls_nothing_pending(
        db: peewee.Database) -> None:
    """0008 on a database in use: its tasks were interrupted by no crash, and its recorded calls
    are history only (never judged again after a crash)."""
    before = [step for step in schema.MIGRATIONS if step[0] < "0008"]
    schema.migrate(db, before)
    db.execute_sql("INSERT INTO task (repo, type, target, description, priority, rank, models, min_quality, "
                   "max_attempts, timeout_s, status, attempts, created_at, updated_at, cancel_requested) "
                   "VALUES ('/r', 'review', 'a.py', '', 'normal', 1, '[]', 0.5, 3, 60, 'running', 1, "
                   "'2026-01-01 00:00:00.000000', '2026-01-01 00:00:00.000000', false)")
    db.execute_sql("INSERT INTO model_call (task_id, model, started_at, prompt, response) "
                   "VALUES (1, 'm', '2026-01-01 00:00:00', 'p', 'r')")
    assert schema.migrate(db) == [name for name, _ in schema.MIGRATIONS if name >= "0008"]
    assert db.execute_sql("SELECT crashes FROM task").fetchall() == [(0,)]
    assert db.execute_sql("SELECT execution_id, pending FROM model_call").fetchall() == [(None, None)]
