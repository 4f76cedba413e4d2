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
import openai
import pytest

from ohd.core.routing import Policy
from ohd.core.taskfile import TaskSpec
from ohd.models import proxy as proxy_module
from ohd.store.calls import CallHistory
from ohd.store.quotas import Governor
from ohd.store.store import Store
from tests.support.clock import FakeClock
from tests.support.fake_openrouter import KEY as ECHO_KEY
from tests.support.fake_openrouter import FakeOpenRouter, error, ok, rate_limited, tool_calls
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


TOOLS = [{"type": "function", "function": {
    "name": "str_replace_editor", "description": "Edit a file",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "new_str": {"type": "string"}},
                   "required": ["path"]}}}]
EDIT_ARGS = {"path": "shop/pricing.py", "new_str": "ADDED = 1\n"}


def agent(rig: Rig, grant: Any) -> openai.AsyncOpenAI:
    """The OpenAI SDK as an agent uses it (OpenHands and Aider reach models through it, via LiteLLM)."""
    return openai.AsyncOpenAI(base_url=rig.proxy.base_url, api_key=grant.token, max_retries=0, timeout=30)


@pytest.mark.parametrize("stream", [False, True])
def test_an_agents_tool_calls_come_back_through_the_proxy(store: Store, server: FakeOpenRouter, clock: FakeClock,
                                                          stream: bool) -> None:
    """A request with tools is sent on whole (tools, tool_choice and sampling settings arrive at the
    server, the model is the governor's), and the answer's tool calls come back as the server sent
    them, as JSON and as OpenAI's stream chunks (read by the OpenAI SDK's own stream accumulator);
    the next request carries the tool's result, and both are counted as agent requests."""
    server.script(A, [tool_calls([("str_replace_editor", EDIT_ARGS), ("finish", {})], prompt_tokens=40,
                                 completion_tokens=9),
                      ok("done", prompt_tokens=50, completion_tokens=1)])
    found: dict[str, Any] = {}

    async def scenario(rig: Rig) -> None:
        grant = rig.open()
        client = agent(rig, grant)
        asked: dict[str, Any] = {"model": "openai/gpt-4o", "messages": HELLO, "tools": TOOLS, "tool_choice": "auto",
                                 "temperature": 0.3, "max_tokens": 321, "stop": ["</done>"], "seed": 7}
        if stream:
            async with client.chat.completions.stream(**asked) as events:
                async for _ in events:
                    pass
                first = await events.get_final_completion()
        else:
            first = await client.chat.completions.create(**asked)
        found["first"] = first
        message = first.choices[0].message
        follow_up = [*HELLO, message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "edited"}]
        found["second"] = await client.chat.completions.create(
            model="openai/gpt-4o", messages=follow_up, tools=TOOLS, stream=False)
        found["grant"] = (grant.requests, list(grant.models_used))

    rig = drive(store, server, clock, [A, B], scenario)
    first = found["first"]
    assert first.model == A and first.choices[0].finish_reason == "tool_calls"
    calls = first.choices[0].message.tool_calls
    assert [(c.id, c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("call_0", "function", "str_replace_editor", EDIT_ARGS), ("call_1", "function", "finish", {})]
    assert not first.choices[0].message.content
    assert (first.usage.prompt_tokens, first.usage.completion_tokens) == (40, 9)
    assert found["second"].choices[0].message.content == "done" and found["grant"] == (2, [A])
    sent, again = [r.body for r in server.completions()]
    assert sent["model"] == A and "stream" not in sent and sent["usage"] == {"include": True}
    assert (sent["tools"], sent["tool_choice"], sent["temperature"], sent["max_tokens"], sent["stop"],
            sent["seed"]) == (TOOLS, "auto", 0.3, 321, ["</done>"], 7)
    assert sent["messages"] == HELLO
    assert again["messages"][2]["tool_calls"][0]["function"] == {"name": "str_replace_editor",
                                                                  "arguments": json.dumps(EDIT_ARGS)}
    assert again["messages"][3] == {"role": "tool", "tool_call_id": "call_0", "content": "edited"}
    assert again["max_tokens"] == 4096                  # no bound given: ohd's own
    executions = store.executions(rig.task_id)
    assert [(e.model, e.outcome, e.prompt_tokens) for e in executions] == [(A, "agent_request", 40),
                                                                          (A, "agent_request", 50)]
    calls_kept = CallHistory(store.db).for_task(rig.task_id)
    assert "[tool call] str_replace_editor" in calls_kept[0]["response"]
    assert "[tool call] str_replace_editor" in calls_kept[1]["prompt"] and "edited" in calls_kept[1]["prompt"]


def test_the_stream_of_a_tool_call_answer_is_openais_chunks(store: Store, server: FakeOpenRouter,
                                                            clock: FakeClock) -> None:
    """The chunks themselves: the role first, each tool call with its index, id, name and arguments,
    the finish reason with the usage last, then [DONE]."""
    server.script(A, [tool_calls([("str_replace_editor", EDIT_ARGS)], content="Editing.")])

    async def scenario(rig: Rig) -> None:
        answer = await rig.post(rig.open().token, {"messages": HELLO, "tools": TOOLS, "stream": True})
        assert answer.status_code == 200, answer.text
        events = sse_events(answer)
        assert events[-1] == "[DONE]"
        deltas = [json.loads(event)["choices"][0] for event in events[:-1]]
        assert deltas[0]["delta"] == {"role": "assistant", "content": "Editing."}
        assert deltas[1]["delta"] == {"tool_calls": [{"index": 0, "id": "call_0", "type": "function", "function": {
            "name": "str_replace_editor", "arguments": json.dumps(EDIT_ARGS)}}]}
        assert [d["finish_reason"] for d in deltas] == [None, None, "tool_calls"]
        assert "usage" in json.loads(events[-2])

    drive(store, server, clock, [A], scenario)


def test_response_format_and_other_parameters_arrive_and_fallbacks_do_not(store: Store, server: FakeOpenRouter,
                                                                          clock: FakeClock) -> None:
    """Every field of the agent's request goes to the server but those that would route around the
    governor (`models`, `route`) or that the proxy answers itself (`stream`, `stream_options`)."""
    fields = {"response_format": {"type": "json_object"}, "top_p": 0.9, "presence_penalty": 0.1,
              "max_completion_tokens": 99, "parallel_tool_calls": False, "user": "agent-1",
              "provider": {"order": ["FakeProvider"]}, "usage": {"include": False}}

    async def scenario(rig: Rig) -> None:
        answer = await rig.post(rig.open().token, {"model": "x", "messages": HELLO, **fields, "models": [B],
                                                   "route": "fallback", "stream": True,
                                                   "stream_options": {"include_usage": True}})
        assert answer.status_code == 200, answer.text

    drive(store, server, clock, [A, B], scenario)
    [sent] = [r.body for r in server.completions()]
    assert sent == {"model": A, "messages": HELLO, **fields, "usage": {"include": True}}


def test_a_model_without_tool_support_refuses_and_the_next_answers(store: Store, server: FakeOpenRouter,
                                                                   clock: FakeClock) -> None:
    """OpenRouter's 404 "No endpoints found that support tool use" is that model refusing this
    request, not a model gone: the next candidate answers, and the first stays alive."""
    server.script(A, [error(404, "No endpoints found that support tool use. Try disabling \"tool_choice\".")])
    server.script(B, [tool_calls([("finish", {})])])

    async def scenario(rig: Rig) -> None:
        answer = await rig.post(rig.open().token, {"messages": HELLO, "tools": TOOLS})
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "finish"

    drive(store, server, clock, [A, B], scenario)
    assert Governor(store).dead_models() == []


def test_a_tool_call_repeating_the_key_is_not_relayed(store: Store, server: FakeOpenRouter, clock: FakeClock) -> None:
    """The key check covers the whole relayed answer, tool call arguments too: that answer is not used."""
    server.script(A, [tool_calls([("run", {"command": f"echo {ECHO_KEY}"})])])
    server.script(B, [tool_calls([("run", {"command": "ls"})])])

    async def scenario(rig: Rig) -> None:
        answer = await rig.post(rig.open().token, {"messages": HELLO, "tools": TOOLS})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == B and KEY not in answer.text

    drive(store, server, clock, [A, B], scenario)
    assert [(e.model, e.outcome) for e in store.executions(1)] == [(A, "malformed"), (B, "agent_request")]


@pytest.mark.parametrize("older", ["normal", "low"])
def test_an_agent_request_waits_behind_an_older_task_for_the_next_slot(store: Store, server: FakeOpenRouter,
                                                                       clock: FakeClock, older: str) -> None:
    """As a task's call does (FIFO): the model's next slot is within `hold_s`, but an older pending
    task of at least the agent task's priority is due by then, so the agent is told to come back
    (429 + Retry-After) instead of taking that slot in place; an older task of lower priority does
    not hold it back (the request waits for the slot in place and is answered)."""
    spec = TaskSpec.model_validate({"type": "unit_test", "target": "shop/other.py", "output": "tests/test_o.py",
                                    "priority": older})
    waiting = store.enqueue("/tmp/ohd-proxy-test-repo", spec, clock.now())
    claim = store.claim_next("w-other", clock.now(), timedelta(seconds=60))
    assert claim is not None and claim.task.id == waiting
    store.defer(waiting, "w-other", clock.now() + timedelta(seconds=30), clock.now(), "waiting for a slot")
    statuses: list[int] = []

    async def scenario(rig: Rig) -> None:
        assert rig.task_id > waiting
        grant = rig.open()
        for _ in range(2):
            answer = await rig.post(grant.token, {"messages": HELLO})
            statuses.append(answer.status_code)
        if older == "normal":
            assert 1 <= int(answer.headers["retry-after"]) <= 61, answer.text
            assert "an older task waits" in answer.json()["error"]["message"]

    drive(store, server, clock, [A], scenario, policy=Policy(free_rpm=None, free_rpd=None, rpm={A: 1}),
          hold_s=120.0)
    assert statuses == ([200, 429] if older == "normal" else [200, 200])
    assert len(server.completions()) == statuses.count(200)
