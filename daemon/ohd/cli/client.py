"""The socket client for the CLI: HTTP/1.1 over the daemon's Unix socket, standard library only.

`ohd status` imports this module and nothing heavy, so it stays fast. Every failure to
reach the daemon (no socket file, nobody listening) becomes `DaemonNotRunning`; a daemon
that took the request and did not answer within `ANSWER_S` is busy, not down (`ApiError`
504: a submit may have been stored). Error answers become the exception the server named when the data
is there (`NotFound`, `InvalidTransition`), else `ApiError` with the status and message.
A socket served by another user's process is refused before a byte is sent (SO_PEERCRED).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import struct
from pathlib import Path

from ohd.core import storeid
from ohd.errors import ApiError, DaemonNotRunning, OhdError, from_http

TYPE_CHECKING = False   # not `typing`'s: importing typing costs `ohd status` more than this module (issue 17)
if TYPE_CHECKING:
    from typing import Any

# How long the CLI waits for the daemon's answer: a bound on a hang. A daemon that is
# running but busy (50 `ohd submit` at once on a loaded machine) took over 10 s for `ohd status`.
ANSWER_S = 60.0


class UnixHTTPConnection(http.client.HTTPConnection):
    """An `HTTPConnection` whose transport is a Unix stream socket."""

    def __init__(self, socket_path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.socket_path))
            check_server(sock, self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


_PEERCRED = struct.Struct("3i")   # struct ucred: pid, uid, gid


def check_server(sock: socket.socket, path: Path) -> None:
    """The process answering must run as this user (or root): a socket another user put in a
    loosened runtime dir gets no task, prompt or id from us. OhdError before anything is sent."""
    try:
        _pid, uid, _gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except (AttributeError, OSError):
        return      # no SO_PEERCRED here (not Linux): the socket's 0700 folder is the protection
    if uid not in (os.geteuid(), 0):
        raise OhdError(f"{path} is served by a process of uid {uid}, not by your ohd daemon "
                       f"(uid {os.geteuid()}); nothing was sent to it")


class Client:
    """One request per connection; JSON in, JSON (or text) out."""

    def __init__(self, socket_path: Path, timeout: float = ANSWER_S) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    def get(self, path: str) -> Any:
        return self._json(*self._exchange("GET", path, None))

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._json(*self._exchange("POST", path, body))

    def get_from_store(self, path: str, database_url: str) -> Any:
        """GET `path` if the daemon's answer comes from the database at `database_url` (its
        `X-Ohd-Store` header, core/storeid.py); None when it names another (or none)."""
        status, data, headers = self._send("GET", path, None)
        if status >= 400:
            raise error_from(status, data, path)
        return self._json(status, data) if storeid.same_store(headers.get(storeid.HEADER), database_url) else None

    def get_text(self, path: str) -> str:
        _, data = self._exchange("GET", path, None)
        return data.decode("utf-8", errors="replace")

    def _json(self, status: int, data: bytes) -> Any:
        try:
            return json.loads(data)
        except ValueError:
            raise ApiError(status, f"the daemon's answer is not JSON: {data[:200]!r}") from None

    def _exchange(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, bytes]:
        """Send one request; (status, body) of a success, else the mapped exception."""
        status, data, _headers = self._send(method, path, body)
        if status >= 400:
            raise error_from(status, data, path)
        return status, data

    def _send(self, method: str, path: str,
              body: dict[str, Any] | None) -> tuple[int, bytes, http.client.HTTPMessage]:
        headers = {"Accept": "application/json"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn = UnixHTTPConnection(self.socket_path, self.timeout)
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            return response.status, response.read(), response.headers
        except FileNotFoundError:
            raise self._not_running("no socket file") from None
        except ConnectionRefusedError:
            raise self._not_running("nobody is listening on the socket") from None
        except PermissionError:
            raise self._not_running("permission denied on the socket (another user's daemon?)") from None
        except TimeoutError:
            if conn.sock is None:
                raise self._not_running(f"no answer within {self.timeout:g}s") from None
            raise ApiError(504, f"the daemon on {self.socket_path} took the request but did not answer within "
                                f"{self.timeout:g} s; it may have been carried out (`ohd tasks` shows the queue)",
                           "Timeout") from None
        except BlockingIOError:     # the listen backlog is full: the daemon is overloaded
            raise ApiError(503, f"the daemon on {self.socket_path} is too busy to accept a connection; "
                                "try again") from None
        except (ConnectionResetError, BrokenPipeError):  # includes http.client.RemoteDisconnected
            raise self._not_running("the connection closed before an answer") from None
        except http.client.HTTPException as exc:
            raise ApiError(502, f"not an HTTP answer on {self.socket_path}: {exc!r}") from None
        finally:
            conn.close()

    def _not_running(self, reason: str) -> DaemonNotRunning:
        # imported here: `logging` would cost `ohd status` more than the rest of this module
        import logging

        logging.getLogger("ohd.client").debug("no daemon on %s: %s", self.socket_path, reason)
        return DaemonNotRunning(str(self.socket_path), reason)


def error_from(status: int, data: bytes, path: str) -> Exception:
    """The exception for an error answer (`errors.from_http`, the way back of the server's mapping)."""
    return from_http(status, _error_info(data), path)


def _error_info(data: bytes) -> dict[str, Any]:
    try:
        info = json.loads(data)
    except ValueError:
        return {"error": data.decode("utf-8", errors="replace").strip()[:500]}
    return info if isinstance(info, dict) else {}
