"""Task files in a repo's `tasks.d/` → queue rows, exactly once.

A path is submitted (by the watcher, via the event loop, or by `scan` at start-up),
waits until its size and mtime have been unchanged for `settle_s` on the injected
clock, and is then ingested: read → sha256 → parse → (standing rules stay in place)
→ target check → `store.ingest_file` (committed) → move to `.done/` →
`store.mark_moved`. Invariant: one content hash dropped once is one task, even across
a crash between the commit and the move (the next pass finds the pending row and only
moves the file); the same content dropped again after the move is a new task. A file
that does not parse, or whose target is missing or outside the repo, goes to
`.rejected/` with `<name>.error.txt` beside it; so does one whose output or reports would
land outside the repo, in a `.git` or in `tasks.d/` (`outputs.check_output`). Only the top level of `tasks.d/` is
ever read. Store and file work run in a thread so the loop never blocks on SQLite.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ohd.clock import Clock, first
from ohd.core import layout
from ohd.core.taskfile import TaskSpec, parse_bytes
from ohd.errors import OhdError, StorageUnavailable, TargetError, TaskFileError
from ohd.ladder import validate
from ohd.repo import worktrees
from ohd.repo.outputs import check_output, check_reports, printable, read_task_file, resolve_inside
from ohd.store.store import Store

log = logging.getLogger("ohd.ingest")

# Names that editors write next to the file they save (vim, emacs, gedit, ...).
MAX_POLL_S = 0.1          # how often settling paths are re-checked
RETRY_BASE_S = 1.0        # a file whose ingest failed is retried after this, doubling
RETRY_MAX_S = 60.0
NAME_MAX = 255


def is_candidate(path: Path) -> bool:
    """A task file name (`layout.is_task_file_name`)."""
    return layout.is_task_file_name(path.name)


@dataclass(slots=True)
class _Settling:
    """What we last saw of a submitted path, and since when (monotonic) it looked so."""

    repo: Path
    size: int
    mtime_ns: int
    since: float
    failures: int = 0


class Ingestor:
    def __init__(self, store: Store, clock: Clock, settle_s: float = 0.3,
                 on_rule: Callable[[Path, str, TaskSpec], object] | None = None) -> None:
        self.store = store
        self.clock = clock
        self.settle_s = settle_s
        # Rule files go to `on_rule(repo, relpath, spec)` (the daemon wires the RuleBook);
        # a TaskFileError it raises (e.g. an invalid cron) rejects the file like a parse error.
        self.on_rule = on_rule
        self._settling: dict[Path, _Settling] = {}
        self._wakeup = asyncio.Event()
        self._rules_logged: set[str] = set()   # content hashes of rule files already logged

    # -- submission (event-loop thread) -------------------------------------------------

    def scan(self, repo: Path) -> None:
        """Submit every candidate file at the top level of `repo/tasks.d`."""
        tasks_dir = layout.tasks_dir(repo)
        if not tasks_dir.is_dir():
            return
        self._settle_moves(repo.resolve())
        for path in sorted(tasks_dir.iterdir()):
            if not path.is_dir() and is_candidate(path):
                self.submit_path(repo, path)

    def _settle_moves(self, repo: Path) -> None:
        """A crash after the move to .done/ but before it was recorded: record it now.

        Otherwise the same content dropped again later would be taken for the
        unmoved file and only moved, not queued as the new task the user meant.
        """
        for relpath, sha256 in self.store.pending_files(str(repo)):
            if not (repo / relpath).exists():
                self.store.mark_moved(str(repo), sha256)
                log.info("%s: its move to %s/ was not recorded before a stop; recorded now", relpath,
                         layout.DONE_DIR)

    def submit_path(self, repo: Path, path: Path) -> None:
        """Note that `path` (in `repo/tasks.d/`) appeared or changed; it is ingested once settled."""
        repo = repo.resolve()
        tasks_dir = layout.tasks_dir(repo)
        if not is_candidate(path) or path.parent.resolve() != tasks_dir.resolve():
            log.debug("ignoring %s: not a task file at the top of %s", path, tasks_dir)
            return
        path = tasks_dir / path.name
        if self._observe(repo, path):
            self._wakeup.set()

    def _observe(self, repo: Path, path: Path) -> bool:
        """Record the path's size and mtime; restart its settle time if they changed."""
        try:
            stat = path.stat()
        except FileNotFoundError:
            self._settling.pop(path, None)
            return False
        seen = self._settling.get(path)
        if seen is None or (seen.size, seen.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
            failures = seen.failures if seen else 0
            self._settling[path] = _Settling(repo, stat.st_size, stat.st_mtime_ns,
                                             self.clock.monotonic(), failures)
        return True

    # -- the loop -----------------------------------------------------------------------

    async def run_once(self) -> int:
        """Ingest every path that has settled; returns the number of tasks created."""
        return len(await self._ingest_settled())

    async def run(self, stop: asyncio.Event, on_task: Callable[[int], None]) -> None:
        """Ingest until `stop` is set; `on_task(task_id)` for each task created."""
        while not stop.is_set():
            self._wakeup.clear()
            try:
                for task_id in await self._ingest_settled():
                    on_task(task_id)
            except Exception:
                log.exception("ingest: iteration failed")
            await self._wait(stop)

    async def _wait(self, stop: asyncio.Event) -> None:
        """A short clock sleep while paths settle; otherwise until a submit or `stop`."""
        if self._settling:
            await first(self.clock, stop, timeout=min(MAX_POLL_S, max(0.01, self.settle_s / 3)))
        else:
            await first(self.clock, stop, self._wakeup)

    async def _ingest_settled(self) -> list[int]:
        created: list[int] = []
        for path in self._settled_paths():
            seen = self._settling.pop(path)
            try:
                task_id = await asyncio.to_thread(self.ingest_file, seen.repo, path)
            except StorageUnavailable as exc:     # a full disk: one line, and the file waits in tasks.d/
                log.warning("ingest of %s waits: %s; will retry", path, exc)
                self._retry_later(path, seen)
                continue
            except Exception:
                log.exception("ingest of %s failed; will retry", path)
                self._retry_later(path, seen)
                continue
            if task_id is not None:
                created.append(task_id)
        return created

    def _settled_paths(self) -> list[Path]:
        now = self.clock.monotonic()
        ready = []
        for path, seen in list(self._settling.items()):
            if self._observe(seen.repo, path) and now - self._settling[path].since >= self.settle_s:
                ready.append(path)
        return ready

    def _retry_later(self, path: Path, seen: _Settling) -> None:
        """Keep a failed path, due again after a doubling delay (a change retries sooner)."""
        delay = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** seen.failures)
        seen.failures += 1
        seen.since = self.clock.monotonic() + delay
        self._settling[path] = seen

    # -- one file (runs in a worker thread) ---------------------------------------------

    def ingest_file(self, repo: Path, path: Path) -> int | None:
        """Ingest one settled file; the new task's id, or None (rejected, rule, moved, gone)."""
        try:
            data = read_task_file(path)
        except FileNotFoundError:
            log.debug("%s vanished before it was read", path)
            return None
        except TaskFileError as exc:
            reject(path, str(exc))
            return None
        sha = hashlib.sha256(data).hexdigest()
        relpath = layout.task_relpath(path.name)
        recovered = self.store.pending_ingest(str(repo), sha)
        if recovered is not None:
            log.info("task %d was queued from %s before a restart; moving the file", recovered, relpath)
            self._move_done(repo, path, sha, recovered)
            return None
        accepted = self._accept(repo, path, relpath, data, sha)
        if accepted is None:
            return None
        spec, base = accepted
        task_id = self.store.ingest_file(str(repo), relpath, sha, spec, self.clock.now(), base)
        log.info("task %d queued from %s (%s %s)", task_id, relpath, spec.type, spec.target,
                 extra={"task_id": task_id, "status": "queued"})
        self._move_done(repo, path, sha, task_id)
        return task_id

    def _accept(self, repo: Path, path: Path, relpath: str, data: bytes,
                sha: str) -> tuple[TaskSpec, str | None] | None:
        """The spec of a one-shot task file and its base commit (agent runners); None after rejecting
        it or leaving a rule in place."""
        try:
            spec = parse_bytes(data, relpath)
            check_rule_names(spec, relpath)
        except TaskFileError as exc:
            reject(path, str(exc))
            return None
        if spec.is_rule:
            self._take_rule(repo, path, relpath, spec, sha)
            return None
        try:
            check_target(repo, spec.file)
            check_reports(repo, spec.file)
        except TargetError as exc:
            reject(path, f"{relpath}: field 'target': {exc}")
            return None
        try:
            if spec.output is not None:
                check_output(repo, spec.output)
        except TargetError as exc:
            reject(path, f"{relpath}: field 'output': {exc}")
            return None
        try:
            return spec, worktrees.base_commit(repo) if spec.agent else None
        except OhdError as exc:
            reject(path, f"{relpath}: field 'runner': {exc}")
            return None

    def _take_rule(self, repo: Path, path: Path, relpath: str, spec: TaskSpec, sha: str) -> None:
        if self.on_rule is None:
            self._note_rule(relpath, sha)
            return
        try:
            self.on_rule(repo, relpath, spec)
        except TaskFileError as exc:
            reject(path, str(exc))

    def _note_rule(self, relpath: str, sha: str) -> None:
        if sha not in self._rules_logged:
            self._rules_logged.add(sha)
            log.info("%s is a standing rule (schedule/on_change); left in place: rules are "
                     "handled by a later version of ohd", relpath)

    def _move_done(self, repo: Path, path: Path, sha: str, task_id: int) -> None:
        dest = free_name(path.parent / layout.DONE_DIR, path.name, str(task_id))
        make_folder(dest.parent)
        path.rename(dest)
        self.store.mark_moved(str(repo), sha)
        log.debug("%s moved to %s", path, dest)



def check_rule_names(spec: TaskSpec, relpath: str) -> None:
    """A task file's `rule_levels` must name rules that exist (the schema checks the levels)."""
    if unknown := validate.unknown_rules(spec.rule_levels):
        raise TaskFileError(relpath, f"unknown rule(s) {', '.join(map(repr, unknown))} "
                                     f"(one of {', '.join(sorted(validate.RULES))})", field="rule_levels")



def check_target(repo: Path, target: str) -> Path:
    """The target as an existing regular file inside the repo, else `TargetError`."""
    try:
        path = resolve_inside(repo, target)
        exists = path.exists()
    except OSError as exc:                       # e.g. ENAMETOOLONG
        raise TargetError(target[:200], exc.strerror or "cannot be read") from None
    if not exists:
        raise TargetError(target, "does not exist")
    if not path.is_file():
        raise TargetError(target, "is not a regular file")
    return path


def reject(path: Path, error: str) -> Path:
    """Write `.rejected/<name>.error.txt`, then move the file beside it (in that order)."""
    dest = free_name(path.parent / layout.REJECTED_DIR, path.name, None)
    make_folder(dest.parent)
    note = layout.error_file(dest)
    note.write_text(printable(error) + "\n", encoding="utf-8")
    note.chmod(dest.parent.stat().st_mode & 0o664)      # readable as the user's own files are
    path.rename(dest)
    log.warning("rejected %s: %s", printable(path.name), printable(error))
    return dest



def make_folder(folder: Path) -> None:
    """`.done/` or `.rejected/` with the mode of `tasks.d/` itself, not the daemon's private umask."""
    if not folder.is_dir():
        folder.mkdir(exist_ok=True)
        folder.chmod(folder.parent.stat().st_mode & 0o2775)


def free_name(folder: Path, name: str, tag: str | None) -> Path:
    """`folder/name`, or `folder/<stem>.<tag><suffix>` (then `.<n>`) when that is taken."""
    stem, suffix = Path(name).stem, Path(name).suffix
    # the name, a `.<tag>.<n>` and `.error.txt` must fit NAME_MAX (255 bytes)
    room = (NAME_MAX - len(layout.ERROR_SUFFIX) - len(f".{tag}.") - 8
            - len(suffix.encode("utf-8", "surrogateescape")))
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX - len(layout.ERROR_SUFFIX):
        stem = stem.encode("utf-8", "surrogateescape")[:room].decode("utf-8", "ignore")
        name = stem + suffix
    candidate = folder / name
    if tag and candidate.exists():
        candidate = folder / f"{stem}.{tag}{suffix}"
    prefix = f"{tag}." if tag else ""
    number = 0
    while candidate.exists():
        number += 1
        candidate = folder / f"{stem}.{prefix}{number}{suffix}"
    return candidate
