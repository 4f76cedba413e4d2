"""The outputs room: reading sources and writing generated files and reports, safely.

Edge: the only module that writes generated files into a repo. Invariants: every path
is resolved (symlinks included) and confined to the repo, outside any `.git` (a nested
repository's folder or a submodule's `.git` file, at any depth), and what ohd writes
stays outside `tasks.d/` (a written file there would be ingested as a task). The check
is made when a task is accepted and again at the write: `atomic_write(..., root=repo)`
resolves again and then walks the folders with `O_NOFOLLOW` from the repo's own file
descriptor, so a folder swapped for a symlink in between is refused, not followed. A file the
user edited since ohd last wrote it is never overwritten (`plan` sends the content to
`<output>.ohd-new`); every write is atomic (temp file in the same directory, fsync,
`os.replace`, fsync of the directory), so a crash leaves the old bytes or the new ones,
never a mix, and re-applying the same plan writes the same bytes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ohd.core import layout
from ohd.core.taskfile import TaskType, check_relpath
from ohd.errors import TargetError, TaskFileError, repo_unwritable

log = logging.getLogger("ohd.outputs")

_SNIFF_BYTES = 8192
MAX_TASK_FILE_BYTES = 1024 * 1024    # a task file is refused above 1 MiB
_NEW_FILE_MODE = 0o644
# a new file gets its folder's bits without x and never world-writable; a new folder its parent's
_FILE_BITS_OF_FOLDER = 0o664
_FOLDER_BITS = 0o2775
_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# `<file>.<type>.json|md` (a target's latest report) and `<file>.<type>.<task id>.json|md`
_REPORT_NAME = re.compile(r".+\.(?:" + "|".join(t.value for t in TaskType) + r")(?:\.\d+)?\.(?:json|md)")


def resolve_inside(repo: Path, rel: str) -> Path:
    """`repo/rel` with symlinks resolved; TargetError if it lands outside the repo or in `.git/`."""
    if not rel or not rel.strip():
        raise TargetError(rel, "the path is empty")
    if PurePosixPath(rel).is_absolute():
        raise TargetError(rel, "the path is absolute; give it relative to the repo root")
    try:
        root = repo.resolve()
        path = (root / rel).resolve()
    except (OSError, RuntimeError) as exc:   # a symlink loop, or the tree changing under the resolve
        raise TargetError(rel, f"cannot be resolved: {getattr(exc, 'strerror', None) or exc}") from None
    if not path.is_relative_to(root):
        raise TargetError(rel, f"resolves to {path}, which is outside the repo {root}")
    inner = path.relative_to(root).parts
    if _in_git(PurePosixPath(rel).parts) or _in_git(inner):
        raise TargetError(rel, f"is inside {layout.GIT_DIR}/ (or names a {layout.GIT_DIR} file), "
                               "which ohd never reads or writes")
    if not inner:
        raise TargetError(rel, "names the repo root, not a file")
    return path


def _in_git(parts: tuple[str, ...]) -> bool:
    """A `.git` component at any depth: the repo's, a nested repository's folder, a submodule's file."""
    return any(part.casefold() == layout.GIT_DIR for part in parts)


def check_writable(repo: Path, rel: str) -> Path:
    """`resolve_inside`, and TargetError inside `tasks.d/` (its `.done/`, `.rejected/` too): a file
    written there would be read back as a task file."""
    path = resolve_inside(repo, rel)
    tasks_dir = layout.tasks_dir(repo).resolve()     # also when tasks.d/ is a symlink, or one leads into it
    if path.is_relative_to(tasks_dir) or PurePosixPath(rel.strip()).parts[:1] == (layout.TASKS_DIR,):
        raise TargetError(rel, f"is inside {layout.TASKS_DIR}/, where ohd reads task files; ohd writes nothing there")
    return path


def check_reports(repo: Path, target: str) -> Path:
    """The folder where a target's reports go (`<dir>/.ohd/`), checked like an output; TargetError
    names the folder when it leads outside the repo (a symlink), into `.git` or into `tasks.d/`."""
    folder = report_paths(repo, target, TaskType.REVIEW.value)[0].parent
    rel = folder.relative_to(repo).as_posix()
    try:
        return check_writable(repo, rel)
    except TargetError as exc:
        raise TargetError(target, f"its reports would be written to {rel}/: {rel} {exc.reason}") from None


def check_output(repo: Path, rel: str) -> Path:
    """`check_writable`, and TargetError if ohd writes its reports there (an output never replaces one)."""
    path = check_writable(repo, rel)
    if is_report_path(path):
        raise TargetError(rel, f"is where ohd writes its reports (`{layout.REPORT_DIR}/<file>.<type>.json|md` "
                               "beside the source); give the task another output")
    return path


def is_report_path(path: PurePosixPath | Path) -> bool:
    """Whether `path` has the name and folder of a report (any target's, any task's)."""
    return path.parent.name == layout.REPORT_DIR and _REPORT_NAME.fullmatch(path.name) is not None


def read_task_file(path: Path, label: str | None = None) -> bytes:
    """The bytes of the task file `path` (named `label` in errors, default `tasks.d/<name>`): a
    regular file of at most MAX_TASK_FILE_BYTES with a UTF-8 name, opened without following a
    symlink or blocking on a FIFO (a cloned repo can carry a `*.yaml` link to /dev/zero);
    anything else is a `TaskFileError`. A missing file is `FileNotFoundError`."""
    relpath = label or layout.task_relpath(printable(path.name))
    if printable(path.name) != path.name:
        # the name would reach the store, the log and the error file, none of which holds such bytes
        raise TaskFileError(relpath, "has a file name that is not UTF-8 text; rename it")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise TaskFileError(relpath, "is a symbolic link; only regular files are read") from None
        if exc.errno == errno.ENOENT:
            raise FileNotFoundError(path) from None
        raise TaskFileError(relpath, f"cannot be opened: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise TaskFileError(relpath, "is not a regular file (a FIFO, device or socket)")
        data = file.read(MAX_TASK_FILE_BYTES + 1)
    if len(data) > MAX_TASK_FILE_BYTES:
        raise TaskFileError(relpath, f"is larger than {MAX_TASK_FILE_BYTES // 1024} KiB")
    return data


def printable(text: str) -> str:
    """`text` with the bytes of a non-UTF-8 file name (decoded by Python as lone surrogates)
    shown as `\\xNN`, so it can be written as UTF-8."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:      # a surrogate no file name decodes to
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


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
         replaceable_sha: str | None = None, previous_sha: str | None = None) -> WritePlan:
    """Decide, without touching the disk, how to write `content` to `intended`.

    absent → write; already this content → unchanged; still what ohd last wrote, or what that
    write was replacing (`previous_sha`: a kill between its record and its rename left the old
    bytes), or exactly `replaceable_sha` (a file the caller proved it may replace) → overwrite;
    anything else (the user's file or the user's edit) → conflict, write `<intended>.ohd-new`.
    """
    sha = sha256_text(content)
    if current_sha is None or current_sha in (written_sha, sha, replaceable_sha, previous_sha):
        return WritePlan(path=intended, intended=intended, content=content, sha256=sha,
                         conflict=False, unchanged=current_sha == sha)
    side = layout.ohd_new(intended)
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


def apply(plan: WritePlan, root: Path | None = None) -> None:
    """Carry out a plan atomically (confined to `root`, see `atomic_write`); an unchanged plan
    writes nothing. Safe to repeat."""
    if plan.unchanged:
        log.debug("%s already holds this content", plan.path)
        return
    atomic_write(plan.path, plan.content, root=root)
    if plan.conflict_reason == NOT_WRITTEN_BY_OHD:
        log.info("%s exists and was not written by ohd; new content in %s", plan.intended, plan.path)
    elif plan.conflict:
        log.info("%s was edited since ohd wrote it; new content in %s", plan.intended, plan.path)


def atomic_write(path: Path, data: str, root: Path | None = None) -> None:
    """Write `data` (UTF-8) to `path` atomically, creating parent directories.

    Temp file in the same directory, fsync, `os.replace`, fsync the directory. On any
    failure the old file is intact, the temp file is removed and TargetError is raised.
    With `root` (the repo: every write ohd makes in one) `path` is checked again now
    (`check_writable`) and its folders are opened one by one from `root` without following
    symlinks, so a folder turned into a symlink since the task was accepted is refused.
    """
    if root is not None:
        _write_inside(root, path, data.encode("utf-8"))
        return
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


def _write_inside(root: Path, path: Path, payload: bytes) -> None:
    """`atomic_write` confined to `root`: resolve and check again, then write through folder fds."""
    base = root.resolve()
    if not (path.is_relative_to(base) or path.is_relative_to(root)):
        raise TargetError(str(path), f"is outside the repo {base}")
    rel = path.relative_to(base if path.is_relative_to(base) else root).as_posix()
    real = check_writable(root, rel)
    *folders, name = real.relative_to(base).parts
    try:
        folder = _open_folders(base, folders)
    except OSError as exc:
        raise repo_unwritable(root, exc) or TargetError(rel, _walk_error(folders, exc)) from exc
    try:
        _replace_in(folder, name, payload)
    except OSError as exc:     # a full disk or a read-only repo: the old file is intact, the temp one gone
        raise repo_unwritable(root, exc) or TargetError(rel, f"cannot write: {exc.strerror or exc}") from exc
    finally:
        os.close(folder)


def _walk_error(folders: list[str], exc: OSError) -> str:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return (f"cannot write: a folder on the way ({'/'.join(folders)}) is no longer a folder inside "
                "the repo (a symlink or a file took its place); nothing was written")
    return f"cannot write: {exc.strerror or exc}"


def _open_folders(base: Path, folders: list[str]) -> int:
    """A descriptor of `base/folders...`, each opened with O_NOFOLLOW (a symlink fails with ELOOP),
    missing ones created with their parent's mode (not the daemon's private umask)."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in folders:
            try:
                child = os.open(name, _FOLDER_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                child = _make_folder(fd, name)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _make_folder(parent: int, name: str) -> int:
    mode = os.fstat(parent).st_mode & _FOLDER_BITS
    try:
        os.mkdir(name, 0o700, dir_fd=parent)
    except FileExistsError:            # made meanwhile by someone else: open it as it is
        return os.open(name, _FOLDER_FLAGS, dir_fd=parent)
    child = os.open(name, _FOLDER_FLAGS, dir_fd=parent)
    os.fchmod(child, mode)
    return child


def _replace_in(folder: int, name: str, payload: bytes) -> None:
    """Temp file in `folder`, fsync, rename over `name` (a symlink there is replaced, never followed)."""
    mode = _mode_in(folder, name)
    tmp = f".{name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=folder)
    try:
        _write_all(fd, payload, mode)
        os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=folder)
        raise
    with contextlib.suppress(OSError):
        os.fsync(folder)


def _mode_in(folder: int, name: str) -> int:
    """An existing file keeps its bits; a new one gets those its folder's files would get
    (the folder's bits without x, never world-writable: 0755 -> 0644, 0775 -> 0664, 0700 -> 0600)."""
    try:
        st = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISREG(st.st_mode):
        return st.st_mode & 0o7777
    return os.fstat(folder).st_mode & _FILE_BITS_OF_FOLDER


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


_TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")   # `_replace_in`'s temp file: `.<name>.<8 hex>.tmp`


def is_transient(name: str) -> bool:
    """A file name ohd uses for a moment in a repo: an atomic write's temp file, the ladder's copy of a
    candidate test (`layout.CANDIDATE_NAME`)."""
    return bool(_TEMP_NAME.fullmatch(name) or layout.CANDIDATE_NAME.fullmatch(name))


def leftovers(repo: Path, candidate: re.Pattern[str]) -> list[Path]:
    """Files a killed daemon left in `repo`: temp files of interrupted atomic writes, and names
    matching `candidate` (the ladder's copies of an answer); sorted. Call only while no write or
    validation runs (at start-up, under the instance lock). `.git`, virtualenvs and `tasks.d/`
    are not searched; symlinked folders are not followed."""
    found = []
    for folder, dirs, files in os.walk(repo):
        dirs[:] = [d for d in dirs if d not in layout.LEFTOVERS_SKIPPED_DIRS]
        found += [Path(folder) / name for name in files if _TEMP_NAME.fullmatch(name) or candidate.fullmatch(name)]
    return sorted(found)


def report_paths(repo: Path, target_rel: str, task_type: str, task_id: int | None = None) -> tuple[Path, Path]:
    """`<repo>/<source dir>/.ohd/<file>.<type>.json` and `.md`: the latest task's report;
    with `task_id`, `<file>.<type>.<task id>.json` and `.md`: that task's own."""
    try:
        rel = PurePosixPath(check_relpath(target_rel))
    except ValueError as exc:
        raise TargetError(target_rel, str(exc)) from exc
    folder = layout.report_dir(repo / rel.parent)
    stem = f"{rel.name}.{task_type}" + ("" if task_id is None else f".{task_id}")
    return folder / f"{stem}.json", folder / f"{stem}.md"
