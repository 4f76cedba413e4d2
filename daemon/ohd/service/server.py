"""The socket API: HTTP/1.1 over the daemon's Unix socket, a route table of small handlers.

Built on the standard library's server classes (`ThreadingMixIn` + `UnixStreamServer` +
`BaseHTTPRequestHandler`); every answer is JSON (or Prometheus text for `/metrics`) with
a Content-Length. The server reads and changes the queue only through the `Store`; live
facts (version, workers, models) come from callables the daemon hands in, and `wake` is
the only way it reaches the event loop.

Invariants: the socket file is mode 0600 before anyone can connect; a live socket is
never taken over (DaemonAlreadyRunning), a stale one is replaced; no request, however
bad, stops the server — unexpected failures become a logged 500, a malformed request a 4xx.
A connection holds a thread; at most `MAX_CONNECTIONS` are open: a new one then evicts the
oldest still waiting for its request (a slow or idle client), so `ohd status` is answered
whatever a slowloris holds. A request must arrive whole within `REQUEST_S`, else 408.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import socketserver
import stat
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pydantic

from ohd.clock import Clock
from ohd.core import layout, storeid
from ohd.core.taskfile import TaskSpec
from ohd.errors import (
    ApiError,
    DaemonAlreadyRunning,
    NotFound,
    OhdError,
    StorageUnavailable,
    TargetError,
    http_answer,
)
from ohd.repo import worktrees
from ohd.repo.outputs import check_output, check_reports, resolve_inside
from ohd.service.metrics import collect, prometheus
from ohd.store.history import Activity, History
from ohd.store.store import Store, Task, TaskStatus
from ohd.work import delivery

log = logging.getLogger("ohd.server")

JSON_TYPE = "application/json"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_BODY = 1_000_000
MAX_LIMIT = 10_000
ACTIVITY_HOURS = 24           # the hours `GET /activity` (the dashboard's charts) covers unless told
MAX_ACTIVITY_HOURS = 24 * 7
MAX_CONNECTIONS = 64    # open connections (each holds a thread); see `_UnixHTTPServer.admit`
REQUEST_S = 20.0        # a request line, headers and body must arrive within this (else 408)
MAX_TASK_ID = 2**63 - 1     # SQLite's INTEGER: a larger id names no task


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed request as a handler sees it: path parameters, query, raw body, and the door it
    came in by (`socket`, or the web listener's `web`), which the log lines name."""

    params: tuple[str, ...]
    query: dict[str, str]
    body: bytes
    via: str = "socket"


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str = JSON_TYPE


Handler = Callable[[Request], Reply]


def json_reply(status: int, data: Any) -> Reply:
    return Reply(status, json.dumps(data, default=str).encode())


def error_reply(code: int, message: str, kind: str, /, **data: Any) -> Reply:
    return json_reply(code, {"error": message, "kind": kind, **data})


def classify(exc: Exception) -> Reply:
    """An exception raised by a handler → its error answer (`errors.http_answer`; 500 for the unexpected)."""
    if isinstance(exc, pydantic.ValidationError):
        problems = [(".".join(str(p) for p in err["loc"]) or "task", str(err["msg"]).removeprefix("Value error, "))
                    for err in exc.errors()]
        text = "; ".join(f"{field}: {msg}" for field, msg in problems)
        return error_reply(400, f"invalid task: {text}", "ValidationError", fields=[f for f, _ in problems])
    if isinstance(exc, OhdError):
        return json_reply(*http_answer(exc))
    log.exception("socket API: unexpected failure")
    return error_reply(500, f"internal error: {type(exc).__name__}: {exc}", type(exc).__name__)


class ApiServer:
    """The route table and its handlers, served on `socket_path` from a daemon thread."""

    def __init__(self, socket_path: Path, store: Store, *, repos: list[Path], clock: Clock,
                 status: Callable[[], dict[str, Any]], wake: Callable[[], object],
                 models: Callable[[], list[dict[str, Any]]],
                 metrics: Callable[[], str] | None = None,
                 metrics_json: Callable[[], dict[str, Any]] | None = None,
                 annotate_models: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None,
                 daemons: Callable[[], list[dict[str, Any]]] | None = None,
                 activity: Callable[[datetime, int], Activity] | None = None,
                 store_id: str = "",
                 request_s: float = REQUEST_S, max_connections: int = MAX_CONNECTIONS) -> None:
        self.socket_path = socket_path
        self.request_s = request_s
        self.max_connections = max_connections
        self.store = store
        self.repos = list(repos)
        self.clock = clock
        self.status = status
        self.wake = wake
        self.models = models
        self.metrics = metrics
        self.metrics_json = metrics_json
        self.annotate_models = annotate_models  # adds measured stats to the model states
        self.daemons = daemons                  # the fleet: the daemons on this database
        self.activity = activity or History(store.db, store.m).activity   # the daemon's: kept between requests
        self.store_id = store_id                # sent as X-Ohd-Store (core/storeid.py): whose answers these are
        self.routes: tuple[tuple[str, re.Pattern[str], Handler], ...] = (
            ("GET", re.compile(r"/status"), self.get_status),
            ("GET", re.compile(r"/tasks"), self.list_tasks),
            ("POST", re.compile(r"/tasks"), self.submit),
            ("GET", re.compile(r"/tasks/([0-9]+)"), self.show),
            ("POST", re.compile(r"/tasks/([0-9]+)/cancel"), self.cancel),
            ("POST", re.compile(r"/tasks/([0-9]+)/retry"), self.retry),
            ("GET", re.compile(r"/metrics"), self.get_metrics),
            ("GET", re.compile(r"/metrics\.json"), self.get_metrics_json),
            ("GET", re.compile(r"/models"), self.get_models),
            ("GET", re.compile(r"/daemons"), self.get_daemons),
            ("GET", re.compile(r"/activity"), self.get_activity),
        )
        self._httpd: _UnixHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._inode: int | None = None

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Replace a stale socket file, bind, chmod 0600, listen, serve in a daemon thread."""
        remove_stale_socket(self.socket_path)
        httpd = _UnixHTTPServer(str(self.socket_path), _RequestHandler, bind_and_activate=False)
        httpd.api = self
        httpd.max_connections = self.max_connections
        try:
            httpd.server_bind()
            os.chmod(self.socket_path, 0o600)
            self._inode = self.socket_path.stat().st_ino
            httpd.server_activate()
        except BaseException:
            httpd.server_close()
            raise
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="ohd-api", daemon=True)
        self._thread.start()
        log.info("socket API listening on %s", self.socket_path)

    def stop(self) -> None:
        """Stop serving, close the socket and remove its file (only if it is still ours)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5)
        httpd.server_close()
        try:
            if self.socket_path.stat().st_ino == self._inode:
                self.socket_path.unlink()
        except FileNotFoundError:
            pass
        log.info("socket API stopped")

    # -- dispatch -----------------------------------------------------------------

    def dispatch(self, method: str, target: str, body: bytes, via: str = "socket") -> Reply:
        """Route one request; never raises. The web listener serves this same table (`via="web"`)."""
        parts = urlsplit(target)
        path = parts.path.rstrip("/") or "/"
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        allowed = []
        for route_method, pattern, handler in self.routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if route_method != method:
                allowed.append(route_method)
                continue
            try:
                return handler(Request(match.groups(), query, body, via))
            except Exception as exc:  # the catch-all at the top of a request: never kills the server
                return classify(exc)
        if allowed:
            return error_reply(405, f"{method} is not allowed on {path} (allowed: {', '.join(allowed)})",
                               "MethodNotAllowed")
        return error_reply(404, f"no route {method} {path}", "NotFound", what="route", id=f"{method} {path}")

    # -- handlers -----------------------------------------------------------------

    def get_status(self, request: Request) -> Reply:
        data = dict(self.status())
        data["repos"] = [str(repo) for repo in self.repos]
        try:
            data["queue"] = self.store.counts()
            data["quarantined"] = self.store.quarantined_count()   # of the completed ones
            data["running"] = [running_entry(task) for task in self.store.running()]
        except StorageUnavailable as exc:    # its server is down: the status says so, without the queue
            data["storage"] = data.get("storage") or exc.as_dict()
        return json_reply(200, data)

    def list_tasks(self, request: Request) -> Reply:
        status = request.query.get("status") or None
        if status is not None and status not in {s.value for s in TaskStatus}:
            raise ApiError(400, f"unknown status {status!r} (one of: {', '.join(s.value for s in TaskStatus)})")
        limit = parse_limit(request.query.get("limit"))
        return json_reply(200, {"tasks": [task.as_dict() for task in self.store.list_tasks(status, limit)]})

    def show(self, request: Request) -> Reply:
        task_id = parse_task_id(request.params[0])
        data = self.store.get_task(task_id).as_dict()
        data["executions"] = [execution.as_dict() for execution in self.store.executions(task_id)]
        return json_reply(200, data)

    def submit(self, request: Request) -> Reply:
        data = json_object(request.body)
        repo = self.repo_for(data.pop("repo", None))
        if data.get("schedule") is not None or data.get("on_change") is not None:
            raise ApiError(400, f"standing rules (schedule, on_change) belong in a file in {layout.TASKS_DIR}/, "
                                "not the API")
        spec = TaskSpec.model_validate(data)
        check_paths(repo, spec)
        base = worktrees.base_commit(repo) if spec.agent else None   # OhdError (400) when it has no commit
        task_id = self.store.enqueue(str(repo), spec, self.clock.now(), source="api", base_commit=base)
        log.info("task %d queued over the %s: %s %s", task_id, request.via, spec.type.value, spec.target,
                 extra={"task_id": task_id, "status": TaskStatus.QUEUED.value})
        self.notify()
        return json_reply(201, {"id": task_id, "status": TaskStatus.QUEUED.value})

    def cancel(self, request: Request) -> Reply:
        task = self.store.cancel(parse_task_id(request.params[0]), self.clock.now())
        if task.status == TaskStatus.CANCELLED:     # committed: now its report (or why none)
            task = delivery.report_cancel(self.store, task.id, self.clock.now())
            log.info("task %d cancelled over the %s", task.id, request.via,
                     extra={"task_id": task.id, "status": task.status})
        else:       # still running: its worker stops it and logs the transition
            log.info("task %d: cancel requested over the %s; its worker stops it", task.id, request.via)
        return json_reply(200, task.as_dict())

    def retry(self, request: Request) -> Reply:
        task = self.store.retry(parse_task_id(request.params[0]), self.clock.now())
        log.info("task %d queued again (retry over the %s)", task.id, request.via,
                 extra={"task_id": task.id, "status": task.status})
        self.notify()
        return json_reply(200, task.as_dict())

    def get_daemons(self, request: Request) -> Reply:
        """The fleet: every daemon on this database (alive, lost or stopped in the last day)."""
        return json_reply(200, {"daemons": self.daemons() if self.daemons is not None else []})

    def get_metrics(self, request: Request) -> Reply:
        text = self.metrics() if self.metrics is not None else \
            prometheus(collect(History(self.store.db, self.store.m), self.clock.now(), None))   # no uptime known
        return Reply(200, text.encode(), METRICS_TYPE)

    def get_metrics_json(self, request: Request) -> Reply:
        return json_reply(200, self.metrics_json() if self.metrics_json is not None else {"tasks": self.store.counts()})

    def get_activity(self, request: Request) -> Reply:
        """The last `hours` (24) clock hours: tasks completed and failed per hour, each model's calls,
        tokens and cost (the dashboard's charts)."""
        hours = parse_bounded("hours", request.query.get("hours"), ACTIVITY_HOURS, MAX_ACTIVITY_HOURS)
        return json_reply(200, self.activity(self.clock.now(), hours).as_dict())

    def get_models(self, request: Request) -> Reply:
        models = self.models()
        return json_reply(200, {"models": self.annotate_models(models) if self.annotate_models else models})

    # -- helpers ------------------------------------------------------------------

    def repo_for(self, value: Any) -> Path:
        """The configured repo a request names (or the only one, when it names none)."""
        names = ", ".join(str(repo) for repo in self.repos) or "(none configured)"
        if value is None:
            if len(self.repos) == 1:
                return self.repos[0]
            raise ApiError(400, f"give 'repo': the daemon serves several repos: {names}")
        if not isinstance(value, str) or not value:
            raise ApiError(400, "'repo' must be a path string")
        wanted = Path(value).resolve()
        for repo in self.repos:
            if repo.resolve() == wanted:
                return repo
        raise ApiError(400, f"{value} is not a repo this daemon serves (serving: {names})")

    def notify(self) -> None:
        """Wake the pool; the task is already committed, so a failure here is only logged."""
        try:
            self.wake()
        except Exception:
            log.exception("socket API: waking the worker pool failed")


def running_entry(task: Task) -> dict[str, Any]:
    data = task.as_dict()
    return {key: data.get(key) for key in ("id", "type", "target", "started_at")}


def parse_limit(raw: str | None) -> int:
    return parse_bounded("limit", raw, 100, MAX_LIMIT)


def parse_bounded(name: str, raw: str | None, default: int, most: int) -> int:
    """A query parameter that is an integer from 1 to `most` (`default` when absent)."""
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer, not {raw!r}") from None
    if not 1 <= value <= most:
        raise ApiError(400, f"{name} must be between 1 and {most}")
    return value


def parse_task_id(raw: str) -> int:
    """A path's task id; NotFound for one no task can have (past SQLite's INTEGER), without
    converting thousands of digits."""
    digits = raw.lstrip("0") or "0"
    if len(digits) > len(str(MAX_TASK_ID)) or int(digits) > MAX_TASK_ID:
        raise NotFound("task", raw if len(raw) <= 40 else f"{raw[:40]}... ({len(raw)} digits)")
    return int(digits)


def json_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    try:    # JSON may escape a lone surrogate (\\ud800), which no UTF-8 text (a path, the store) can hold
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"the request body holds a lone surrogate ({exc.object[exc.start:exc.end]!a}), "
                            "which is not valid Unicode") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    return data


def check_paths(repo: Path, spec: TaskSpec) -> None:
    """The target is an existing file inside the repo; the output (if given) and the reports
    land inside it, outside any `.git` and outside `tasks.d/`."""
    target = resolve_inside(repo, spec.file)
    try:
        is_file, is_dir = target.is_file(), target.is_dir()
    except OSError as exc:      # ENAMETOOLONG, EACCES: a path no request can name
        raise TargetError(spec.file, f"cannot be looked up: {exc.strerror or exc}") from None
    if not is_file:
        what = "is a directory" if is_dir else "does not exist"
        raise TargetError(spec.file, f"{what} in the repo {repo} (the target must be an existing file)")
    check_reports(repo, spec.file)
    if spec.output is not None:
        check_output(repo, spec.output)


def remove_stale_socket(path: Path) -> None:
    """Remove a socket file nobody answers on; DaemonAlreadyRunning if somebody does."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OhdError(f"{path} exists and is not a socket; remove it or choose another runtime dir")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale socket %s", path)
        path.unlink(missing_ok=True)
        return
    except OSError as exc:   # EAGAIN: a live daemon whose backlog is full; EACCES: not ours to take
        log.info("socket %s is not stale (%s); leaving it", path, exc.strerror or exc)
    finally:
        probe.close()
    raise DaemonAlreadyRunning(str(path), None)


# -- the standard-library plumbing ---------------------------------------------------


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    # The listen backlog (socketserver's default is 5): a Unix socket whose backlog is
    # full refuses a connect with EAGAIN instead of queueing it, so bursts of clients
    # (hooks, scripts, `ohd status --watch`) would see errors.
    request_queue_size = 128
    block_on_close = False
    api: ApiServer
    max_connections: int = MAX_CONNECTIONS

    def server_activate(self) -> None:
        self._open: dict[socket.socket, bool] = {}     # open connections → waiting for a request; oldest first
        self._open_lock = threading.Lock()
        super().server_activate()

    def process_request(self, request: Any, client_address: Any) -> None:
        """On the accept thread: a thread for the connection if `admit` finds room, else a 503."""
        if not self.admit(request):
            refuse_busy(request)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def admit(self, conn: socket.socket) -> bool:
        """Room for one more connection: at the cap, the oldest one still waiting for (or reading) its
        request is shut down, so slow or idle clients can never lock out one that asks; False when
        every open connection is being answered."""
        with self._open_lock:
            if len(self._open) >= self.max_connections:
                victim = next((c for c, waiting in self._open.items() if waiting), None)
                if victim is None:
                    return False
                del self._open[victim]
                try:
                    victim.shutdown(socket.SHUT_RDWR)   # its thread's read ends: the connection closes
                except OSError:
                    pass
                log.debug("socket API: %d connections open; closed the oldest waiting one", self.max_connections)
            self._open[conn] = True
            return True

    def mark_waiting(self, conn: socket.socket, waiting: bool) -> None:
        """A connection starts waiting for a request (moved to the newest end) or starts being answered."""
        with self._open_lock:
            if self._open.pop(conn, None) is not None:
                self._open[conn] = waiting

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.pop(request, None)
        super().shutdown_request(request)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """On the connection's own thread: a peer of another user is answered 403, then dropped."""
        pid, uid = peer_credentials(request)
        if not peer_allowed(uid, os.geteuid()):
            log.warning("socket API: refused a connection from uid %s (pid %s): only uid %d and root may "
                        "use this socket", uid, pid, os.geteuid())
            refuse_peer(request, uid)
            return
        super().finish_request(request, client_address)


_PEERCRED = struct.Struct("3i")   # struct ucred: pid, uid, gid
_REFUSAL_READ = 65536             # how much of a refused peer's request is read (and dropped)


def peer_credentials(conn: socket.socket) -> tuple[int | None, int | None]:
    """The connecting process's (pid, uid) from SO_PEERCRED; (None, None) where it is unknown."""
    try:
        pid, uid, _gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except (AttributeError, OSError):
        return None, None
    return pid, uid


def peer_allowed(uid: int | None, own_uid: int) -> bool:
    """Only the daemon's own user, and root (who can read the state directory anyway), may talk to
    it, whatever the socket's mode: the socket queues tasks and shows prompts and answers."""
    return uid is not None and uid in (own_uid, 0)


def refuse_peer(conn: socket.socket, uid: int | None) -> None:
    """Answer 403 and close. The request is read first (briefly, bounded), so that the client sees the
    answer rather than a reset connection; its content is never looked at."""
    conn.settimeout(1.0)
    seen, total = b"", 0
    try:
        while b"\r\n\r\n" not in seen and total < _REFUSAL_READ:
            chunk = conn.recv(4096)
            if not chunk:
                break
            seen, total = seen[-3:] + chunk, total + len(chunk)
    except OSError:
        pass
    reply = error_reply(403, f"this socket belongs to uid {os.geteuid()}; uid {uid} may not use it", "PeerRefused")
    head = (f"HTTP/1.1 403 Forbidden\r\nContent-Type: {reply.content_type}\r\n"
            f"Content-Length: {len(reply.body)}\r\nConnection: close\r\n\r\n").encode()
    try:
        conn.sendall(head + reply.body)
    except OSError:
        pass


def refuse_busy(conn: socket.socket) -> None:
    """503 to a connection there is no room for, without waiting on it (this is the accept thread)."""
    reply = error_reply(503, f"the daemon is answering {MAX_CONNECTIONS} requests; try again", "Busy")
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: {reply.content_type}\r\n"
            f"Content-Length: {len(reply.body)}\r\nConnection: close\r\n\r\n").encode()
    try:
        conn.setblocking(False)
        conn.send(head + reply.body)
    except OSError:
        pass


class _DeadlineReader(io.RawIOBase):
    """The connection's reads, each allowed only what is left of the current request's time, so a
    client that sends a byte now and then (slowloris) cannot hold its thread for ever."""

    def __init__(self, conn: socket.socket, clock: Clock, request_s: float) -> None:
        self.conn, self.clock, self.request_s = conn, clock, request_s
        self.deadline = 0.0
        self.received = 0
        self.timed_out = False

    def start(self) -> None:
        """A new request (or the wait for it) begins now."""
        self.deadline = self.clock.monotonic() + self.request_s
        self.received, self.timed_out = 0, False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - self.clock.monotonic()
        try:
            if left <= 0:
                raise TimeoutError(f"the request did not arrive within {self.request_s:g} s")
            self.conn.settimeout(left)
            count = self.conn.recv_into(buffer)
        except TimeoutError:
            self.timed_out = True
            raise
        self.received += count
        return count


class _RequestHandler(BaseHTTPRequestHandler):
    """Reads one request, hands it to `ApiServer.dispatch`, writes the reply. The parsing is the
    standard library's (its limits: 65,536 bytes a line → 414/431, 100 headers → 431); around it,
    `_DeadlineReader` bounds the time and `_read_body` the body."""

    protocol_version = "HTTP/1.1"
    server_version = "ohd"
    timeout = None      # each read gets what is left of the request's time instead (`_DeadlineReader`)
    server: _UnixHTTPServer

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        api = self.server.api
        self.reader = _DeadlineReader(self.connection, api.clock, api.request_s)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self) -> None:
        """One request within its time; 408 to a client that began one and did not finish it in time."""
        self.server.mark_waiting(self.connection, True)
        self.reader.start()
        super().handle_one_request()
        if self.reader.timed_out:
            self.close_connection = True
            if self.reader.received:
                self._send(error_reply(408, f"the request did not arrive whole within {self.reader.request_s:g} s",
                                       "RequestTimeout"))

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":     # a bare `GET /path`: its answer would carry no status
            self.send_error(400, "HTTP/0.9 requests are not served; send HTTP/1.0 or HTTP/1.1")
            return False
        return True

    def do_GET(self) -> None:
        body = self._read_body()
        if body is not None:
            self.server.mark_waiting(self.connection, False)
            self._send(self.server.api.dispatch(self.command, self.path, body))

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def do_HEAD(self) -> None:
        self.server.mark_waiting(self.connection, False)
        self._send(self.server.api.dispatch("GET", self.path, b""))  # `_send` leaves the body out

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering 400/411/413 (the connection is then closed)."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self._refuse(error_reply(411, "send a Content-Length; chunked bodies are not accepted", "ApiError"))
            return None
        raw = (self.headers.get("Content-Length") or "0").strip()
        if re.fullmatch(r"[0-9]+", raw) is None:
            self._refuse(error_reply(400, f"bad Content-Length {raw[:40]!r}", "ApiError"))
            return None
        if len(raw) > len(str(MAX_BODY)) or int(raw) > MAX_BODY:
            self._refuse(error_reply(413, f"the body is larger than {MAX_BODY} bytes", "ApiError"))
            return None
        length = int(raw)
        return self.rfile.read(length) if length else b""

    def _refuse(self, reply: Reply) -> None:
        self.close_connection = True
        self._send(reply)

    def _send(self, reply: Reply) -> None:
        if self.request_version == "HTTP/0.9":      # unparsed: the standard library would omit the status line
            self.request_version = "HTTP/1.0"
        try:
            self.connection.settimeout(self.server.api.request_s)   # a client that never reads is dropped
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            if self.server.api.store_id:
                self.send_header(storeid.HEADER, self.server.api.store_id)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(reply.body)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client went away (or reads nothing); nothing to tell it

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol-level errors (bad request line, unsupported method) as JSON too."""
        self.close_connection = True
        text = message or HTTPStatus(code).phrase
        self._send(error_reply(code, text, "HTTPError"))

    def address_string(self) -> str:
        return "unix"  # client_address is empty for AF_UNIX

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("socket API: " + format, *args)
