"""Who may be answered by the web listener, decided from the request's head alone (pure).

The checks, in order, for every request:

1. **Host.** The `Host` header names this listener: its address, `localhost`, `127.0.0.1` or
   `[::1]`, with its port. Anything else is refused (421) before any other check: a page of
   another site that made its name resolve to 127.0.0.1 (DNS rebinding) gets nothing.
2. **Origin**, on a state-changing request (any method but GET, HEAD, OPTIONS): absent, or one of
   the origins above (`http://<allowed host>`); else 403. A browser always sends it on a
   cross-origin POST, so another site's form or script is refused even when the browser would
   send our cookie along.
3. **`/metrics`** is answered without the token when `metrics_public` (a scraper holds none).
4. **Login**: a GET with `?token=` sets the cookie and is sent (303) to the same URL without the
   token, so the token does not stay in the address bar or the history; a wrong one is a 401.
5. **The token**: `Authorization: Bearer <token>` or the `ohd_token` cookie; a state-changing
   request needs the header (a cookie is sent by the browser on its own, a header only by a page
   or a program that holds the token: no cross-site request forgery). 401 without it, 403 with
   the cookie alone. Tokens are compared with `hmac.compare_digest`.

Nothing here does I/O; the app turns a verdict into a response.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

COOKIE_NAME = "ohd_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
METRICS_PATH = "/metrics"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


@dataclass(frozen=True, slots=True)
class Refusal:
    """Not answered: the status and why (the body of a JSON error, as the socket's errors are)."""

    status: int
    message: str
    kind: str


@dataclass(frozen=True, slots=True)
class Login:
    """A valid `?token=`: set the cookie and redirect (303) to `location`."""

    location: str


Verdict = Refusal | Login | None      # None: answer it


def url_host(host: str) -> str:
    """A host as a URL or a Host header spells it (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def browse_host(host: str) -> str:
    """The host to open in a browser for a listener bound to `host` (any-address binds: loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host, url_host(host))


def base_url(host: str, port: int) -> str:
    return f"http://{browse_host(host)}:{port}"


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback address: only this machine can connect."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False        # a host name: it may resolve to anything


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """The Host header values that name this listener (lower case): the bound address and the
    loopback names with the port (and without it on port 80, where browsers leave it out)."""
    names = {url_host(host).lower(), browse_host(host).lower(), *LOOPBACK_NAMES}
    with_port = {f"{name}:{port}" for name in names}
    return frozenset(with_port | (names if port == 80 else set()))


def same_token(given: str, token: str) -> bool:
    """Constant-time comparison (bytes: `compare_digest` refuses non-ASCII text)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), token.encode("utf-8"))


def bearer(headers: Mapping[str, str]) -> str | None:
    """The token of `Authorization: Bearer <token>`, None without one."""
    scheme, _, value = (headers.get("authorization") or "").strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


@dataclass(frozen=True, slots=True)
class Guard:
    """The listener's checks (the module's docstring): `check` answers one request's head."""

    token: str
    hosts: frozenset[str]
    metrics_public: bool = True

    def check(self, method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str],
              cookie: str | None) -> Verdict:
        """`headers` with lower-case names; `query` the last value of each parameter."""
        host = (headers.get("host") or "").strip().lower()
        if host not in self.hosts:
            return Refusal(421, f"this listener does not answer for host {host or '(none)'!r}; use one of "
                                f"{', '.join(sorted(h for h in self.hosts if ':' in h))}", "WrongHost")
        unsafe = method.upper() not in SAFE_METHODS
        if unsafe and (refusal := self._origin(headers.get("origin"))) is not None:
            return refusal
        if path == METRICS_PATH and self.metrics_public and not unsafe:
            return None
        if "token" in query and not unsafe:
            return self._login(path, query)
        given = bearer(headers)
        if given is not None:
            return None if same_token(given, self.token) else Refusal(
                401, "the token in the Authorization header is wrong", "Unauthorized")
        if cookie is not None and same_token(cookie, self.token):
            if unsafe:
                return Refusal(403, f"{method} needs the token in the Authorization header (Bearer); "
                                    "the cookie alone is not enough for a change", "TokenHeaderRequired")
            return None
        why = "the token cookie is out of date" if cookie is not None else "no token"
        return Refusal(401, f"{why}: send Authorization: Bearer <token>, or open the URL `ohd dashboard` "
                            "prints", "Unauthorized")

    def _origin(self, origin: str | None) -> Refusal | None:
        if origin is None:
            return None         # not a browser's cross-origin request (browsers send it on those)
        if origin.strip().lower() in {f"http://{host}" for host in self.hosts}:
            return None
        return Refusal(403, f"cross-origin request refused (Origin {origin[:200]!r} is not this listener)",
                       "CrossOrigin")

    def _login(self, path: str, query: Mapping[str, str]) -> Verdict:
        if not same_token(query["token"], self.token):
            return Refusal(401, "the token in the URL is wrong (run `ohd dashboard` for the current one)",
                           "Unauthorized")
        rest = {key: value for key, value in query.items() if key != "token"}
        here = "/" + path.lstrip("/")       # never `//host/...`: a redirect off this listener
        return Login(here + (f"?{urlencode(rest)}" if rest else ""))
