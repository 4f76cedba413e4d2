"""The socket API and its client together, over a real Unix socket, on a real SQLite store."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from ohd.cli.client import Client, UnixHTTPConnection
from ohd.core.taskfile import TaskSpec
from ohd.errors import (
    ApiError,
    ConfigError,
    DaemonAlreadyRunning,
    DaemonNotRunning,
    InvalidTransition,
    NotFound,
    OhdError,
    StorageUnavailable,
    TargetError,
)
from ohd.service.server import ApiServer
from ohd.store.store import Store, TaskStatus
from tests.support.clock import FakeClock

TARGET = "shop/pricing.py"


@dataclass
class Daemonish:
    """What the daemon hands the server: counters for wake, a status that can be made to fail."""

    wakes: list[int] = field(default_factory=list)
    status_failures: int = 0
    status_error: Exception | None = None

    def wake(self) -> None:
        self.wakes.append(1)

    def status(self) -> dict[str, Any]:
        if self.status_error is not None:
            raise self.status_error
        if self.status_failures:
            self.status_failures -= 1
            raise RuntimeError("status snapshot blew up")
        return {"version": "9.9.9", "pid": 4242, "uptime_s": 1.5, "workers": {"size": 2, "busy": 0},
                "models": [{"id": "m1", "state": "ready", "cooldown_until": None}]}

    def models(self) -> list[dict[str, Any]]:
        return [{"id": "m1", "state": "ready", "cooldown_until": None}]


@pytest.fixture
def sock() -> Path:
    return Path(os.environ["OHD_RUNTIME_DIR"]) / "ohd.sock"


@pytest.fixture
def daemonish() -> Daemonish:
    return Daemonish()


def make_server(sock: Path, store: Store, repo: Path, clock: FakeClock, daemonish: Daemonish,
                metrics: Any = None) -> ApiServer:
    return ApiServer(sock, store, repos=[repo], clock=clock, status=daemonish.status, wake=daemonish.wake,
                     models=daemonish.models, metrics=metrics)


@pytest.fixture
def server(sock: Path, store: Store, repo: Path, clock: FakeClock, daemonish: Daemonish) -> Iterator[ApiServer]:
    server = make_server(sock, store, repo, clock, daemonish)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def client(server: ApiServer, sock: Path) -> Client:
    return Client(sock, timeout=5.0)


def enqueue(store: Store, repo: Path, clock: FakeClock, **fields: Any) -> int:
    spec = TaskSpec.model_validate({"type": "unit_test", "target": TARGET, **fields})
    return store.enqueue(str(repo), spec, clock.now(), source="test")


def finish(store: Store, clock: FakeClock, status: TaskStatus) -> int:
    claim = store.claim_next("w1", clock.now(), timedelta(minutes=5))
    assert claim is not None
    store.finish(claim.task.id, "w1", status, clock.now(), error="boom" if status is TaskStatus.FAILED else None)
    return claim.task.id


def raw_request(sock: Path, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    conn = UnixHTTPConnection(sock, timeout=5.0)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


# -- the socket itself -------------------------------------------------------------------


def test_socket_file_is_private(server: ApiServer, sock: Path) -> None:
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600


def test_stop_removes_the_socket_file(sock: Path, store: Store, repo: Path, clock: FakeClock,
                                      daemonish: Daemonish) -> None:
    server = make_server(sock, store, repo, clock, daemonish)
    server.start()
    server.stop()
    assert not sock.exists()
    with pytest.raises(DaemonNotRunning):
        Client(sock).get("/status")


def test_stale_socket_file_is_replaced(sock: Path, store: Store, repo: Path, clock: FakeClock,
                                       daemonish: Daemonish) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()  # the file stays; nobody answers on it
    assert sock.exists()
    server = make_server(sock, store, repo, clock, daemonish)
    server.start()
    try:
        assert Client(sock).get("/status")["version"] == "9.9.9"
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    finally:
        server.stop()


def test_second_server_on_a_live_socket_is_refused(server: ApiServer, client: Client, sock: Path, store: Store,
                                                   repo: Path, clock: FakeClock, daemonish: Daemonish) -> None:
    second = make_server(sock, store, repo, clock, daemonish)
    with pytest.raises(DaemonAlreadyRunning):
        second.start()
    second.stop()  # harmless: it never started, and must not remove the first one's socket
    assert client.get("/status")["pid"] == 4242


def test_client_without_a_socket_reports_daemon_not_running(sock: Path) -> None:
    with pytest.raises(DaemonNotRunning) as info:
        Client(sock).get("/status")
    assert info.value.socket_path == str(sock)
    assert "no socket file" in info.value.reason


def test_client_on_a_dead_socket_reports_daemon_not_running(sock: Path) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock))
    dead.close()
    with pytest.raises(DaemonNotRunning) as info:
        Client(sock).post("/tasks", {"type": "unit_test"})
    assert "nobody is listening" in info.value.reason


def test_a_daemon_that_takes_the_request_and_is_slow_to_answer_is_not_reported_as_not_running(sock: Path) -> None:
    """Busy is not down: "start it with: ohd daemon" would be wrong advice, and a submit that timed
    out may have been stored, so the user is told to look before sending it again."""
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    busy.bind(str(sock))
    busy.listen(1)           # the connection is accepted by the kernel, and nobody answers in time
    try:
        with pytest.raises(ApiError) as info:
            Client(sock, timeout=0.3).post("/tasks", {"type": "unit_test"})
    finally:
        busy.close()
    assert not isinstance(info.value, DaemonNotRunning) and info.value.status == 504
    assert "did not answer within 0.3 s" in str(info.value) and "ohd tasks" in str(info.value)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_unix_socket(server: ApiServer, sock: Path) -> None:
    done = subprocess.run(["curl", "-s", "--unix-socket", str(sock), "http://localhost/status"],
                          capture_output=True, text=True, timeout=30, check=True)
    assert json.loads(done.stdout)["queue"]["queued"] == 0


def test_keep_alive_serves_several_requests_on_one_connection(server: ApiServer, sock: Path) -> None:
    conn = UnixHTTPConnection(sock, timeout=5.0)
    try:
        for path in ("/status", "/models", "/metrics", "/tasks"):
            conn.request("GET", path)
            response = conn.getresponse()
            assert response.status == 200
            assert int(response.getheader("Content-Length") or -1) == len(response.read())
    finally:
        conn.close()


# -- routes ------------------------------------------------------------------------------


def test_status_merges_live_fields_with_the_queue(client: Client, store: Store, repo: Path,
                                                  clock: FakeClock) -> None:
    enqueue(store, repo, clock)
    enqueue(store, repo, clock)
    claim = store.claim_next("w1", clock.now(), timedelta(minutes=5))
    assert claim is not None
    status = client.get("/status")
    assert status["version"] == "9.9.9" and status["workers"] == {"size": 2, "busy": 0}
    assert status["queue"] == {s.value: 0 for s in TaskStatus} | {"queued": 1, "running": 1}
    assert status["quarantined"] == 0
    assert status["repos"] == [str(repo)]
    assert [(r["id"], r["type"], r["target"]) for r in status["running"]] == [(claim.task.id, "unit_test", TARGET)]
    assert status["running"][0]["started_at"]


def test_submit_queues_a_task_and_wakes_the_pool(client: Client, store: Store, repo: Path,
                                                 daemonish: Daemonish) -> None:
    answer = client.post("/tasks", {"type": "docstring", "target": "./shop/pricing.py", "repo": str(repo),
                                    "priority": "high", "description": "document it", "max_attempts": 2})
    assert answer == {"id": answer["id"], "status": "queued"}
    task = store.get_task(answer["id"])
    assert (task.status, task.type, task.target, task.priority) == ("queued", "docstring", TARGET, "high")
    assert (task.repo, task.source, task.max_attempts) == (str(repo), "api", 2)
    assert daemonish.wakes == [1]


def test_submit_without_repo_uses_the_only_one(client: Client, store: Store, repo: Path) -> None:
    answer = client.post("/tasks", {"type": "review", "target": TARGET})
    assert store.get_task(answer["id"]).repo == str(repo)


@pytest.mark.parametrize(("body", "expected"), [
    ({"type": "poem", "target": TARGET}, "type"),
    ({"type": "unit_test"}, "target"),
    ({"type": "unit_test", "target": "../outside.py"}, "leaves the repo"),
    ({"type": "unit_test", "target": "/etc/passwd"}, "absolute"),
    ({"type": "unit_test", "target": "shop/missing.py"}, "does not exist"),
    ({"type": "unit_test", "target": "shop"}, "is a directory"),
    ({"type": "unit_test", "target": TARGET, "colour": "red"}, "colour"),
    ({"type": "unit_test", "target": TARGET, "max_attempts": 99}, "max_attempts"),
    ({"type": "custom", "target": TARGET}, "requires output and prompt"),
    ({"type": "unit_test", "target": TARGET, "repo": "/nowhere"}, "not a repo this daemon serves"),
    ({"type": "unit_test", "target": TARGET, "schedule": "0 * * * *"}, "tasks.d"),
    ({"type": "unit_test", "target": TARGET, "description": "x" * 20_001}, "at most 20000 characters"),
    ({"type": "custom", "target": TARGET, "output": "n.md", "prompt": "x" * 200_001}, "at most 200000 characters"),
])
def test_bad_submissions_are_400_and_enqueue_nothing(client: Client, store: Store, daemonish: Daemonish,
                                                     body: dict[str, Any], expected: str) -> None:
    with pytest.raises(ApiError) as info:
        client.post("/tasks", body)
    assert info.value.status == 400
    assert expected in info.value.message
    assert sum(store.counts().values()) == 0
    assert daemonish.wakes == []


def test_unknown_repo_error_names_the_configured_ones(client: Client, repo: Path) -> None:
    with pytest.raises(ApiError) as info:
        client.post("/tasks", {"type": "unit_test", "target": TARGET, "repo": "/nowhere"})
    assert str(repo) in info.value.message


def test_target_symlinked_outside_the_repo_is_refused(client: Client, store: Store, repo: Path,
                                                      tmp_path: Path) -> None:
    outside = tmp_path / "secret.py"
    outside.write_text("x = 1\n")
    (repo / "shop" / "link.py").symlink_to(outside)
    with pytest.raises(ApiError) as info:
        client.post("/tasks", {"type": "unit_test", "target": "shop/link.py"})
    assert (info.value.status, info.value.kind) == (400, "TargetError")
    assert "outside the repo" in info.value.message
    assert sum(store.counts().values()) == 0


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", b"\xff\xfe"])
def test_body_that_is_not_a_json_object_is_400(server: ApiServer, sock: Path, store: Store, body: bytes) -> None:
    status, answer = raw_request(sock, "POST", "/tasks", body, {"Content-Type": "application/json"})
    assert status == 400
    assert answer["kind"] == "ApiError" and answer["error"]
    assert sum(store.counts().values()) == 0


def test_show_task_with_executions(client: Client, store: Store, repo: Path, clock: FakeClock) -> None:
    task_id = enqueue(store, repo, clock)
    started = clock.now()
    clock.advance(2)
    store.record_execution(task_id, 1, "m1", started, clock.now(), 10, 5, 0.0, "accepted")
    shown = client.get(f"/tasks/{task_id}")
    assert (shown["id"], shown["status"], shown["target"]) == (task_id, "queued", TARGET)
    assert [(e["model"], e["outcome"]) for e in shown["executions"]] == [("m1", "accepted")]


def test_ohd_tasks_json_prints_the_document_get_tasks_answers(
        client: Client, store: Store, repo: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]) -> None:
    from ohd.cli.commands import main

    ids = [enqueue(store, repo, clock) for _ in range(2)]
    store.cancel(ids[0], clock.now())
    for query, flags in (("", []), ("?status=cancelled", ["--status", "cancelled"]), ("?limit=1", ["--limit", "1"])):
        assert main(["tasks", "--json", *flags]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed == client.get(f"/tasks{query}") and list(printed) == ["tasks"] and printed["tasks"]
    assert main(["models", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == client.get("/models")


def test_unknown_task_raises_not_found(client: Client) -> None:
    with pytest.raises(NotFound) as info:
        client.get("/tasks/999")
    assert (info.value.kind, str(info.value.ident)) == ("task", "999")
    with pytest.raises(NotFound):
        client.post("/tasks/999/cancel")


def test_list_tasks_filters_and_limits(client: Client, store: Store, repo: Path, clock: FakeClock) -> None:
    ids = [enqueue(store, repo, clock) for _ in range(3)]
    store.cancel(ids[0], clock.now())
    assert [t["id"] for t in client.get("/tasks")["tasks"]] == sorted(ids, reverse=True)
    assert [t["id"] for t in client.get("/tasks?status=cancelled")["tasks"]] == [ids[0]]
    assert len(client.get("/tasks?limit=1")["tasks"]) == 1
    for bad in ("/tasks?status=sleeping", "/tasks?limit=zero", "/tasks?limit=0"):
        with pytest.raises(ApiError) as info:
            client.get(bad)
        assert info.value.status == 400


def test_cancel_queued_then_cancel_again_is_409(client: Client, store: Store, repo: Path,
                                                clock: FakeClock) -> None:
    task_id = enqueue(store, repo, clock)
    assert client.post(f"/tasks/{task_id}/cancel")["status"] == "cancelled"
    assert store.get_task(task_id).status == "cancelled"
    with pytest.raises(InvalidTransition) as info:
        client.post(f"/tasks/{task_id}/cancel")
    assert (info.value.task_id, info.value.status) == (task_id, "cancelled")


def test_cancel_completed_is_409(client: Client, store: Store, repo: Path, clock: FakeClock) -> None:
    enqueue(store, repo, clock)
    task_id = finish(store, clock, TaskStatus.COMPLETED)
    with pytest.raises(InvalidTransition):
        client.post(f"/tasks/{task_id}/cancel")
    assert store.get_task(task_id).status == "completed"


def test_retry_failed_requeues_and_wakes(client: Client, store: Store, repo: Path, clock: FakeClock,
                                         daemonish: Daemonish) -> None:
    enqueue(store, repo, clock)
    task_id = finish(store, clock, TaskStatus.FAILED)
    answer = client.post(f"/tasks/{task_id}/retry")
    assert (answer["status"], answer["attempts"], answer["error"]) == ("queued", 0, None)
    assert daemonish.wakes == [1]
    with pytest.raises(InvalidTransition):
        client.post(f"/tasks/{task_id}/retry")  # queued: nothing to retry


def test_metrics_from_the_store_when_no_metrics_callable(client: Client, store: Store, repo: Path,
                                                         clock: FakeClock) -> None:
    enqueue(store, repo, clock)
    text = client.get_text("/metrics")
    lines = text.splitlines()
    assert lines[:2] == ["# HELP ohd_tasks Tasks in the store, by status.", "# TYPE ohd_tasks gauge"]
    assert 'ohd_tasks{status="queued"} 1.0' in lines
    assert 'ohd_tasks{status="failed"} 0.0' in lines
    assert text.endswith("\n")


def test_metrics_callable_text_is_served_as_prometheus(sock: Path, store: Store, repo: Path, clock: FakeClock,
                                                       daemonish: Daemonish) -> None:
    server = make_server(sock, store, repo, clock, daemonish, metrics=lambda: "ohd_up 1\n")
    server.start()
    try:
        conn = UnixHTTPConnection(sock, timeout=5.0)
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.read() == b"ohd_up 1\n"
        assert response.getheader("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
        conn.close()
    finally:
        server.stop()


def test_models(client: Client) -> None:
    assert client.get("/models") == {"models": [{"id": "m1", "state": "ready", "cooldown_until": None}]}


def test_unknown_path_is_404_and_wrong_method_is_405(client: Client, sock: Path) -> None:
    with pytest.raises(NotFound) as info:
        client.get("/nope")
    assert "no route GET /nope" in str(info.value)
    status, answer = raw_request(sock, "DELETE", "/tasks/1", b"", {})
    assert status == 405 and "GET" in answer["error"]


def test_unexpected_failure_is_500_and_the_server_keeps_serving(client: Client, daemonish: Daemonish,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    daemonish.status_failures = 1
    with pytest.raises(ApiError) as info:
        client.get("/status")
    assert info.value.status == 500
    assert "status snapshot blew up" in info.value.message and info.value.kind == "RuntimeError"
    assert any("unexpected failure" in r.message and r.exc_info for r in caplog.records)
    assert client.get("/status")["version"] == "9.9.9"


def test_a_silent_connection_does_not_block_others(client: Client, sock: Path) -> None:
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.connect(str(sock))  # connected, never sends a byte
    try:
        assert client.get("/status")["pid"] == 4242
    finally:
        idle.close()


def test_concurrent_submissions_each_get_their_own_task(client: Client, store: Store, daemonish: Daemonish) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda _: client.post("/tasks", {"type": "unit_test", "target": TARGET}), range(16)))
    ids = {answer["id"] for answer in answers}
    assert len(ids) == 16
    assert store.counts()["queued"] == 16
    assert len(daemonish.wakes) == 16


def test_head_gives_the_headers_without_a_body(server: ApiServer, sock: Path) -> None:
    conn = UnixHTTPConnection(sock, timeout=5.0)
    try:
        conn.request("HEAD", "/status")
        response = conn.getresponse()
        assert response.status == 200 and int(response.getheader("Content-Length") or 0) > 0
        assert response.read() == b""
        conn.request("GET", "/models")  # the connection is still in step
        assert conn.getresponse().status == 200
    finally:
        conn.close()


@pytest.mark.parametrize(("error", "status"), [
    (NotFound("task", 7), 404), (InvalidTransition(3, "running", "retry"), 409),
    (StorageUnavailable("/s/ohd.db", StorageUnavailable.FULL), 507),
    (StorageUnavailable("/s/ohd.db", StorageUnavailable.LOCKED), 503),
    (TargetError("shop/x.py", "does not exist"), 400), (ApiError(418, "a teapot", "Teapot"), 418),
    (ConfigError("bad value"), 400)])
def test_an_error_the_server_answers_is_the_one_the_client_raises(client: Client, daemonish: Daemonish,
                                                                 error: OhdError, status: int) -> None:
    """One mapping both ways (`errors.http_answer`, `errors.from_http`): the exception a handler
    raised comes back from the client with its data, or as ApiError with its status, kind and text."""
    daemonish.status_error = error
    with pytest.raises(OhdError) as raised:
        client.get("/status")
    got = raised.value
    if isinstance(error, (NotFound, InvalidTransition)):
        assert type(got) is type(error) and vars(got) == {**vars(error), **({"ident": "7"} if isinstance(error, NotFound) else {})}
    else:
        assert isinstance(got, ApiError) and (got.status, str(got)) == (status, str(error))
        assert got.kind == (error.kind if isinstance(error, ApiError) else type(error).__name__)

