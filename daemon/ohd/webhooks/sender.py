"""The webhook sender: the outbox's due rows, posted to their hooks over HTTP (httpx), at least once.

Each hook has its own loop on the injected clock, so a hook that fails or hangs (a short timeout)
never delays another hook's deliveries, and no task waits for any of them: tasks only write
outbox rows (`store/outbox.py`). A round sends, per subject (a task, a model), the oldest
undelivered event whose next try has come; a 2xx marks it delivered, anything else is tried
again after a backoff (`events.backoff_s`) until the event is `max_age` old, then it is dead
with its last error. A crash between the receiver's answer and the commit sends the event again
(the receiver dedups on `X-Ohd-Delivery`). Nothing here reads configuration or writes SQL.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta

import httpx
from pydantic import SecretStr

from ohd import __version__
from ohd.clock import Clock, first
from ohd.core import events
from ohd.store.outbox import Delivery, Outbox

log = logging.getLogger("ohd.webhooks")

POLL_S = 1.0   # how often an idle hook looks for new rows (a task's end commits them on a worker's thread)
KEEP = timedelta(days=7)   # delivered and dead rows are deleted this long after (`ohd status` counts those kept)
PRUNE_S = 3600.0           # how often a hook's loop deletes them


@dataclass(frozen=True, slots=True)
class Retry:
    """The backoff of failed deliveries and their bound."""

    first_s: float = 5.0
    max_s: float = 900.0
    max_age: timedelta = timedelta(hours=24)
    timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class Target:
    """One hook as the sender posts to it."""

    url: str
    fmt: str = "json"                  # json, slack or discord (`events.body`)
    secret: SecretStr | None = None    # signs the body (X-Ohd-Signature) when set
    retry: Retry | None = None         # this hook's timeout and backoff; None: the sender's

    @property
    def key(self) -> str:
        return events.hook_key(self.url)

    @property
    def label(self) -> str:
        return events.hook_label(self.url)


@dataclass(frozen=True, slots=True)
class Answer:
    """What one post got: the status code (None: no answer) and the error (None: delivered, a 2xx)."""

    status: int | None
    error: str | None


@asynccontextmanager
async def http_client() -> AsyncIterator[httpx.AsyncClient]:
    """The client of every delivery: no proxy from the environment, no redirect followed (a 3xx is a failure)."""
    async with httpx.AsyncClient(trust_env=False, follow_redirects=False) as http:
        yield http


async def post(http: httpx.AsyncClient, target: Target, event: str, delivery: int, raw: bytes,
               timeout_s: float) -> Answer:
    """POST `raw` with ohd's headers; the receiver's URL never appears in the error (it may hold a token)."""
    headers = {"Content-Type": "application/json", "User-Agent": f"ohd/{__version__}",
               "X-Ohd-Event": event, "X-Ohd-Delivery": str(delivery)}
    if target.secret is not None:
        headers["X-Ohd-Signature"] = events.signature(raw, target.secret.get_secret_value())
    try:
        response = await http.post(target.url, content=raw, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        reason = str(exc).replace(target.url, target.label) or "no answer"
        return Answer(None, f"{type(exc).__name__}: {reason}")
    if 200 <= response.status_code < 300:
        return Answer(response.status_code, None)
    text = " ".join(response.text.split())[:200]
    return Answer(response.status_code, f"HTTP {response.status_code}" + (f": {text}" if text else ""))


class Sender:
    """Delivers the outbox to `targets`; `run` until the stop event, or `run_once` a round (tests).
    `use` replaces the targets while it runs (a SIGHUP): a hook gone or changed (its URL, format,
    secret or retry) has its loop cancelled (a post in flight is sent again later: at least once),
    a new or changed one gets a loop; the others go on undisturbed."""

    def __init__(self, outbox: Outbox, http: httpx.AsyncClient, clock: Clock, targets: Sequence[Target],
                 retry: Retry | None = None, rng: random.Random | None = None) -> None:
        self.outbox = outbox
        self.http = http
        self.clock = clock
        self.targets = tuple(targets)
        self.retry = retry or Retry()
        self.rng = rng or random.Random()
        self._changed = asyncio.Event()
        self._loops: dict[Target, asyncio.Task[None]] = {}

    @property
    def running(self) -> frozenset[Target]:
        """The targets whose loops run now."""
        return frozenset(target for target, loop in self._loops.items() if not loop.done())

    def use(self, targets: Sequence[Target]) -> None:
        """From now on deliver to `targets` (on the event loop's thread)."""
        self.targets = tuple(targets)
        self._changed.set()

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                self._changed.clear()
                wanted = set(self.targets)
                for target in [t for t in self._loops if t not in wanted]:
                    self._loops.pop(target).cancel()
                for target in wanted - self._loops.keys():
                    self._loops[target] = asyncio.ensure_future(self._loop(target, stop))
                await first(self.clock, stop, self._changed)
        finally:
            await asyncio.gather(*self._loops.values(), return_exceptions=True)
            self._loops.clear()

    async def run_once(self) -> int:
        """One round of every hook at once; how many deliveries were tried."""
        return sum(await asyncio.gather(*(self.round(target) for target in self.targets)))

    async def _loop(self, target: Target, stop: asyncio.Event) -> None:
        pruned: float | None = None
        while not stop.is_set():
            try:
                await self.round(target)
                if pruned is None or self.clock.monotonic() - pruned >= PRUNE_S:
                    await asyncio.to_thread(self.outbox.prune, target.key, self.clock.now() - KEEP)
                    pruned = self.clock.monotonic()
                wait = await asyncio.to_thread(self._idle_s, target)
            except Exception:
                log.exception("webhook %s: round failed; trying again in %gs", target.label, POLL_S)
                wait = POLL_S
            await first(self.clock, stop, timeout=wait)

    def _idle_s(self, target: Target) -> float:
        """Until the next row of `target` is due, at most POLL_S (new rows may come any time)."""
        due = self.outbox.next_try(target.key)
        if due is None:
            return POLL_S
        return max(0.0, min(POLL_S, (due - self.clock.now()).total_seconds()))

    async def round(self, target: Target) -> int:
        """Send every due head of `target`'s subjects (concurrently: distinct subjects); how many."""
        due = await asyncio.to_thread(self.outbox.due, target.key, self.clock.now())
        await asyncio.gather(*(self._deliver(target, delivery) for delivery in due))
        return len(due)

    async def _deliver(self, target: Target, delivery: Delivery) -> None:
        retry = target.retry or self.retry
        raw = events.body(delivery.id, delivery.event, delivery.created_at.isoformat(), delivery.payload, target.fmt)
        answer = await post(self.http, target, delivery.event, delivery.id, raw, retry.timeout_s)
        now = self.clock.now()
        if answer.error is None:
            await asyncio.to_thread(self.outbox.delivered, delivery.id, now)
            log.debug("webhook %s: %s %d delivered", target.label, delivery.event, delivery.id)
            return
        deadline = delivery.created_at + retry.max_age
        if now >= deadline:
            await asyncio.to_thread(self.outbox.failed, delivery.id, now, answer.error, None)
            log.warning("webhook %s: %s %d dead after %d tries over %s: %s", target.label, delivery.event,
                        delivery.id, delivery.attempts + 1, retry.max_age, answer.error)
            return
        wait = events.backoff_s(delivery.attempts + 1, retry.first_s, retry.max_s, self.rng.random())
        retry_at = min(now + timedelta(seconds=wait), deadline)    # the last try falls on the bound
        await asyncio.to_thread(self.outbox.failed, delivery.id, now, answer.error, retry_at)
        log.info("webhook %s: %s %d failed (%s); next try at %s", target.label, delivery.event, delivery.id,
                 answer.error, retry_at.isoformat())


async def send_sample(target: Target, event: str, clock: Clock, timeout_s: float = 10.0) -> Answer:
    """`ohd webhooks test`: one sample `event` posted now (delivery id 0), whatever its answer."""
    at = clock.now().isoformat()
    raw = events.body(0, event, at, events.sample(event, at), target.fmt)
    async with http_client() as http:
        return await post(http, target, event, 0, raw, timeout_s)
