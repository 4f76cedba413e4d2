"""The schema: one model per table, the task row's value derived from it, datetimes stored one way."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import peewee
import pytest
from ohd.core.taskfile import TaskSpec
from ohd.store import schema
from ohd.store.calls import CallHistory
from ohd.store.rulestore import RuleStore
from ohd.store.store import Store, open_database

from tests.support.databases import BACKENDS, store_on

REPO = "/home/me/project"


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with store_on(request.param, tmp_path) as st:
        yield st


def test_the_task_value_has_every_column_of_the_task_row_but_its_rank() -> None:
    assert set(schema.TASK_FIELDS) == set(schema.TaskRow._meta.fields) - {"rank"}


def test_a_new_task_keeps_every_column_the_task_file_names(store: Store) -> None:
    """The insert takes the spec's value of each column named like a task-file field (none listed
    by hand), and the row reads back as the spec said."""
    spec = TaskSpec.model_validate({
        "type": "custom", "target": "src/a.py", "description": "d", "priority": "high", "output": "out.md",
        "models": ["m1", "m2"], "min_quality": 0.5, "max_attempts": 2, "timeout_s": 30.0, "prompt": "p",
        "rule_levels": {"lint": "error", "coverage_delta": "off"}, "cache": False})
    now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    task = store.get_task(store.enqueue(REPO, spec, now, source="tasks.d/a.yaml"))
    assert set(schema.SPEC_COLUMNS) == {"description", "output", "models", "min_quality", "max_attempts",
                                        "timeout_s", "prompt", "rule_levels", "runner", "check_command", "deliver",
                                        "cache"}
    for name in schema.SPEC_COLUMNS:
        expected = getattr(spec, name)
        expected = expected.value if hasattr(expected, "value") else expected
        assert getattr(task, name) == (tuple(expected) if isinstance(expected, list) else expected), name
    assert (task.type, task.target, task.priority, task.source) == ("custom", "src/a.py", "high", "tasks.d/a.yaml")
    assert (task.status, task.attempts, task.crashes, task.cancel_requested) == ("queued", 0, 0, False)
    assert (task.created_at, task.updated_at) == (now, now)
    [(stored,)] = store.db.execute_sql("SELECT rule_levels FROM task").fetchall()
    assert stored == '{"coverage_delta": "off", "lint": "error"}'    # sorted keys: the bytes ohd always wrote


def test_no_rule_levels_are_stored_as_null_and_read_back_empty(store: Store) -> None:
    spec = TaskSpec.model_validate({"type": "unit_test", "target": "src/a.py"})
    task = store.get_task(store.enqueue(REPO, spec, datetime(2026, 3, 1, tzinfo=UTC)))
    assert task.rule_levels == {} and task.models == ("auto",)
    assert store.db.execute_sql("SELECT rule_levels, models FROM task").fetchall() == [(None, '["auto"]')]


def test_every_table_stores_datetimes_one_way(store: Store) -> None:
    """The call history and the standing rules keep their instants as the task does: naive UTC in
    the database (SQLite: fixed-width text, so text order is time order), aware UTC out, the same on
    every backend. `ohd show --calls` printed a call's start with +00:00 from SQLite and without
    from PostgreSQL, and SQLite held these in ISO text that drops a zero fraction."""
    moment = datetime(2026, 3, 1, 13, 0, 0, tzinfo=timezone(timedelta(hours=1)))   # 12:00 UTC, no fraction
    spec = TaskSpec.model_validate({"type": "unit_test", "target": "src/a.py"})
    task_id = store.enqueue(REPO, spec, moment)
    calls = CallHistory(store.db)
    calls.record(task_id, "m", moment, [{"role": "user", "content": "hi"}], "answer")
    rules = RuleStore(store)
    rules.set_last_fire(Path(REPO), "tasks.d/r.yaml", moment)
    rules.fire_schedule(Path(REPO), "tasks.d/r.yaml", spec, moment, moment)

    assert calls.for_task(task_id)[0]["started_at"] == "2026-03-01 12:00:00+00:00"
    assert rules.last_fire(Path(REPO), "tasks.d/r.yaml") == moment
    stored = {str(store.db.execute_sql(f"SELECT {column} FROM {table}").fetchone()[0]) for table, column in (
        ("task", "created_at"), ("model_call", "started_at"), ("rule_clock", "last_fire"),
        ("rule_firing", "fired_at"))}
    assert stored == {"2026-03-01 12:00:00.000000" if isinstance(store.db, peewee.SqliteDatabase) else "2026-03-01 12:00:00"}


def test_rows_older_versions_wrote_in_iso_text_read_the_same(tmp_path: Path) -> None:
    """Before one way, SQLite held a call's start as ISO text with its offset and a rule's clock
    without a zero fraction: such rows read back as the instants they were."""
    store = Store(open_database(f"sqlite:///{tmp_path / 'ohd.db'}"))
    store.migrate()
    store.db.execute_sql("INSERT INTO model_call (task_id, model, started_at, prompt, response) "
                         "VALUES (1, 'm', '2026-03-01 12:00:00+00:00', 'p', 'r')")
    store.db.execute_sql("INSERT INTO rule_clock (repo, rule, last_fire) VALUES (?, 'r', '2026-03-01 12:00:00')",
                         (REPO,))
    assert CallHistory(store.db).for_task(1)[0]["started_at"] == "2026-03-01 12:00:00+00:00"
    assert RuleStore(store).last_fire(Path(REPO), "r") == datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    store.close()


def test_an_agent_task_keeps_its_runner_check_delivery_and_base_commit(store: Store) -> None:
    spec = TaskSpec.model_validate({"type": "change", "target": "src/a.py", "runner": "command",
                                    "check_command": "pytest -q", "deliver": "branch"})
    task = store.get_task(store.enqueue(REPO, spec, datetime(2026, 3, 1, tzinfo=UTC), base_commit="ab" * 20))
    assert (task.runner, task.check_command, task.deliver, task.base_commit) == (
        "command", ("pytest", "-q"), "branch", "ab" * 20)
    assert task.agent and task.as_dict()["check_command"] == ["pytest", "-q"]
    plain = store.get_task(store.enqueue(REPO, TaskSpec.model_validate({"type": "review", "target": "a.py"}),
                                         datetime(2026, 3, 1, tzinfo=UTC)))
    assert (plain.runner, plain.check_command, plain.deliver, plain.base_commit, plain.agent) == (
        "llm", None, "patch", None, False)
