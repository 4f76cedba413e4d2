"""The governor's memory in SQL: model state (cooldowns, breakers, learned limits) and requests sent.

An edge room beside `store`, on the same database and the `Store`'s bound tables (`model_state`,
`model_request`, `task`). Decisions come from `routing` (pure); this module
reads rows into values, asks `routing`, and writes the answer back. Invariant: choosing
a model and recording the request to it happen in ONE write transaction (SQLite
`BEGIN IMMEDIATE`; PostgreSQL an advisory transaction lock), so any number of workers in
threads or processes never send more than the known limits allow. Counters and state
live only in the database: a new `Store` on the same file sees them (restarts).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import peewee

from ohd.core import events, routing
from ohd.core.routing import Choice, ModelState, Policy, Usage
from ohd.store import outbox
from ohd.store.schema import Task, TaskStatus
from ohd.store.store import Store
from ohd.store.transactions import atomic_write, connect

log = logging.getLogger("ohd.quotas")

_LOCK_KEY = 0x6F6867  # PostgreSQL advisory lock of the governor ("ohg")
KEEP = timedelta(days=2)  # request rows older than this are pruned (the daily window is 1 UTC day)


def iso_or_none(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


@dataclass(frozen=True, slots=True)
class ModelView:
    """One model as `ohd models` shows it."""

    model: str
    health: routing.Health
    cooldown_until: datetime | None
    failures: int
    left_minute: int | None
    left_today: int | None
    rpm: int | None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.model, "state": self.health.value,
                "cooldown_until": self.cooldown_until.isoformat() if self.cooldown_until else None,
                "failures": self.failures, "requests_left_minute": self.left_minute,
                "requests_left_today": self.left_today, "rpm_limit": self.rpm}


class Governor:
    """Model state and request reservations for one API key (`key_id`: a label, never the key)."""

    def __init__(self, store: Store, policy: Policy | None = None, key_id: str = "default") -> None:
        self.store = store
        self.db = store.db
        self.policy = policy or Policy()
        self.key_id = key_id
        self.request = store.m.model_request
        self.priced: Mapping[str, bool] = {}   # model -> has a price, per the catalogue (swapped whole)
        self.contexts: Mapping[str, int] = {}  # model -> context in tokens, per the catalogue (swapped whole)
        self._refusals_logged: set[str] = set()

    @contextmanager
    def _tx(self) -> Iterator[None]:
        """One write transaction that holds the governor's lock from its first statement."""
        with atomic_write(self.db, self.store.lock_wait_s, lock=_LOCK_KEY):
            yield

    # -- reservations --------------------------------------------------------------------

    def acquire(self, models: Sequence[str], now: datetime, hold: timedelta | None = None,
                task: Task | None = None) -> Choice:
        """Pick the first model that may be sent a request now and record that request.

        Returns the choice; when none can be sent, `Choice(None, at)` with the earliest
        instant one can (None: every candidate is dead). With `hold`: a slot that frees within
        `hold` is taken now for its instant, `Choice(model, at)` (send at `at`), unless an older
        pending task of `task`'s priority waits for it (FIFO). So workers waiting in place for
        slots each hold their own, in this daemon or any other on the database, and do not all
        ask again when one frees (each freed slot was a round of transactions under the lock).
        """
        earliest: datetime | None = None
        soonest: tuple[datetime, ModelState] | None = None
        allowed = self._permitted(models)
        if models and not allowed:
            return Choice(None, None, reason=f"no allowed model: every candidate has a price ({', '.join(models)}) "
                          "and strict free-only mode is on (set allow_paid = true or list them in paid_models)")
        with self._tx():
            if (held := self._over_budget(now)) is not None:
                return held
            for model in allowed:       # in order, and no further than the first that can go
                state = self._state(model)
                choice = routing.choose([(state, self._usage(state, now))], now, self.policy)
                if choice.model is not None:
                    self._take(choice, state, now)
                    return choice
                if choice.at is not None:
                    earliest = choice.at if earliest is None else min(earliest, choice.at)
                    # only a slot of the window (a cooldown or a breaker's probe is asked for again)
                    ready = routing.health(state, now, self.policy) is routing.Health.READY
                    if ready and (soonest is None or choice.at < soonest[0]):
                        soonest = (choice.at, state)
            if (hold is not None and soonest is not None and soonest[0] - now <= hold
                    and not (task is not None and self.store.waits_before(task, soonest[0]))):
                at, state = soonest
                held = Choice(state.model, at)
                self._take(held, state, at)
                return held
        return Choice(None, earliest)

    def _permitted(self, models: Sequence[str]) -> list[str]:
        """The models that budgets allow; each refused one is logged (warning once, then debug)."""
        allowed = []
        for model in models:
            if not routing.refused(model, self.policy, self.priced):
                allowed.append(model)
                continue
            first = model not in self._refusals_logged
            self._refusals_logged.add(model)
            log.log(logging.WARNING if first else logging.DEBUG,
                    "model %s refused: it has a price and strict free-only mode is on "
                    "(set allow_paid = true or add it to paid_models)", model)
        return allowed

    def _over_budget(self, now: datetime) -> Choice | None:
        """A reached daily cap (requests of every model, cost of today's executions), in the lock."""
        policy = self.policy
        if policy.request_cap is None and policy.cost_cap is None:
            return None
        sent = self.requests_today(now) if policy.request_cap is not None else 0
        cost = float(self.store.totals_today(now)["cost"]) if policy.cost_cap is not None else 0.0
        held = routing.over_budget(sent, cost, now, policy)
        if held is not None:
            log.warning("budget: %s", held.reason)
        return held

    def requests_today(self, now: datetime) -> int:
        """Requests recorded since UTC midnight, every model (what `daily_request_cap` counts)."""
        connect(self.db)
        r = self.request
        return int(r.select().where(r.at >= routing.utc_midnight(now)).count())

    def reserve(self, model: str, now: datetime) -> datetime | None:
        """Record one request to `model` if the limits allow it now (None); else when they will.

        A dead model answers the next UTC midnight (it has no instant; `acquire` says None).
        """
        choice = self.acquire([model], now)
        if choice.model is not None:
            return None
        return choice.at if choice.at is not None else routing.next_utc_midnight(now)

    def _take(self, choice: Choice, state: ModelState, now: datetime) -> None:
        """Record the request (and re-arm a half-open breaker for its probe)."""
        model, r = state.model, self.request
        r.insert(model=model, key_id=self.key_id, free=routing.is_free(model), at=now).execute()
        r.delete().where(r.at < now - KEEP).execute()
        if self.store.hooks:
            self._quota_events(state, now)
        if choice.probe:
            self._save(routing.after_probe(state, now), now)
            log.info("model %s: breaker half-open; one probe request", model)

    def _quota_events(self, state: ModelState, now: datetime) -> None:
        """In the request's transaction: `quota.exhausted` when this request used the last one of a
        daily quota (the model's or the key's free requests, or `daily_request_cap`); the minute's
        window is pacing, not a quota."""
        resets = routing.next_utc_midnight(now).isoformat()
        _, left_today = routing.remaining(state, self._usage(state, now), now, self.policy)
        quotas = [("daily requests", state.model)] if left_today == 0 else []
        cap = self.policy.request_cap
        if cap is not None and self.requests_today(now) == cap:
            quotas.append(("daily_request_cap", "*"))
        for quota, model in quotas:
            outbox.record(self.store.m, self.store.hooks, events.QUOTA_EXHAUSTED, now,
                          {"model": model, "quota": quota, "resets_at": resets}, model=model)

    def _usage(self, state: ModelState, now: datetime) -> Usage:
        """The counts that this model's known limits need (no query for a limit it does not have)."""
        r, model, known = self.request, state.model, routing.limits(state, self.policy)
        recent: tuple[datetime, ...] = ()
        if known.rpm is not None:
            since = now - self.policy.window - self.policy.margin
            rows = r.select(r.at).where((r.model == model) & (r.at > since)).order_by(r.at)
            recent = tuple(row.at for row in rows if row.at is not None)
        midnight = routing.utc_midnight(now)
        today = r.select().where((r.model == model) & (r.at >= midnight)).count() if known.rpd else 0
        key_today = 0
        if known.key_rpd:
            key_today = r.select().where((r.key_id == self.key_id) & (r.free == True)  # noqa: E712
                                         & (r.at >= midnight)).count()
        return Usage(recent=recent, today=today, key_today=key_today)

    # -- outcomes ------------------------------------------------------------------------

    def rate_limited(self, model: str, until: datetime, limit: int | None, now: datetime) -> ModelState:
        """A 429: cool down until `until` (never shorter than a running cooldown); learn the limit."""
        with self._tx():
            before = self._state(model)
            state = routing.after_rate_limit(before, until, limit, now)
            self._save(state, now)
            if before.cooldown_until is None or before.cooldown_until <= now:   # a new cooldown, not a longer one
                outbox.record(self.store.m, self.store.hooks, events.MODEL_COOLDOWN, now,
                              {"model": model, "until": iso_or_none(state.cooldown_until), "rpm_limit": limit},
                              model=model)
        return state

    def failed(self, model: str, now: datetime) -> ModelState:
        """A transient failure after llm's retries; the breaker opens after N in a row."""
        with self._tx():
            before = self._state(model)
            state = routing.after_failure(before, now, self.policy)
            self._save(state, now)
        if state.opened_at is not None:
            log.warning("model %s: breaker open after %d consecutive failure(s); probe after %s",
                        model, state.failures, (state.opened_at + self.policy.breaker_reset).isoformat())
        return state

    def breaker_open(self, model: str, now: datetime) -> bool:
        """The model's breaker is open now (no probe due yet)."""
        connect(self.db)
        return routing.health(self._state(model), now, self.policy) is routing.Health.OPEN

    def unreachable(self, model: str, now: datetime, reason: str) -> ModelState:
        """The server refused or dropped the connection: the breaker opens now; its probe decides."""
        with self._tx():
            state = routing.after_unreachable(self._state(model), now)
            self._save(state, now)
        log.warning("model %s: the server cannot be reached (%s); waiting for it, probe after %s", model, reason,
                    (now + self.policy.breaker_reset).isoformat())
        return state

    def unsent(self, model: str) -> None:
        """The last request reserved for `model` never left (connection refused): it counts against no limit."""
        r = self.request
        with self._tx():
            last = r.select(r.id).where((r.model == model) & (r.key_id == self.key_id)).order_by(r.id.desc()).first()
            if last is not None:
                r.delete().where(r.id == last.id).execute()

    def succeeded(self, model: str, now: datetime) -> bool:
        """An answer came back: the failure streak ends and an open breaker closes (True: it was open)."""
        ms = self.store.m.model_state
        connect(self.db)
        if not ms.select().where((ms.model == model) & ((ms.failures > 0) | ms.opened_at.is_null(False))).exists():
            return False    # the common case: nothing to change, no write lock taken
        with self._tx():
            before = self._state(model)
            self._save(routing.after_success(before), now)
        if before.opened_at is None:
            return False
        log.info("model %s: breaker closed", model)
        return True

    def gone(self, model: str, now: datetime) -> None:
        """404 / no endpoints: the model is dead until a catalogue refresh revives it."""
        with self._tx():
            self._save(routing.after_gone(self._state(model)), now)
        log.warning("model %s: gone (404); skipped from now on", model)

    def dead_models(self) -> list[str]:
        """The models marked gone (404), for the catalogue to revive when listed again."""
        ms = self.store.m.model_state
        connect(self.db)
        return [row.model for row in ms.select(ms.model).where(ms.dead == True)]  # noqa: E712

    def revive(self, model: str, now: datetime) -> None:
        with self._tx():
            state = self._state(model)
            self._save(ModelState(model, state.cooldown_until, learned_rpm=state.learned_rpm), now)

    # -- reading -------------------------------------------------------------------------

    def state(self, model: str) -> ModelState:
        connect(self.db)
        return self._state(model)

    def views(self, models: Sequence[str], now: datetime) -> list[ModelView]:
        """Health, cooldown and requests left (this window, today) of each model."""
        connect(self.db)
        views = []
        for model in models:
            state = self._state(model)
            usage = self._usage(state, now)
            minute, today = routing.remaining(state, usage, now, self.policy)
            health = routing.health(state, now, self.policy)
            views.append(ModelView(model, health, state.cooldown_until if health is routing.Health.COOLDOWN
                                   else None, state.failures, minute, today,
                                   routing.limits(state, self.policy).rpm))
        return views

    def next_due(self, now: datetime) -> datetime | None:
        """The earliest `not_before` of a pending task (when the pool should wake next)."""
        connect(self.db)
        t = self.store.m.task
        row = (t.select(peewee.fn.MIN(t.not_before).alias("due"))
               .where((t.status == TaskStatus.PENDING.value) & t.not_before.is_null(False)).first())
        due = getattr(row, "due", None) if row is not None else None
        if due is None:
            return None
        return cast(datetime, t.not_before.python_value(due))

    # -- rows ----------------------------------------------------------------------------

    def _state(self, model: str) -> ModelState:
        ms = self.store.m.model_state
        row = ms.select().where(ms.model == model).first()
        if row is None:
            return ModelState(model)
        return ModelState(model, row.cooldown_until, row.failures, row.opened_at, bool(row.dead), row.rpm_limit)

    def _save(self, state: ModelState, now: datetime) -> None:
        ms = self.store.m.model_state
        label = routing.health(state, now, self.policy).value
        values = {ms.state: label, ms.cooldown_until: state.cooldown_until, ms.dead: state.dead,
                  ms.failures: state.failures, ms.opened_at: state.opened_at,
                  ms.rpm_limit: state.learned_rpm, ms.updated_at: now}
        (ms.insert({ms.model: state.model, **values})
         .on_conflict(conflict_target=[ms.model], update=values).execute())
