"""The git-hook spool: event files left by `hooks/pre-commit` and `hooks/post-commit` → changed paths.

The hooks write one event file per hook run into `<git common dir>/ohd/inbox/` and never
talk to the daemon. They write it in place, sealed (`sealed 1` as its second line, `.` as its
last): a sealed event without its `.` is `Unfinished` (a hook is still writing it) and stays
where it is until a later look, or is rejected once older than an hour (a killed hook); so
the hooks need no temp file and no `mv` fork. An unsealed event (hooks of an older ohd, which
renamed a temp file in) is complete as it is. This room reads them:
`parse_event` (pure) turns a file's text into a `SpoolEvent`; `SpoolReader.process`
completes it (a post-commit event names only its commit: the changed paths are read
from git here, so the hook itself runs no git), hands the paths to
`on_paths(repo, paths, origin)` and deletes the file once the callback has returned.
Invariant: an event is handed on exactly once in normal running (delete after the
callback; a crash in between hands it on again at the next scan, so the callback must be
idempotent — rules dedupe the tasks they create). A file that does not
parse goes to `<spool>/rejected/` with `<name>.error.txt` beside it: no crash, no loop.
A callback that raises leaves the event in place; the next `scan` (start-up) retries it.
Only names ending in `.event` at the top of the spool are read (the hooks' temp files are
dotfiles). This room never writes into the working tree and knows nothing of the store.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath

from ohd.core import layout
from ohd.errors import OhdError
from ohd.repo.gitrepo import commit_paths, git_dir

log = logging.getLogger("ohd.spool")

MAGIC = "ohd-event 1"
SEALED = "sealed 1"                    # the second line of an event the hook writes in place
SEAL = "."                             # ... and its last line: the hook has finished it (never a path)
KINDS = frozenset({"pre-commit", "post-commit"})
MAX_EVENT_BYTES = 64 * 1024 * 1024
STALE_TEMP = timedelta(hours=1)        # a hook's temp file this old was left by a killed hook
# git's C-style quoting (core.quotePath=false still quotes control characters, '"' and '\').
ESCAPES = {"a": 7, "b": 8, "t": 9, "n": 10, "v": 11, "f": 12, "r": 13, '"': 34, "\\": 92}

OnPaths = Callable[[Path, list[str], str], object]
Resolve = Callable[[Path, str], list[str]]     # (repo, commit id) → the paths it changed


class EventError(OhdError):
    """A spool file that is not a valid ohd event."""


class Unfinished(EventError):
    """A sealed event whose seal is not there yet, or an empty file: a hook is still writing it."""


@dataclass(frozen=True, slots=True)
class SpoolEvent:
    kind: str                        # "pre-commit" | "post-commit"
    head: str | None                 # the commit (post-commit); pre-commit events have none
    paths: tuple[str, ...] | None    # repo-relative paths, git's order, no duplicates;
                                     # None: read them from git (the commit `head` changed)
    time: datetime | None            # when the hook ran: `time` line, else the file's mtime

    @property
    def origin(self) -> str:
        """What created the event, for logs and task sources: `post-commit 1a2b3c4d5e6f`."""
        return f"{self.kind} {self.head[:12]}" if self.head else self.kind


def spool_dir(repo: Path) -> Path:
    """`<git common dir>/ohd/inbox` of `repo` (worktrees share it); OhdError outside a git repo."""
    common = git_dir(repo)
    if common is None:
        raise OhdError(f"{repo} is not a git repository: no hook spool")
    return layout.spool_dir(common)


def find_spool(repo: Path) -> Path | None:
    """`spool_dir(repo)`, or None (logged) when `repo` is not a git repository."""
    try:
        return spool_dir(repo)
    except OhdError as exc:
        log.info("hooks: %s", exc)
        return None


# -- parsing (pure) ------------------------------------------------------------------------


def parse_event(text: str, received: datetime | None = None) -> SpoolEvent:
    """Parse an event file's text; `EventError` saying what is wrong for anything else.

    Header lines `key value` (`kind`, optional `time` and `head`; unknown keys are
    ignored), then optionally a `paths` line and one path per line. A pre-commit event
    must list its paths; a post-commit event must name its commit (`head`).
    `received` (the file's mtime) is the time when the event has no `time` line.
    """
    lines = text.split("\n")
    if not lines or lines[0].rstrip("\r") != MAGIC:
        raise EventError(f"not an ohd event: the first line is not {MAGIC!r}")
    if len(lines) > 1 and lines[1] == SEALED:
        lines = _unsealed(lines)
    header, rest = _split_header(lines[1:])
    kind = header.get("kind", "")
    if kind not in KINDS:
        raise EventError(f"kind: expected one of {', '.join(sorted(KINDS))}, got {kind!r}")
    head = _head(header.get("head", ""))
    if rest is None and (kind == "pre-commit" or head is None):
        raise EventError(f"a {kind} event needs a {'paths' if kind == 'pre-commit' else 'head'} line: "
                         "the event is incomplete")
    when = _time(header["time"]) if "time" in header else received
    return SpoolEvent(kind=kind, head=head, paths=None if rest is None else _paths(rest), time=when)


def _unsealed(lines: list[str]) -> list[str]:
    """A sealed event's lines without its seal; `Unfinished` when the seal is not there yet."""
    end = len(lines)
    while end and not lines[end - 1]:
        end -= 1
    if lines[end - 1] != SEAL:
        raise Unfinished(f"unfinished: a sealed event without its last line {SEAL!r} (a hook is writing it)")
    return lines[:end - 1]


def _split_header(lines: list[str]) -> tuple[dict[str, str], list[str] | None]:
    """`key value` lines up to the `paths` line (None: there is none)."""
    header: dict[str, str] = {}
    for number, line in enumerate(lines):
        if line == "paths":
            return header, lines[number + 1:]
        if not line:
            continue
        key, _, value = line.partition(" ")
        if not key or not key.replace("-", "").isalnum():
            raise EventError(f"line {number + 2}: expected 'key value' or 'paths', got {line[:80]!r}")
        header[key] = value
    return header, None


def _head(value: str) -> str | None:
    if not value:
        return None
    if len(value) not in (40, 64) or any(c not in "0123456789abcdef" for c in value):
        raise EventError(f"head: expected a commit id, got {value[:80]!r}")
    return value


def _time(value: str) -> datetime:
    if not value.isdigit():
        raise EventError(f"time: expected unix epoch seconds, got {value[:80]!r}")
    try:
        return datetime.fromtimestamp(int(value), tz=UTC)
    except (OverflowError, OSError, ValueError):
        raise EventError(f"time: {value[:80]!r} is out of range") from None


def _paths(lines: list[str]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for line in lines:
        if line:
            seen.setdefault(_check_path(unquote(line) if line.startswith('"') else line), None)
    return tuple(seen)


def _check_path(path: str) -> str:
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts or pure.parts[0] == layout.GIT_DIR:
        raise EventError(f"path: {path[:200]!r} is not a path inside the repository")
    return str(pure)


def unquote(quoted: str) -> str:
    """Undo git's C-style path quoting (`"a\\nb"`, octal bytes `\\303\\251`); EventError if malformed."""
    if len(quoted) < 2 or not quoted.endswith('"'):
        raise EventError(f"path: unterminated quoted path {quoted[:200]!r}")
    body, out, i = quoted[1:-1], bytearray(), 0
    while i < len(body):
        char = body[i]
        if char != "\\":
            out += char.encode("utf-8", "surrogateescape")
            i += 1
        elif body[i + 1:i + 2] in ESCAPES:
            out.append(ESCAPES[body[i + 1]])
            i += 2
        elif len(body[i + 1:i + 4]) == 3 and all(c in "01234567" for c in body[i + 1:i + 4]):
            out.append(int(body[i + 1:i + 4], 8) & 0xFF)
            i += 4
        else:
            raise EventError(f"path: bad escape in quoted path {quoted[:200]!r}")
    return out.decode("utf-8", "surrogateescape")


def is_event_name(name: str) -> bool:
    """A finished event file (the hooks' temp files start with a dot)."""
    return name.endswith(layout.EVENT_SUFFIX) and not name.startswith(".")


# -- reading the spool ---------------------------------------------------------------------


class SpoolReader:
    """Hands each event in a repo's spool to `on_paths(repo, paths, origin)`, then deletes it.

    `process` may be called from several threads (the start-up scan, the watcher): a lock
    makes one event go through at a time, and a file already handled is simply gone.
    """

    def __init__(self, on_paths: OnPaths, resolve: Resolve = commit_paths) -> None:
        self.on_paths = on_paths
        self.resolve = resolve
        self._lock = threading.Lock()

    def scan(self, repo: Path, now: datetime | None = None) -> int:
        """Process every event waiting in `repo`'s spool, oldest first; returns how many were
        handed on. With `now`, hook temp files older than an hour (a hook killed mid-write)
        are deleted. A repo that is not a git repo has no spool (logged, 0)."""
        spool = find_spool(repo)
        if spool is None or not spool.is_dir():
            return 0
        if now is not None:
            remove_stale_temp_files(spool, now)
        found = [(_mtime(p), p.name) for p in spool.iterdir() if is_event_name(p.name)]
        return sum(self.process(repo, spool / name, now) for _when, name in sorted(found))

    def process(self, repo: Path, path: Path, now: datetime | None = None) -> bool:
        """Handle one event file; True if its paths were handed on (and the file deleted).
        An unfinished one stays for a later call; with `now`, one older than STALE_TEMP (its
        hook was killed) is rejected."""
        if not is_event_name(path.name):
            return False
        with self._lock:
            return self._process_locked(repo, path, now)

    def _process_locked(self, repo: Path, path: Path, now: datetime | None) -> bool:
        try:
            event = read_event(path)
        except FileNotFoundError:
            return False                          # handled already (or never finished)
        except Unfinished as exc:                 # its hook is writing it: the close is seen next
            if now is not None and now.timestamp() - _mtime(path) > STALE_TEMP.total_seconds():
                reject(path, str(exc))
            return False
        except (EventError, OSError) as exc:
            reject(path, str(exc))
            return False
        try:
            paths = self._paths(repo, event)
        except OhdError as exc:
            reject(path, str(exc))
            return False
        try:
            self.on_paths(repo, paths, event.origin)
        except Exception:   # one bad event must not stop the spool; it stays for the next scan
            log.exception("hooks: handling %s failed; it stays in the spool", path.name)
            return False
        path.unlink(missing_ok=True)
        log.info("hooks: %s: %d changed path(s) from %s", repo, len(paths), event.origin)
        return True

    def _paths(self, repo: Path, event: SpoolEvent) -> list[str]:
        """The event's paths; for a post-commit event that names only its commit, from git."""
        if event.paths is not None:
            return list(event.paths)
        assert event.head is not None   # parse_event guarantees it
        return [_check_path(p) for p in self.resolve(repo, event.head)]


def read_event(path: Path) -> SpoolEvent:
    """Read and parse one event file (FileNotFoundError passes through)."""
    with open(path, "rb") as handle:
        received = datetime.fromtimestamp(os.fstat(handle.fileno()).st_mtime, tz=UTC)
        data = handle.read(MAX_EVENT_BYTES + 1)
    if len(data) > MAX_EVENT_BYTES:
        raise EventError(f"larger than {MAX_EVENT_BYTES} bytes")
    if not data:
        raise Unfinished("unfinished: empty (a hook has just created it)")
    return parse_event(data.decode("utf-8", "surrogateescape"), received)


def remove_stale_temp_files(spool: Path, now: datetime) -> int:
    """Delete the hooks' temp files (`.<kind>-<pid>.tmp`) older than STALE_TEMP; how many."""
    removed = 0
    for path in spool.glob(".*.tmp"):
        if now.timestamp() - _mtime(path) > STALE_TEMP.total_seconds():
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        log.info("hooks: removed %d stale temp file(s) from %s", removed, spool)
    return removed


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def reject(path: Path, error: str) -> Path | None:
    """Move a bad event to `<spool>/rejected/` with `<name>.error.txt` (error file first)."""
    folder = path.parent / layout.SPOOL_REJECTED_DIR
    dest = folder / path.name
    number = 0
    while dest.exists():
        number += 1
        dest = folder / f"{path.stem}.{number}{path.suffix}"
    try:
        folder.mkdir(exist_ok=True)
        layout.error_file(dest).write_text(f"{path.name}: {error}\n", encoding="utf-8")
        path.rename(dest)
    except FileNotFoundError:
        return None
    except OSError as exc:   # cannot move it: delete it rather than read it again and again
        log.error("hooks: cannot move bad event %s to %s/ (%s); deleting it", path, layout.SPOOL_REJECTED_DIR, exc)
        path.unlink(missing_ok=True)
        return None
    log.warning("hooks: rejected %s: %s", path.name, error)
    return dest
