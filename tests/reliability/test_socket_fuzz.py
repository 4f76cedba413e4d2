"""Issue 11, point 4 (the socket API): malformed HTTP, oversized bodies and headers, bad JSON,
random paths and ids, slow clients; each is answered with a clear status (never a 500, always a
JSON body) and the server keeps answering `/status` meanwhile.

Hypothesis sends raw bytes over a real Unix socket to the real server on a real SQLite store; a
slowloris holding more connections than the cap, and a real daemon process, do the rest.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ohd.cli.client import Client
from ohd.clock import SystemClock
from ohd.service.server import MAX_BODY, MAX_CONNECTIONS, ApiServer
from ohd.store.store import Store
from tests.e2e.helpers import DaemonProcess, daemon_env
from tests.support.clock import FakeClock
from tests.support.databases import open_store
from tests.support.gitrepo import make_repo
from tests.support.waiting import HANG_S, wait_for

pytestmark = pytest.mark.reliability

TARGET = "shop/pricing.py"
STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ")
FUZZ = settings(max_examples=250, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@dataclass
class Served:
    sock: Path
    store: Store
    cases: int = 0


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("sockfuzz")
    repo = make_repo(tmp / "repo")
    store = open_store(tmp / "ohd.db")
    server = ApiServer(tmp / "ohd.sock", store, repos=[repo], clock=FakeClock(), status=lambda: {"version": "0"},
                       wake=lambda: None, models=lambda: [])
    server.start()
    served = Served(tmp / "ohd.sock", store)
    try:
        yield served
    finally:
        server.stop()
        store.close()
        print(f"\nsocket fuzz: {served.cases} requests tried")


def exchange(sock: Path, data: bytes) -> bytes:
    """Send `data`, close the sending side, read to the end (a hang fails the test)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(HANG_S)
    try:
        conn.connect(str(sock))
        try:
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass                       # refused mid-send (a 413, a 431): the answer is still there to read
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
        return answer
    except ConnectionResetError:
        return answer
    finally:
        conn.close()


def check(served: Served, data: bytes) -> list[int]:
    """Every answer to `data` has a status below 500 (501/505 are HTTP's own for an unknown method or
    version) and a JSON body; `/status` answers afterwards; an accepted task is in the store."""
    served.cases += 1
    answer = exchange(served.sock, data)
    statuses = [int(code) for code in STATUS_LINE.findall(answer)]
    assert answer == b"" or answer.startswith(b"HTTP/1.1 "), answer[:200]
    for status in statuses:
        assert status < 500 or status in (501, 505), answer[:2000]
    for head_end in re.finditer(rb"\r\n\r\n", answer):
        if data.startswith(b"HEAD "):
            break                      # no body: what follows the head is the next request's answer
        body = answer[head_end.end():]
        length = re.search(rb"Content-Length: (\d+)", answer[:head_end.start()][-400:])
        if length is not None and body and statuses and statuses[0] >= 400:
            json.loads(body[:int(length.group(1))])      # the error is JSON, not an HTML page
        break
    for created in re.finditer(rb'\{"id": (\d+), "status": "queued"\}', answer):
        assert served.store.get_task(int(created.group(1))).id == int(created.group(1))
    status = Client(served.sock, timeout=HANG_S).get("/status")
    assert "queue" in status
    return statuses


def request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: ohd", "Connection: close", f"Content-Length: {len(body)}"]
    lines += [f"{key}: {value}" for key, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


# -- strategies ------------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)
ids = st.integers(min_value=0, max_value=10**30).map(str) | st.text("0123456789", min_size=1, max_size=5000)
surrogate = st.integers(0xD800, 0xDFFF).map(lambda code: f"\\u{code:04x}")
deep = st.integers(1, 200_000).map(lambda depth: "[" * depth + "]" * depth) \
    | st.integers(1, 200_000).map(lambda depth: '{"a":' * depth + "1" + "}" * depth)
task_fields = st.fixed_dictionaries(
    {"type": st.sampled_from(["unit_test", "review", "docstring", "bogus"]) | json_values,
     "target": st.sampled_from([TARGET, "missing.py", "../etc/passwd", "/etc/passwd", ".git/config", "a" * 5000,
                                "shop", "tasks.d/x.yaml"]) | st.text(max_size=300)},
    optional={"repo": json_values, "priority": json_values, "output": st.text(max_size=300) | json_values,
              "description": st.text(max_size=300) | json_values, "schedule": json_values,
              "max_attempts": json_values, "models": json_values, "extra": json_values})


valid_tasks = st.fixed_dictionaries({"type": st.sampled_from(["unit_test", "review", "docstring"]),
                                     "target": st.just(TARGET)}, optional={"description": st.text(max_size=100)})


def as_json(fields: dict[str, Any], swap: str | None, key: str) -> bytes:
    """The task's JSON text with the value of `key` replaced by `swap` (a lone surrogate's escape
    inside a path, or deep JSON)."""
    if swap is None:
        return json.dumps(fields).encode()
    value = f'"shop/{swap}.py"' if swap.startswith("\\u") else swap
    return json.dumps({**fields, key: "@swap@"}).replace('"@swap@"', value, 1).encode()


routes = st.sampled_from(["/status", "/tasks", "/tasks/{id}", "/tasks/{id}/cancel", "/tasks/{id}/retry",
                          "/models", "/metrics", "/metrics.json", "/", "/tasks/{id}/x", "/{text}"])
queries = st.sampled_from(["", "?limit={text}", "?status={text}", "?limit={id}", "?{text}={text}"])


@st.composite
def paths(draw: st.DrawFn) -> str:
    path = draw(routes) + draw(queries)
    text = draw(st.text(st.characters(min_codepoint=33, max_codepoint=0x10FFFF, exclude_characters="\x7f"),
                        max_size=40)).replace("{", "").replace("}", "")
    return path.replace("{id}", draw(ids)).replace("{text}", text)


# -- the fuzz ---------------------------------------------------------------------------------------

@FUZZ
@given(data=st.binary(max_size=3000))
def test_random_bytes_get_a_clear_answer_or_a_closed_connection(served: Served, data: bytes) -> None:
    check(served, data)


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW", "get", ""]),
       path=paths(), version=st.sampled_from(["HTTP/1.1", "HTTP/1.0", "", "HTTP/2.0", "HTTP/1.x", "HTTP/11.1"]),
       headers=st.lists(st.tuples(st.text(max_size=20), st.text(max_size=60)), max_size=6),
       length=st.sampled_from(["right", "none", "short", "long", "-1", "abc", "1_0", str(MAX_BODY + 1),
                               "9" * 5000, "two"]),
       body=st.binary(max_size=500) | json_values.map(lambda value: json.dumps(value).encode()),
       oversize=st.sampled_from([None, "header", "headers", "line"]))
# a HEAD answer's Content-Length names a body it does not carry; the "body" sent after it is a second
# request, whose answer follows the head (hypothesis found it: the check read that answer as JSON)
@example(method="HEAD", path="/tasks/x", version="HTTP/1.1", headers=[], length="right",
         body=b"GET /status HTTP/1.1\r\n\r\n", oversize=None)
def test_malformed_requests_on_every_route_get_a_clear_answer(served: Served, method: str, path: str, version: str,
                                                              headers: list[tuple[str, str]], length: str,
                                                              body: bytes, oversize: str | None) -> None:
    lines = [f"{method} {path} {version}".rstrip(), "Host: ohd"]
    lines += [f"{name}: {value}" for name, value in headers]
    declared = {"right": str(len(body)), "short": str(max(0, len(body) - 3)), "long": str(len(body) + 50),
                "two": f"{len(body)}, {len(body)}"}.get(length, length)
    if length != "none":
        lines.append(f"Content-Length: {declared}")
    if oversize == "header":
        lines.append("X-Big: " + "a" * 70_000)
    elif oversize == "headers":
        lines += [f"X-{n}: {n}" for n in range(150)]
    elif oversize == "line":
        lines[0] = f"{method} /{'a' * 70_000} {version}"
    check(served, ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogatepass") + body)


@FUZZ
@given(fields=valid_tasks | task_fields, swap=st.none() | surrogate | deep, route=st.sampled_from(["/tasks", "/tasks/{id}/cancel",
                                                                                   "/tasks/{id}/retry"]),
       task_id=ids, key=st.sampled_from(["type", "target", "description"]))
def test_random_json_bodies_get_a_clear_answer(served: Served, fields: dict[str, Any], swap: str | None,
                                               route: str, task_id: str, key: str) -> None:
    check(served, request("POST", route.replace("{id}", task_id), as_json(fields, swap, key)))


@pytest.mark.parametrize(("name", "data", "status"), [
    ("deep JSON", request("POST", "/tasks", b"[" * 100_000 + b"]" * 100_000), 400),
    ("deep object", request("POST", "/tasks", b'{"a":' * 50_000 + b"1" + b"}" * 50_000), 400),
    ("lone surrogate", request("POST", "/tasks", b'{"type": "unit_test", "target": "\\ud800"}'), 400),
    ("huge id", request("GET", "/tasks/" + "9" * 30), 404),
    ("5000-digit id", request("POST", "/tasks/" + "9" * 5000 + "/cancel"), 404),
    ("long target", request("POST", "/tasks", json.dumps({"type": "unit_test", "target": "a" * 5000}).encode()), 400),
    ("bare HTTP/0.9", b"GET /status\r\n\r\n", 400),
    ("body too large", b"POST /tasks HTTP/1.1\r\nContent-Length: 1000001\r\n\r\n", 413),
    ("header too large", b"GET /status HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431),
])
def test_each_finding_gets_its_4xx(served: Served, name: str, data: bytes, status: int) -> None:
    assert check(served, data) == [status], name


# -- slow clients -----------------------------------------------------------------------------------

def slow_connections(sock: Path, count: int) -> list[socket.socket]:
    """`count` clients that begin a request and never finish it."""
    conns = []
    for _ in range(count):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(HANG_S)
        conn.connect(str(sock))
        conn.sendall(b"POST /tasks HTTP/1.1\r\nHost: ohd\r\nContent-Length: 10\r\n\r\n{")
        conns.append(conn)
    return conns


def closed(conn: socket.socket) -> bytes | None:
    """What the server sent before closing `conn`, or None while it is still open."""
    conn.setblocking(False)
    try:
        data = conn.recv(65536, socket.MSG_PEEK)
    except BlockingIOError:
        return None
    except ConnectionResetError:
        return b""
    finally:
        conn.settimeout(HANG_S)
    return data if data.endswith(b"}") or data == b"" else None


def api_threads() -> int:
    return sum(1 for thread in threading.enumerate() if "process_request_thread" in thread.name)


def test_a_slowloris_cannot_lock_out_status_and_its_threads_stay_bounded(tmp_path: Path, repo: Path,
                                                                        store: Store) -> None:
    """Twice the connection cap of half-sent requests (with a deadline too long to matter here):
    `/status` is still answered, because the oldest waiting connections are closed for it."""
    sock = tmp_path / "ohd.sock"
    server = ApiServer(sock, store, repos=[repo], clock=SystemClock(), status=lambda: {"version": "0"},
                       wake=lambda: None, models=lambda: [], request_s=10 * HANG_S)
    server.start()
    conns = []
    try:
        baseline = api_threads()
        conns = slow_connections(sock, 2 * MAX_CONNECTIONS)
        for _ in range(5):
            assert "queue" in Client(sock, timeout=HANG_S).get("/status")
        wait_for(lambda: sum(closed(conn) == b"" for conn in conns) >= MAX_CONNECTIONS,
                 what="the oldest slow connections to be closed without an answer")
        wait_for(lambda: api_threads() <= MAX_CONNECTIONS + baseline, what="the threads to be bounded")
        assert all(closed(conn) is None for conn in conns[-MAX_CONNECTIONS // 2:])     # the newest wait on
        assert store.counts().get("queued", 0) == 0
    finally:
        for conn in conns:
            conn.close()
        server.stop()


def test_a_request_that_does_not_arrive_whole_in_time_gets_408(tmp_path: Path, repo: Path, store: Store) -> None:
    """A client that sends a byte now and then (each read well within any idle timeout) still ends."""
    sock = tmp_path / "ohd.sock"
    server = ApiServer(sock, store, repos=[repo], clock=SystemClock(), status=lambda: {"version": "0"},
                       wake=lambda: None, models=lambda: [], request_s=1.0)
    server.start()
    conns = []
    try:
        dripper = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dripper.settimeout(HANG_S)
        dripper.connect(str(sock))
        dripper.sendall(b"GET /status HTTP/1.1\r\nX-Slow: ")      # a header line that never ends
        conns = [dripper, *slow_connections(sock, 3)]

        def drip() -> bytes | None:
            try:
                dripper.send(b"a")
            except OSError:
                return b"closed"
            return closed(dripper)
        ends = [wait_for(drip, interval=0.2, what="the dripping client to be answered")]
        ends += [wait_for(lambda conn=conn: closed(conn), what="a slow client to be answered") for conn in conns[1:]]
        for end in ends[1:]:
            assert b" 408 " in end and b"RequestTimeout" in end, end
        assert b" 408 " in ends[0] or ends[0] == b"closed", ends[0]
        assert "queue" in Client(sock, timeout=HANG_S).get("/status")
    finally:
        for conn in conns:
            conn.close()
        server.stop()


def test_a_real_daemon_answers_malformed_requests_and_status_under_a_slowloris(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    repo = make_repo(tmp_path / "repo")
    daemon = DaemonProcess(daemon_env(tmp_path, runtime), repo, tmp_path / "stderr.log").start()
    sock = runtime / "ohd.sock"
    conns = []
    try:
        conns = slow_connections(sock, 2 * MAX_CONNECTIONS)
        for data, status in [(request("POST", "/tasks", b"[" * 100_000 + b"]" * 100_000), b"400"),
                             (request("POST", "/tasks", b'{"type": "unit_test", "target": "\\udc00"}'), b"400"),
                             (request("GET", "/tasks/" + "9" * 5000), b"404"),
                             (b"POST /tasks HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", b"413"),
                             (b"GET /status HTTP/1.1\r\n" + b"X: y\r\n" * 150 + b"\r\n", b"431"),
                             (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"400")]:
            answer = exchange(sock, data)
            assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer[:300]
        done = daemon.ohd("status", "--json")
        assert done.returncode == 0, done.stderr
        assert "queue" in json.loads(done.stdout)
        wait_for(lambda: sum(closed(conn) == b"" for conn in conns) >= MAX_CONNECTIONS,
                 what="the oldest slow connections to be closed without an answer")
        assert daemon.proc is not None and daemon.proc.poll() is None
    finally:
        for conn in conns:
            conn.close()
        assert daemon.stop() == 0
    assert "unexpected failure" not in (tmp_path / "stderr.log").read_text()
