"""Serving an ASGI app inside the daemon's own event loop: uvicorn's `Server.serve` as a task.

Both of ohd's HTTP servers run this way, the agent proxy (`models/proxy.py`) and the web listener
(`service/web/`). uvicorn's own signal handlers are left out: the daemon owns SIGTERM and SIGINT
(its graceful stop), and `Server.serve` would install its own in the main thread otherwise.
Invariant: `start` returns only once the socket listens, or raises OSError when it cannot bind.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: the daemon owns SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) and listening; OSError (EADDRINUSE, ...) naming the cause.

    Made with proto IPPROTO_TCP, as asyncio makes its own: asyncio sets TCP_NODELAY only on
    connections of such a socket, and without it every answer on a kept-alive connection waited
    ~40 ms (Nagle's algorithm against the client's delayed ACK). bench/web.py shows it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


async def _serve(server: uvicorn.Server, sock: socket.socket) -> None:
    """uvicorn's serve; its `sys.exit` at a failed start-up (which would stop the loop) as an OSError."""
    try:
        await server.serve(sockets=[sock])
    except SystemExit as exc:
        raise OSError(f"uvicorn exited with status {exc.code}") from None


class Served:
    """One ASGI app on one address (port 0: a free one), served until `stop`."""

    def __init__(self, app: Any, host: str, port: int, *, name: str, grace_s: float) -> None:
        self.host, self.name = host, name
        self._config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                      log_config=None, access_log=False, server_header=False,
                                      timeout_graceful_shutdown=max(1, int(grace_s)))
        self._server: _Server | None = None
        self._serving: asyncio.Task[None] | None = None
        self._port: int | None = None

    async def start(self) -> None:
        """Bind (here, so that a taken port is an OSError naming it), then serve until `stop`."""
        sock = listening_socket(self.host, self._config.port)
        self._server = server = _Server(self._config)
        self._serving = serving = asyncio.create_task(_serve(server, sock), name=self.name)
        while not server.started:
            if serving.done():      # uvicorn gave up at its start-up (its exit became an OSError)
                self._server = self._serving = None
                sock.close()
                raise OSError(f"{self.name} could not start on {self.host}:{self._config.port}: "
                              f"{serving.exception()!r}")
            await asyncio.sleep(0.01)
        self._port = int(server.servers[0].sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop accepting; requests in flight get the grace time. Safe to call when not started."""
        if self._server is None or self._serving is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, SystemExit):
            await self._serving
        self._server = self._serving = None
        self._port = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._port
