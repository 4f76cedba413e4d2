"""Serving an ASGI app in our loop (`ohd.models.asgi`): the listening socket it binds itself."""

from __future__ import annotations

import asyncio
import socket

import pytest

from ohd.models.asgi import listening_socket


def test_connections_accepted_on_the_listening_socket_get_tcp_nodelay() -> None:
    """asyncio sets TCP_NODELAY only on connections of an IPPROTO_TCP socket; without it each answer
    on a kept-alive connection waited ~40 ms for the client's delayed ACK (bench/web.py)."""

    async def main() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Record(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        sock = listening_socket("127.0.0.1", 0)
        server = await asyncio.get_running_loop().create_server(Record, sock=sock)
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
            value = await asyncio.wait_for(accepted, 60)
            writer.close()
            return value
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(main()) != 0


def test_a_taken_port_is_an_oserror_and_leaves_no_socket_open() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="in use"):
            listening_socket("127.0.0.1", taken.getsockname()[1])
