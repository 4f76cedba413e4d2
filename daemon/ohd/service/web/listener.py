"""The web listener's lifecycle: the app served on the configured address, in the daemon's loop.

Off unless `http_listen` names an address. It binds exactly that address; one that is not
loopback is the user's explicit choice and is said in a warning (anyone who can reach it can try
the token, and it travels in clear HTTP). A bind that fails is an OhdError naming the address.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from starlette.routing import BaseRoute

from ohd.errors import OhdError
from ohd.models.asgi import Served
from ohd.service.web.app import Dispatch, api_routes, build_app
from ohd.service.web.guard import Guard, allowed_hosts, base_url, is_loopback

log = logging.getLogger("ohd.web")

STOP_GRACE_S = 5.0      # requests in flight at a stop get this long


class WebListener:
    """The app on (host, port): `start` once it listens, `stop` at the daemon's stop."""

    def __init__(self, host: str, port: int, token: str, api: Dispatch, metrics: Callable[[], str], *,
                 metrics_public: bool = True, pages: Sequence[BaseRoute] = ()) -> None:
        self.host, self.port = host, port
        self.guard = Guard(token, allowed_hosts(host, port), metrics_public)
        self.app = build_app(self.guard, [*pages, *api_routes(api, metrics)])
        self._served = Served(self.app, host, port, name="ohd-web", grace_s=STOP_GRACE_S)

    @property
    def url(self) -> str:
        return base_url(self.host, self.port)

    async def start(self) -> None:
        try:
            await self._served.start()
        except OSError as exc:
            raise OhdError(f"the web listener cannot listen on {self.host}:{self.port} (http_listen): "
                           f"{exc}") from None
        if not is_loopback(self.host):
            log.warning("web listener on %s:%d, which is not a loopback address: whoever can reach it may try "
                        "the token, sent in clear HTTP; bind 127.0.0.1 unless you mean it", self.host, self.port)
        log.info("web listener on %s (API under /api/, /metrics %s)", self.url,
                 "public" if self.guard.metrics_public else "with the token")

    async def stop(self) -> None:
        await self._served.stop()
