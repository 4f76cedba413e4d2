"""The agent proxy: an OpenAI-compatible HTTP server on 127.0.0.1 through which coding agents reach models.

A coding agent (Aider, OpenHands, any CLI) speaks to its model itself, many requests a run. ohd points
it at this server instead of the model server: each agent run is `open`ed as a session with its own
random token (the agent's "API key") and a `Forward` that asks the governor's model for one request
(`work/governed.py`), so every request the agent makes is paced, counted, costed, recorded and rotated
on a 429 like ohd's own. The real key never leaves ohd: the agent gets a token that works only here,
only until its run is `close`d, and nothing it receives (answers, errors, headers, `/models`) holds the
key (the model client masks it in errors and refuses answers that repeat it).

Routes: `POST /v1/chat/completions` (and `/chat/completions`), `GET /v1/models` (and `/models`). The
`model` a request names is recorded but does not route: the session's governor decides, and the
answer's `model` is the one that really answered. The request's other fields (`tools`, `tool_choice`,
`temperature`, `max_tokens`, `stop`, `response_format`, ...) go to `forward` as they came, and with a
relaying forward (`governed.Relay`) on to the model server; its answer's choices come back as the
server sent them (content, tool calls, finish reason). The model server is always asked for the whole
answer; `stream: true` is answered as Server-Sent Events in OpenAI's chunk shape, because most agent
clients stream by default: per choice a chunk with the role and content, one per tool call (its index,
id, name and whole arguments), then one with the finish reason and usage, then `[DONE]`. A
`ModelError` becomes its status through `errors.http_answer` (429 with `Retry-After` when no model can
take a request before then). Runs inside the daemon's event loop (`models/asgi.py`: uvicorn's
`Server.serve` as a task); the daemon keeps its own signal handlers.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pydantic
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ohd.clock import Clock
from ohd.errors import ModelError, RateLimited, http_answer
from ohd.models.asgi import Served
from ohd.models.llm import Completion

log = logging.getLogger("ohd.proxy")

Forward = Callable[[list[dict[str, Any]], dict[str, Any]], Awaitable[Completion]]
MAX_BODY_BYTES = 4 * 1024 * 1024   # an agent's whole context fits many times; anything larger is refused (413)
STOP_GRACE_S = 5.0                 # requests in flight at a stop get this long to finish
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}


@dataclass
class Grant:
    """One agent run's session: its token, the requests answered through it and the models that answered."""

    token: str = field(repr=False)
    requests: int = 0
    models_used: list[str] = field(default_factory=list)


@dataclass
class _Session:
    grant: Grant
    forward: Forward
    models: list[str]


class _Body(pydantic.BaseModel):
    """What the proxy reads of a chat completion request; other fields pass to `forward` as they are."""

    model_config = pydantic.ConfigDict(extra="allow")

    model: str = ""
    messages: list[dict[str, Any]] = pydantic.Field(min_length=1)
    stream: bool = False

    @pydantic.field_validator("messages")
    @classmethod
    def _roles(cls, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for n, message in enumerate(messages):
            if not isinstance(message.get("role"), str):
                raise ValueError(f"message {n} has no role")
            if not isinstance(message.get("content"), str | list | None):
                raise ValueError(f"message {n}'s content is neither text nor a list of parts")
        return messages


class _Refusal(Exception):
    """A request answered with an error before any model is asked."""

    def __init__(self, status: int, message: str, code: str) -> None:
        self.status, self.message, self.code = status, message, code
        super().__init__(message)


class Proxy:
    """The server and its sessions; `start` binds 127.0.0.1 on a free port (`base_url` after it)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._sessions: dict[str, _Session] = {}
        self._served: Served | None = None
        self._port: int | None = None
        self.app = Starlette(routes=[
            Route(path, self._chat, methods=["POST"]) for path in ("/v1/chat/completions", "/chat/completions")
        ] + [Route(path, self._models, methods=["GET"]) for path in ("/v1/models", "/models")])

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self._served = served = Served(self.app, "127.0.0.1", 0, name="ohd-proxy", grace_s=STOP_GRACE_S)
        try:
            await served.start()
        except OSError as exc:
            self._served = None
            raise OSError(f"the agent proxy could not start on 127.0.0.1: {exc}") from exc
        self._port = served.port
        log.info("agent proxy listening on %s", self.base_url)

    async def stop(self) -> None:
        served, self._served = self._served, None
        if served is not None:
            await served.stop()
        self._port = None

    @property
    def base_url(self) -> str:
        if self._port is None:
            raise RuntimeError("the agent proxy is not started")
        return f"http://127.0.0.1:{self._port}/v1"

    # -- sessions --------------------------------------------------------------------

    def open(self, forward: Forward, models: list[str]) -> Grant:
        """A session for one agent run: its token works until `close`."""
        grant = Grant(token=secrets.token_urlsafe(32))
        self._sessions[grant.token] = _Session(grant, forward, list(models))
        return grant

    def close(self, grant: Grant) -> None:
        """The grant's token stops working at once (requests in flight finish)."""
        self._sessions.pop(grant.token, None)

    def _session(self, request: Request) -> _Session:
        """The session whose token the request carries (compared in constant time), or a 401."""
        headers = request.headers
        auth = headers.get("authorization", "")
        scheme, _, bearer = auth.partition(" ")
        offered = bearer.strip() if scheme.lower() == "bearer" else ""
        offered = offered or headers.get("api-key", "") or headers.get("x-api-key", "")
        found = None
        for token, session in list(self._sessions.items()):
            if offered and hmac.compare_digest(token.encode(), offered.encode()):
                found = session
        if found is None:
            raise _Refusal(401, "unknown or closed token: use the key ohd gave this run", "invalid_api_key")
        return found

    # -- routes ------------------------------------------------------------------------

    async def _models(self, request: Request) -> Response:
        try:
            session = self._session(request)
        except _Refusal as refusal:
            return _error(refusal.status, refusal.message, refusal.code)
        return JSONResponse({"object": "list", "data": [
            {"id": model, "object": "model", "created": 0, "owned_by": "ohd"} for model in session.models]})

    async def _chat(self, request: Request) -> Response:
        try:
            session = self._session(request)
            body = _parse(await _read(request))
        except _Refusal as refusal:
            return _error(refusal.status, refusal.message, refusal.code)
        params = {k: v for k, v in (body.model_extra or {}).items()}
        if body.model:
            params["model"] = body.model      # recorded, never routed on
        try:
            completion = await session.forward(body.messages, params)
        except ModelError as exc:
            return self._failure(exc)
        grant = session.grant
        grant.requests += 1
        if completion.answered_by not in grant.models_used:
            grant.models_used.append(completion.answered_by)
        log.debug("agent request answered by %s (asked for %r)", completion.answered_by, body.model)
        answer = _Answer(completion, f"chatcmpl-{secrets.token_hex(12)}", int(self.clock.now().timestamp()))
        if body.stream:
            return Response(answer.events(), media_type="text/event-stream",
                            headers={"cache-control": "no-cache"})
        return JSONResponse(answer.body())

    def _failure(self, exc: ModelError) -> Response:
        status, info = http_answer(exc)
        headers = {}
        if isinstance(exc, RateLimited):
            wait = (exc.reset_at - self.clock.now()).total_seconds()
            headers["retry-after"] = str(max(1, math.ceil(wait)))
        code = "context_length_exceeded" if exc.error_class == "context_overflow" else exc.error_class
        return _error(status, str(info["error"]), code, headers)


@dataclass(frozen=True)
class _Answer:
    completion: Completion
    ident: str
    created: int

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.ident, "object": kind, "created": self.created, "model": self.completion.answered_by}

    def _usage(self) -> dict[str, int]:
        c = self.completion
        return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                "total_tokens": c.prompt_tokens + c.completion_tokens}

    def _choices(self) -> list[dict[str, Any]]:
        """The answer's choices: the server's as it sent them (a relayed request), else the text."""
        c = self.completion
        if not c.choices:
            return [{"index": 0, "message": {"role": "assistant", "content": c.content},
                     "finish_reason": c.finish_reason or "stop"}]
        found = []
        for n, choice in enumerate(c.choices):
            message = choice.get("message")
            message = {"role": "assistant", **message} if isinstance(message, dict) else {"role": "assistant"}
            finish = choice.get("finish_reason") or ("tool_calls" if message.get("tool_calls") else "stop")
            found.append({**choice, "index": choice.get("index", n), "message": message, "finish_reason": finish})
        return found

    def body(self) -> dict[str, Any]:
        """The `chat.completion` object."""
        return {**self._head("chat.completion"), "usage": self._usage(), "choices": self._choices()}

    def events(self) -> bytes:
        """The same answer as Server-Sent Events (OpenAI's chunks): per choice its role and content
        (and any other field of its message), one chunk per tool call, its finish reason; the last
        chunk carries the usage; then `[DONE]`."""
        head = self._head("chat.completion.chunk")
        chunks: list[dict[str, Any]] = []
        choices = self._choices()
        for choice in choices:
            index, message = choice["index"], dict(choice["message"])
            calls = message.pop("tool_calls", None)
            chunks.append({**head, "choices": [{"index": index, "delta": message, "finish_reason": None}]})
            for n, call in enumerate(calls if isinstance(calls, list) else []):
                delta = {"tool_calls": [{"index": n, **call} if isinstance(call, dict) else call]}
                chunks.append({**head, "choices": [{"index": index, "delta": delta, "finish_reason": None}]})
        for n, choice in enumerate(choices):
            end = {"index": choice["index"], "delta": {}, "finish_reason": choice["finish_reason"]}
            chunks.append({**head, "choices": [end], **({"usage": self._usage()} if n == len(choices) - 1 else {})})
        lines = [f"data: {json.dumps(chunk)}\n\n" for chunk in chunks] + ["data: [DONE]\n\n"]
        return "".join(lines).encode()


async def _read(request: Request) -> bytes:
    """The request body, refused (413) past `MAX_BODY_BYTES` without reading the rest."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    chunks, size = [], 0
    stream: AsyncIterator[bytes] = request.stream()
    async for chunk in stream:
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large() -> _Refusal:
    return _Refusal(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", "request_too_large")


def _parse(raw: bytes) -> _Body:
    """The request's JSON, with at least one message; a 400 saying what is wrong otherwise."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Refusal(400, f"the body is not JSON: {exc}", "invalid_json") from None
    try:
        return _Body.model_validate(data)
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
        raise _Refusal(400, f"invalid chat completion request: {problems}", "invalid_request") from None


def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error shape, which agent clients read."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status,
                        headers=headers)
