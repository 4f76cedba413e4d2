"""The model client against a real fake OpenRouter over a real socket; `reset_at` as a pure function."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from ohd.clock import SystemClock
from ohd.errors import (
    AuthFailed,
    BadRequest,
    ConfigError,
    ContextOverflow,
    MalformedAnswer,
    ModelError,
    ModelGone,
    ModelTimeout,
    RateLimited,
    Refused,
    ServerError,
    Unreachable,
)
from ohd.models.llm import Completion, ModelClient, OfflineProvider, reset_at

from tests.support.clock import FakeClock
from tests.support.waiting import wait_for
from tests.support.fake_openrouter import (
    FakeOpenRouter,
    error,
    error_in_200_body,
    garbage,
    no_choices,
    not_found,
    ok,
    rate_limited,
    server_error,
    slow,
)

KEY = "sk-or-v1-0123456789abcdef-very-secret"
MODEL = "vendor/coder-7b:free"
MESSAGES = [{"role": "system", "content": "You write pytest tests."},
            {"role": "user", "content": "Write tests for app/auth.py"}]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_openrouter() -> Iterator[FakeOpenRouter]:
    with FakeOpenRouter() as server:
        yield server


def complete(base_url: str, clock: FakeClock, model: str = MODEL, *, timeout_s: float = 5.0,
             key: str | None = KEY, retries: int = 2, **options: Any) -> Completion:
    """One `ModelClient.complete` call on a fresh event loop and httpx client."""
    async def go() -> Completion:
        async with httpx.AsyncClient() as http:
            client = ModelClient(http, base_url, key, clock, retries=retries, **options)
            return await client.complete(model, MESSAGES, timeout_s)
    return asyncio.run(go())


def rate_limit_reset(server: FakeOpenRouter, clock: FakeClock) -> datetime:
    with pytest.raises(RateLimited) as caught:
        complete(server.url, clock)
    assert caught.value.model == MODEL
    assert len(server.requests) == 1, "a 429 is never retried by the client"
    return caught.value.reset_at


# --- reset_at, pure ----------------------------------------------------------------------

NOW = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


def ms(when: datetime) -> str:
    return str(int(when.timestamp() * 1000))


@pytest.mark.parametrize(("headers", "body", "expected"), [
    ({"Retry-After": "30"}, None, NOW + timedelta(seconds=30)),
    ({"retry-after": "2.5"}, None, NOW + timedelta(seconds=2.5)),
    ({"Retry-After": format_datetime(NOW + timedelta(minutes=5), usegmt=True)}, None, NOW + timedelta(minutes=5)),
    ({"X-RateLimit-Reset": ms(NOW + timedelta(seconds=42))}, None, NOW + timedelta(seconds=42)),
    ({"x-ratelimit-reset": str(int((NOW + timedelta(seconds=42)).timestamp()))}, None,
     NOW + timedelta(seconds=42)),  # seconds instead of ms: still understood
    ({}, {"error": {"code": 429, "metadata": {"headers": {"X-RateLimit-Reset": ms(NOW + timedelta(seconds=7))}}}},
     NOW + timedelta(seconds=7)),
    ({"Retry-After": "10", "X-RateLimit-Reset": ms(NOW + timedelta(seconds=500))}, None,
     NOW + timedelta(seconds=10)),  # Retry-After wins
    ({"Retry-After": "whenever", "X-RateLimit-Reset": ms(NOW + timedelta(seconds=20))}, None,
     NOW + timedelta(seconds=20)),  # a garbage Retry-After falls through
    ({}, None, NOW + timedelta(seconds=60)),
    ({"Retry-After": "-5"}, None, NOW + timedelta(seconds=60)),
    ({"Retry-After": "nan"}, None, NOW + timedelta(seconds=60)),
    ({"Retry-After": format_datetime(NOW - timedelta(minutes=5), usegmt=True)}, None, NOW + timedelta(seconds=60)),
    ({"X-RateLimit-Reset": ms(NOW - timedelta(seconds=5))}, None, NOW + timedelta(seconds=60)),
    ({"X-RateLimit-Reset": "1e400"}, None, NOW + timedelta(seconds=60)),
    ({}, {"error": "not an object"}, NOW + timedelta(seconds=60)),
    ({}, ["not", "a", "dict"], NOW + timedelta(seconds=60)),
    ({"Retry-After": "0"}, None, NOW + timedelta(seconds=1)),  # never sooner than 1 s
    ({"Retry-After": "999999"}, None, NOW + timedelta(hours=1)),  # never later than 1 h
])
def test_reset_at(headers: dict[str, str], body: Any, expected: datetime) -> None:
    assert reset_at(headers, body, NOW) == expected


def test_reset_at_reads_httpx_headers() -> None:
    response = httpx.Response(429, headers={"Retry-After": "15"})
    assert reset_at(response.headers, None, NOW) == NOW + timedelta(seconds=15)


def test_reset_at_default_doubles_with_each_attempt_up_to_an_hour() -> None:
    waits = [reset_at({}, None, NOW, attempt=attempt) - NOW for attempt in (1, 2, 3, 7, 50)]
    assert waits == [timedelta(seconds=60), timedelta(seconds=120), timedelta(seconds=240),
                     timedelta(hours=1), timedelta(hours=1)]


# --- success -----------------------------------------------------------------------------


def test_ok_answer_carries_content_usage_and_cost(fake_openrouter: FakeOpenRouter, clock: FakeClock) -> None:
    fake_openrouter.script(MODEL, [ok("```python\nx = 1\n```", prompt_tokens=321, completion_tokens=45,
                                      cost=0.00042)])
    result = complete(fake_openrouter.url, clock)
    assert result == Completion(model=MODEL, content="```python\nx = 1\n```", prompt_tokens=321,
                                completion_tokens=45, cost=0.00042, latency_ms=0, finish_reason="stop",
                                generation_id="gen-000001", served=MODEL)


def test_request_has_openrouter_headers_and_body(fake_openrouter: FakeOpenRouter, clock: FakeClock) -> None:
    complete(fake_openrouter.url, clock, app_url="https://example.org/ohd", app_title="ohd-test",
             max_tokens=777, temperature=0.3)
    (request,) = fake_openrouter.requests
    assert (request.method, request.path) == ("POST", "/api/v1/chat/completions")
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["http-referer"] == "https://example.org/ohd"
    assert request.headers["x-title"] == "ohd-test"
    assert request.headers["content-type"] == "application/json"
    assert request.body == {"model": MODEL, "messages": MESSAGES, "max_tokens": 777, "temperature": 0.3,
                            "usage": {"include": True}}


def test_without_a_key_no_authorization_header_is_sent(fake_openrouter: FakeOpenRouter, clock: FakeClock) -> None:
    """Local OpenAI-compatible servers (Ollama, vLLM) take no key."""
    complete(fake_openrouter.url + "/", clock, key=None)
    (request,) = fake_openrouter.requests
    assert "authorization" not in request.headers
    assert request.path == "/api/v1/chat/completions"


def test_missing_usage_gives_zero_tokens_and_unknown_cost(fake_openrouter: FakeOpenRouter,
                                                          clock: FakeClock) -> None:
    fake_openrouter.script(MODEL, [ok("hello", usage=False)])
    result = complete(fake_openrouter.url, clock)
    assert (result.prompt_tokens, result.completion_tokens, result.cost) == (0, 0, None)


def test_latency_is_measured_on_the_injected_clock(fake_openrouter: FakeOpenRouter) -> None:
    class TickingClock(FakeClock):
        def monotonic(self) -> float:
            self.advance(0.25)
            return super().monotonic()

    assert complete(fake_openrouter.url, TickingClock()).latency_ms == 250


def test_list_models_returns_the_catalogue(fake_openrouter: FakeOpenRouter, clock: FakeClock) -> None:
    async def go() -> list[dict[str, Any]]:
        async with httpx.AsyncClient() as http:
            return await ModelClient(http, fake_openrouter.url, KEY, clock).list_models()

    models = asyncio.run(go())
    assert [model["id"] for model in models] == fake_openrouter.models
    assert models[0]["pricing"]["prompt"] == "0"
    assert fake_openrouter.requests[0].headers["authorization"] == f"Bearer {KEY}"


# --- 429 ---------------------------------------------------------------------------------


def test_429_with_retry_after_seconds(fake_openrouter: FakeOpenRouter, clock: FakeClock) -> None:
    fake_openrouter.script(MODEL, [rate_limited(retry_after=120)])
    assert rate_limit_reset(fake_openrouter, clock) == clock.now() + timedelta(seconds=120)


def test_429_with_retry_after_http_date(fake_openrouter: FakeOpenRouter, clock: FakeClock) -> None:
    when = clock.now() + timedelta(seconds=300)
    fake_openrouter.script(MODEL, [rate_limited(retry_after=format_datetime(when, usegmt=True))])
    assert rate_limit_reset(fake_openrouter, clock) == when


def test_429_with_x_ratelimit_reset_in_ms(fake_openrouter: FakeOpenRouter, clock: FakeClock) -> None:
    when = clock.now() + timedelta(seconds=90)
    fake_openrouter.script(MODEL, [rate_limited(reset_ms=int(when.timestamp() * 1000))])
    assert rate_limit_reset(fake_openrouter, clock) == when


def test_429_with_reset_only_in_error_metadata(fake_openrouter: FakeOpenRouter, clock: FakeClock) -> None:
    when = clock.now() + timedelta(seconds=45)
    fake_openrouter.script(MODEL, [rate_limited(reset_ms=int(when.timestamp() * 1000), in_body=True)])
    assert rate_limit_reset(fake_openrouter, clock) == when


def test_429_without_any_hint_cools_down_60_seconds(fake_openrouter: FakeOpenRouter, clock: FakeClock) -> None:
    fake_openrouter.script(MODEL, [rate_limited()])
    assert rate_limit_reset(fake_openrouter, clock) == clock.now() + timedelta(seconds=60)


def test_429_with_garbage_hints_falls_back_to_the_default(fake_openrouter: FakeOpenRouter,
                                                          clock: FakeClock) -> None:
    fake_openrouter.script(MODEL, [rate_limited(retry_after="soon-ish", reset_ms="tomorrow")])
    assert rate_limit_reset(fake_openrouter, clock) == clock.now() + timedelta(seconds=60)


@pytest.mark.parametrize("answer", [rate_limited(retry_after=10 * 86400),
                                    rate_limited(reset_ms=4_102_444_800_000)])  # year 2100
def test_429_far_in_the_future_is_capped_at_one_hour(fake_openrouter: FakeOpenRouter, clock: FakeClock,
                                                     answer: Any) -> None:
    fake_openrouter.script(MODEL, [answer])
    assert rate_limit_reset(fake_openrouter, clock) == clock.now() + timedelta(hours=1)


def test_repeated_429s_without_hints_back_off_until_a_success(fake_openrouter: FakeOpenRouter,
                                                              clock: FakeClock) -> None:
    fake_openrouter.script(MODEL, [rate_limited(), rate_limited(), ok(), rate_limited()])

    async def go() -> list[timedelta]:
        waits = []
        async with httpx.AsyncClient() as http:
            client = ModelClient(http, fake_openrouter.url, KEY, clock)
            for _ in range(4):
                try:
                    await client.complete(MODEL, MESSAGES, 5.0)
                except RateLimited as exc:
                    waits.append(exc.reset_at - clock.now())
        return waits

    assert asyncio.run(go()) == [timedelta(seconds=60), timedelta(seconds=120), timedelta(seconds=60)]


def test_the_fake_servers_sliding_window_answers_429_with_reset_headers() -> None:
    clock = FakeClock(start=SystemClock().now())  # the fake server's reset is a real epoch
    with FakeOpenRouter(rpm=2) as server:
        complete(server.url, clock)
        complete(server.url, clock)
        with pytest.raises(RateLimited) as caught:
            complete(server.url, clock)
        complete(server.url, clock, model="other/model:free")  # limits are per model
        limited = server.requests[2]
    assert limited.status == 429
    wait = caught.value.reset_at - clock.now()
    assert timedelta(seconds=50) < wait <= timedelta(seconds=61)


# --- other statuses ----------------------------------------------------------------------


@pytest.mark.parametrize(("answer", "kind"), [
    (error(401, "No auth credentials found"), AuthFailed),
    (error(402, "Insufficient credits"), Refused),      # this model's refusal: the next one may take it
    (error(403, "Flagged by moderation"), Refused),
    (error(400, "Invalid value for temperature"), BadRequest),
    (error(400, "This endpoint's maximum context length is 8192 tokens"), ContextOverflow),
    (error(400, "the request exceeds the available context size, try increasing it"), ContextOverflow),
    (error(413, "Payload too large"), BadRequest),
    (error(422, "Unprocessable"), BadRequest),
    (not_found(), ModelGone),
])
def test_client_errors_are_classified_and_not_retried(fake_openrouter: FakeOpenRouter, clock: FakeClock,
                                                      answer: Any, kind: type[ModelError]) -> None:
    fake_openrouter.script(MODEL, [answer])
    with pytest.raises(kind) as caught:
        complete(fake_openrouter.url, clock)
    assert type(caught.value) is kind
    assert caught.value.model == MODEL
    assert len(fake_openrouter.requests) == 1
    assert clock.slept == []


def test_404_names_the_missing_model(fake_openrouter: FakeOpenRouter, clock: FakeClock) -> None:
    fake_openrouter.script(MODEL, [not_found()])
    with pytest.raises(ModelGone, match=f"No endpoints found for {MODEL}"):
        complete(fake_openrouter.url, clock)


def test_wrong_key_is_auth_failed(clock: FakeClock) -> None:
    with FakeOpenRouter(api_key="sk-the-right-one") as server, pytest.raises(AuthFailed):
        complete(server.url, clock)


def test_500_twice_then_success_is_retried(fake_openrouter: FakeOpenRouter, clock: FakeClock) -> None:
    fake_openrouter.script(MODEL, [server_error(500), server_error(502), ok("third time")])
    assert complete(fake_openrouter.url, clock).content == "third time"
    assert len(fake_openrouter.requests_for(MODEL)) == 3
    assert len(clock.slept) == 2 and all(seconds > 0 for seconds in clock.slept)


def test_500_always_raises_server_error_after_the_retries(fake_openrouter: FakeOpenRouter,
                                                          clock: FakeClock) -> None:
    fake_openrouter.default = server_error(500)
    with pytest.raises(ServerError) as caught:
        complete(fake_openrouter.url, clock, retries=2)
    assert type(caught.value) is ServerError
    assert "HTTP 500" in str(caught.value)
    assert len(fake_openrouter.requests) == 3


def test_no_retries_means_one_request(fake_openrouter: FakeOpenRouter, clock: FakeClock) -> None:
    fake_openrouter.default = server_error(503)
    with pytest.raises(ServerError):
        complete(fake_openrouter.url, clock, retries=0)
    assert len(fake_openrouter.requests) == 1


def test_408_is_a_timeout(fake_openrouter: FakeOpenRouter, clock: FakeClock) -> None:
    fake_openrouter.default = error(408, "Request timed out")
    with pytest.raises(ModelTimeout):
        complete(fake_openrouter.url, clock, retries=1)
    assert len(fake_openrouter.requests) == 2


def test_error_inside_a_200_is_a_server_error(fake_openrouter: FakeOpenRouter, clock: FakeClock) -> None:
    fake_openrouter.script(MODEL, [error_in_200_body("Provider returned error"), ok("recovered")])
    assert complete(fake_openrouter.url, clock).content == "recovered"
    fake_openrouter.default = error_in_200_body()
    with pytest.raises(ServerError, match="Provider returned error"):
        complete(fake_openrouter.url, clock, retries=0)


def test_finish_reason_error_is_a_server_error(fake_openrouter: FakeOpenRouter, clock: FakeClock) -> None:
    fake_openrouter.default = ok("half an answer", finish_reason="error")
    with pytest.raises(ServerError, match="finish_reason"):
        complete(fake_openrouter.url, clock, retries=0)


@pytest.mark.parametrize("answer", [garbage(), garbage(b"\xff\xfe not utf-8"), no_choices(), ok(""), ok("  \n")])
def test_unusable_200_is_malformed_and_not_retried(fake_openrouter: FakeOpenRouter, clock: FakeClock,
                                                   answer: Any) -> None:
    fake_openrouter.script(MODEL, [answer])
    with pytest.raises(MalformedAnswer):
        complete(fake_openrouter.url, clock)
    assert len(fake_openrouter.requests) == 1


def test_slow_answer_times_out(fake_openrouter: FakeOpenRouter, clock: FakeClock) -> None:
    fake_openrouter.default = slow(10)
    with pytest.raises(ModelTimeout):
        complete(fake_openrouter.url, clock, timeout_s=0.2, retries=1)
    assert len(fake_openrouter.requests) == 2, "a timeout is retried"


def test_a_refused_connection_is_unreachable_and_not_retried_here(clock: FakeClock) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(Unreachable) as caught:
        complete(f"http://127.0.0.1:{port}/api/v1", clock, retries=1)
    assert isinstance(caught.value, ServerError) and not caught.value.sent    # no request reached a server
    assert "Connection refused" in str(caught.value)
    assert clock.slept == [], "the breaker waits for the server, not a retry loop"


def test_a_connection_dropped_mid_answer_is_retried_and_then_unreachable(clock: FakeClock) -> None:
    import threading

    server = FakeOpenRouter().start()
    server.default = slow(60)                   # the server dies while this answer is on its way
    stopper = threading.Thread(target=lambda: (wait_for(lambda: server.requests, what="the request"),
                                               server.stop()))
    stopper.start()
    with pytest.raises(Unreachable) as caught:
        complete(server.url, clock, timeout_s=120, retries=1)
    stopper.join()
    assert len(server.requests) == 1 and len(clock.slept) == 1   # the drop was retried, into a closing port
    assert caught.value.error_class == "unreachable"     # refused, or reset before an answer: the same to the pool


# --- the key stays secret ----------------------------------------------------------------


def test_the_key_never_appears_in_logs_or_errors(fake_openrouter: FakeOpenRouter, clock: FakeClock,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fake_openrouter.script(MODEL, [ok(), rate_limited(), server_error(500), ok(), error(401, "bad key"),
                                   garbage(), slow(10), slow(10)])
    raised = []
    for timeout_s in (5, 5, 5, 5, 5, 0.2):
        try:
            complete(fake_openrouter.url, clock, timeout_s=timeout_s, retries=1)
        except ModelError as exc:
            raised.append(f"{exc!r} {exc} {exc.__cause__!r}")
    assert len(raised) == 4
    assert caplog.records, "the client logs what it does"
    for text in [caplog.text, *raised]:
        assert KEY not in text
        assert "Bearer" not in text


def test_a_key_that_cannot_be_a_header_is_refused_without_echoing_it(clock: FakeClock) -> None:
    async def build() -> None:
        async with httpx.AsyncClient() as http:
            ModelClient(http, "http://127.0.0.1:1/api/v1", "sk-abc\r\nX-Evil: 1", clock)

    with pytest.raises(ConfigError) as caught:
        asyncio.run(build())
    assert "sk-abc" not in str(caught.value)


def test_a_trailing_newline_on_the_key_is_ignored(fake_openrouter: FakeOpenRouter, clock: FakeClock) -> None:
    complete(fake_openrouter.url, clock, key=KEY + "\n")
    assert fake_openrouter.requests[0].headers["authorization"] == f"Bearer {KEY}"


# --- the fake server itself --------------------------------------------------------------


def test_fake_server_answers_concurrent_requests_concurrently(clock: FakeClock) -> None:
    async def go(server: FakeOpenRouter) -> list[Completion]:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=32)) as http:
            client = ModelClient(http, server.url, KEY, clock)
            return await asyncio.gather(*(client.complete(f"m{i % 4}", MESSAGES, 10) for i in range(16)))

    with FakeOpenRouter(latency_s=0.5) as server:
        started = time.monotonic()
        results = asyncio.run(go(server))
        elapsed = time.monotonic() - started
    assert len(results) == 16 and len({r.generation_id for r in results}) == 16
    # a serial server cannot answer in less than 16 x 0.5 s, however fast the machine; a concurrent one
    # needs about 0.5 s (4.6 s was seen on a machine at load 50, so no tighter bound holds)
    assert elapsed < 16 * 0.5, f"16 answers of 0.5 s took {elapsed:.1f} s: the server is serial"


def test_fake_server_runs_as_a_process() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fake_openrouter", "--port", "0", "--latency-ms", "20", "--rpm", "2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/api/v1")
        statuses = [httpx.post(f"{url}/chat/completions", json={"model": MODEL, "messages": MESSAGES},
                               timeout=10).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        assert httpx.get(f"{url}/models", timeout=10).json()["data"]
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0
    assert "served 3 completion request(s)" in stderr


# --- offline provider --------------------------------------------------------------------


def test_offline_provider_answers_from_the_job_without_network(clock: FakeClock) -> None:
    from ohd.models import offline
    from ohd.core.taskfile import TaskType
    from ohd.core.tasktypes import Job

    job = Job(task_type=TaskType.UNIT_TEST, target="app/calc.py", source='def add(a, b):\n    return a + b\n',
              module="app.calc", output="tests/test_calc.py")
    result = asyncio.run(OfflineProvider(clock).complete(MODEL, MESSAGES, 5.0, job))
    assert result.content == offline.answer(job)
    assert (result.model, result.cost, result.latency_ms, result.finish_reason) == ("offline", 0.0, 0, "stop")
    assert result.prompt_tokens == sum(len(message["content"].split()) for message in MESSAGES)
    assert result.completion_tokens == len(result.content.split()) > 0


def test_offline_provider_needs_the_job(clock: FakeClock) -> None:
    with pytest.raises(BadRequest):
        asyncio.run(OfflineProvider(clock).complete(MODEL, MESSAGES, 5.0))
