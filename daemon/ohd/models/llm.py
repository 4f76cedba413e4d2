"""Model calls: an OpenAI-compatible chat-completions client, and the offline provider.

`ModelClient` talks to OpenRouter or any OpenAI-compatible server (Ollama, vLLM,
LM Studio) through the `httpx.AsyncClient` it is given. Invariant: every failure
leaves this room as an `errors.ModelError` subclass, classified here and nowhere
else (status codes, httpx exceptions and error bodies never travel further).
Transient failures (`ServerError`, `ModelTimeout`) are retried with tenacity on the
injected clock; everything else is raised at once. The API key goes into the
`Authorization` header and nowhere else: never into a log line or an exception. A
server may echo it (in an error body, a header, an answer): every text that leaves this
room from a server (error messages, the model list) has it masked by `logfmt.Redactor`,
and an answer whose body repeats it is refused as `MalformedAnswer` (nothing of it is
used or stored). Redirects are never followed: the key would travel with the request.
Each request to a model (each retry too, and the offline provider's answer) is logged
once, by `_log_call`, with `model` and `outcome` as fields; the task comes from the
pool's `logfmt.task_context`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import astuple, dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from ohd.clock import Clock
from ohd.core.tasktypes import Job
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
from ohd.logfmt import CURRENT_TASK, Redactor
from ohd.models import offline

log = logging.getLogger("ohd.llm")

DEFAULT_COOLDOWN = timedelta(seconds=60)
MIN_COOLDOWN = timedelta(seconds=1)
MAX_COOLDOWN = timedelta(hours=1)
LIST_MODELS_TIMEOUT_S = 30.0
MAX_MESSAGE_CHARS = 400   # of an error message (cut after the key is masked: no piece of it stays)
OFFLINE_MODEL = "offline"
# What of an agent's request `ModelClient.relay` does not send on: the model is the governor's choice,
# the answer is asked for whole (the proxy streams it to the agent), and OpenRouter's own fallbacks
# (`models`, `route`) would send the request to models the governor never chose
NOT_RELAYED = frozenset({"model", "messages", "stream", "stream_options", "models", "route"})
# A 404 for a request a model cannot serve as asked (OpenRouter: "No endpoints found that support
# tool use"): that model refuses this request, it is not gone
UNSUPPORTED = re.compile(r"no endpoints? found that supports?\b", re.IGNORECASE)
# How servers word a prompt that does not fit (llama.cpp, OpenAI, vLLM, OpenRouter, Ollama)
CONTEXT_OVERFLOW = re.compile(r"context (size|length|window)|maximum context|too many tokens|prompt is too long"
                              r"|input is too long|exceeds the (available )?context", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Completion:
    """One successful answer. `model` is the model that was asked (as routing knows it); `served`
    the one the server says answered (its `model` field; None when it names none)."""

    model: str
    content: str
    prompt_tokens: int
    completion_tokens: int
    cost: float | None
    latency_ms: int
    finish_reason: str | None
    generation_id: str | None
    served: str | None = None
    # a relayed request's answer (`ModelClient.relay`): the server's choices as it sent them (the
    # message with its tool calls, the finish reason); None for ohd's own calls
    choices: tuple[dict[str, Any], ...] | None = None

    @property
    def answered_by(self) -> str:
        """Who answered: the server's word, else the model asked."""
        return self.served or self.model


# --- rate-limit arithmetic (pure) -------------------------------------------------------


def reset_at(headers: Mapping[str, str], body: Any, now: datetime, attempt: int = 1) -> datetime:
    """When a rate-limited model may be asked again, from a 429's headers and body.

    `Retry-After` (seconds or an HTTP date) wins over `X-RateLimit-Reset` (a Unix
    timestamp in milliseconds, from the headers or from `error.metadata.headers`).
    Without a usable, future hint the default is 60 s, doubled for each further
    consecutive `attempt`. The result always lies in [now + 1 s, now + 1 h].
    """
    hints = _lowered(_metadata_headers(body)) | _lowered(headers)
    found = _from_retry_after(hints.get("retry-after"), now) or _from_reset_ms(hints.get("x-ratelimit-reset"), now)
    if found is None:
        until = now + DEFAULT_COOLDOWN * (1 << min(max(attempt, 1) - 1, 6))
        log.debug("rate limit without a usable reset hint; cooling down until %s", until.isoformat())
    else:
        until = found
    return min(max(until, now + MIN_COOLDOWN), now + MAX_COOLDOWN)


def rate_limit(headers: Mapping[str, str], body: Any) -> int | None:
    """`X-RateLimit-Limit` of a 429 (headers, else `error.metadata.headers`); None if absent or garbage."""
    value = (_lowered(_metadata_headers(body)) | _lowered(headers)).get("x-ratelimit-limit")
    number = _finite(value) if value else None
    return int(number) if number is not None and 1 <= number <= 1_000_000 else None


def _lowered(headers: Mapping[str, Any]) -> dict[str, str]:
    return {str(name).lower(): str(value).strip() for name, value in headers.items()}


def _metadata_headers(body: Any) -> Mapping[str, Any]:
    """OpenRouter may repeat the rate-limit headers in `error.metadata.headers`."""
    error = body.get("error") if isinstance(body, dict) else None
    metadata = error.get("metadata") if isinstance(error, dict) else None
    headers = metadata.get("headers") if isinstance(metadata, dict) else None
    return headers if isinstance(headers, dict) else {}


def _from_retry_after(value: str | None, now: datetime) -> datetime | None:
    if not value:
        return None
    seconds = _finite(value)
    if seconds is not None:
        return now + timedelta(seconds=seconds) if seconds >= 0 else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when if when > now else None


def _from_reset_ms(value: str | None, now: datetime) -> datetime | None:
    stamp = _finite(value) if value else None
    if stamp is None:
        return None
    # OpenRouter sends milliseconds; a value that only makes sense as seconds is taken as such.
    seconds = stamp / 1000 if stamp >= 1e11 else stamp
    try:
        when = datetime.fromtimestamp(seconds, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return when if when > now else None


def _finite(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


# --- the client -------------------------------------------------------------------------


def http_client(proxy: str = "") -> httpx.AsyncClient:
    """The HTTP client for the model server. `HTTP_PROXY`, `ALL_PROXY` and the other proxy variables
    are ignored (`trust_env=False`): the key would go to whatever proxy the environment names, in
    clear for an `http://` base URL. `proxy` (the `proxy` setting) is the only proxy used; CA bundles
    named by `SSL_CERT_FILE` / `SSL_CERT_DIR` still apply."""
    return httpx.AsyncClient(trust_env=False, proxy=proxy or None, verify=httpx.create_ssl_context())


class ModelClient:
    """Chat completions over HTTP, one classified outcome per call."""

    def __init__(self, http: httpx.AsyncClient, base_url: str, api_key: str | None, clock: Clock,
                 *, app_url: str = "", app_title: str = "ohd", max_tokens: int = 4096,
                 temperature: float = 0.2, retries: int = 2,
                 before_retry: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.http = http
        self.base_url = base_url.rstrip("/")
        self.clock = clock
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.retries = max(0, retries)
        self._headers = _request_headers(api_key, app_url, app_title)
        self._redactor = Redactor([api_key] if api_key else [])
        self._rate_limit_streak: dict[str, int] = {}
        self._rate_limits_seen: dict[str, int] = {}   # 429s received per model, ever
        # awaited before each retry (e.g. the quotas reserving a request slot); may raise a ModelError
        self.before_retry = before_retry

    def __repr__(self) -> str:  # never show the headers (they hold the key)
        return f"ModelClient(base_url={self.base_url!r})"

    async def complete(self, model: str, messages: list[dict[str, str]], timeout_s: float) -> Completion:
        """Ask `model`; transient failures are retried `retries` times, then raised."""
        body = {"model": model, "messages": messages, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "usage": {"include": True}}
        return await self._retried(model, body, timeout_s, relayed=False)

    async def relay(self, model: str, messages: list[dict[str, Any]], params: Mapping[str, Any],
                    timeout_s: float) -> Completion:
        """Ask `model` an agent's request as it came: its messages whole (tool calls and tool results
        included) and its other fields (`tools`, `tool_choice`, `temperature`, `max_tokens`, `stop`,
        `response_format`, ...) sent on, but for `NOT_RELAYED`; `max_tokens` is ohd's when the agent
        sets no bound. The answer's choices come back as the server sent them (`Completion.choices`):
        an answer that is only tool calls is an answer. Retried, classified and logged as `complete`."""
        body = {name: value for name, value in params.items() if name not in NOT_RELAYED}
        body["model"], body["messages"] = model, messages
        usage = body.get("usage")
        body["usage"] = {**usage, "include": True} if isinstance(usage, dict) else {"include": True}
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = self.max_tokens
        return await self._retried(model, body, timeout_s, relayed=True)

    async def _retried(self, model: str, body: dict[str, Any], timeout_s: float, *, relayed: bool) -> Completion:
        async for attempt in self._retrying():
            with attempt:
                number = attempt.retry_state.attempt_number
                if number > 1 and self.before_retry is not None:
                    await self.before_retry(model)      # a retry is one more request to the server
                return await self._complete_once(model, body, timeout_s, number, relayed=relayed)
        raise AssertionError("unreachable: tenacity re-raises the last failure")

    async def list_models(self) -> list[dict[str, Any]]:
        """The server's model catalogue (`GET {base_url}/models` → its `data` list)."""
        async for attempt in self._retrying():
            with attempt:
                return await self._list_models_once()
        raise AssertionError("unreachable: tenacity re-raises the last failure")

    def _retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            retry=retry_if_exception(_transient),
            stop=stop_after_attempt(self.retries + 1),
            wait=wait_exponential_jitter(initial=1, max=30, jitter=1),
            sleep=self.clock.sleep,
            reraise=True,
            before_sleep=_log_retry,
        )

    async def _complete_once(self, model: str, body: dict[str, Any], timeout_s: float, attempt: int = 1, *,
                             relayed: bool = False) -> Completion:
        """One request, logged once whatever its outcome."""
        started, seen = self.clock.monotonic(), self._rate_limits_seen.get(model, 0)
        try:
            response = await self._send(model, "POST", "/chat/completions", timeout_s, body)
            latency_ms = max(0, round((self.clock.monotonic() - started) * 1000))
            self._raise_for_status(model, response, seen)
            completion = self._unechoed(_completion(model, response, latency_ms, relayed))
        except (ModelError, asyncio.CancelledError) as exc:
            if isinstance(exc, ModelError):
                self._redact(exc)   # before anything reads it: the log line, the store, a report
            _log_call(model, attempt, self.clock.monotonic() - started, None, exc)
            raise
        self._rate_limit_streak.pop(model, None)
        _log_call(model, attempt, latency_ms / 1000, completion, None)
        return completion

    async def _list_models_once(self) -> list[dict[str, Any]]:
        try:
            response = await self._send("models", "GET", "/models", LIST_MODELS_TIMEOUT_S, None)
            self._raise_for_status("models", response)
        except ModelError as exc:
            self._redact(exc)
            raise
        body = _json(response)
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise MalformedAnswer("models", "the model list has no 'data' array")
        # ids, names and descriptions go to the routing state, `ohd status` and the log
        return [self._scrubbed(entry) for entry in data if isinstance(entry, dict)]

    def _redact(self, exc: ModelError) -> None:
        """Mask the key in `exc`'s message (a server's error body, a header it quotes, a library's words),
        then cut it to `MAX_MESSAGE_CHARS` (in that order: a cut through the key would leave a piece)."""
        exc.message = self._redactor.redact(exc.message)[:MAX_MESSAGE_CHARS]

    def _scrubbed(self, value: Any) -> Any:
        """A decoded JSON value with the key masked in every string of it."""
        if isinstance(value, str):
            return self._redactor.redact(value)
        if isinstance(value, list):
            return [self._scrubbed(item) for item in value]
        if isinstance(value, dict):
            return {self._scrubbed(name): self._scrubbed(item) for name, item in value.items()}
        return value

    def _unechoed(self, completion: Completion) -> Completion:
        """The answer, unless it repeats the key (a server or model echoing what it was sent, or a
        prompt injection at work): then nothing of it is used, stored or written."""
        fields = [*astuple(completion), json.dumps(completion.choices) if completion.choices else None]
        if any(isinstance(field, str) and self._redactor.holds(field) for field in fields):
            raise MalformedAnswer(completion.model, "the answer repeats the API key ohd sent; it is not used "
                                                    "(nor stored) and the model is asked again")
        return completion

    async def _send(self, model: str, method: str, path: str, timeout_s: float,
                    body: dict[str, Any] | None) -> httpx.Response:
        """One HTTP exchange; transport failures become `ModelError`s (without the key)."""
        try:
            # httpx's timeout bounds each phase; asyncio's bounds the whole exchange (a trickle).
            async with asyncio.timeout(timeout_s):
                return await self.http.request(method, self.base_url + path, json=body, headers=self._headers,
                                               timeout=httpx.Timeout(timeout_s), follow_redirects=False)
        except (httpx.TimeoutException, TimeoutError) as exc:
            raise ModelTimeout(model, f"no answer within {timeout_s:g} s ({type(exc).__name__})") from exc
        except httpx.LocalProtocolError:
            # h11 quotes the offending header value, which may be the key: drop the cause.
            raise AuthFailed(model, "the request could not be sent (malformed header)") from None
        except httpx.DecodingError as exc:
            raise MalformedAnswer(model, f"the answer could not be decoded: {type(exc).__name__}") from exc
        except httpx.ConnectError as exc:       # refused, no route, unknown host: nothing was sent
            raise Unreachable(model, f"cannot connect to {self.base_url} ({_reason(exc)})") from exc
        except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as exc:   # reset, closed
            raise Unreachable(model, f"the connection to {self.base_url} was dropped ({_reason(exc)})",
                              sent=True) from exc
        except httpx.RequestError as exc:
            raise ServerError(model, f"connection failed: {type(exc).__name__}") from exc

    def _raise_for_status(self, model: str, response: httpx.Response, seen: int | None = None) -> None:
        """Raise the classified error; `seen` = the model's 429 count when the request was sent."""
        status = response.status_code
        if 200 <= status < 300:
            return
        body = _json(response)
        message = f"HTTP {status}: {_error_message(body, response)}"
        if 300 <= status < 400:
            raise BadRequest(model, f"HTTP {status}: ohd follows no redirect (the API key would go with it); set "
                                    f"base_url to the address that answers: {response.headers.get('location', '?')}")
        if status == 429:
            count = self._rate_limits_seen.get(model, 0)
            self._rate_limits_seen[model] = count + 1
            streak = self._rate_limit_streak.get(model, 0)
            # Only a 429 to a request sent after the previous 429 arrived is a repeat: requests
            # in flight together must not double the default wait once each.
            streak += 1 if seen is None or seen == count or streak == 0 else 0
            self._rate_limit_streak[model] = streak
            until = reset_at(response.headers, body, self.clock.now(), attempt=streak)
            raise RateLimited(model, until, message, limit=rate_limit(response.headers, body))
        error = _status_error(status)
        if error is BadRequest and CONTEXT_OVERFLOW.search(message):
            error = ContextOverflow
        if error is ModelGone and UNSUPPORTED.search(message):
            error = Refused
        raise error(model, message)


def _transient(exc: BaseException) -> bool:
    """Retried here: 5xx, timeouts, a dropped connection; not a refused one (the breaker waits for
    the server and its probe decides), nor anything that will not change on a retry."""
    return isinstance(exc, ServerError) and not (isinstance(exc, Unreachable) and not exc.sent)


def _reason(exc: httpx.RequestError) -> str:
    """The OS's words for a transport failure ('Connection refused'), else httpx's, else its class."""
    cause: BaseException | None = exc
    for _ in range(8):      # httpx wraps httpcore, which wraps anyio's wrap of the OSError
        if cause is None:
            break
        if isinstance(cause, OSError) and (cause.errno or cause.strerror):
            return os.strerror(cause.errno) if cause.errno else str(cause.strerror)
        cause = cause.__cause__ or cause.__context__
    text = str(exc).strip()
    return text or type(exc).__name__


def _status_error(status: int) -> type[ModelError]:
    """The exception class for a non-2xx, non-429 status."""
    if status == 401:
        return AuthFailed
    if status in (402, 403):        # per model: a free model, another provider may still answer
        return Refused
    if status == 404:
        return ModelGone
    if status == 408:
        return ModelTimeout
    if status >= 500:
        return ServerError
    return BadRequest  # 400, 413, 422 and any other status that will not change on a retry


def _request_headers(api_key: str | None, app_url: str, app_title: str) -> dict[str, str]:
    headers = {"Accept": "application/json"}
    key = (api_key or "").strip()
    if key:
        if not key.isascii() or not key.isprintable() or " " in key:
            raise ConfigError("the API key contains characters that cannot be sent in an HTTP header")
        headers["Authorization"] = f"Bearer {key}"
    if app_url:
        headers["HTTP-Referer"] = app_url
    if app_title:
        headers["X-Title"] = app_title
    return headers


def _log_call(model: str, attempt: int, seconds: float, completion: Completion | None,
              error: BaseException | None) -> None:
    """The one line of one request: ok (latency, tokens), rate_limited (until when), the error
    class, or cancelled (the task was cancelled or the daemon stopped while it waited)."""
    ms = max(0, round(seconds * 1000))
    retry = f" (retry {attempt - 1})" if attempt > 1 else ""
    extra: dict[str, Any] = {"model": model, "task_id": CURRENT_TASK.get()}
    if completion is not None:
        log.info("model %s: ok in %d ms, %d prompt + %d completion tokens%s", model, ms,
                 completion.prompt_tokens, completion.completion_tokens, retry, extra=extra | {"outcome": "ok"})
    elif isinstance(error, RateLimited):
        until = error.reset_at.isoformat(timespec="seconds")
        log.info("model %s: rate_limited until %s%s: %s", model, until, retry, error.message,
                 extra=extra | {"outcome": error.error_class})
    elif isinstance(error, ModelError):
        log.warning("model %s: %s after %d ms%s: %s", model, error.error_class, ms, retry,
                    error.message or "no detail", extra=extra | {"outcome": error.error_class})
    else:
        log.info("model %s: cancelled after %d ms%s", model, ms, retry, extra=extra | {"outcome": "cancelled"})


def _log_retry(state: RetryCallState) -> None:
    """When tenacity will try again (the failed request itself was logged by `_log_call`)."""
    outcome = state.outcome
    error = outcome.exception() if outcome is not None else None
    delay = state.next_action.sleep if state.next_action is not None else 0.0
    log.debug("%s; retry %d in %.1f s", error, state.attempt_number, delay)


# --- reading an answer --------------------------------------------------------------------


def _json(response: httpx.Response) -> Any:
    """The decoded body, or None when it is not JSON."""
    try:
        return json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        return None


def _error_message(body: Any, response: httpx.Response) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        text = str(error.get("message") or "")
        metadata = error.get("metadata")
        if isinstance(metadata, dict) and metadata.get("raw"):
            text += f" (provider: {metadata['raw']})"
    elif error:
        text = str(error)
    else:
        text = response.text if body is None else json.dumps(body)
    return text.strip() or response.reason_phrase


def _completion(model: str, response: httpx.Response, latency_ms: int, relayed: bool = False) -> Completion:
    """Turn a 2xx answer into a `Completion`, or raise: a 200 can still be a failure. `relayed`: an
    agent's request, whose answer may be tool calls alone and keeps its choices whole."""
    body = _json(response)
    if not isinstance(body, dict):
        raise MalformedAnswer(model, "the answer is not a JSON object")
    if body.get("error"):
        raise ServerError(model, f"error inside a 200 answer: {_error_message(body, response)}")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise MalformedAnswer(model, "the answer has no choices")
    choice = choices[0]
    finish_reason = choice.get("finish_reason")
    if finish_reason == "error":
        raise ServerError(model, "the model stopped with finish_reason 'error'")
    message = choice.get("message")
    content = _content(message)
    calls = relayed and isinstance(message, dict) and bool(message.get("tool_calls") or message.get("function_call"))
    if not content.strip() and not calls:
        raise MalformedAnswer(model, f"the answer is empty (finish_reason {finish_reason!r})")
    usage: dict[str, Any] = body["usage"] if isinstance(body.get("usage"), dict) else {}
    generation_id, served = body.get("id"), body.get("model")
    return Completion(
        model=model, content=content, prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")), cost=_cost(usage.get("cost")),
        latency_ms=latency_ms, finish_reason=finish_reason if isinstance(finish_reason, str) else None,
        generation_id=generation_id if isinstance(generation_id, str) else None,
        served=served.strip() if isinstance(served, str) and served.strip() else None,
        choices=tuple(c for c in choices if isinstance(c, dict)) if relayed else None)


def _content(message: Any) -> str:
    """The assistant text; some servers send a list of parts instead of a string."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _cost(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        cost = float(value)
    except ValueError:
        return None
    return cost if math.isfinite(cost) and cost >= 0 else None


# --- no network -------------------------------------------------------------------------


class OfflineProvider:
    """Answers without a network, from `offline.answer(job)`; reported as model "offline"."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    async def complete(self, model: str, messages: list[dict[str, str]], timeout_s: float,
                       job: Job | None = None) -> Completion:
        if job is None:
            raise BadRequest(OFFLINE_MODEL, "the offline provider needs the job, not only messages")
        started = self.clock.monotonic()
        content = offline.answer(job)
        completion = Completion(
            model=OFFLINE_MODEL, content=content,
            prompt_tokens=sum(len(message.get("content", "").split()) for message in messages),
            completion_tokens=len(content.split()), cost=0.0,
            latency_ms=max(0, round((self.clock.monotonic() - started) * 1000)),
            finish_reason="stop", generation_id=None)
        _log_call(OFFLINE_MODEL, 1, completion.latency_ms / 1000, completion, None)
        return completion
