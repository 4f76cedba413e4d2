"""The daemon's own folders kept private: state dir and runtime dir 0700, what is in them 0600.

The store holds the prompts (the repo's source) and the answers, the log names files and
errors, the socket queues tasks: none of it is for other local users. The daemon runs
under a umask of 0o077, so everything it creates for itself (the database and its
`-wal`/`-shm`, the log, the lock, the socket) is private from the start; what an older
version left readable is tightened at start-up, with a log line. Files ohd writes into a
repo do not follow this umask: `outputs` gives them the mode of the folder they land in.
One daemon per state dir: `InstanceLock` holds an exclusive `flock` on its `ohd.lock`. The web
listener's token (`web_token`) is made once, at the first start with the listener on, and kept.
Nothing here reads configuration; the daemon hands in the paths.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from ohd.errors import DaemonAlreadyRunning, OhdError, StorageUnavailable, unwritable_reason

log = logging.getLogger("ohd.statedir")

PRIVATE_UMASK = 0o077
DIR_MODE = 0o700
FILE_MODE = 0o600
TOKEN_BYTES = 32                                   # secrets.token_urlsafe(32): 43 characters
_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,512}")      # what a token file may hold (one made by hand too)


def private_umask() -> int:
    """Set the daemon's umask to 0o077; returns the one it replaced."""
    return os.umask(PRIVATE_UMASK)


def secure(state_dir: Path, runtime_dir: Path, files: Iterable[Path] = ()) -> list[str]:
    """Create the runtime dir (0700), refuse folders of another user, and tighten the state dir,
    the runtime dir, every file and folder directly in them and `files` (the database elsewhere,
    the log) to 0700/0600. Returns what was changed, as `path 0755 -> 0700` (also logged)."""
    runtime_dir.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    changed: list[str] = []
    for folder in (state_dir, runtime_dir):
        _check_owner(folder)
        changed += _tighten(folder)
        for child in sorted(folder.iterdir()):
            changed += _tighten(child)
    for path in files:
        changed += _tighten(path)
    if changed:
        log.warning("made private what others could read (left by an older ohd or created by hand): %s",
                    ", ".join(changed))
    return changed


def _check_owner(folder: Path) -> None:
    """A folder of another user could hold a socket or a database planted by them: refuse it."""
    owner = folder.stat().st_uid
    if owner != os.geteuid():
        raise OhdError(f"{folder} belongs to uid {owner}, not to uid {os.geteuid()} that runs ohd; "
                       "ohd keeps its state and socket only in folders of its own user")


def _tighten(path: Path) -> list[str]:
    """chmod a folder to 0700 and a regular file or socket to 0600 when group or others have bits;
    symlinks and missing paths are left alone."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return []
    if stat.S_ISDIR(st.st_mode):
        wanted = DIR_MODE
    elif stat.S_ISREG(st.st_mode) or stat.S_ISSOCK(st.st_mode):
        wanted = FILE_MODE
    else:
        return []
    mode = stat.S_IMODE(st.st_mode)
    if not mode & 0o077 or st.st_uid != os.geteuid():
        return []
    new = mode & ~0o077 | (wanted & 0o700)
    os.chmod(path, new)
    return [f"{path} {mode:04o} -> {new:04o}"]


class InstanceLock:
    """An exclusive `flock` on `<state_dir>/ohd.lock`, holding our pid; released on exit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock; DaemonAlreadyRunning if another daemon holds it, StorageUnavailable when the
        state dir's disk is full or read-only (said in one line, not a traceback)."""
        try:
            self._acquire()
        except OSError as exc:
            if (reason := unwritable_reason(exc)) is None:
                raise
            self.release()
            raise StorageUnavailable(str(self.path), reason, str(exc), what="the lock file") from None

    def _acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        self.handle = handle
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            text = handle.read().strip()
            handle.close()
            self.handle = None
            raise DaemonAlreadyRunning(str(self.path), int(text) if text.isdigit() else None) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            try:
                self.handle.close()
            except OSError:      # the pid could not be flushed (a full disk): nothing to keep
                pass
            self.handle = None


def web_token(path: Path) -> str:
    """The web listener's token in `path` (0600), made there with `secrets.token_urlsafe` if there is
    none yet. Written whole or not at all (a temp file linked into place: never a half-written
    token, never one replaced under a running browser); OhdError for a file that holds no token."""
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            os.write(fd, (secrets.token_urlsafe(TOKEN_BYTES) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)          # fails if another process made one meanwhile: theirs is kept
            log.info("made the web listener's token in %s", path)
        except FileExistsError:
            pass
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return read_web_token(path)


def read_web_token(path: Path) -> str:
    """The token `path` holds; OhdError when it cannot be read or holds none."""
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError as exc:
        raise OhdError(f"cannot read the web listener's token {path}: {exc.strerror or exc}") from None
    if _TOKEN.fullmatch(text) is None:
        raise OhdError(f"{path} holds no token (16 to 512 of A-Z a-z 0-9 _ -); remove it and start the daemon: "
                       "it makes a new one")
    return text
