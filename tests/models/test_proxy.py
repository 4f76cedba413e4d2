"""The agent proxy over a real socket: a real httpx client -> Proxy -> governed_call -> Pool's
governor on a real SQLite store -> the real ModelClient -> the fake OpenRouter."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest

from ohd.core.routing import Policy
from ohd.models import proxy as proxy_module
from ohd.store.calls import CallHistory
from ohd.store.quotas import Governor
from ohd.store.store import Store
from tests.support.clock import FakeClock
from tests.support.fake_openrouter import KEY as ECHO_KEY
from tests.support.fake_openrouter import FakeOpenRouter, error, ok, rate_limited
from tests.support.proxied import HELLO, KEY, Rig

A, B = "vendor/model-a", "vendor/model-b"


@pytest.fixture
def server() -> Iterator[FakeOpenRouter]:
    with FakeOpenRouter(api_key=KEY, models=[A, B]) as fake:
        yield fake


def drive(store: Store, server: FakeOpenRouter, clock: FakeClock, models: list[str],
          scenario: Callable[[Rig], Awaitable[None]], **options: Any) -> Rig:
    rig = Rig(store, server, clock, models, **options)

    async def main() -> None:
        async with rig:
            await scenario(rig)

    asyncio.run(main())
    return rig


def sse_events(response: httpx.Response) -> list[str]:
    """The `data` fields of a Server-Sent Events body, as the openai client's decoder reads them:
    events end at a blank line, `data:` lines of one event are joined by newlines."""
    events, data = [], []
    for line in response.text.split("\n"):
        if line == "":
            if data:
                events.append("\n".join(data))
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    assert not data, "the stream ended inside an event"
    return events


def test_a_429_on_the_first_model_is_answered_by_the_next(store: Store, server: FakeOpenRouter,
                                                           clock: FakeClock) -> None:
    server.script(A, [rate_limited(retry_after=60)])
    server.script(B, [ok("hello from b", prompt_tokens=7, completion_tokens=3)])

    async def scenario(rig: Rig) -> None:
        grant = rig.open()
        answer = await rig.post(grant.token, {"model": "openai/gpt-4o", "messages": HELLO})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["object"] == "chat.completion" and body["model"] == B
        assert body["choices"][0]["message"] == {"role": "assistant", "content": "hello from b"}
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        assert (grant.requests, grant.models_used) == (1, [B])

    rig = drive(store, server, clock, [A, B], scenario)
    assert [r.model for r in server.completions()] == [A, B]       # the same agent request, then the next model
    assert server.completions()[1].body["messages"] == HELLO
    state = Governor(store).state(A)
    assert state.cooldown_until == clock.now() + timedelta(seconds=60)   # cooling, in the store
    task_id = rig.task_id
    executions = store.executions(task_id)
    assert [(e.model, e.outcome) for e in executions] == [(A, "rate_limited"), (B, "agent_request")]
    assert (executions[1].prompt_tokens, executions[1].completion_tokens) == (7, 3)
    calls = CallHistory(store.db).for_task(task_id)
    assert [c["model"] for c in calls] == [B] and calls[0]["response"] == "hello from b"
    assert "Say hello." in calls[0]["prompt"]


def test_requests_over_the_per_minute_quota_get_429_with_retry_after(store: Store, server: FakeOpenRouter,
                                                                     clock: FakeClock) -> None:
    """Each agent request is one request row of the governor: with an rpm of 2, the third in the
    same minute is not sent; the agent is told when to come back."""
    async def scenario(rig: Rig) -> None:
        grant = rig.open()
        first = [await rig.post(grant.token, {"messages": HELLO}) for _ in range(2)]
        assert [r.status_code for r in first] == [200, 200]
        over = await rig.post(grant.token, {"messages": HELLO})
        assert over.status_code == 429, over.text
        assert 1 <= int(over.headers["retry-after"]) <= 61
        assert over.json()["error"]["type"] == "rate_limit_error"
        assert grant.requests == 2
        clock.advance(int(over.headers["retry-after"]) + 1)
        again = await rig.post(grant.token, {"messages": HELLO})
        assert again.status_code == 200, again.text

    drive(store, server, clock, [A], scenario, policy=Policy(free_rpm=None, free_rpd=None, rpm={A: 2}))
    assert len(server.completions()) == 3      # the refused request never reached the server
    assert Governor(store).requests_today(clock.now()) == 3


def test_a_wrong_or_closed_token_gets_401(store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    async def scenario(rig: Rig) -> None:
        grant = rig.open()
        for headers in ({"x-api-key": grant.token}, {"api-key": grant.token}):
            assert (await rig.post(None, {"messages": HELLO}, headers=headers)).status_code == 200
        for token in ("nope", grant.token[:-1], grant.token + "x"):
            wrong = await rig.post(token, {"messages": HELLO})
            assert wrong.status_code == 401
            assert wrong.json()["error"]["type"] == "authentication_error"
        assert (await rig.post(None, {"messages": HELLO})).status_code == 401
        assert (await rig.post(None, {"messages": HELLO},
                               headers={"authorization": f"Basic {grant.token}"})).status_code == 401
        assert (await rig.http.get("/models", headers={"authorization": "Bearer nope"})).status_code == 401
        rig.proxy.close(grant)
        closed = await rig.post(grant.token, {"messages": HELLO})
        assert closed.status_code == 401 and set(closed.json()["error"]) == {"message", "type", "code"}
        assert (await rig.http.get("/models", headers={"authorization": f"Bearer {grant.token}"})).status_code == 401

    drive(store, server, clock, [A], scenario)
    assert len(server.completions()) == 2


@pytest.mark.parametrize("body", [b"{not json", b"[]", json.dumps({"messages": []}).encode(),
                                  json.dumps({"model": "x"}).encode(), json.dumps({"messages": ["hi"]}).encode(),
                                  json.dumps({"messages": [{"content": "no role"}]}).encode(),
                                  json.dumps({"messages": [{"role": "user", "content": 3}]}).encode()])
def test_a_malformed_request_gets_400_and_asks_no_model(store: Store, server: FakeOpenRouter, clock: FakeClock,
                                                        body: bytes) -> None:
    async def scenario(rig: Rig) -> None:
        answer = await rig.post(rig.open().token, body, headers={"content-type": "application/json"})
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["type"] == "invalid_request_error"

    drive(store, server, clock, [A], scenario)
    assert server.completions() == []


def test_a_body_over_the_cap_gets_413(store: Store, server: FakeOpenRouter, clock: FakeClock,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy_module, "MAX_BODY_BYTES", 1000)

    async def scenario(rig: Rig) -> None:
        token = rig.open().token
        big = [{"role": "user", "content": "x" * 2000}]
        assert (await rig.post(token, {"messages": big})).status_code == 413

        async def chunks() -> Any:    # no Content-Length: the cap holds while reading
            yield json.dumps({"messages": big}).encode()

        streamed = await rig.http.post("/chat/completions", content=chunks(),
                                       headers={"authorization": f"Bearer {token}"})
        assert streamed.status_code == 413

    drive(store, server, clock, [A], scenario)
    assert server.completions() == []


def test_stream_true_is_answered_as_server_sent_events(store: Store, server: FakeOpenRouter,
                                                       clock: FakeClock) -> None:
    server.script(A, [ok("line one\nline two", prompt_tokens=11, completion_tokens=5)])

    async def scenario(rig: Rig) -> None:
        answer = await rig.post(rig.open().token, {"messages": HELLO, "stream": True})
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"].startswith("text/event-stream")
        events = sse_events(answer)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
        assert {chunk["model"] for chunk in chunks} == {A} and len({chunk["id"] for chunk in chunks}) == 1
        text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)
        assert text == "line one\nline two"
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert [chunk["choices"][0]["finish_reason"] for chunk in chunks] == [None, "stop"]
        assert chunks[-1]["usage"] == {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}

    drive(store, server, clock, [A], scenario)


def test_models_lists_the_sessions_candidates(store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    async def scenario(rig: Rig) -> None:
        grant = rig.open([B, A])
        listed = await rig.http.get("/models", headers={"authorization": f"Bearer {grant.token}"})
        assert listed.status_code == 200
        body = listed.json()
        assert body["object"] == "list" and [m["id"] for m in body["data"]] == [B, A]
        assert rig.proxy.base_url.startswith("http://127.0.0.1:") and rig.proxy.base_url.endswith("/v1")

    drive(store, server, clock, [A, B], scenario)


def test_the_key_never_reaches_the_agent(store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    """A server error quoting the key and an answer repeating it: neither reaches the agent (the
    error is masked, the answer not used), nor does anything else it receives hold the key."""
    server.script(A, [ok(f"the key is {ECHO_KEY}")])
    server.script(B, [error(500, f"upstream saw {ECHO_KEY}")])   # the last failure: the one the agent is told
    seen: list[httpx.Response] = []

    async def scenario(rig: Rig) -> None:
        grant = rig.open()
        failed = await rig.post(grant.token, {"messages": HELLO})
        assert failed.status_code == 502, failed.text     # every candidate failed
        assert "upstream saw ***" in failed.json()["error"]["message"]
        seen.append(failed)
        seen.append(await rig.post(grant.token, {"messages": HELLO, "stream": True}))   # A answers now
        seen.append(await rig.post(grant.token, {"messages": HELLO}))
        seen.append(await rig.http.get("/models", headers={"authorization": f"Bearer {grant.token}"}))
        seen.append(await rig.post("wrong", {"messages": HELLO}))

    drive(store, server, clock, [A, B], scenario)
    assert [r.status_code for r in seen] == [502, 200, 200, 200, 401]
    assert server.completions()[0].headers["authorization"] == f"Bearer {KEY}"   # the key did go upstream
    for response in seen:
        received = response.text + json.dumps(list(response.headers.items()))
        for secret in (KEY, KEY.rsplit("-", 1)[-1]):
            assert secret not in received


def test_stop_ends_the_server(store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    async def main() -> None:
        rig = Rig(store, server, clock, [A])
        async with rig:
            url = rig.proxy.base_url
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient() as http:
                await http.get(url + "/models")

    asyncio.run(main())


def test_the_proxy_leaves_the_daemons_signal_handlers_alone(store: Store, server: FakeOpenRouter,
                                                            clock: FakeClock) -> None:
    """uvicorn installs its own SIGTERM/SIGINT handlers while it serves; inside the daemon they
    would take the daemon's graceful stop away."""
    def daemons(signum: int, frame: object) -> None:
        raise AssertionError("not sent in this test")

    async def scenario(rig: Rig) -> None:
        await rig.http.get("/models")
        assert signal.getsignal(signal.SIGTERM) is daemons and signal.getsignal(signal.SIGINT) is daemons

    before = {sig: signal.signal(sig, daemons) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        drive(store, server, clock, [A], scenario)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
