"""The running daemon as it is read: `ohd status`, the metrics and systemd's STATUS line.

A read model only: it reads the store (queue counts, today's totals, the history), the
pool's snapshot and model states and the governor's policy, and writes nothing. The socket
server's threads call it, and the loop calls `summary` in a thread (it reads the store).
The pool is None until the daemon has built it; the status then says so (no workers, no
models, no budget). Nothing here reads configuration: the daemon hands in the values.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from ohd import __version__
from ohd.clock import Clock
from ohd.core.views import eta_seconds
from ohd.errors import StorageUnavailable
from ohd.service.metrics import DEFAULT_WINDOW, HOUR, Metrics, Throughput, collect, efficiency_dict
from ohd.store.history import History
from ohd.store.outbox import Outbox
from ohd.store.store import Store
from ohd.work.worker import Pool


class StatusView:
    """What the daemon is doing, read now (see the module's docstring)."""

    def __init__(self, store: Store, history: History, clock: Clock, *, offline: bool, database: str,
                 webhooks: Sequence[tuple[str, str]] = ()) -> None:
        self.store = store
        self.webhooks = tuple(webhooks)   # (key, label) of each configured hook
        self.outbox = Outbox(store.db)
        self.history = history
        self.clock = clock
        self.offline = offline          # the offline provider answers (no API key)
        self.database = _redact(database)
        self.started = clock.monotonic()
        self.pool: Pool | None = None   # set once the daemon has built it
        self.fleet: Callable[[], list[dict[str, Any]]] | None = None   # the daemons on the database

    def summary(self, workers: Mapping[str, Any]) -> str:
        """The one-line STATUS (reads the store: call it in a thread)."""
        return summary(self.store.counts(), workers)

    def metrics(self) -> Metrics:
        """A metrics snapshot now, read from the store (called on the socket server's threads)."""
        return collect(self.history, self.clock.now(), self.clock.monotonic() - self.started)

    def status(self) -> dict[str, Any]:
        """The status; while the store cannot be read (its server down), what is known without it,
        with the reason (`storage`) and no queue, models, fleet or progress."""
        pool = self.pool
        known = {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(self.clock.monotonic() - self.started, 1),
            "workers": pool.snapshot() if pool else {"size": 0, "busy": 0},
            "offline": self.offline,
            "sandbox": pool.ladder.tests.sandbox().as_dict() if pool else None,
            "database": self.database,
        }
        try:
            read = {"models": pool.model_states() if pool else [],
                    "fleet": self.fleet() if self.fleet is not None else [],
                    "webhooks": self._webhooks(), **self._progress(), "storage": self._storage()}
        except StorageUnavailable as exc:
            read = {"models": [], "fleet": [], "webhooks": [], "storage": (self.store.trouble or exc).as_dict()}
        return {**known, **read}

    def _webhooks(self) -> list[dict[str, Any]]:
        """Each hook's deliveries (pending, delivered, dead) and its last error."""
        labels = dict(self.webhooks)
        return [{"hook": labels[view["key"]], **view} for view in self.outbox.summary(list(labels))]

    def _storage(self) -> dict[str, Any] | None:
        """Why the daemon waits for storage (the last write the store refused), None when it can write."""
        trouble = self.store.trouble
        return None if trouble is None else trouble.as_dict()

    def _progress(self) -> dict[str, Any]:
        """Now, today's tokens and cost, recent throughput, the quota's efficiency (accepted outputs per
        request, requests saved by the replay cache) and the queue's ETA (`ohd status`)."""
        now = self.clock.now()
        history = self.history
        window = DEFAULT_WINDOW
        throughput = Throughput(completed_last_hour=history.completed_between(now - HOUR, now),
                                window_s=window.total_seconds(),
                                completed_in_window=history.completed_between(now - window, now))
        today = self.store.totals_today(now)
        return {"now": now.isoformat(), "today": today, "throughput": throughput.as_dict(),
                "efficiency": efficiency_dict(history.efficiency()),
                "eta_s": eta_seconds(self.store.counts(), throughput.per_minute,
                                     (last - now).total_seconds() if (last := self.store.last_wait()) else 0.0),
                **({"budget": self._budget(self.pool, now, float(today["cost"]))} if self.pool else {})}

    @staticmethod
    def _budget(pool: Pool, now: datetime, cost_today: float) -> dict[str, Any]:
        """Today's requests and cost against the daily caps, and whether paid models may be used."""
        policy = pool.governor.policy
        return {"requests_today": pool.governor.requests_today(now), "daily_request_cap": policy.request_cap,
                "cost_today": cost_today, "daily_cost_cap_usd": policy.cost_cap,
                "allow_paid": policy.allow_paid, "paid_models": sorted(policy.paid_models)}


def summary(counts: Mapping[str, int], workers: Mapping[str, Any]) -> str:
    """The one-line STATUS: queue counts and busy workers."""
    return (f"{counts.get('queued', 0)} queued, {counts.get('running', 0)} running, "
            f"{counts.get('pending', 0)} pending, {counts.get('completed', 0)} completed, "
            f"{counts.get('failed', 0)} failed; workers {workers['busy']}/{workers['size']} busy")


def _redact(url: str) -> str:
    """A database URL without its password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}" if ":" in creds else url
    return url
