"""ingest: task files in tasks.d/ become queue rows exactly once (real SQLite, FakeClock)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path

import pytest

from ohd.core.taskfile import parse
from ohd.intake.ingest import Ingestor, is_candidate
from ohd.store.store import Store
from tests.support.clock import FakeClock

SETTLE = 0.3
VALID = "type: unit_test\ntarget: shop/pricing.py\npriority: high\n"


@pytest.fixture
def ingestor(store: Store, clock: FakeClock) -> Ingestor:
    return Ingestor(store, clock, settle_s=SETTLE)


def drop(repo: Path, name: str, text: str) -> Path:
    path = repo / "tasks.d" / name
    path.write_text(text, encoding="utf-8")
    return path


def settle_and_run(ingestor: Ingestor, clock: FakeClock) -> int:
    """One pass after the settle window has passed."""
    clock.advance(SETTLE + 0.01)
    return asyncio.run(ingestor.run_once())


def submit_and_run(ingestor: Ingestor, clock: FakeClock, repo: Path, path: Path) -> int:
    ingestor.submit_path(repo, path)
    return settle_and_run(ingestor, clock)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_valid_file_becomes_one_queued_task_and_moves_to_done(
        ingestor: Ingestor, store: Store, clock: FakeClock, repo: Path) -> None:
    path = drop(repo, "auth.yaml", VALID)
    assert submit_and_run(ingestor, clock, repo, path) == 1
    [task] = store.list_tasks()
    assert (task.status, task.type, task.target, task.priority) == ("queued", "unit_test", "shop/pricing.py", "high")
    assert task.source == "tasks.d/auth.yaml"
    assert not path.exists()
    assert names(repo / "tasks.d" / ".done") == ["auth.yaml"]


def test_malformed_yaml_is_rejected_with_the_line(ingestor: Ingestor, store: Store,
                                                  clock: FakeClock, repo: Path) -> None:
    path = drop(repo, "bad.yaml", "type: unit_test\ntarget: [shop/pricing.py\npriority: high\n")
    assert submit_and_run(ingestor, clock, repo, path) == 0
    rejected = repo / "tasks.d" / ".rejected"
    assert names(rejected) == ["bad.yaml", "bad.yaml.error.txt"]
    error = (rejected / "bad.yaml.error.txt").read_text()
    assert error.startswith("tasks.d/bad.yaml:")
    assert any(f":{n}" in error for n in (2, 3, 4))
    assert store.list_tasks() == []


def test_an_unknown_key_is_rejected_naming_the_field(ingestor: Ingestor, store: Store,
                                                     clock: FakeClock, repo: Path) -> None:
    path = drop(repo, "typo.yaml", VALID + "prioritty: low\n")
    assert submit_and_run(ingestor, clock, repo, path) == 0
    error = (repo / "tasks.d" / ".rejected" / "typo.yaml.error.txt").read_text()
    assert "prioritty" in error
    assert ":4" in error
    assert store.list_tasks() == []


def test_a_task_files_rule_levels_are_kept_and_unknown_rules_or_levels_rejected(
        ingestor: Ingestor, store: Store, clock: FakeClock, repo: Path) -> None:
    good = drop(repo, "strict.yaml", VALID + "rule_levels:\n  lint: error\n  coverage_delta: 'off'\n")
    assert submit_and_run(ingestor, clock, repo, good) == 1
    [task] = store.list_tasks()
    assert task.rule_levels == {"lint": "error", "coverage_delta": "off"}
    assert store.get_task(task.id).as_dict()["rule_levels"] == {"lint": "error", "coverage_delta": "off"}

    typo = drop(repo, "typo.yaml", VALID + "rule_levels:\n  lynt: error\n")
    assert submit_and_run(ingestor, clock, repo, typo) == 0
    error = (repo / "tasks.d" / ".rejected" / "typo.yaml.error.txt").read_text()
    assert "field 'rule_levels'" in error and "unknown rule(s) 'lynt'" in error and "coverage_delta" in error

    level = drop(repo, "level.yaml", VALID + "rule_levels:\n  lint: fatal\n")
    assert submit_and_run(ingestor, clock, repo, level) == 0
    error = (repo / "tasks.d" / ".rejected" / "level.yaml.error.txt").read_text()
    assert "rule_levels" in error and "'error', 'warning', 'info' or 'off'" in error
    assert len(store.list_tasks()) == 1


@pytest.mark.parametrize("target", ["shop/missing.py", "../x.py", "shop"])
def test_a_target_that_is_missing_outside_or_not_a_file_is_rejected(
        ingestor: Ingestor, store: Store, clock: FakeClock, repo: Path, target: str) -> None:
    (repo.parent / "x.py").write_text("x = 1\n")   # exists, but outside the repo
    path = drop(repo, "t.yaml", f"type: review\ntarget: {target}\n")
    assert submit_and_run(ingestor, clock, repo, path) == 0
    rejected = repo / "tasks.d" / ".rejected"
    assert names(rejected) == ["t.yaml", "t.yaml.error.txt"]
    assert "target" in (rejected / "t.yaml.error.txt").read_text()
    assert store.list_tasks() == []


def test_a_symlinked_target_leaving_the_repo_is_rejected(
        ingestor: Ingestor, store: Store, clock: FakeClock, repo: Path) -> None:
    (repo.parent / "secret.py").write_text("x = 1\n")
    (repo / "shop" / "link.py").symlink_to(repo.parent / "secret.py")
    path = drop(repo, "t.yaml", "type: review\ntarget: shop/link.py\n")
    assert submit_and_run(ingestor, clock, repo, path) == 0
    assert names(repo / "tasks.d" / ".rejected") == ["t.yaml", "t.yaml.error.txt"]
    assert store.list_tasks() == []


def test_the_same_file_scanned_twice_is_one_task(ingestor: Ingestor, store: Store,
                                                 clock: FakeClock, repo: Path) -> None:
    path = drop(repo, "t.yaml", VALID)
    ingestor.scan(repo)
    ingestor.scan(repo)
    ingestor.submit_path(repo, path)
    assert settle_and_run(ingestor, clock) == 1
    ingestor.scan(repo)
    assert settle_and_run(ingestor, clock) == 0
    assert len(store.list_tasks()) == 1


def test_a_crash_between_insert_and_move_leaves_one_task_and_moves_the_file(
        ingestor: Ingestor, store: Store, clock: FakeClock, repo: Path) -> None:
    path = drop(repo, "t.yaml", VALID)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    task_id = store.ingest_file(str(repo.resolve()), "tasks.d/t.yaml", sha, parse(VALID), clock.now())
    # ... the daemon died here; at restart the scan finds the file again
    ingestor.scan(repo)
    assert settle_and_run(ingestor, clock) == 0
    assert [t.id for t in store.list_tasks()] == [task_id]
    assert names(repo / "tasks.d" / ".done") == ["t.yaml"]
    assert store.pending_ingest(str(repo.resolve()), sha) is None


def test_a_crash_after_the_move_before_it_was_recorded_still_lets_a_redrop_be_new(
        ingestor: Ingestor, store: Store, clock: FakeClock, repo: Path) -> None:
    path = drop(repo, "t.yaml", VALID)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    store.ingest_file(str(repo.resolve()), "tasks.d/t.yaml", sha, parse(VALID), clock.now())
    (repo / "tasks.d" / ".done").mkdir()
    path.rename(repo / "tasks.d" / ".done" / "t.yaml")
    # ... the daemon died before mark_moved; at restart the scan records the move
    ingestor.scan(repo)
    assert store.pending_ingest(str(repo.resolve()), sha) is None
    assert submit_and_run(ingestor, clock, repo, drop(repo, "t.yaml", VALID)) == 1
    assert len(store.list_tasks()) == 2


def test_a_failed_move_is_retried_without_a_second_task(
        ingestor: Ingestor, store: Store, clock: FakeClock, repo: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    blocker = repo / "tasks.d" / ".done"
    blocker.write_text("not a directory")      # the move to .done/ fails once
    path = drop(repo, "t.yaml", VALID)
    assert submit_and_run(ingestor, clock, repo, path) == 0   # inserted, then the move failed
    assert path.exists()
    assert "ingest of" in caplog.text
    blocker.unlink()
    clock.advance(60)
    assert settle_and_run(ingestor, clock) == 0
    assert len(store.list_tasks()) == 1
    assert names(blocker) == ["t.yaml"]


def test_the_same_content_dropped_again_after_processing_is_a_new_task(
        ingestor: Ingestor, store: Store, clock: FakeClock, repo: Path) -> None:
    assert submit_and_run(ingestor, clock, repo, drop(repo, "t.yaml", VALID)) == 1
    assert submit_and_run(ingestor, clock, repo, drop(repo, "t.yaml", VALID)) == 1
    assert len(store.list_tasks()) == 2
    done = names(repo / "tasks.d" / ".done")
    assert len(done) == 2 and "t.yaml" in done   # the second got a suffix


def test_a_half_written_file_is_not_read_until_it_settles(
        ingestor: Ingestor, store: Store, clock: FakeClock, repo: Path) -> None:
    path = drop(repo, "t.yaml", "type: unit_test\n")          # invalid if read now
    ingestor.submit_path(repo, path)
    assert asyncio.run(ingestor.run_once()) == 0               # not settled yet
    clock.advance(SETTLE / 2)
    with path.open("a") as handle:
        handle.write("target: shop/pricing.py\n")
    clock.advance(SETTLE / 2 + 0.01)                           # settle_s since submit, not since change
    assert asyncio.run(ingestor.run_once()) == 0
    assert path.exists()
    assert settle_and_run(ingestor, clock) == 1
    assert not (repo / "tasks.d" / ".rejected").exists()


def test_a_rule_file_stays_in_place_and_is_logged_once(
        ingestor: Ingestor, store: Store, clock: FakeClock, repo: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ohd.ingest")
    path = drop(repo, "nightly.yaml", VALID + 'schedule: "0 3 * * *"\n')
    assert submit_and_run(ingestor, clock, repo, path) == 0
    assert submit_and_run(ingestor, clock, repo, path) == 0
    assert path.exists()
    assert store.list_tasks() == []
    assert caplog.text.count("standing rule") == 1


def test_subdirectories_and_non_candidates_are_never_ingested(
        ingestor: Ingestor, store: Store, clock: FakeClock, repo: Path) -> None:
    examples = repo / "tasks.d" / "examples"
    examples.mkdir()
    (examples / "e.yaml").write_text(VALID)
    for name in (".hidden.yaml", "t.yaml~", "notes.txt", "#t.yaml#"):
        drop(repo, name, VALID)
    ingestor.scan(repo)
    ingestor.submit_path(repo, examples / "e.yaml")
    assert settle_and_run(ingestor, clock) == 0
    assert (examples / "e.yaml").exists()
    assert store.list_tasks() == []


@pytest.mark.parametrize(("name", "expected"), [
    ("auth.yaml", True), ("auth.yml", True), ("AUTH.YAML", True),
    (".auth.yaml", False), ("auth.yaml~", False), ("auth.yaml.swp", False),
    (".auth.yaml.swp", False), ("#auth.yaml#", False), ("auth.yaml.tmp", False),
    ("4913", False), ("auth.json", False), ("auth", False),
])
def test_is_candidate(name: str, expected: bool) -> None:
    assert is_candidate(Path("tasks.d") / name) is expected


def test_run_ingests_a_submitted_file_and_reports_the_task(
        ingestor: Ingestor, store: Store, clock: FakeClock, repo: Path) -> None:
    created: list[int] = []

    async def scenario() -> None:
        stop = asyncio.Event()

        def on_task(task_id: int) -> None:
            created.append(task_id)
            stop.set()

        runner = asyncio.create_task(ingestor.run(stop, on_task))
        await asyncio.sleep(0)                       # run() is now waiting for a submit
        ingestor.submit_path(repo, drop(repo, "t.yaml", VALID))
        await asyncio.wait_for(runner, timeout=10)

    asyncio.run(scenario())
    assert created == [store.list_tasks()[0].id]
    assert clock.slept                               # settled on the clock, not in real time


def test_run_survives_a_failing_file_and_stops_on_request(
        ingestor: Ingestor, store: Store, clock: FakeClock, repo: Path) -> None:
    (repo / "tasks.d" / ".done").write_text("not a directory")   # every move fails

    async def scenario() -> None:
        stop = asyncio.Event()
        runner = asyncio.create_task(ingestor.run(stop, lambda _id: None))
        ingestor.submit_path(repo, drop(repo, "t.yaml", VALID))
        while not clock.slept or clock.monotonic() < 1005:   # several passes, one failure
            await asyncio.sleep(0)
        stop.set()
        await asyncio.wait_for(runner, timeout=10)

    asyncio.run(scenario())
    assert len(store.list_tasks()) == 1
