"""A fake OpenRouter: a real HTTP server on 127.0.0.1 that speaks its API, scripted per test.

Serves `POST /api/v1/chat/completions`, `GET /api/v1/models` and `GET /api/v1/key` from
a thread pool (`ThreadingHTTPServer`, one thread per connection, HTTP/1.1 keep-alive),
so many concurrent requests are answered concurrently.

In a test::

    with FakeOpenRouter() as server:                   # or the `fake_openrouter` fixture
        server.script("model-a", [rate_limited(retry_after=60), ok("```python\\n...```")])
        client = ModelClient(http, server.url, "sk-test", clock)
        ...
        assert server.requests_for("model-a")[0].headers["authorization"] == "Bearer sk-test"

Each model has a queue of answers; when it is empty the server gives `default`
(an `ok(...)` answer unless changed); `script_catalogue` queues answers for `GET /models`
the same way (then the list of `models`). `rate_limit(n, window_s)` makes it enforce a
per-model sliding window (a 429 with `X-RateLimit-*` headers, reset in ms epoch), and
`latency_s` delays every answer. `tool_calls(...)` answers with calls of the request's tools
(content None, `finish_reason` "tool_calls"); every request's body is kept whole (`requests`),
so a test sees the parameters that arrived. An answer may echo what the client sent: `AUTH`
(the `Authorization` header), `KEY` (its bearer token), `KEY_TAIL` (the token after its
last '-') and `KEY_URL` (URL-encoded) are replaced in its body and header values;
`echo_key(...)` is an error that does so, `redirect(location)` a 3xx. Besides answers, a
script can hold faults of the connection itself: `never_answer()` (the request is read,
nothing is ever sent), `trickle()` (a 200's headers, then keep-alive whitespace forever),
`dropped()` (closed without an answer) and `truncated()` (closed half-way through the
body). As a process, for end-to-end tests::

    python -m tests.support.fake_openrouter --port 0 --latency-ms 200 [--rpm 20]

prints its base URL (``http://127.0.0.1:PORT/api/v1``) on the first stdout line and
serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

API_PREFIX = "/api/v1"
MODEL = "$MODEL"  # replaced by the requested model id when an answer is sent
GEN = "$GEN"  # replaced by a fresh generation id
AUTH = "$AUTH"  # replaced by the request's Authorization header (as sent)
KEY = "$KEY"  # ... by its bearer token
KEY_TAIL = "$KEY_TAIL"  # ... by the token after its last '-' (the key with its prefix cut)
KEY_URL = "$KEY_URL"  # ... by the token URL-encoded
DEFAULT_CONTENT = (
    "```python\n"
    "from shop.pricing import total\n\n\n"   # the test repos' module: the ladder runs this answer
    "def test_answer_from_fake_openrouter() -> None:\n"
    "    assert total([1.0, 1.0]) == 2.0\n"
    "```\n"
)
DEFAULT_MODELS = ("meta-llama/llama-3.3-70b-instruct:free", "qwen/qwen-2.5-coder-32b-instruct:free",
                  "mistralai/mistral-7b-instruct:free")


@dataclass(frozen=True)
class Answer:
    """One scripted answer: status, headers, a JSON body (or raw bytes), an extra delay; `fault`
    names what happens to the connection instead of a whole answer ("" = none; see `FAULTS`)."""

    status: int = 200
    json: Any = None
    raw: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    delay_s: float = 0.0
    fault: str = ""
    gate: threading.Event | None = None   # when set: sent only once the test sets this event (`held`)

    def render(self, model: str, generation: str, authorization: str = "") -> bytes:
        if self.raw is not None:
            return echoed(self.raw.decode("utf-8", "surrogateescape"), authorization).encode("utf-8", "surrogateescape")
        text = echoed(json.dumps(self.json), authorization, json_string=True)
        return text.replace(MODEL, json.dumps(model)[1:-1]).replace(GEN, generation).encode()


def echoed(text: str, authorization: str, *, json_string: bool = False) -> str:
    """`text` with the echo placeholders (`AUTH`, `KEY`, `KEY_TAIL`, `KEY_URL`) filled in."""
    token = authorization.removeprefix("Bearer ").strip()
    values = {KEY_TAIL: token.rsplit("-", 1)[-1], KEY_URL: urllib.parse.quote(token, safe=""), AUTH: authorization,
              KEY: token}     # the longer placeholders first: `$KEY` begins `$KEY_TAIL`
    for name, value in values.items():
        text = text.replace(name, json.dumps(value)[1:-1] if json_string else value)
    return text


# --- answers -----------------------------------------------------------------------------


def ok(content: str = DEFAULT_CONTENT, *, prompt_tokens: int = 100, completion_tokens: int = 50,
       cost: float | None = 0.0, finish_reason: str = "stop", usage: bool = True) -> Answer:
    body: dict[str, Any] = {
        "id": GEN, "model": MODEL, "provider": "FakeProvider", "object": "chat.completion",
        "created": 1767268800,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": finish_reason, "native_finish_reason": finish_reason}],
    }
    if usage:
        body["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}
        if cost is not None:
            body["usage"]["cost"] = cost
    return Answer(json=body)


def tool_calls(calls: Iterable[tuple[str, dict[str, Any]]], *, content: str | None = None,
               prompt_tokens: int = 120, completion_tokens: int = 30, cost: float | None = 0.0) -> Answer:
    """An answer that calls tools (OpenAI's shape, as OpenRouter relays it): `calls` are (function
    name, arguments), each with an id `call_<n>` and its arguments as a JSON string; `content`
    beside them (None, as most models send); `finish_reason` "tool_calls"."""
    answer = ok("", prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cost=cost,
                finish_reason="tool_calls")
    message = {"role": "assistant", "content": content, "tool_calls": [
        {"id": f"call_{n}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
        for n, (name, arguments) in enumerate(calls)]}
    answer.json["choices"][0]["message"] = message
    return answer


def error(status: int, message: str, *, headers: Iterable[tuple[str, str]] = (),
          metadata: dict[str, Any] | None = None) -> Answer:
    """OpenRouter's error shape: `{"error": {"code", "message", "metadata"?}}` with that status."""
    err: dict[str, Any] = {"code": status, "message": message}
    if metadata is not None:
        err["metadata"] = metadata
    return Answer(status=status, json={"error": err}, headers=tuple(headers))


def rate_limited(retry_after: float | str | None = None, reset_ms: int | str | None = None, *,
                 in_body: bool = False, message: str = "Rate limit exceeded: free-models-per-min") -> Answer:
    """A 429. `retry_after` (seconds or any raw string, e.g. an HTTP date) → `Retry-After`;
    `reset_ms` → `X-RateLimit-Reset` (in the headers, or in `error.metadata.headers` when
    `in_body`). Neither → a 429 with no hint at all (as OpenRouter sometimes sends)."""
    headers: list[tuple[str, str]] = []
    limit_headers: dict[str, str] = {}
    if retry_after is not None:
        headers.append(("Retry-After", str(retry_after)))
    if reset_ms is not None:
        limit_headers = {"X-RateLimit-Limit": "20", "X-RateLimit-Remaining": "0",
                         "X-RateLimit-Reset": str(reset_ms)}
    if in_body:
        return error(429, message, headers=headers, metadata={"headers": limit_headers})
    return error(429, message, headers=headers + list(limit_headers.items()))


def echo_key(status: int = 401, message: str = f"invalid credentials: {AUTH}") -> Answer:
    """An error that repeats the key: in its message (default: the whole `Authorization` header),
    in `error.metadata.raw` (URL-encoded) and in a response header."""
    return error(status, message, headers=(("X-Echo-Authorization", AUTH),),
                 metadata={"raw": f"upstream saw key={KEY_URL} ({KEY_TAIL})"})


def redirect(location: str, status: int = 307) -> Answer:
    """A redirect (the client must not follow it: the key would go with it)."""
    return Answer(status=status, json={"error": {"code": status, "message": f"moved to {location}"}},
                  headers=(("Location", location),))


def server_error(status: int = 500, message: str = "Internal Server Error") -> Answer:
    return error(status, message)


def not_found() -> Answer:
    return error(404, f"No endpoints found for {MODEL}.")


def error_in_200_body(message: str = "Provider returned error", code: int = 502) -> Answer:
    """The model started, then failed: status 200, the error in the body."""
    return Answer(json={"id": GEN, "model": MODEL, "object": "chat.completion",
                        "error": {"code": code, "message": message,
                                  "metadata": {"provider_name": "FakeProvider", "raw": "upstream fell over"}},
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": ""},
                                     "finish_reason": "error"}]})


def garbage(text: bytes = b"<html><body>502 Bad Gateway</body></html>", status: int = 200) -> Answer:
    return Answer(status=status, raw=text, headers=(("Content-Type", "text/html"),))


def no_choices() -> Answer:
    return Answer(json={"id": GEN, "model": MODEL, "object": "chat.completion", "choices": [],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 0, "total_tokens": 10}})


def slow(delay_s: float, answer: Answer | None = None) -> Answer:
    """`answer` (default `ok()`), sent after `delay_s` extra seconds."""
    base = answer or ok()
    return Answer(status=base.status, json=base.json, raw=base.raw, headers=base.headers,
                  delay_s=base.delay_s + delay_s)


def held(gate: threading.Event, answer: Answer | None = None) -> Answer:
    """`answer` (default `ok()`), sent once the test sets `gate`: the request is in, its answer waits."""
    base = answer or ok()
    return Answer(status=base.status, json=base.json, raw=base.raw, headers=base.headers,
                  delay_s=base.delay_s, gate=gate)


def empty_message() -> Answer:
    """A well-formed 200 whose assistant message is empty."""
    return ok("")


FAULTS = ("never", "trickle", "drop", "truncate")


def never_answer() -> Answer:
    """The request is read and nothing is ever sent back (until the server stops)."""
    return Answer(fault="never")


def trickle(every_s: float = 0.2) -> Answer:
    """A 200's headers (chunked), then a space every `every_s` forever: OpenRouter's keep-alive
    whitespace before a non-streamed answer, from a server that never gets to the answer."""
    return Answer(fault="trickle", delay_s=every_s)


def dropped() -> Answer:
    """The request is read, then the connection is closed without a byte of answer."""
    return Answer(fault="drop")


def truncated(answer: Answer | None = None) -> Answer:
    """`answer` (default `ok()`) announced whole (Content-Length), cut half-way, connection closed."""
    base = answer or ok()
    return Answer(status=base.status, json=base.json, raw=base.raw, headers=base.headers, fault="truncate")


# --- the server --------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """What the server received: headers keyed in lower case, the JSON body (or None)."""

    method: str
    path: str
    model: str | None
    headers: dict[str, str]
    body: Any
    at: float  # time.monotonic() on arrival
    status: int = 0  # what was answered


@dataclass
class _Window:
    limit: int
    window_s: float
    hits: dict[str, collections.deque[float]] = field(default_factory=dict)


class FakeOpenRouter:
    """The scripted server; start with `with FakeOpenRouter() as server:` or `start()`/`stop()`."""

    def __init__(self, *, latency_s: float = 0.0, rpm: int | None = None, api_key: str | None = None,
                 models: Iterable[str] = DEFAULT_MODELS, port: int = 0) -> None:
        self.latency_s = latency_s
        self.api_key = api_key  # when set, any other bearer token gets a 401
        self.models = list(models)
        self.default: Answer = ok()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._scripts: dict[str, collections.deque[Answer]] = {}
        self._catalogue_script: collections.deque[Answer] = collections.deque()
        self._requests: list[Request] = []
        self._window: _Window | None = _Window(rpm, 60.0) if rpm else None
        self._generation = 0
        self._httpd = _Server(("127.0.0.1", port), _Handler)
        self._httpd.fake = self
        self._thread: threading.Thread | None = None

    # scripting
    def script(self, model: str, answers: Iterable[Answer]) -> None:
        """Queue answers for `model`, given in order, one per request."""
        with self._lock:
            self._scripts.setdefault(model, collections.deque()).extend(answers)

    def script_catalogue(self, answers: Iterable[Answer]) -> None:
        """Queue answers for `GET /models` (e.g. `never_answer()`), one per request; then the real list."""
        with self._lock:
            self._catalogue_script.extend(answers)

    def rate_limit(self, limit: int | None, window_s: float = 60.0) -> None:
        """Allow `limit` requests per model per sliding `window_s`; None turns it off."""
        with self._lock:
            self._window = _Window(limit, window_s) if limit else None

    def remaining(self, model: str) -> int:
        """Scripted answers not yet used for `model`."""
        with self._lock:
            return len(self._scripts.get(model, ()))

    # inspection
    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def requests_for(self, model: str) -> list[Request]:
        return [request for request in self.requests if request.model == model]

    def completions(self) -> list[Request]:
        return [request for request in self.requests if request.path.endswith("/chat/completions")]

    # lifecycle
    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """The base URL to give a client (`.../api/v1`)."""
        return f"http://127.0.0.1:{self.port}{API_PREFIX}"

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-openrouter", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes handlers that are sleeping out a delay
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # called by the handler threads
    def _next_generation(self) -> str:
        with self._lock:
            self._generation += 1
            return f"gen-{self._generation:06d}"

    def _record(self, request: Request) -> None:
        with self._lock:
            self._requests.append(request)

    def _answer_completion(self, model: str) -> Answer:
        """The rate-limit window first (a limited request consumes no scripted answer), then the script."""
        with self._lock:
            limited = self._over_limit(model)
            if limited is not None:
                return limited
            queue = self._scripts.get(model)
            return queue.popleft() if queue else self.default

    def _over_limit(self, model: str) -> Answer | None:
        window = self._window
        if window is None:
            return None
        now = time.monotonic()
        hits = window.hits.setdefault(model, collections.deque())
        while hits and hits[0] <= now - window.window_s:
            hits.popleft()
        if len(hits) < window.limit:
            hits.append(now)
            return None
        reset_ms = int((time.time() + hits[0] + window.window_s - now) * 1000)
        return error(429, "Rate limit exceeded: free-models-per-min", headers=(
            ("X-RateLimit-Limit", str(window.limit)), ("X-RateLimit-Remaining", "0"),
            ("X-RateLimit-Reset", str(reset_ms))))

    def _authorized(self, headers: dict[str, str]) -> bool:
        return self.api_key is None or headers.get("authorization") == f"Bearer {self.api_key}"

    def _catalogue(self) -> Answer:
        with self._lock:
            if self._catalogue_script:
                return self._catalogue_script.popleft()
        data = [{"id": model, "name": model, "created": 1767268800, "description": "fake",
                 "context_length": 32768, "architecture": {"modality": "text->text"},
                 "pricing": {"prompt": "0", "completion": "0", "request": "0"},
                 "top_provider": {"context_length": 32768, "max_completion_tokens": 4096, "is_moderated": False},
                 "supported_parameters": ["max_tokens", "temperature"]} for model in self.models]
        return Answer(json={"data": data})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # benchmarks open many connections at once
    fake: FakeOpenRouter


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, the second waits for the
    # client's delayed ACK (~40 ms) and every answer looks 40 ms slower than it is.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet; tests inspect `requests` instead

    def do_GET(self) -> None:
        self._serve(None)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self._serve(self.rfile.read(length) if length else b"")

    def _serve(self, raw: bytes | None) -> None:
        fake = self.server.fake
        headers = {name.lower(): value for name, value in self.headers.items()}
        body = _decode(raw)
        model = body.get("model") if isinstance(body, dict) and isinstance(body.get("model"), str) else None
        answer = self._route(fake, headers, model)
        fake._record(Request(self.command, self.path, model, headers, body, time.monotonic(), answer.status))
        if answer.fault:
            self._fault(fake, answer, model or "")
            return
        if answer.gate is not None:
            while not answer.gate.wait(0.05):
                if fake._stopping.is_set():
                    self.close_connection = True
                    return
        delay = fake.latency_s + answer.delay_s
        if delay > 0 and fake._stopping.wait(delay):
            self.close_connection = True
            return
        authorization = headers.get("authorization", "")
        self._send(answer.status, answer.render(model or "", fake._next_generation(), authorization), answer,
                   authorization)

    def _route(self, fake: FakeOpenRouter, headers: dict[str, str], model: str | None) -> Answer:
        route = (self.command, self.path.split("?", 1)[0].rstrip("/"))
        if route == ("POST", API_PREFIX + "/chat/completions"):
            if not fake._authorized(headers):
                return error(401, "No auth credentials found")
            if model is None:
                return error(400, "Input required: model")
            return fake._answer_completion(model)
        if route == ("GET", API_PREFIX + "/models"):
            return fake._catalogue()
        if route == ("GET", API_PREFIX + "/key"):
            return Answer(json={"data": {"label": "fake", "limit": None, "usage": 0, "is_free_tier": True}})
        return error(404, f"Not Found: {self.command} {self.path}")

    def _fault(self, fake: FakeOpenRouter, answer: Answer, model: str) -> None:
        """A connection-level fault (`FAULTS`); the connection is closed afterwards in every case."""
        self.close_connection = True
        try:
            if answer.fault == "never":
                fake._stopping.wait()
            elif answer.fault == "trickle":
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                while not fake._stopping.wait(answer.delay_s):
                    self.wfile.write(b"1\r\n \r\n")
                    self.wfile.flush()
            elif answer.fault == "truncate":
                payload = answer.render(model, fake._next_generation())
                self.send_response(answer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
            # "drop": nothing is sent
        except (BrokenPipeError, ConnectionResetError):
            pass    # the client gave up (its deadline), as it should

    def _send(self, status: int, payload: bytes, answer: Answer, authorization: str = "") -> None:
        try:
            self.send_response(status)
            names = {name.lower() for name, _ in answer.headers}
            if "content-type" not in names:
                self.send_header("Content-Type", "application/json")
            for name, value in answer.headers:
                self.send_header(name, echoed(value, authorization))
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (e.g. its timeout fired)


def _decode(raw: bytes | None) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


# --- as a process ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.fake_openrouter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0, help="0 = any free port (default)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay of every answer")
    parser.add_argument("--rpm", type=int, default=None, help="per-model requests per 60 s sliding window")
    parser.add_argument("--content-file", default=None, help="the assistant text of every answer")
    parser.add_argument("--api-key", default=None, help="require this bearer token (else any or none)")
    parser.add_argument("--model", action="append", default=None, help="ids for GET /models (repeatable)")
    args = parser.parse_args(argv)
    server = FakeOpenRouter(latency_s=args.latency_ms / 1000, rpm=args.rpm, api_key=args.api_key,
                            models=args.model or DEFAULT_MODELS, port=args.port)
    if args.content_file:
        with open(args.content_file, encoding="utf-8") as handle:
            server.default = ok(handle.read())
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with server:
        print(server.url, flush=True)
        while not stop.wait(0.5):
            pass
    completions = server.completions()
    print(f"served {len(completions)} completion request(s)", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
