"""An agent runner's task records the repo's HEAD where it is created: ingest, a rule's firing; a repo
with no commit refuses it, naming the field."""

from __future__ import annotations

import asyncio
from datetime import UTC, timedelta
from pathlib import Path

from ohd.core import layout
from ohd.intake.ingest import Ingestor
from ohd.intake.rules import RuleBook
from ohd.store.store import Store

from tests.support.clock import FakeClock
from tests.support.gitrepo import git

CHANGE = "type: change\ntarget: shop/pricing.py\ndescription: round half up\nrunner: command\n" \
         "check_command: pytest -q\ndeliver: branch\n"


def ingest(store: Store, clock: FakeClock, repo: Path, name: str, text: str) -> Ingestor:
    ingestor = Ingestor(store, clock, settle_s=0.1, on_rule=RuleBook(store, clock, timezone=UTC,
                                                                      grace=timedelta(hours=1)).register)
    (repo / layout.TASKS_DIR / name).write_text(text)
    ingestor.submit_path(repo, repo / layout.TASKS_DIR / name)
    clock.advance(0.2)
    asyncio.run(ingestor.run_once())
    return ingestor


def test_an_ingested_agent_task_records_head(repo: Path, store: Store, clock: FakeClock) -> None:
    ingest(store, clock, repo, "c.yaml", CHANGE)
    [task] = store.list_tasks()
    assert (task.runner, task.check_command, task.deliver) == ("command", ("pytest", "-q"), "branch")
    assert task.base_commit == git(repo, "rev-parse", "HEAD").strip()


def test_an_agent_task_in_a_repo_without_a_commit_is_rejected(tmp_path: Path, store: Store,
                                                             clock: FakeClock) -> None:
    repo = tmp_path / "fresh"
    (repo / layout.TASKS_DIR).mkdir(parents=True)
    (repo / "shop").mkdir()
    (repo / "shop" / "pricing.py").write_text("X = 1\n")
    git(repo, "init", "-q")
    ingest(store, clock, repo, "c.yaml", CHANGE)
    assert store.list_tasks() == []
    error = (repo / layout.TASKS_DIR / layout.REJECTED_DIR / f"c.yaml{layout.ERROR_SUFFIX}").read_text()
    assert "field 'runner'" in error and "has no commit yet" in error


def test_a_rules_task_carries_the_agent_fields_and_the_head_of_its_firing(repo: Path, store: Store,
                                                                         clock: FakeClock) -> None:
    book = RuleBook(store, clock, timezone=UTC, grace=timedelta(hours=1))
    ingestor = Ingestor(store, clock, settle_s=0.1, on_rule=book.register)
    rule = repo / layout.TASKS_DIR / "r.yaml"
    rule.write_text("type: change\ndescription: tidy\nrunner: aider\ncheck_command: [make, test]\n"
                    "on_change: ['shop/*.py']\n")
    ingestor.submit_path(repo, rule)
    clock.advance(0.2)
    asyncio.run(ingestor.run_once())
    (repo / "shop" / "pricing.py").write_text("X = 2\n")
    git(repo, "commit", "-qam", "edit")
    [task_id] = book.changed(repo, ["shop/pricing.py"], "post-commit")
    task = store.get_task(task_id)
    assert (task.runner, task.check_command, task.type) == ("aider", ("make", "test"), "change")
    assert task.base_commit == git(repo, "rev-parse", "HEAD").strip()
