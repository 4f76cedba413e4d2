"""The outputs room: reading sources and writing generated files and reports, safely.

Edge: the only module that writes generated files into a repo. Invariants: every path
is resolved (symlinks included) and confined to the repo outside `.git/`; a file the
user edited since ohd last wrote it is never overwritten (`plan` sends the content to
`<output>.ohd-new`); every write is atomic (temp file in the same directory, fsync,
`os.replace`, fsync of the directory), so a crash leaves the old bytes or the new ones,
never a mix, and re-applying the same plan writes the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ohd.errors import TargetError
from ohd.taskfile import TaskType, check_relpath

log = logging.getLogger(__name__)

OHD_NEW_SUFFIX = ".ohd-new"
REPORT_DIR = ".ohd"
_SNIFF_BYTES = 8192
_NEW_FILE_MODE = 0o644
# `<file>.<type>.json|md` (a target's latest report) and `<file>.<type>.<task id>.json|md`
_REPORT_NAME = re.compile(r".+\.(?:%s)(?:\.\d+)?\.(?:json|md)" % "|".join(t.value for t in TaskType))


def resolve_inside(repo: Path, rel: str) -> Path:
    """`repo/rel` with symlinks resolved; TargetError if it lands outside the repo or in `.git/`."""
    if not rel or not rel.strip():
        raise TargetError(rel, "the path is empty")
    if PurePosixPath(rel).is_absolute():
        raise TargetError(rel, "the path is absolute; give it relative to the repo root")
    root = repo.resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise TargetError(rel, f"resolves to {path}, which is outside the repo {root}")
    inner = path.relative_to(root).parts
    if inner and inner[0] == ".git":
        raise TargetError(rel, "is inside .git/, which ohd never reads or writes")
    if not inner:
        raise TargetError(rel, "names the repo root, not a file")
    return path


def check_output(repo: Path, rel: str) -> Path:
    """`resolve_inside`, and TargetError if ohd writes its reports there (an output never replaces one)."""
    path = resolve_inside(repo, rel)
    if is_report_path(path):
        raise TargetError(rel, f"is where ohd writes its reports (`{REPORT_DIR}/<file>.<type>.json|md` "
                               "beside the source); give the task another output")
    return path


def is_report_path(path: PurePosixPath | Path) -> bool:
    """Whether `path` has the name and folder of a report (any target's, any task's)."""
    return path.parent.name == REPORT_DIR and _REPORT_NAME.fullmatch(path.name) is not None


def read_source(repo: Path, rel: str, max_bytes: int = 1_000_000) -> str:
    """The UTF-8 text of a source file inside the repo; TargetError if it is not usable text."""
    path = resolve_inside(repo, rel)
    if not path.exists():
        raise TargetError(rel, "does not exist")
    if path.is_dir():
        raise TargetError(rel, "is a directory, not a file")
    if not path.is_file():
        raise TargetError(rel, "is not a regular file")
    size = path.stat().st_size
    if size > max_bytes:
        raise TargetError(rel, f"is {size} bytes, larger than the limit of {max_bytes} bytes")
    with path.open("rb") as fh:
        raw = fh.read(max_bytes + 1)
    return _decode(rel, raw, max_bytes)


def related(repo: Path, output: str) -> tuple[tuple[str, str], ...]:
    """An existing file at the output path, as context for the model (what the user has); else ()."""
    try:
        return ((output, read_source(repo, output)),)
    except TargetError:
        return ()


def _decode(rel: str, raw: bytes, max_bytes: int) -> str:
    if len(raw) > max_bytes:
        raise TargetError(rel, f"is larger than the limit of {max_bytes} bytes")
    if b"\x00" in raw[:_SNIFF_BYTES]:
        raise TargetError(rel, "is a binary file (it contains NUL bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TargetError(rel, f"is not UTF-8 text (invalid byte at offset {exc.start})") from exc
    if not text.strip():
        raise TargetError(rel, "is empty")
    return text


def sha256_text(text: str) -> str:
    """Hex SHA-256 of the UTF-8 encoding of `text` (what `atomic_write` puts on disk)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


NOT_WRITTEN_BY_OHD = "not_written_by_ohd"     # why a plan is a conflict: the file is the user's own
EDITED_SINCE_WRITTEN = "edited_since_ohd_wrote"  # ... or ohd wrote it and it was changed since


@dataclass(frozen=True, slots=True)
class WritePlan:
    """Where the content goes: `intended`, or `<intended>.ohd-new` on conflict; or nowhere."""

    path: Path
    intended: Path
    content: str
    sha256: str
    conflict: bool
    unchanged: bool
    conflict_reason: str | None = None    # NOT_WRITTEN_BY_OHD or EDITED_SINCE_WRITTEN when `conflict`


def plan(intended: Path, content: str, current_sha: str | None, written_sha: str | None,
         replaceable_sha: str | None = None) -> WritePlan:
    """Decide, without touching the disk, how to write `content` to `intended`.

    absent → write; already this content → unchanged; still what ohd last wrote, or exactly
    `replaceable_sha` (a file the caller proved it may replace) → overwrite; anything else
    (the user's file or the user's edit) → conflict, write `<intended>.ohd-new`.
    """
    sha = sha256_text(content)
    if current_sha is None or current_sha in (written_sha, sha, replaceable_sha):
        return WritePlan(path=intended, intended=intended, content=content, sha256=sha,
                         conflict=False, unchanged=current_sha == sha)
    side = intended.with_name(intended.name + OHD_NEW_SUFFIX)
    reason = NOT_WRITTEN_BY_OHD if written_sha is None else EDITED_SINCE_WRITTEN
    return WritePlan(path=side, intended=intended, content=content, sha256=sha,
                     conflict=True, unchanged=False, conflict_reason=reason)


def current_sha(path: Path) -> str | None:
    """Hex SHA-256 of the file's bytes, or None if it does not exist."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError as exc:
        raise TargetError(str(path), "is a directory, not a file") from exc
    return hashlib.sha256(data).hexdigest()


def apply(plan: WritePlan) -> None:
    """Carry out a plan atomically; an unchanged plan writes nothing. Safe to repeat."""
    if plan.unchanged:
        log.debug("%s already holds this content", plan.path)
        return
    atomic_write(plan.path, plan.content)
    if plan.conflict_reason == NOT_WRITTEN_BY_OHD:
        log.info("%s exists and was not written by ohd; new content in %s", plan.intended, plan.path)
    elif plan.conflict:
        log.info("%s was edited since ohd wrote it; new content in %s", plan.intended, plan.path)


def atomic_write(path: Path, data: str) -> None:
    """Write `data` (UTF-8) to `path` atomically, creating parent directories.

    Temp file in the same directory, fsync, `os.replace`, fsync the directory. On any
    failure the old file is intact, the temp file is removed and TargetError is raised.
    """
    payload = data.encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = _mode_for(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise TargetError(str(path), f"cannot write: {exc.strerror or exc}") from exc
    try:
        _write_all(fd, payload, mode)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise TargetError(str(path), f"cannot write: {exc.strerror or exc}") from exc
    _fsync_dir(path.parent)


def _mode_for(path: Path) -> int:
    """Keep an existing file's permission bits; new files get 0644."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return _NEW_FILE_MODE


def _write_all(fd: int, payload: bytes, mode: int) -> None:
    try:
        os.fchmod(fd, mode)
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable; some filesystems refuse fsync on a directory, which is harmless."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def report_paths(repo: Path, target_rel: str, task_type: str, task_id: int | None = None) -> tuple[Path, Path]:
    """`<repo>/<source dir>/.ohd/<file>.<type>.json` and `.md`: the latest task's report;
    with `task_id`, `<file>.<type>.<task id>.json` and `.md`: that task's own."""
    try:
        rel = PurePosixPath(check_relpath(target_rel))
    except ValueError as exc:
        raise TargetError(target_rel, str(exc)) from exc
    folder = repo / rel.parent / REPORT_DIR
    stem = f"{rel.name}.{task_type}" + ("" if task_id is None else f".{task_id}")
    return folder / f"{stem}.json", folder / f"{stem}.md"
