"""`ohd db migrate`, `ohd db copy` and `ohd db check` on a real SQLite file and the real PostgreSQL;
several processes migrating one fresh PostgreSQL schema at once."""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import peewee
import pytest
from ohd.cli.commands import main
from ohd.core.taskfile import TaskSpec
from ohd.store import admin, schema
from ohd.store.fields import JsonField, UtcDateTimeField
from ohd.store.fleet import Fleet
from ohd.store.store import Store, open_database

from tests.store.test_migrations import SCHEMA, columns
from tests.support.databases import BACKENDS, POSTGRES_URL, database_url

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
ROWS = 7     # per table: more than one, fewer than a batch; `test_copy_moves_batches` crosses batches
postgres_only = pytest.mark.skipif(not POSTGRES_URL, reason="OHD_TEST_POSTGRES_URL is not set")


@pytest.fixture
def pg_url(tmp_path: Path) -> Iterator[str]:
    with database_url("postgresql", tmp_path) as url:
        yield url


def value(model: type[peewee.Model], field: peewee.Field, i: int) -> Any:
    """Row `i`'s value of `field`, of its type (distinct per row; ids and the ids rows name are `i`)."""
    if isinstance(field, peewee.AutoField) or field.name in ("task_id", "execution_id", "replay_of", "attempt"):
        return i
    if isinstance(field, UtcDateTimeField):
        return NOW + timedelta(seconds=i, microseconds=i)
    if isinstance(field, JsonField):
        return ("a", str(i)) if field.load is tuple else {"n": i, "text": "é\n'"}
    if isinstance(field, peewee.BooleanField):
        return i % 2 == 0
    if isinstance(field, peewee.FloatField):
        return i + 0.25
    if isinstance(field, peewee.IntegerField):
        return i * 10
    if field.name == "status":
        return "queued"
    if isinstance(field, peewee.CharField):     # the migrated columns have lengths (16 for some)
        return f"é'{field.name[:6]}{i}"
    return f"{model._meta.table_name}-{field.name}-{i} 'quoted' ünïcode"


def fill(db: peewee.Database, rows: int = ROWS) -> None:
    """`rows` rows in every table, each column set (so a column the copy dropped shows)."""
    tables = schema.bind(db)
    with db.atomic():
        for name in admin.TABLES:
            model = getattr(tables, name)
            model.insert_many([{f.name: value(model, f, i) for f in model._meta.sorted_fields}
                               for i in range(1, rows + 1)]).execute()


def everything(db: peewee.Database) -> dict[str, list[dict[str, Any]]]:
    """Every row of every table, in key order."""
    tables = schema.bind(db)
    out = {}
    for name in admin.TABLES:
        model = getattr(tables, name)
        key = model._meta.primary_key
        order = [model._meta.fields[n] for n in key.field_names] if isinstance(key, peewee.CompositeKey) else [key]
        out[name] = list(model.select().order_by(*order).dicts())
    return out


def sqlite_store(db_path: Path, rows: int = ROWS) -> peewee.Database:
    db = open_database(f"sqlite:///{db_path}")
    schema.migrate(db)
    fill(db, rows)
    return db


@postgres_only
def test_db_copy_moves_every_row_of_every_table_from_sqlite_to_postgresql(
        db_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    source = sqlite_store(db_path)
    before = everything(source)
    assert all(len(rows) == ROWS for rows in before.values())

    assert main(["db", "copy", "--to", pg_url, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verified"] is True
    assert report["target_counts"] == {name: ROWS for name in admin.TABLES} == report["source_counts"]
    target = open_database(pg_url)
    assert everything(target) == before            # every value of every row, ids kept
    assert everything(source) == before            # the source is untouched
    # the target's id sequences go on after the copied ids
    new_id = Store(target).enqueue("/repo", TaskSpec.model_validate({"type": "docstring", "target": "a.py"}), NOW)
    assert new_id == ROWS + 1
    assert main(["db", "check", "--url", pg_url]) == 0
    capsys.readouterr()
    # and back: PostgreSQL to a new SQLite file (read from one REPEATABLE READ snapshot)
    back = f"sqlite:///{db_path.parent / 'back.db'}"
    assert main(["db", "copy", "--from", pg_url, "--to", back]) == 0
    assert "every table's count matches" in capsys.readouterr().out
    assert everything(open_database(back)) == everything(target)


@postgres_only
def test_db_copy_refuses_a_target_with_rows_unless_told_to_replace_them(
        db_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    source = sqlite_store(db_path)
    target = open_database(pg_url)
    schema.migrate(target)
    Store(target).enqueue("/elsewhere", TaskSpec.model_validate({"type": "docstring", "target": "b.py"}), NOW)

    assert main(["db", "copy", "--to", pg_url]) == 1
    err = capsys.readouterr().err
    assert "is not empty (task 1)" in err and "--replace" in err
    assert admin.counts(target)["task"] == 1 and admin.counts(target)["execution"] == 0   # nothing copied

    assert main(["db", "copy", "--to", pg_url, "--replace"]) == 0
    assert "every table's count matches" in capsys.readouterr().out
    assert everything(target) == everything(source)


def test_copy_moves_batches_between_two_sqlite_files(tmp_path: Path) -> None:
    """Many rows (several INSERT batches) to another SQLite file, as `copy` also goes back."""
    source = sqlite_store(tmp_path / "a.db", rows=admin.BATCH * 2 + 3)
    target = open_database(f"sqlite:///{tmp_path / 'b.db'}")
    copied = admin.copy(source, target)
    assert copied.verified and copied.rows == len(admin.TABLES) * (admin.BATCH * 2 + 3)
    assert everything(target) == everything(source)


def test_db_copy_refuses_while_a_daemon_runs_on_the_source(db_path: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    db = open_database(f"sqlite:///{db_path}")
    schema.migrate(db)
    Fleet(db).register("host-1-abcd", host="host", pid=1, version="0", state_dir="/s", repos=["/r"], workers=1,
                       now=datetime.now(UTC))
    assert main(["db", "copy", "--to", f"sqlite:///{tmp_path / 'b.db'}"]) == 1
    assert "daemon(s) host-1-abcd run on the source: stop them first" in capsys.readouterr().err


@pytest.mark.parametrize("backend", BACKENDS)
def test_db_migrate_creates_then_finds_the_schema_up_to_date(backend: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    with database_url(backend, tmp_path) as url:
        assert main(["db", "migrate", "--url", url, "--json"]) == 0
        first = json.loads(capsys.readouterr().out)
        assert first["applied"] == [name for name, _ in schema.MIGRATIONS]
        assert main(["db", "migrate", "--url", url]) == 0
        assert capsys.readouterr().out == f"the schema is up to date ({schema.MIGRATIONS[-1][0]})\n"
        db = open_database(url)
        assert columns(db) == SCHEMA
        db.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_db_check_reports_the_version_references_and_leases_no_live_daemon_holds(
        backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with database_url(backend, tmp_path) as url:
        assert main(["db", "check", "--url", url]) == 1        # a fresh database: no schema
        missing = len(schema.MIGRATIONS)
        assert f"the schema is not up to date: {missing} migration(s) not applied" in capsys.readouterr().out
        db = open_database(url)
        store = Store(db)
        store.migrate()
        assert main(["db", "check", "--url", url]) == 0
        assert capsys.readouterr().out.rstrip().endswith("ok")

        spec = TaskSpec.model_validate({"type": "docstring", "target": "a.py"})
        now = datetime.now(UTC)
        ids = [store.enqueue("/repo", spec, now) for _ in range(3)]
        fleet = Fleet(db)
        fleet.register("gone-1-aaaa", host="h", pid=1, version="0", state_dir="/s", repos=[], workers=1, now=now)
        fleet.register("live-2-bbbb", host="h2", pid=2, version="0", state_dir="/s", repos=[], workers=1, now=now)
        assert store.claim_next("gone-1-aaaa/w0", now, timedelta(hours=1)) is not None
        assert store.claim_next("live-2-bbbb/w0", now, timedelta(hours=1)) is not None
        fleet.deregister("gone-1-aaaa", now)                   # stopped, yet its lease is still on task 1
        calls = schema.bind(db).model_call
        calls.insert(task_id=999, model="m", started_at=now, prompt="p", response="r").execute()
        calls.insert(task_id=ids[1], model="m", started_at=now, prompt="p", response="r", replay_of=77).execute()

        assert main(["db", "check", "--url", url, "--json"]) == 1
        report = json.loads(capsys.readouterr().out)
        assert report["ok"] is False and report["version"] == schema.MIGRATIONS[-1][0]
        assert report["counts"]["task"] == 3 and report["counts"]["model_call"] == 2
        assert report["problems"] == [
            "1 model_call row(s) name a task that does not exist (task_id 999)",
            "1 model_call row(s) name a model_call that does not exist (replay_of 77)",
            f"task {ids[0]} is leased to daemon gone-1-aaaa, which is stopped: the next daemon to heartbeat "
            "returns it to the queue"]
        db.close()


def _migrate_at_once(url: str, barrier: Any, results: Any) -> None:
    """One process: open the database, wait for the others, migrate; report what it applied."""
    db = open_database(url)
    db.connect()
    barrier.wait(timeout=120)
    try:
        results.put(("ok", schema.migrate(db)))
    except Exception as exc:
        results.put(("error", f"{type(exc).__name__}: {exc}"))


@postgres_only
def test_processes_migrating_a_fresh_postgresql_schema_at_once_take_turns(pg_url: str) -> None:
    """Four processes released at one instant on an empty schema: one applies every step, the
    others wait for its lock and then find nothing to do; no step is applied twice or fails."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_migrate_at_once, args=(pg_url, barrier, results)) for _ in range(4)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=180) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert [kind for kind, _ in outcomes] == ["ok"] * 4, outcomes
    applied = sorted((names for _, names in outcomes), key=len)
    assert applied == [[], [], [], [name for name, _ in schema.MIGRATIONS]]
    db = open_database(pg_url)
    assert schema.applied(db) == [name for name, _ in schema.MIGRATIONS]
    assert columns(db) == SCHEMA
