"""watchdog observers on each repo's `tasks.d/`: file events → `callback(repo, path)`.

One Observer thread watches every registered `tasks.d/`; only its top level counts
(never its subdirectories: `.done/`, `.rejected/`, `examples/`). Created, modified, closed and
moved-into events for task-file names reach the callback, called on the observer
thread; the daemon hands them to the event loop with `call_soon_threadsafe`. This room
only filters and forwards: settling, parsing and the store belong to `ingest`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    EVENT_TYPE_CLOSED,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

log = logging.getLogger(__name__)

TASKS_DIR = "tasks.d"
TASK_SUFFIXES = frozenset({".yaml", ".yml"})
FORWARDED = frozenset({EVENT_TYPE_CREATED, EVENT_TYPE_MODIFIED, EVENT_TYPE_CLOSED})
STOP_TIMEOUT_S = 5.0


def looks_like_task_file(path: Path) -> bool:
    """`*.yaml`/`*.yml` and not a dotfile; this suffix rule already drops editor temp
    names (`x.yaml~`, `x.yaml.swp`, `#x.yaml#`, `4913`). `ingest.is_candidate` re-checks
    every path; the two services may not import each other, hence the small copy."""
    return not path.name.startswith(".") and path.suffix.lower() in TASK_SUFFIXES


def event_path(event: FileSystemEvent) -> Path | None:
    """The file an event brings into view, or None (directories, deletions, opens)."""
    if event.is_directory:
        return None
    if event.event_type == EVENT_TYPE_MOVED:
        return Path(os.fsdecode(event.dest_path))
    if event.event_type in FORWARDED:
        return Path(os.fsdecode(event.src_path))
    return None


class _TasksDirHandler(FileSystemEventHandler):
    def __init__(self, repo: Path, tasks_dir: Path, callback: Callable[[Path, Path], object]) -> None:
        super().__init__()
        self.repo = repo
        self.tasks_dir = tasks_dir
        self.callback = callback

    def on_any_event(self, event: FileSystemEvent) -> None:
        path = event_path(event)
        if path is None or path.parent != self.tasks_dir or not looks_like_task_file(path):
            return
        try:
            self.callback(self.repo, path)
        except Exception:   # the observer thread must survive one bad callback
            log.exception("watch: callback for %s failed", path)


class TasksDirWatcher:
    """A watchdog Observer on the top level of each watched repo's `tasks.d/`."""

    def __init__(self, callback: Callable[[Path, Path], object]) -> None:
        self.callback = callback
        self.observer = Observer()
        self.watched: set[Path] = set()

    def watch(self, repo: Path) -> None:
        """Watch `repo/tasks.d/` (created if missing); before or after `start`."""
        tasks_dir = repo / TASKS_DIR
        if tasks_dir in self.watched:
            return
        tasks_dir.mkdir(parents=True, exist_ok=True)
        handler = _TasksDirHandler(repo, tasks_dir, self.callback)
        # Recursive although only the top level counts (the handler filters): ingest moves
        # files into .done/ and .rejected/, and a move whose destination is not watched
        # is held back 0.5 s by watchdog's move grouping, delaying every event after it.
        self.observer.schedule(handler, str(tasks_dir), recursive=True)
        self.watched.add(tasks_dir)
        log.info("watching %s", tasks_dir)

    def start(self) -> None:
        self.observer.start()

    def stop(self) -> None:
        """Stop the observer thread and wait (bounded) for it to end."""
        if self.observer.is_alive():
            self.observer.stop()
            self.observer.join(timeout=STOP_TIMEOUT_S)


# -- the git-hook spool ---------------------------------------------------------------------

SPOOL_EVENT_SUFFIX = ".event"


class _SpoolHandler(FileSystemEventHandler):
    def __init__(self, repo: Path, spool: Path, callback: Callable[[Path, Path], object]) -> None:
        super().__init__()
        self.repo = repo
        self.spool = spool
        self.callback = callback

    def on_any_event(self, event: FileSystemEvent) -> None:
        path = event_path(event)
        if (path is None or path.parent != self.spool or path.name.startswith(".")
                or not path.name.endswith(SPOOL_EVENT_SUFFIX)):
            return
        try:
            self.callback(self.repo, path)
        except Exception:   # the observer thread must survive one bad callback
            log.exception("watch: spool callback for %s failed", path)


class SpoolWatcher:
    """A watchdog Observer on each repo's hook spool (`<git dir>/ohd/inbox`, top level only):
    a finished event file (`*.event`, renamed in by a hook) → `callback(repo, path)`,
    on the observer thread. A file may be reported more than once; the reader copes."""

    def __init__(self, callback: Callable[[Path, Path], object]) -> None:
        self.callback = callback
        self.observer = Observer()
        self.watched: set[Path] = set()

    def watch(self, repo: Path, spool: Path) -> None:
        """Watch `spool` (created if missing) for `repo`; before or after `start`."""
        if spool in self.watched:
            return
        spool.mkdir(parents=True, exist_ok=True)
        self.observer.schedule(_SpoolHandler(repo, spool, self.callback), str(spool), recursive=False)
        self.watched.add(spool)
        log.info("watching the hook spool %s", spool)

    def start(self) -> None:
        self.observer.start()

    def stop(self) -> None:
        """Stop the observer thread and wait (bounded) for it to end."""
        if self.observer.is_alive():
            self.observer.stop()
            self.observer.join(timeout=STOP_TIMEOUT_S)
