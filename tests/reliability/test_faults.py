"""The fault matrix (issue 11, point 3): every way the model server can fail, against one real daemon.

One `ohd daemon` process serves every case at once: the fake OpenRouter (in this process, a real
HTTP server on 127.0.0.1) scripts the answers of one model id per case, and each case is one task
asking that model (with a second, well-answering model where the case is about falling through to
it). Requests get 2 s (`request_timeout_s`), tasks 60 s (`timeout_s`): a task that ends with its
own classified error ended within its time limit (the limit's error is "timed out after 60s").
While the tasks run, a thread asks the daemon for its status over the socket without a pause,
and `ohd status` runs as a process: every reply must come. `HTTP_PROXY`, `HTTPS_PROXY` and
`ALL_PROXY` name a listener on 127.0.0.1 that must receive nothing (the key would travel to it).

Connection refused cannot share that daemon's server; it runs against the real pool, store and
client in this process. The `proxy` setting, the one proxy that is used, has its own test.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from ohd.cli.client import Client
from ohd.clock import SystemClock
from ohd.core.taskfile import TaskSpec
from ohd.core.tasktypes import Job
from ohd.models.llm import Completion, ModelClient, http_client
from ohd.store.store import Store
from ohd.work.worker import Pool
from tests.e2e.helpers import DaemonProcess, daemon_env
from tests.support.clock import FakeClock
from tests.support.databases import open_store
from tests.support.fake_openrouter import (
    Answer,
    FakeOpenRouter,
    dropped,
    empty_message,
    error,
    error_in_200_body,
    garbage,
    never_answer,
    no_choices,
    ok,
    rate_limited,
    server_error,
    slow,
    trickle,
    truncated,
)
from tests.support.gitrepo import make_repo
from tests.support.waiting import wait_for

pytestmark = pytest.mark.reliability

KEY = "sk-fault-matrix-key-0123456789"
FALLBACK = "fault/fallback"      # answers well to every task that gets to it (the fake's default)
REQUEST_TIMEOUT_S = 6.0   # a request cut by it is retried, one more request than the case asks: at load 20+
# the in-process fake server took over 2 s to answer a plain 429 (`asked` 2, not 1)
TASK_TIMEOUT_S = 60.0
MANY = 12                        # scripted answers per case: more than any case may ask for
PACED_RPM = 2                    # the per-minute limit of case 500-paced (below its 1 + 2 retries)
RESET_IN = timedelta(seconds=600)   # X-RateLimit-Reset's instant, from the moment the cases are scripted
TERMINAL = ("completed", "failed", "cancelled")


@dataclass(frozen=True)
class Case:
    """One fault: what the case's model answers, and how its task must end.

    `classes`: the error classes of the case model's executions, in order; `error`: a piece of the
    task's error; `resume_s`: a pending task's resume time, (low, high) seconds after the run started
    (before its submission) and after the task was read; `asked`: requests the case's model got
    by the time its task settled."""

    name: str
    answers: tuple[Answer, ...]
    status: str
    classes: tuple[str, ...]
    error: str = ""
    fallback: bool = False
    resume_s: tuple[float, float] | None = None
    asked: int | None = None
    extra: tuple[tuple[str, tuple[Answer, ...]], ...] = ()    # more models of the task, scripted

    @property
    def model(self) -> str:
        return f"fault/{self.name}"

    @property
    def models(self) -> list[str]:
        return [self.model, *(name for name, _ in self.extra), *([FALLBACK] if self.fallback else [])]


def _many(answer: Answer) -> tuple[Answer, ...]:
    return (answer,) * MANY


def cases() -> list[Case]:
    transient = dict(status="failed", error="every model failed", asked=3)   # two retries, then no model
    return [
        Case("401", _many(error(401, "No auth credentials found")), "failed", ("auth",), "HTTP 401",
             fallback=True, asked=1),           # the key: no other model is asked
        Case("402", _many(error(402, "Insufficient credits")), "completed", ("refused",), fallback=True, asked=1),
        Case("403", _many(error(403, "Flagged by moderation")), "completed", ("refused",), fallback=True, asked=1),
        Case("403-alone", _many(error(403, "not allowed for this model")), "failed", ("refused",),
             "HTTP 403: not allowed for this model", asked=1),
        Case("404", _many(error(404, "No endpoints found for fault/404.")), "completed", ("not_found",),
             fallback=True, asked=1),
        Case("400", _many(error(400, "Invalid parameter: temperature")), "failed", ("bad_request",), "HTTP 400",
             asked=1),
        Case("500", _many(server_error(500)), classes=("server",), **transient),
        Case("502", _many(server_error(502, "Provider returned error")), classes=("server",), **transient),
        Case("503", _many(server_error(503, "No available provider")), classes=("server",), **transient),
        Case("500-then-next", _many(server_error(500)), "completed", ("server",), fallback=True, asked=3),
        # `rate_limits` allows it PACED_RPM requests a minute: the client's retries are paced by the
        # governor (`pace_retries`), so the second retry is not sent; the task waits for the window
        Case("500-paced", _many(server_error(500)), "pending", ("rate_limited",), resume_s=(50, 65),
             asked=PACED_RPM),
        Case("hang", _many(slow(30.0)), classes=("timeout",), **transient),
        Case("never-answers", _many(never_answer()), classes=("timeout",), **transient),
        Case("keepalive-trickle", _many(trickle(0.2)), classes=("timeout",), **transient),
        Case("dropped", _many(dropped()), "pending", ("unreachable",), "waiting for the model server",
             resume_s=(50, 70), asked=3),
        Case("truncated", _many(truncated()), "pending", ("unreachable",), "waiting for the model server",
             resume_s=(50, 70), asked=3),
        Case("malformed-json", _many(garbage()), "failed", ("malformed", "malformed"),
             "gave the same unusable answer twice", asked=2),
        Case("malformed-then-next", _many(garbage()), "completed", ("malformed", "malformed"),
             fallback=True, asked=2),
        Case("unusable-varying-then-next", _many(ok("I would rather not (ref $GEN).")), "completed",
             ("malformed", "malformed"), fallback=True, asked=2),     # no code block, a new text each time
        Case("truncated-json", _many(garbage(b'{"id": "gen-1", "choices": [{"message": {"content": "``')),
             "failed", ("malformed", "malformed"), "not a JSON object", asked=2),
        Case("no-choices", _many(no_choices()), "failed", ("malformed", "malformed"), "no choices", asked=2),
        Case("empty-message", _many(empty_message()), "failed", ("malformed", "malformed"), "empty", asked=2),
        Case("error-in-200", _many(error_in_200_body()), classes=("server",), **transient),
        Case("429-retry-after", (rate_limited(retry_after=300),) * 2, "pending", ("rate_limited",),
             resume_s=(299, 301), asked=1),
        Case("429-reset-only", (), "pending", ("rate_limited",), asked=1),   # scripted by `run` (below)
        Case("429-no-headers", (rate_limited(),) * 2, "pending", ("rate_limited",), resume_s=(59, 61), asked=1),
        Case("429-then-next", (rate_limited(retry_after=30),) * 2, "completed", ("rate_limited",),
             fallback=True, asked=1),
        Case("429-every-model", (rate_limited(retry_after=400),) * 2, "pending", ("rate_limited",),
             resume_s=(399, 401), asked=1,
             extra=(("fault/429-every-model-b", (rate_limited(retry_after=500),) * 2),)),
    ]


CASES = cases()


# --- a listener that must hear nothing (and, as a configured proxy, answers) --------------------


class Listener:
    """A TCP listener on 127.0.0.1 that records the first bytes of every connection; `answer`, when
    set, is sent back (a configured proxy's reply), else the connection is closed."""

    def __init__(self, answer: bytes | None = None) -> None:
        self.answer = answer
        self.received: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                data = b""
                try:
                    while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                        data += chunk
                    self.received.append(data)
                    if self.answer is not None:
                        conn.sendall(self.answer)
                except OSError:
                    self.received.append(data)

    def close(self) -> None:
        self.sock.close()


# --- the run ------------------------------------------------------------------------------------


@dataclass
class Run:
    """What the module's daemon run left: each case's task (with executions), the status polls."""

    started: datetime
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    read_at: dict[str, datetime] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    polls: int = 0
    poll_errors: list[str] = field(default_factory=list)
    polls_while_running: int = 0
    cli_status: list[subprocess.CompletedProcess[str]] = field(default_factory=list)
    proxy_received: list[bytes] = field(default_factory=list)
    daemon_exit: int | None = None
    reset_at: datetime | None = None      # the 429-reset-only case's X-RateLimit-Reset


class StatusPoller(threading.Thread):
    """Asks the daemon for `/status` over its socket, one request after the other, until stopped."""

    def __init__(self, socket_path: Path, run: Run) -> None:
        super().__init__(daemon=True)
        self.client = Client(socket_path, timeout=60.0)    # a bound on a hang, not a speed goal
        self.run_ = run
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                status = self.client.get("/status")
            except Exception as exc:   # every failure is the finding
                self.run_.poll_errors.append(f"{type(exc).__name__}: {exc}")
            else:
                self.run_.polls += 1
                self.run_.polls_while_running += bool(status["queue"].get("running"))
            self.done.wait(0.05)


def _settled(case: Case, task: dict[str, Any]) -> bool:
    """The task reached where it will stay for this run: terminal, or pending (a case expecting
    pending, or a resume time far enough off that it is no passing wait)."""
    if task["status"] in TERMINAL:
        return True
    if task["status"] != "pending" or not task.get("not_before"):
        return False
    if case.status == "pending":
        return True
    return datetime.fromisoformat(task["not_before"]) > datetime.now(UTC) + timedelta(seconds=15)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("faults")
    runtime = Path(tempfile.mkdtemp(prefix="ohd-rt-"))
    repo = make_repo(tmp / "repo")
    proxy = Listener()
    server = FakeOpenRouter(models=[FALLBACK, *(m for case in CASES for m in case.models if m != FALLBACK)])
    env = daemon_env(tmp, runtime, OPENROUTER_API_KEY=KEY, OHD_WORKERS=str(len(CASES) + 2),
                     OHD_MODELS=FALLBACK, OHD_REQUEST_TIMEOUT_S=str(REQUEST_TIMEOUT_S), OHD_TEST_RUNS="0",
                     OHD_GRACE_S="0", OHD_RATE_LIMITS=f'{{"fault/500-paced": {PACED_RPM}}}')
    for name in ("NO_PROXY", "no_proxy"):
        env.pop(name, None)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env[name] = proxy.url
    # an instant fixed when the module was imported had passed by the time its daemon ran on a
    # loaded machine under xdist (the task then resumed after the default cooldown): fix it now
    reset_at = datetime.now(UTC).replace(microsecond=0) + RESET_IN
    with server:
        for case in CASES:
            reset_only = (rate_limited(reset_ms=int(reset_at.timestamp() * 1000)),) * 2
            server.script(case.model, reset_only if case.name == "429-reset-only" else case.answers)
            for name, answers in case.extra:
                server.script(name, answers)
        env["OHD_BASE_URL"] = server.url
        daemon = DaemonProcess(env, repo, tmp / "daemon.log").start()
        client = Client(runtime / "ohd.sock", timeout=60.0)
        result = Run(started=datetime.now(UTC), reset_at=reset_at)
        poller = StatusPoller(runtime / "ohd.sock", result)
        try:
            poller.start()
            ids = {case.name: client.post("/tasks", {
                "type": "unit_test", "target": "shop/pricing.py", "output": f"tests/test_{case.name.replace('-', '_')}.py",
                "models": case.models, "max_attempts": 3, "timeout_s": TASK_TIMEOUT_S})["id"] for case in CASES}
            result.cli_status.append(daemon.ohd("status"))       # the real command, while the tasks run

            def unsettled() -> list[str]:
                waiting = []
                for case in CASES:
                    if case.name not in result.tasks or not _settled(case, result.tasks[case.name]):
                        result.tasks[case.name] = client.get(f"/tasks/{ids[case.name]}")
                        result.read_at[case.name] = datetime.now(UTC)
                    if not _settled(case, result.tasks[case.name]):
                        waiting.append(case.name)
                    elif case.model not in result.requests:     # as it settled (a pending task may resume)
                        result.requests |= {m: len(server.requests_for(m)) for m in case.models}
                return waiting

            try:
                wait_for(lambda: not unsettled(), timeout=90, what="every fault case to settle")
            except AssertionError:
                pass    # the per-case tests name the ones that did not
            result.cli_status.append(daemon.ohd("status"))
        finally:
            poller.done.set()
            poller.join(timeout=70)
            result.daemon_exit = daemon.stop()
            result.requests[FALLBACK] = len(server.requests_for(FALLBACK))
            result.proxy_received = list(proxy.received)
            proxy.close()
    yield result


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_each_fault_ends_in_its_state_with_its_error_class(run: Run, case: Case) -> None:
    task = run.tasks[case.name]
    own = [e["error_class"] for e in task["executions"] if e["model"] == case.model]
    summary = f"{case.name}: {task['status']} ({task['error']}); executions " + "; ".join(
        f"{e['model']} {e['outcome']} {e['error_class']}" for e in task["executions"])
    assert task["status"] == case.status, summary
    assert own == list(case.classes), summary
    if case.error:
        assert case.error in (task["error"] or ""), summary
    assert "timed out after" not in (task["error"] or ""), summary     # its own error, not the task's limit
    if case.asked is not None:
        assert run.requests.get(case.model) == case.asked, summary
    if case.status == "completed":
        assert task["executions"][-1]["model"] == FALLBACK and task["executions"][-1]["outcome"] == "accepted"
        assert task["attempts"] == 1 + own.count("malformed"), summary     # refusals, 429s, 5xx spend none
    if case.name == "429-reset-only":
        assert run.reset_at is not None    # resumes at the header's instant exactly
        assert abs(datetime.fromisoformat(task["not_before"]) - run.reset_at) <= timedelta(seconds=1), summary
    if case.resume_s is not None:
        low, high = case.resume_s
        resume = datetime.fromisoformat(task["not_before"])
        assert run.started + timedelta(seconds=low) <= resume <= run.read_at[case.name] + timedelta(seconds=high), \
            summary


def test_the_key_is_refused_for_every_model_at_once(run: Run) -> None:
    """A 401 is the key, not the model: the fallback model is not asked."""
    assert [e["model"] for e in run.tasks["401"]["executions"]] == ["fault/401"]


def test_the_daemon_kept_answering_status_throughout(run: Run) -> None:
    assert run.poll_errors == []
    assert run.polls_while_running > 0 and run.polls > len(CASES)
    for done in run.cli_status:
        assert done.returncode == 0 and "queued" in done.stdout, done.stderr
    assert run.daemon_exit == 0


def test_proxy_variables_receive_nothing(run: Run) -> None:
    """HTTP_PROXY / HTTPS_PROXY / ALL_PROXY named a listener: not one connection reached it."""
    assert run.proxy_received == []
    assert run.requests[FALLBACK] > 0           # the server itself was reached


# --- the rest, in this process ----------------------------------------------------------------


def _call(client: ModelClient) -> Any:
    async def call(model: str, messages: list[dict[str, str]], timeout_s: float, job: Job) -> Completion:
        return await client.complete(model, messages, timeout_s)
    return call


def test_a_refused_connection_leaves_the_task_pending_for_the_probe(tmp_path: Path, repo: Path) -> None:
    """Nothing listens on the base URL's port: no attempt is spent, the task waits for the probe."""
    closed = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{closed.getsockname()[1]}/api/v1"
    closed.close()
    clock = FakeClock()
    store: Store = open_store(tmp_path / "refused.db")

    async def main() -> None:
        async with http_client() as http:
            pool = Pool(store, _call(ModelClient(http, url, KEY, clock, retries=2)), clock,
                        models=["fault/refused"], size=1)
            await pool.run_until_idle()

    try:
        task_id = store.enqueue(str(repo), TaskSpec.model_validate(
            {"type": "unit_test", "target": "shop/pricing.py", "models": ["fault/refused"]}), clock.now())
        asyncio.run(main())
        task = store.get_task(task_id)
        executions = store.executions(task_id)
    finally:
        store.close()
    assert task.status == "pending" and task.attempts == 0, task
    assert task.not_before is not None and task.not_before > clock.now()
    assert "waiting for the model server" in (task.error or "") and "Connection refused" in (task.error or "")
    assert [e.error_class for e in executions] == ["unreachable"]


def test_the_proxy_setting_is_the_one_proxy_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """`proxy` set: the request goes to it (and HTTP_PROXY, naming another listener, gets nothing)."""
    answer = ok().render("fault/proxied", "gen-proxy")
    configured = Listener(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                          b"Content-Length: " + str(len(answer)).encode() + b"\r\n\r\n" + answer)
    environment = Listener()
    monkeypatch.setenv("HTTP_PROXY", environment.url)
    monkeypatch.setenv("ALL_PROXY", environment.url)

    async def main() -> Completion:
        async with http_client(configured.url) as http:
            client = ModelClient(http, "http://model-server.invalid/api/v1", KEY, SystemClock(), retries=0)
            return await client.complete("fault/proxied", [{"role": "user", "content": "hi"}], 30.0)

    try:
        completion = asyncio.run(main())
    finally:
        configured.close()
        environment.close()
    assert completion.content.startswith("```python")
    assert configured.received[0].startswith(b"POST http://model-server.invalid/api/v1/chat/completions ")
    assert environment.received == []


def test_a_proxy_setting_that_is_no_http_url_is_refused() -> None:
    from ohd import config
    from ohd.errors import ConfigError

    with pytest.raises(ConfigError, match="proxy"):
        config.load(env={"OHD_PROXY": "socks5://127.0.0.1:1080"})
    assert config.load(env={"OHD_PROXY": "http://127.0.0.1:3128"}).proxy == "http://127.0.0.1:3128"


def test_fake_server_faults_close_the_connection_as_scripted() -> None:
    """The fake's connection faults do what their names say (the matrix relies on them)."""
    with FakeOpenRouter() as server:
        server.script("m", [dropped(), truncated(), trickle(0.05)])
        with httpx.Client(trust_env=False, timeout=5.0) as http:
            url = server.url + "/chat/completions"
            with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
                http.post(url, json={"model": "m"})
            with pytest.raises(httpx.RemoteProtocolError, match="complete message body"):
                http.post(url, json={"model": "m"})
            with http.stream("POST", url, json={"model": "m"}) as response:
                chunks = response.iter_bytes()
                assert response.status_code == 200 and next(chunks).strip() == b""


