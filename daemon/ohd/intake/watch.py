"""watchdog observers on each repo's `tasks.d/`: file events → `callback(repo, path)`.

One Observer thread watches every registered `tasks.d/`; only its top level counts
(never its subdirectories: `.done/`, `.rejected/`, `examples/`). Created, modified, closed and
moved-into events for task-file names reach the callback, called on the observer
thread; the daemon hands them to the event loop with `call_soon_threadsafe`. This room
only filters and forwards: settling, parsing and the store belong to `ingest`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from watchdog.events import (
    EVENT_TYPE_CLOSED,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import ObservedWatch

from ohd.clock import Clock, first
from ohd.core import layout
from ohd.repo.gitrepo import ignored_paths

log = logging.getLogger("ohd.watch")

FORWARDED = frozenset({EVENT_TYPE_CREATED, EVENT_TYPE_MODIFIED, EVENT_TYPE_CLOSED})
STOP_TIMEOUT_S = 5.0
# What the kernel is asked to report: writes, creations and moves. Never opens, reads or closes
# without a write (IN_OPEN, IN_CLOSE_NOWRITE): every `git status`, pytest run or editor read in
# the tree produced one event per directory and file, queued by watchdog for nothing, and a stop
# with such events still queued made watchdog log an ERROR ("queue_events() called when the
# thread is inactive").
FILE_EVENTS: list[type[FileSystemEvent]] = [FileCreatedEvent, FileModifiedEvent, FileClosedEvent,
                                            FileMovedEvent]


def looks_like_task_file(path: Path) -> bool:
    """A task file name (`layout.is_task_file_name`): editor temp names (`x.yaml~`, `x.yaml.swp`,
    `#x.yaml#`, `4913`) and dotfiles never reach ingest."""
    return layout.is_task_file_name(path.name)


def event_path(event: FileSystemEvent) -> Path | None:
    """The file an event brings into view, or None (directories, deletions, opens)."""
    if event.is_directory:
        return None
    if event.event_type == EVENT_TYPE_MOVED:
        return Path(os.fsdecode(event.dest_path))
    if event.event_type in FORWARDED:
        return Path(os.fsdecode(event.src_path))
    return None


class _TopLevelHandler(FileSystemEventHandler):
    """Forwards events for files directly in `folder` that `accepts` to `callback(repo, path)`."""

    def __init__(self, repo: Path, folder: Path, accepts: Callable[[Path], bool],
                 callback: Callable[[Path, Path], object]) -> None:
        super().__init__()
        self.repo = repo
        self.folder = folder
        self.accepts = accepts
        self.callback = callback

    def on_any_event(self, event: FileSystemEvent) -> None:
        path = event_path(event)
        if path is None or path.parent != self.folder or not self.accepts(path):
            return
        try:
            self.callback(self.repo, path)
        except Exception:   # the observer thread must survive one bad callback
            log.exception("watch: callback for %s failed", path)


class _ObserverOwner:
    """One watchdog Observer thread: started, and stopped with a bounded join."""

    def __init__(self, callback: Callable[[Path, Path], object]) -> None:
        self.callback = callback
        self.observer = Observer()
        self.watched: set[Path] = set()

    def start(self) -> None:
        self.observer.start()

    def stop(self) -> None:
        """Stop the observer thread and wait (bounded) for it to end."""
        if self.observer.is_alive():
            self.observer.stop()
            self.observer.join(timeout=STOP_TIMEOUT_S)


class TasksDirWatcher(_ObserverOwner):
    """A watchdog Observer on the top level of each watched repo's `tasks.d/`."""

    def watch(self, repo: Path) -> None:
        """Watch `repo/tasks.d/` (created if missing); before or after `start`."""
        tasks_dir = layout.tasks_dir(repo)
        if tasks_dir in self.watched:
            return
        tasks_dir.mkdir(parents=True, exist_ok=True)
        handler = _TopLevelHandler(repo, tasks_dir, looks_like_task_file, self.callback)
        # Recursive although only the top level counts (the handler filters): ingest moves
        # files into .done/ and .rejected/, and a move whose destination is not watched
        # is held back 0.5 s by watchdog's move grouping, delaying every event after it.
        self.observer.schedule(handler, str(tasks_dir), recursive=True, event_filter=FILE_EVENTS)
        self.watched.add(tasks_dir)
        log.info("watching %s", tasks_dir)


# -- the git-hook spool ---------------------------------------------------------------------


def _is_spool_event(path: Path) -> bool:
    return not path.name.startswith(".") and path.name.endswith(layout.EVENT_SUFFIX)


class SpoolWatcher(_ObserverOwner):
    """A watchdog Observer on each repo's hook spool (`<git dir>/ohd/inbox`, top level only):
    an event file (`*.event`, written in place by a hook, or renamed in by an older one) →
    `callback(repo, path)`, on the observer thread. A file may be reported more than once; the reader copes."""

    def watch(self, repo: Path, spool: Path) -> None:
        """Watch `spool` (created if missing) for `repo`; before or after `start`."""
        if spool in self.watched:
            return
        spool.mkdir(parents=True, exist_ok=True)
        self.observer.schedule(_TopLevelHandler(repo, spool, _is_spool_event, self.callback), str(spool),
                               recursive=False, event_filter=FILE_EVENTS)
        self.watched.add(spool)
        log.info("watching the hook spool %s", spool)


# -- the working tree (standing rules, issue 4) ------------------------------------------

TREE_EVENTS = frozenset({EVENT_TYPE_CREATED, EVENT_TYPE_MODIFIED, EVENT_TYPE_CLOSED, EVENT_TYPE_MOVED})
TREE_DIR_EVENTS: list[type[FileSystemEvent]] = [*FILE_EVENTS, DirCreatedEvent, DirMovedEvent,
                                                DirDeletedEvent]


def is_venv(folder: Path) -> bool:
    return (folder / "pyvenv.cfg").is_file()


def watches_top_dir(repo: Path, folder: Path) -> bool:
    """Whether the tree watch looks inside `folder`, a directory at the top of `repo`: not the
    git directory, `tasks.d/` (its own watcher), `.ohd/`, caches or a virtualenv. Watching
    those cost an inotify watch per directory (`.git/objects/*`, a venv's thousands), and the
    git directory holds the hook spool: the daemon creating it under a recursive watch made
    watchdog register `.git/ohd/inbox` twice and print a warning listing every watched folder."""
    return (folder.parent == repo and folder.name != layout.TASKS_DIR
            and folder.name not in layout.TREE_SKIPPED_DIRS and not is_venv(folder))


class _TreeHandler(FileSystemEventHandler):
    """Observer-thread side: drop ignored directories, hand repo-relative paths to `sink`.

    `on_top_dir(folder)` hears of directories appearing at or leaving the top of the repo, so
    the watcher can watch or forget them."""

    def __init__(self, repo: Path, sink: Callable[[Path, str], object],
                 on_top_dir: Callable[[Path], object] = lambda _folder: None) -> None:
        super().__init__()
        self.repo = repo
        self.sink = sink
        self.on_top_dir = on_top_dir
        self.venvs: set[Path] = set()   # directories known to hold a pyvenv.cfg

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            self._directory(event)
            return
        if event.event_type not in TREE_EVENTS:
            return
        raw = event.dest_path if event.event_type == EVENT_TYPE_MOVED else event.src_path
        self.deliver(Path(os.fsdecode(raw)))

    def deliver(self, path: Path) -> None:
        relpath = self.relevant(path)
        if relpath is None:
            return
        try:
            self.sink(self.repo, relpath)
        except Exception:   # the observer thread must survive one bad callback
            log.exception("watch: tree callback for %s failed", relpath)

    def _directory(self, event: FileSystemEvent) -> None:
        if event.event_type not in (EVENT_TYPE_CREATED, EVENT_TYPE_DELETED, EVENT_TYPE_MOVED):
            return
        folders = [Path(os.fsdecode(event.src_path))]
        if event.event_type == EVENT_TYPE_MOVED:
            folders.append(Path(os.fsdecode(event.dest_path)))
        for folder in folders:
            if folder.parent == self.repo:
                try:
                    self.on_top_dir(folder)
                except Exception:   # the observer thread must survive it
                    log.exception("watch: could not follow the directory %s", folder)

    def relevant(self, path: Path) -> str | None:
        """The repo-relative POSIX path, or None for ignored places (.git, .ohd, tasks.d, venvs)
        and for the ladder's transient candidate test files."""
        try:
            parts = path.relative_to(self.repo).parts
        except ValueError:
            return None
        if (not parts or parts[0] == layout.TASKS_DIR
                or any(p in layout.TREE_SKIPPED_DIRS for p in parts[:-1])):
            return None
        if parts[-1].startswith(layout.CANDIDATE_PREFIX):
            return None
        for depth in range(1, len(parts)):
            folder = self.repo.joinpath(*parts[:depth])
            if folder in self.venvs or is_venv(folder):
                self.venvs.add(folder)
                return None
        return "/".join(parts)


class TreeWatcher:
    """Watchdog observers on each repo's working tree; changed files, debounced, in batches.

    Each repo gets a watch on its top level and a recursive one on each directory there that
    `watches_top_dir` accepts, followed as such directories come and go (files already in a
    new one count as changed: they were written before its watch began). The observer thread
    only filters and hands `(repo, relpath)` to the event loop (`call_soon_threadsafe`); the
    debounce lives on the loop and is timed by the Clock: a path is delivered once it has had
    no event for `quiet_s`, however often it was saved before. Paths git ignores (nested
    `.gitignore` files included) are dropped at delivery, one `git check-ignore` call per batch.
    """

    def __init__(self, clock: Clock, quiet_s: float = 2.0) -> None:
        self.clock = clock
        self.quiet_s = quiet_s
        self.observer = Observer()
        self.watched: set[Path] = set()
        self._subtrees: dict[Path, ObservedWatch] = {}   # a watched top-level directory → its watch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[tuple[Path, str], float] = {}   # (repo, relpath) → last event (monotonic)
        self._wakeup = asyncio.Event()

    def watch(self, repo: Path) -> None:
        repo = repo.resolve()
        if repo in self.watched:
            return
        handler = _TreeHandler(repo, self._from_thread)
        handler.on_top_dir = lambda folder: self._top_dir(handler, folder)
        self.observer.schedule(handler, str(repo), recursive=False, event_filter=TREE_DIR_EVENTS)
        for folder in sorted(repo.iterdir()):
            if folder.is_dir() and not folder.is_symlink() and watches_top_dir(repo, folder):
                self._subtrees[folder] = self.observer.schedule(handler, str(folder), recursive=True,
                                                                event_filter=TREE_DIR_EVENTS)
        self.watched.add(repo)
        log.info("watching the working tree of %s", repo)

    def _top_dir(self, handler: _TreeHandler, folder: Path) -> None:
        """Observer thread: an event said a directory appeared at or left the top of a repo.

        Its watch is made to match what is on disk now, whatever the event said: the top level's
        emitter and the folder's own both report a removal, in either order, so a late one may
        come after the folder was made again. A folder that is there gets a new watch (the old
        one may have died with the directory it watched)."""
        watch = self._subtrees.pop(folder, None)
        if watch is not None:
            try:
                self.observer.unschedule(watch)
            except KeyError:
                pass   # its emitter had already gone with the directory
        if not folder.is_dir() or folder.is_symlink() or not watches_top_dir(handler.repo, folder):
            return
        self._subtrees[folder] = self.observer.schedule(handler, str(folder), recursive=True,
                                                        event_filter=TREE_DIR_EVENTS)
        for root, dirs, files in os.walk(folder):   # written before the watch began
            dirs[:] = [d for d in dirs if d not in layout.TREE_SKIPPED_DIRS]
            for name in files:
                handler.deliver(Path(root) / name)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the observer; its events reach `loop` (the loop that runs `run`)."""
        self._loop = loop
        self.observer.start()

    def stop(self) -> None:
        if self.observer.is_alive():
            self.observer.stop()
            self.observer.join(timeout=STOP_TIMEOUT_S)

    def _from_thread(self, repo: Path, relpath: str) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.note, repo, relpath)

    # -- loop side ------------------------------------------------------------------

    def note(self, repo: Path, relpath: str) -> None:
        """An event for `relpath` now: (re)start its quiet period."""
        self._pending[(repo, relpath)] = self.clock.monotonic()
        self._wakeup.set()

    def noted(self, relpath: str) -> bool:
        """Whether `relpath` waits for its quiet period (tests)."""
        return any(rel == relpath for _, rel in self._pending)

    def take_quiet(self) -> dict[Path, list[str]]:
        """Remove and return the paths whose quiet period has passed, per repo."""
        now = self.clock.monotonic()
        batches: dict[Path, list[str]] = {}
        for (repo, relpath), last in list(self._pending.items()):
            if now - last >= self.quiet_s:
                del self._pending[(repo, relpath)]
                batches.setdefault(repo, []).append(relpath)
        return batches

    async def flush(self) -> list[tuple[Path, list[str]]]:
        """The quiet paths that git does not ignore, per repo."""
        found = []
        for repo, paths in self.take_quiet().items():
            ignored = await asyncio.to_thread(ignored_paths, repo, paths)
            kept = sorted(p for p in paths if p not in ignored)
            if kept:
                found.append((repo, kept))
        return found

    async def run(self, stop: asyncio.Event,
                  on_change: Callable[[Path, list[str]], Awaitable[object]]) -> None:
        """Deliver quiet paths to `on_change(repo, relpaths)` until `stop` is set."""
        while not stop.is_set():
            self._wakeup.clear()
            try:
                for repo, paths in await self.flush():
                    await on_change(repo, paths)
            except Exception:
                log.exception("watch: tree iteration failed")
            await self._wait(stop)

    async def _wait(self, stop: asyncio.Event) -> None:
        """Until the earliest quiet period ends, or (nothing pending) a new event, or `stop`."""
        if self._pending:
            left = min(self._pending.values()) + self.quiet_s - self.clock.monotonic()
            await first(self.clock, stop, timeout=max(0.01, left))
        else:
            await first(self.clock, stop, self._wakeup)
