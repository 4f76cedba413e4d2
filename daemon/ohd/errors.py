"""The exception tree: everything ohd raises on purpose derives from `OhdError`.

Exceptions carry data (the path, the field, the model, the reset instant), never a
message to be parsed. Classification of model failures happens once, in `llm.py`;
`cli.main()` maps `OhdError` to stderr and an exit code in one place.
`ShutdownRequested` is a `BaseException` so `except Exception` never swallows it.
"""

from __future__ import annotations

from datetime import datetime

TYPE_CHECKING = False   # not `typing`'s: importing typing costs `ohd status` more than this module (issue 17)
if TYPE_CHECKING:
    from typing import Any


class OhdError(Exception):
    """Base of every error ohd raises on purpose."""


class ConfigError(OhdError):
    """A bad configuration file or environment value (CLI exit 2; the daemon refuses to start)."""


class TaskFileError(OhdError):
    """A task file that does not parse or validate; written to `.rejected/<name>.error.txt`."""

    def __init__(self, path: str, message: str, field: str | None = None, line: int | None = None) -> None:
        self.path = path
        self.field = field
        self.line = line
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.path
        if self.line is not None:
            where += f":{self.line}"
        if self.field:
            where += f": field '{self.field}'"
        return f"{where}: {self.message}"


class TargetError(OhdError):
    """A path that is outside the repo, missing, binary or otherwise unusable."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class RepoUnwritable(TargetError):
    """Nothing can be written in the repo now: its disk is full or its file system read-only (what
    was there is left as it was). `path` is the repo, `reason` one of `StorageUnavailable.REASONS`."""

    def __str__(self) -> str:
        return f"cannot write in {self.path}: {self.reason}"


def repo_unwritable(repo: object, exc: BaseException) -> RepoUnwritable | None:
    """`RepoUnwritable` for a write in `repo` that failed because of its disk (full, read-only, an
    I/O error); None for any other failure (a name too long, a permission), which says more itself."""
    reason = unwritable_reason(exc)
    if reason is None or reason == StorageUnavailable.LOCKED:
        return None
    return RepoUnwritable(str(repo), reason)


class NotFound(OhdError):
    """An unknown id (CLI exit 1, HTTP 404)."""

    def __init__(self, kind: str, ident: object) -> None:
        self.kind = kind
        self.ident = ident
        super().__init__(f"no {kind} {ident}")


class InvalidTransition(OhdError):
    """A state change that the task's current state does not allow (e.g. retry a running task)."""

    def __init__(self, task_id: int, status: str, action: str) -> None:
        self.task_id = task_id
        self.status = status
        self.action = action
        super().__init__(f"task {task_id} is {status}; cannot {action} it")


class DaemonNotRunning(OhdError):
    """No socket, or nobody listening on it (CLI exit 3)."""

    def __init__(self, socket_path: str, reason: str = "") -> None:
        self.socket_path = socket_path
        self.reason = reason
        detail = f" ({reason})" if reason else ""
        super().__init__(f"the ohd daemon is not running: no answer on {socket_path}{detail}")


class DaemonAlreadyRunning(OhdError):
    """A second daemon on the same state/runtime directory."""

    def __init__(self, lock_path: str, pid: int | None) -> None:
        self.lock_path = lock_path
        self.pid = pid
        who = f" (pid {pid})" if pid else ""
        super().__init__(f"another ohd daemon{who} already holds {lock_path}; stop it first")


class ModelError(OhdError):
    """A model call failed; `error_class` is its kind in the store, the metrics and `ohd show`."""

    error_class = "error"

    def __init__(self, model: str, message: str = "") -> None:
        self.model = model
        self.message = message
        super().__init__(model, message)

    def __str__(self) -> str:
        # from the attributes as they are now: the worker names the model of an answer that
        # `tasktypes.extract` found malformed (raised there as model "?") after the fact
        kind = f"{self.model}: {self.error_class}"
        return f"{kind}: {self.message}" if self.message else kind


class RateLimited(ModelError):
    """429: the model cools down until `reset_at`; the task moves on without spending an attempt.

    `limit` is the server's `X-RateLimit-Limit` when it sent one (requests per window).
    """

    error_class = "rate_limited"

    def __init__(self, model: str, reset_at: datetime, message: str = "", limit: int | None = None) -> None:
        self.reset_at = reset_at
        self.limit = limit
        super().__init__(model, message)


class AuthFailed(ModelError):
    """401 (or a key that cannot be sent): the key is invalid or disabled, so no model on the server
    takes a request; the task fails at once."""

    error_class = "auth"


class Refused(ModelError):
    """402/403: this model will not take this request (no credits for it, a moderation or guardrail
    block, "not allowed for this model"); not retried, but another model may take it."""

    error_class = "refused"


class BadRequest(ModelError):
    """400/413/422: the request itself is wrong; the same body is not sent again."""

    error_class = "bad_request"


class ContextOverflow(BadRequest):
    """400: the prompt is larger than the model's context (llama.cpp: "the request exceeds the available
    context size"; OpenAI: "maximum context length"); another model with a larger context may take it."""

    error_class = "context_overflow"


class ModelGone(ModelError):
    """404 / "No endpoints found": the model is retired."""

    error_class = "not_found"


class ServerError(ModelError):
    """5xx, 408, a dropped connection, or an error inside a 200 body: transient."""

    error_class = "server"


class ModelTimeout(ServerError):
    """The model did not answer within the timeout: transient."""

    error_class = "timeout"


class Unreachable(ServerError):
    """The server refused the connection or dropped it (reset, closed without an answer): no model
    there can take a request now. `sent` is False when the request never left (refused): it is no
    request against any quota. The model's breaker opens; its probe decides when to go on."""

    error_class = "unreachable"

    def __init__(self, model: str, message: str = "", *, sent: bool = False) -> None:
        self.sent = sent
        super().__init__(model, message)


class MalformedAnswer(ModelError):
    """The answer is not JSON, has no choices, or holds no usable code block; counts as an attempt."""

    error_class = "malformed"
    answer: str | None = None     # the answer's text, when one came with nothing usable in it


class StorageUnavailable(OhdError):
    """The store cannot be written (or read) now: its disk is full, its file system read-only, the
    database locked by another process, or an I/O error. Transient: the daemon holds what it was
    doing and goes on once a write succeeds. `reason` is one of `REASONS`; `path` the store."""

    FULL = "the disk is full"
    READ_ONLY = "the file system is read-only"
    LOCKED = "the database is locked by another process"
    IO = "an I/O error (see the kernel log)"
    UNREACHABLE = "its server cannot be reached (down, restarting or cut off)"
    REASONS = (FULL, READ_ONLY, LOCKED, IO, UNREACHABLE)

    def __init__(self, path: str, reason: str, detail: str = "", what: str = "the store") -> None:
        self.path = path
        self.reason = reason
        self.detail = detail
        super().__init__(f"cannot write {what} {path}: {reason}")

    @property
    def locked(self) -> bool:
        return self.reason == self.LOCKED

    @property
    def unreachable(self) -> bool:
        return self.reason == self.UNREACHABLE

    def as_dict(self) -> dict[str, str]:
        """What `ohd status` shows of it (`storage`)."""
        return {"error": str(self), "reason": self.reason, "path": self.path}


_ERRNO_REASONS = {28: StorageUnavailable.FULL, 122: StorageUnavailable.FULL,   # ENOSPC, EDQUOT
                  30: StorageUnavailable.READ_ONLY, 5: StorageUnavailable.IO}   # EROFS, EIO
# SQLite's primary result codes (`sqlite_errorname` of a sqlite3 error, extended names start with them)
_SQLITE_REASONS = (("SQLITE_FULL", StorageUnavailable.FULL), ("SQLITE_READONLY", StorageUnavailable.READ_ONLY),
                   ("SQLITE_BUSY", StorageUnavailable.LOCKED), ("SQLITE_LOCKED", StorageUnavailable.LOCKED),
                   ("SQLITE_IOERR", StorageUnavailable.IO), ("SQLITE_CANTOPEN", StorageUnavailable.IO))
_PG_REASONS = {"53100": StorageUnavailable.FULL, "25006": StorageUnavailable.READ_ONLY,   # disk_full, read only
               "55P03": StorageUnavailable.LOCKED,                                          # lock_not_available
               # admin_shutdown (a restart), crash_shutdown, cannot_connect_now (starting or stopping)
               "57P01": StorageUnavailable.UNREACHABLE, "57P02": StorageUnavailable.UNREACHABLE,
               "57P03": StorageUnavailable.UNREACHABLE}


def unwritable_reason(exc: BaseException) -> str | None:
    """Why storage failed, if `exc` or any exception it was raised from or while handling says so
    (a full disk, a read-only file system, a lock, an I/O error); None for any other failure. The
    whole chain is walked: SQLite's 'cannot rollback' after a full disk is named a full disk."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, StorageUnavailable):
            return current.reason
        reason = _reason_of(current)
        if reason is not None:
            return reason
        todo += [e for e in (current.__cause__, current.__context__) if e is not None]
    return None


def _reason_of(exc: BaseException) -> str | None:
    if isinstance(exc, OSError) and exc.errno in _ERRNO_REASONS:
        return _ERRNO_REASONS[exc.errno]
    name = getattr(exc, "sqlite_errorname", None)
    if isinstance(name, str):
        return next((reason for prefix, reason in _SQLITE_REASONS if name.startswith(prefix)), None)
    code = getattr(exc, "pgcode", None)
    if isinstance(code, str):
        return StorageUnavailable.UNREACHABLE if code.startswith("08") else _PG_REASONS.get(code)
    return StorageUnavailable.UNREACHABLE if _lost_connection(exc) else None


def _lost_connection(exc: BaseException) -> bool:
    """psycopg2's OperationalError or InterfaceError without a server's code: the connection could not
    be made or broke (refused, closed by the server, timed out), as the driver names it."""
    return any(cls.__module__.split(".")[0] == "psycopg2" and cls.__name__ in ("OperationalError", "InterfaceError")
               for cls in type(exc).__mro__)


class ApiError(OhdError):
    """The socket API refused a request (a 4xx/5xx answer): the status, the message, the error kind."""

    def __init__(self, status: int, message: str, kind: str | None = None) -> None:
        self.status = status
        self.message = message
        self.kind = kind
        super().__init__(message)


def http_answer(exc: OhdError) -> tuple[int, dict[str, Any]]:
    """The socket API's answer to `exc`: its HTTP status and JSON body (`error`, `kind`, and the data
    a client needs to raise the same exception again; `from_http` is the way back)."""
    body: dict[str, Any] = {"error": str(exc), "kind": type(exc).__name__}
    if isinstance(exc, ApiError):
        return exc.status, {"error": exc.message, "kind": exc.kind or type(exc).__name__}
    if isinstance(exc, NotFound):
        return 404, {**body, "what": exc.kind, "id": str(exc.ident)}
    if isinstance(exc, InvalidTransition):
        return 409, {**body, "task_id": exc.task_id, "status": exc.status, "action": exc.action}
    if isinstance(exc, StorageUnavailable):     # 507 Insufficient Storage; a lock or a server's restart passes: 503
        return 503 if exc.locked or exc.unreachable else 507, {**body, "reason": exc.reason}
    if isinstance(exc, TargetError):
        return 400, {**body, "path": exc.path}
    if isinstance(exc, ModelError):
        return _model_status(exc), {**body, "model": exc.model, "error_class": exc.error_class,
                                    **({"retry_at": exc.reset_at.isoformat()} if isinstance(exc, RateLimited) else {})}
    return 400, body


def _model_status(exc: ModelError) -> int:
    """A model failure as an HTTP status for whoever asked through ohd (the agent proxy): the request's
    own fault is 4xx (400 too large or wrong, 403 refused, 404 no model left, 429 wait until
    `retry_at`); the model server's is 5xx (502, 503 unreachable, 504 timed out). ohd's key being
    refused upstream is 502: the asker's credentials are fine."""
    for kind, status in ((RateLimited, 429), (BadRequest, 400), (Refused, 403), (ModelGone, 404),
                         (ModelTimeout, 504), (Unreachable, 503)):
        if isinstance(exc, kind):
            return status
    return 502


def from_http(status: int, info: dict[str, Any], path: str) -> OhdError:
    """The exception for an error answer of the socket API: the one `http_answer` was given when the
    answer carries its data (`NotFound`, `InvalidTransition`), else `ApiError` with status and message."""
    if status == 404:
        return NotFound(str(info.get("what") or "resource"), info.get("id") or path)
    if status == 409 and all(key in info for key in ("task_id", "status", "action")):
        return InvalidTransition(int(info["task_id"]), str(info["status"]), str(info["action"]))
    kind = info.get("kind")
    return ApiError(status, str(info.get("error") or f"HTTP {status} for {path}"), str(kind) if kind else None)


class ShutdownRequested(BaseException):
    """Stop the loop; a BaseException so that `except Exception` never catches it."""


class TestEnvironmentError(OhdError):
    """The repo's tests cannot be run as configured (no pytest in the chosen interpreter)."""

    __test__ = False   # not a pytest test class, whatever its name
