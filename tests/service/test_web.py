"""The web listener's parts that need no daemon: the guard's verdicts (pure), the token file, the
address setting, and a listener that cannot bind. The real daemon's listener: tests/e2e/test_web_e2e.py."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from ohd.config import listen_address, load
from ohd.errors import ConfigError, OhdError
from ohd.service import statedir
from ohd.service.server import json_reply
from ohd.service.web.guard import Guard, Login, Refusal, allowed_hosts, base_url, is_loopback
from ohd.service.web.listener import WebListener

TOKEN = "t0ken-" + "x" * 40
GUARD = Guard(TOKEN, allowed_hosts("127.0.0.1", 8767), metrics_public=True)
HOST = {"host": "127.0.0.1:8767"}
BEARER = {**HOST, "authorization": f"Bearer {TOKEN}"}


def verdict(method: str = "GET", path: str = "/api/status", query: dict[str, str] | None = None,
            headers: dict[str, str] | None = None, cookie: str | None = None, guard: Guard = GUARD
            ) -> Refusal | Login | None:
    return guard.check(method, path, query or {}, HOST if headers is None else headers, cookie)


def kind(result: Refusal | Login | None) -> str | None:
    return result.kind if isinstance(result, Refusal) else None


def test_the_allowed_hosts_are_the_address_and_the_loopback_names_with_the_port() -> None:
    assert allowed_hosts("127.0.0.1", 8767) == {"127.0.0.1:8767", "localhost:8767", "[::1]:8767"}
    assert allowed_hosts("::1", 9) == {"[::1]:9", "localhost:9", "127.0.0.1:9"}
    assert "192.168.1.5:8767" in allowed_hosts("192.168.1.5", 8767)
    assert "localhost" in allowed_hosts("127.0.0.1", 80)        # browsers leave port 80 out
    assert base_url("0.0.0.0", 8767) == "http://127.0.0.1:8767" and base_url("::1", 1) == "http://[::1]:1"
    assert [is_loopback(h) for h in ("127.0.0.1", "127.3.2.1", "::1", "localhost", "0.0.0.0", "10.0.0.1",
                                     "example.com")] == [True, True, True, True, False, False, False]


def test_a_wrong_host_is_refused_before_anything_else() -> None:
    for host in ("evil.example:8767", "127.0.0.1", "127.0.0.1:8768", "", "127.0.0.1:8767.evil.example"):
        assert kind(verdict(headers={**BEARER, "host": host})) == "WrongHost", host
        assert kind(verdict(path="/metrics", headers={"host": host})) == "WrongHost", host
    assert verdict(headers={**BEARER, "host": "LocalHost:8767"}) is None


def test_reading_needs_the_bearer_token_or_the_cookie() -> None:
    assert verdict(headers=BEARER) is None
    assert verdict(cookie=TOKEN) is None
    assert verdict(method="HEAD", path="/", cookie=TOKEN) is None
    for headers, cookie in ((HOST, None), ({**HOST, "authorization": "Bearer nope"}, None),
                            ({**HOST, "authorization": "Bearer nope"}, TOKEN),    # a wrong header is not ignored
                            ({**HOST, "authorization": f"Basic {TOKEN}"}, None), (HOST, TOKEN[:-1]),
                            (HOST, TOKEN + "x"), ({**HOST, "authorization": "Bearer \u00e9"}, "\u00e9")):
        result = verdict(headers=headers, cookie=cookie)
        assert isinstance(result, Refusal) and result.status == 401, (headers, cookie)


def test_a_change_needs_the_token_in_the_header_and_no_foreign_origin() -> None:
    for method in ("POST", "DELETE", "PUT", "PATCH"):
        assert verdict(method, "/api/tasks/1/cancel", headers=BEARER) is None
        assert kind(verdict(method, "/api/tasks/1/cancel", cookie=TOKEN)) == "TokenHeaderRequired"
        refused = verdict(method, "/api/tasks/1/cancel", headers={**BEARER, "origin": "http://evil.example"},
                          cookie=TOKEN)
        assert isinstance(refused, Refusal) and refused.status == 403 and refused.kind == "CrossOrigin"
    for origin in ("null", "https://127.0.0.1:8767", "http://127.0.0.1:8768", "http://localhost:3000"):
        assert kind(verdict("POST", "/api/tasks", headers={**BEARER, "origin": origin})) == "CrossOrigin", origin
    for origin in ("http://127.0.0.1:8767", "http://localhost:8767", "http://[::1]:8767"):
        assert verdict("POST", "/api/tasks", headers={**BEARER, "origin": origin}) is None, origin
    # an Origin on a read is the browser's business (CORS keeps the answer from a foreign page)
    assert verdict(headers={**BEARER, "origin": "http://evil.example"}) is None


def test_metrics_are_public_only_when_so_configured() -> None:
    assert verdict(path="/metrics") is None
    assert kind(verdict("POST", "/metrics")) == "Unauthorized"
    private = Guard(TOKEN, GUARD.hosts, metrics_public=False)
    assert kind(verdict(path="/metrics", guard=private)) == "Unauthorized"
    assert verdict(path="/metrics", headers=BEARER, guard=private) is None
    assert kind(verdict(path="/metrics/x")) == "Unauthorized"


def test_a_login_url_redirects_to_itself_without_the_token() -> None:
    assert verdict(path="/", query={"token": TOKEN}) == Login("/")
    assert verdict(path="/tasks", query={"token": TOKEN, "status": "failed"}) == Login("/tasks?status=failed")
    assert verdict(path="//evil.example/x", query={"token": TOKEN}) == Login("/evil.example/x")
    assert kind(verdict(path="/", query={"token": "wrong"})) == "Unauthorized"
    assert kind(verdict("POST", "/api/tasks", query={"token": TOKEN})) == "Unauthorized"   # no login by POST


def test_the_token_is_made_once_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "web.token"
    token = statedir.web_token(path)
    assert len(token) >= 40 and path.stat().st_mode & 0o777 == 0o600
    assert statedir.web_token(path) == token and os.listdir(tmp_path) == ["web.token"]   # no temp file left
    path.write_text("my-own-token-0123456789\n")
    assert statedir.web_token(path) == "my-own-token-0123456789"
    for bad in ("", "short", "has space in it 0123456789"):
        path.write_text(bad)
        with pytest.raises(OhdError, match="holds no token"):
            statedir.web_token(path)


def test_the_listen_setting_is_host_and_port() -> None:
    assert listen_address("127.0.0.1:8767") == ("127.0.0.1", 8767)
    assert listen_address("[::1]:8767") == ("::1", 8767) and listen_address("localhost:1") == ("localhost", 1)
    for bad in ("8767", "127.0.0.1", ":8767", "::1:8767", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:x",
                "http://127.0.0.1:8767"):
        with pytest.raises(ValueError):
            listen_address(bad)
    assert load(env={}).http_address is None
    assert load(env={"OHD_HTTP_LISTEN": "127.0.0.1:8767"}).http_address == ("127.0.0.1", 8767)
    with pytest.raises(ConfigError, match="http_listen.*port"):
        load(env={"OHD_HTTP_LISTEN": "127.0.0.1:99999"})


def test_a_listener_whose_port_is_taken_says_so() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        web = WebListener("127.0.0.1", port, TOKEN, lambda method, target, body, via: json_reply(200, {}), str)
        with pytest.raises(OhdError, match=f"cannot listen on 127.0.0.1:{port}"):
            asyncio.run(web.start())
