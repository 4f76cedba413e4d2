"""The web listener's Starlette app: the guard in front of one route table.

`build_app(guard, routes)` wraps every request in `Guarded` (the `guard` module's checks, and
headers that keep the answers out of caches, frames and other sites' reach) and serves `routes`.
`api_routes(api, metrics)` is the table this slice serves: `/api/<path>` is the socket's API
(`ApiServer.dispatch`, the same handlers, JSON and statuses), `/metrics` the Prometheus text, `/`
a page that points at them. The dashboard adds its pages to the same list. Handlers that read the
store run in a thread (the store is blocking); the event loop only routes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ohd.service.server import MAX_BODY, METRICS_TYPE, Reply
from ohd.service.web.guard import COOKIE_NAME, METRICS_PATH, Guard, Login, Refusal

Dispatch = Callable[[str, str, bytes, str], Reply]     # the socket's `ApiServer.dispatch`: never raises
VIA = "web listener"        # the door its log lines name ("task 3 queued over the web listener")
API_PREFIX = "/api"
COOKIE_MAX_AGE_S = 30 * 24 * 3600
ALL_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH"]
# on every answer: never cached, never framed (no clickjacking of a button), no Referer with a URL
SECURITY_HEADERS = ((b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"),
                    (b"content-security-policy", b"default-src 'self'; frame-ancestors 'none'"))


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    """An error as the socket API words them: `{"error": ..., "kind": ...}`."""
    headers = {"WWW-Authenticate": 'Bearer realm="ohd"'} if status == 401 else None
    return JSONResponse({"error": message, "kind": kind}, status_code=status, headers=headers)


class Guarded:
    """ASGI middleware: the guard's verdict before the app sees a request; security headers after."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app, self.guard = app, guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":        # none are served; refused before anything is read
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        verdict = self.guard.check(request.method, request.url.path, dict(request.query_params),
                                   {k.lower(): v for k, v in request.headers.items()},
                                   request.cookies.get(COOKIE_NAME))

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *SECURITY_HEADERS]}
            await send(message)

        if isinstance(verdict, Refusal):
            await error_response(verdict.status, verdict.message, verdict.kind)(scope, receive, send_secured)
        elif isinstance(verdict, Login):
            response = RedirectResponse(verdict.location, status_code=303)
            response.set_cookie(COOKIE_NAME, self.guard.token, max_age=COOKIE_MAX_AGE_S, path="/",
                                httponly=True, samesite="strict")
            await response(scope, receive, send_secured)
        else:
            await self.app(scope, receive, send_secured)


def build_app(guard: Guard, routes: Sequence[BaseRoute]) -> Starlette:
    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        kind = {404: "NotFound", 405: "MethodNotAllowed"}.get(status, "HTTPError")
        return error_response(status, f"{request.method} {request.url.path}: "
                                      f"{exc.detail if isinstance(exc, HTTPException) else 'failed'}", kind)

    app = Starlette(routes=list(routes), exception_handlers={HTTPException: http_error})
    app.add_middleware(Guarded, guard=guard)
    return app


async def read_body(request: Request) -> bytes | None:
    """The body, or None past MAX_BODY (read no further than that)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def api_routes(api: Dispatch, metrics: Callable[[], str]) -> list[BaseRoute]:
    """`/api/<path>` (the socket's API), `/metrics`, and `/`."""

    async def call_api(request: Request) -> Response:
        body = await read_body(request)
        if body is None:
            return error_response(413, f"the body is larger than {MAX_BODY} bytes", "ApiError")
        target = request.url.path.removeprefix(API_PREFIX) or "/"
        if request.url.query:
            target += f"?{request.url.query}"
        method = "GET" if request.method == "HEAD" else request.method
        reply = await run_in_threadpool(api, method, target, body, VIA)
        return Response(reply.body, status_code=reply.status, media_type=reply.content_type)

    async def get_metrics(request: Request) -> Response:
        return Response(await run_in_threadpool(metrics), media_type=METRICS_TYPE)

    return [Route("/", home, methods=["GET"]), Route(METRICS_PATH, get_metrics, methods=["GET"]),
            Route(API_PREFIX + "/{path:path}", call_api, methods=ALL_METHODS)]


async def home(request: Request) -> Response:
    """What `/` shows until the dashboard exists: where the API and the metrics are."""
    links = [("/api/status", "status (JSON)"), ("/api/tasks", "tasks (JSON)"), ("/api/models", "models (JSON)"),
             (METRICS_PATH, "metrics (Prometheus)")]
    items = "".join(f'<li><a href="{href}">{text}</a></li>' for href, text in links)
    return HTMLResponse(f"<!doctype html><html><head><meta charset=utf-8><title>ohd</title></head>"
                        f"<body><h1>ohd</h1><ul>{items}</ul></body></html>")
