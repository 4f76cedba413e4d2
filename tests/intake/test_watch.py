"""watch: real watchdog events on a repo's tasks.d/ reach the callback (bounded polling)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from watchdog.events import DirCreatedEvent, FileDeletedEvent, FileMovedEvent, FileOpenedEvent

from ohd.intake.watch import TasksDirWatcher, event_path, looks_like_task_file
from tests.support.waiting import wait_for

TASK = "type: review\ntarget: shop/pricing.py\n"


class Recorder:
    """The callback: records (repo, path) from the observer thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[Path, Path]] = []

    def __call__(self, repo: Path, path: Path) -> None:
        with self.lock:
            self.calls.append((repo, path))

    def names(self) -> set[str]:
        with self.lock:
            return {path.name for _repo, path in self.calls}


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def watcher(recorder: Recorder, repo: Path) -> Iterator[TasksDirWatcher]:
    watcher = TasksDirWatcher(recorder)
    watcher.watch(repo)
    watcher.start()
    yield watcher
    watcher.stop()


def test_a_written_file_reaches_the_callback(watcher: TasksDirWatcher, recorder: Recorder, repo: Path) -> None:
    (repo / "tasks.d" / "t.yaml").write_text(TASK)
    wait_for(lambda: "t.yaml" in recorder.names(), timeout=10, what="event for t.yaml")
    repo_seen, path = recorder.calls[0]
    assert repo_seen == repo
    assert path == repo / "tasks.d" / "t.yaml"


def test_a_rename_into_the_directory_is_seen(watcher: TasksDirWatcher, recorder: Recorder, repo: Path) -> None:
    temp = repo / "tasks.d" / "t.tmp"
    temp.write_text(TASK)
    os.rename(temp, repo / "tasks.d" / "t.yaml")
    wait_for(lambda: "t.yaml" in recorder.names(), timeout=10, what="event for the renamed file")
    assert "t.tmp" not in recorder.names()


def test_a_file_moved_in_from_outside_is_seen(watcher: TasksDirWatcher, recorder: Recorder, repo: Path) -> None:
    outside = repo.parent / "drafted.yaml"
    outside.write_text(TASK)
    os.rename(outside, repo / "tasks.d" / "drafted.yaml")
    wait_for(lambda: "drafted.yaml" in recorder.names(), timeout=10, what="event for the moved-in file")


def test_dotfiles_subdirectories_and_temp_files_are_dropped(
        watcher: TasksDirWatcher, recorder: Recorder, repo: Path) -> None:
    tasks = repo / "tasks.d"
    (tasks / ".hidden.yaml").write_text(TASK)
    (tasks / "t.yaml.swp").write_text(TASK)
    (tasks / "examples").mkdir()
    (tasks / "examples" / "e.yaml").write_text(TASK)
    (tasks / "last.yaml").write_text(TASK)         # events arrive in order: this one comes last
    wait_for(lambda: "last.yaml" in recorder.names(), timeout=10, what="event for last.yaml")
    assert recorder.names() == {"last.yaml"}


def test_watch_creates_a_missing_tasks_dir_and_watches_several_repos(
        recorder: Recorder, repo: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    watcher = TasksDirWatcher(recorder)
    watcher.start()
    try:
        watcher.watch(repo)
        watcher.watch(other)                       # after start, and without a tasks.d yet
        assert (other / "tasks.d").is_dir()
        (other / "tasks.d" / "o.yml").write_text(TASK)
        wait_for(lambda: "o.yml" in recorder.names(), timeout=10, what="event in the second repo")
        assert {repo_seen for repo_seen, _path in recorder.calls} == {other}
    finally:
        watcher.stop()


def test_event_path_keeps_files_brought_into_view() -> None:
    assert event_path(FileMovedEvent("/r/tasks.d/a.tmp", "/r/tasks.d/a.yaml")) == Path("/r/tasks.d/a.yaml")
    assert event_path(DirCreatedEvent("/r/tasks.d/.done")) is None
    assert event_path(FileDeletedEvent("/r/tasks.d/a.yaml")) is None
    assert event_path(FileOpenedEvent("/r/tasks.d/a.yaml")) is None


@pytest.mark.parametrize(("name", "expected"), [
    ("a.yaml", True), ("a.yml", True), (".a.yaml", False), ("a.yaml~", False),
    ("a.yaml.swp", False), ("#a.yaml#", False), ("4913", False), ("a.tmp", False),
])
def test_looks_like_task_file(name: str, expected: bool) -> None:
    assert looks_like_task_file(Path(name)) is expected
