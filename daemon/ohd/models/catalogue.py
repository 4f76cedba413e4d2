"""The model catalogue: which models exist, which are free, and what the others cost.

A service room over a fetch of `GET /models` (`llm.ModelClient.list_models`) and the
store-backed governor. Each refresh reads the server's list and, only when it has the
expected shape, (1) gives the governor the models' prices (the budget's "has a price"),
(2) revives every model the governor marked dead (404) that is listed again, and (3) in
discovery mode has the pool's model list replaced by the free models it lists (on a server
you run, not OpenRouter, every model it lists without a price): (1) is swapped whole on the
event loop thread (the one the workers read it on), (2) reads the store in a thread, (3) is
done on the loop thread by `use_models`, the one writer of the pool's list (`live.Live`).
Invariant: a refresh that fails or returns garbage changes nothing (logged; the previous
list stays), and the pool's list is never emptied by a refresh. Refreshes run every
`refresh_s` seconds on the injected clock (a plain loop; no scheduler thread), every
`retry_s` while a discovered list has not been read yet (a server you run starts empty).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol, TypeVar

from ohd.clock import Clock, first
from ohd.core import routing
from ohd.errors import OhdError
from ohd.store.quotas import Governor

log = logging.getLogger("ohd.catalogue")
T = TypeVar("T")

Fetch = Callable[[], Awaitable[Any]]
ZERO = Decimal(0)
RETRY_S = 5.0   # a model list not read yet is asked for again this often


class HasModels(Protocol):
    """What holds the model list `auto` expands to (the pool): read at each use, changed by `use_models`."""

    models: list[str]


@dataclass(frozen=True, slots=True)
class Listing:
    """One model of the server's list; prices in USD per token, None when not given or garbage."""

    model: str
    prompt: Decimal | None = None
    completion: Decimal | None = None
    context: int | None = None      # tokens (`context_length`), None when not given

    @property
    def free(self) -> bool:
        """Free: no price above zero listed, and a `:free` id or a zero prompt AND completion price
        (the listed price wins over the name: a `:free` id with a price costs money)."""
        if any(p is not None and p > ZERO for p in (self.prompt, self.completion)):
            return False
        return routing.is_free(self.model) or (self.prompt == ZERO and self.completion == ZERO)

    def costs_nothing(self, unknown_price_paid: bool) -> bool:
        """`free`; or, on a server you run (`unknown_price_paid` False), no price above zero listed
        (Ollama, vLLM and LM Studio list their models without any `pricing`)."""
        if self.free:
            return True
        return not unknown_price_paid and all(p is None or p == ZERO for p in (self.prompt, self.completion))


def price(value: Any) -> Decimal | None:
    """A price as OpenRouter sends it (a decimal string; a number is accepted); None if not one."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        return None
    return amount if amount.is_finite() and amount >= ZERO else None


def context_length(entry: dict[str, Any]) -> int | None:
    """The model's context in tokens: `context_length`, else `top_provider.context_length`; None if neither."""
    top = entry.get("top_provider")
    for value in (entry.get("context_length"), top.get("context_length") if isinstance(top, dict) else None):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def parse(data: Any) -> list[Listing] | None:
    """The listings of a `/models` `data` array; None when it is not that shape at all.

    Entries without a string `id` are skipped; a missing or garbled `pricing` leaves the
    prices unknown (then only a `:free` id makes the model free). A list in which no entry
    has an id is garbage (None), so a broken answer never empties the catalogue.
    """
    if not isinstance(data, list):
        return None
    listings: list[Listing] = []
    for entry in data:
        model = entry.get("id") if isinstance(entry, dict) else None
        if not isinstance(model, str) or not model.strip():
            continue
        pricing = entry.get("pricing")
        pricing = pricing if isinstance(pricing, dict) else {}
        listings.append(Listing(model.strip(), price(pricing.get("prompt")), price(pricing.get("completion")),
                                context_length(entry)))
    if data and not listings:
        return None
    skipped = len(data) - len(listings)
    if skipped:
        log.warning("catalogue: %d entr%s without a model id skipped", skipped, "y" if skipped == 1 else "ies")
    return listings


class Catalogue:
    """Keeps the pool's model list and the governor's prices in step with the server."""

    def __init__(self, fetch: Fetch, governor: Governor, clock: Clock, pool: HasModels, *,
                 discover: bool = False, refresh_s: float = 3600.0, unknown_price_paid: bool = True,
                 retry_s: float = RETRY_S, on_change: Callable[[], Awaitable[None]] | None = None,
                 use_models: Callable[[list[str]], None] | None = None) -> None:
        if discover and use_models is None:
            raise ValueError("a discovering catalogue needs `use_models`, the writer of the pool's list")
        self.fetch = fetch
        self.governor = governor
        self.clock = clock
        self.pool = pool                # its `models` list is read; `use_models` replaces it (on the loop)
        self.use_models = use_models
        self.discover = discover
        self.refresh_s = refresh_s
        self.unknown_price_paid = unknown_price_paid   # False: a server you run, unpriced = free
        self.retry_s = retry_s          # how soon a failed refresh is tried again while the list is empty
        self.on_change = on_change      # awaited when a refresh changed the pool's list
        self.listings: tuple[Listing, ...] = ()
        self.refreshed_at: datetime | None = None

    async def refresh(self) -> bool:
        """Fetch and apply the server's list; False (and nothing changed) when it failed."""
        try:
            data = await self.fetch()
        except OhdError as exc:
            log.warning("catalogue: GET /models failed (%s); keeping the previous list", exc)
            return False
        listings = parse(data)
        if listings is None:
            log.warning("catalogue: GET /models answered an unexpected shape (%s); keeping the previous list",
                        type(data).__name__)
            return False
        before = list(self.pool.models)
        self.listings, self.refreshed_at = tuple(listings), self.clock.now()
        # the prices and contexts the workers read, swapped whole here on the loop thread they read on
        priced = {entry.model: not entry.costs_nothing(self.unknown_price_paid) for entry in listings}
        self.governor.priced = priced
        self.governor.contexts = {entry.model: entry.context for entry in listings if entry.context}
        free = await asyncio.to_thread(self.apply, listings, priced, self.refreshed_at)
        if free is not None:
            self._discovered(free)      # here, on the loop thread the workers read the list on
        if self.on_change is not None and self.pool.models != before:
            await self.on_change()
        return True

    def apply(self, listings: Sequence[Listing], priced: Mapping[str, bool], now: datetime) -> list[str] | None:
        """Relisted dead models revived (store: a thread); returns the free models of `priced` when
        discovering (None: not), for `_discovered` on the loop thread."""
        listed = {entry.model for entry in listings}
        for model in self.governor.dead_models():
            if model in listed:
                self.governor.revive(model, now)
                log.info("catalogue: model %s is listed again; revived", model)
        if not self.discover:
            return None
        return [model for model, has_price in priced.items() if not has_price]

    def _discovered(self, free: list[str]) -> None:
        models = self.pool.models
        if not free:
            log.warning("catalogue: the server lists no free model; keeping %d model(s)", len(models))
            return
        if free != models:
            added, dropped = set(free) - set(models), set(models) - set(free)
            assert self.use_models is not None      # a discovering catalogue has one
            self.use_models(free)
            log.info("catalogue: %d free model(s) (+%d, -%d)", len(free), len(added), len(dropped))

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh now, then every `refresh_s` on the clock, until `stop` is set; never raises."""
        while not stop.is_set():
            try:
                await self.refresh_until_stopped(stop)
            except Exception:
                log.exception("catalogue: refresh failed; retrying in %g s", self.refresh_s)
            # a model list still to be read (a server you run that is down) is asked for again soon
            await self._wait(stop, min(self.retry_s, self.refresh_s) if self.discover and not self.pool.models
                             else self.refresh_s)

    async def refresh_until_stopped(self, stop: asyncio.Event) -> None:
        """One refresh, cancelled when `stop` is set first: a slow or hung GET /models must not
        hold the daemon's stop (it did, up to the request's timeout and retries, 55-92 s, past
        systemd's stop timeout), neither in `run` nor at start-up."""
        refresh = await _unless_stopped(stop, self.refresh())
        if not refresh.cancelled() and (error := refresh.exception()) is not None:
            raise error

    async def _wait(self, stop: asyncio.Event, seconds: float) -> None:
        await first(self.clock, stop, timeout=seconds)


async def _unless_stopped(stop: asyncio.Event, work: Awaitable[T]) -> asyncio.Future[T]:
    """Run `work` until it ends or `stop` is set, whichever comes first; the other is
    cancelled and awaited. Returns `work`'s future (done, or cancelled by the stop)."""
    job = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({job, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in (job, stopper):
            waiter.cancel()
        await asyncio.gather(job, stopper, return_exceptions=True)
    return job
