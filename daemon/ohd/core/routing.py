"""Model routing decisions at a given instant: health, quotas, the breaker, the next model.

Pure: values in, decisions out; no I/O and no clock reads (every function takes `now`).
Invariant: a model is never offered before its cooldown ends, while its breaker is open
(a half-open breaker allows one probe), when it is dead, or when one more request would
exceed a known limit: requests per sliding window (plus a small safety margin, so our
count is never behind the server's), per UTC day per model, and per UTC day per key for
`:free` models. Budgets: in strict free-only mode a model with a price is never offered
unless allowed, and a reached daily cap (requests, cost) holds every model until the next
UTC midnight. When no candidate can be sent now, the answer is the earliest instant
one can, so the caller waits exactly that long. The arithmetic of a 429's reset hints
lives in `llm.reset_at`; here a cooldown is only kept or extended, never shortened.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum

WINDOW = timedelta(seconds=60)
MARGIN = timedelta(milliseconds=250)
FREE_SUFFIX = ":free"


class Health(StrEnum):
    READY = "ready"
    COOLDOWN = "cooldown"
    OPEN = "open"
    HALF_OPEN = "half_open"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class Policy:
    """The known limits and breaker settings (plain values from the configuration)."""

    free_rpm: int | None = 20                 # per `:free` model per window
    free_rpd: int | None = 50                 # per key per UTC day, over all `:free` models
    rpm: Mapping[str, int] = field(default_factory=dict)   # per-model overrides of the window limit
    rpd: Mapping[str, int] = field(default_factory=dict)   # per-model limits per UTC day
    breaker_failures: int = 3
    breaker_reset: timedelta = timedelta(seconds=60)
    window: timedelta = WINDOW
    margin: timedelta = MARGIN
    # budgets (the configuration's default is strict free-only; these plain defaults refuse nothing)
    allow_paid: bool = True
    paid_models: frozenset[str] = frozenset()  # allowed despite a price when `allow_paid` is off
    # OpenRouter: a model the catalogue gives no price for is paid unless its id ends in `:free`.
    # False for a server you run (Ollama, vLLM, LM Studio): no listed price means it costs nothing.
    unknown_price_paid: bool = True
    request_cap: int | None = None             # requests per UTC day, every model
    cost_cap: float | None = None              # USD per UTC day, summed over executions


@dataclass(frozen=True, slots=True)
class ModelState:
    """What the store remembers about one model."""

    model: str
    cooldown_until: datetime | None = None
    failures: int = 0                         # consecutive failures (5xx, timeouts) since a success
    opened_at: datetime | None = None         # breaker opened (or re-armed by a probe) at
    dead: bool = False
    learned_rpm: int | None = None            # from a 429's X-RateLimit-Limit


@dataclass(frozen=True, slots=True)
class Usage:
    """Requests already sent: this model's in the current window, today's, the key's today."""

    recent: tuple[datetime, ...] = ()         # within window + margin of `now`, oldest first
    today: int = 0
    key_today: int = 0


@dataclass(frozen=True, slots=True)
class Limits:
    rpm: int | None
    rpd: int | None
    key_rpd: int | None


@dataclass(frozen=True, slots=True)
class Choice:
    """The model to send to now (or at `at`: a slot held for the asker), or (model None) the earliest
    instant one can be (None: never)."""

    model: str | None
    at: datetime | None = None
    probe: bool = False
    reason: str | None = None     # why nothing can be sent (a budget), for the task's error text


def is_free(model: str) -> bool:
    return model.endswith(FREE_SUFFIX)


def candidates(wanted: Sequence[str], configured: Sequence[str]) -> list[str]:
    """A task's models in order, `auto` expanded to the configured list, without repeats."""
    chosen: list[str] = []
    for model in wanted or ("auto",):
        for name in configured if model == "auto" else [model]:
            if name not in chosen:
                chosen.append(name)
    return chosen


def limits(state: ModelState, policy: Policy) -> Limits:
    """Configured overrides win; else the tighter of the free-tier default and the learned limit."""
    rpm = policy.rpm.get(state.model)
    if rpm is None:
        known = [v for v in (policy.free_rpm if is_free(state.model) else None, state.learned_rpm) if v]
        rpm = min(known) if known else None
    key_rpd = policy.free_rpd if is_free(state.model) else None
    return Limits(rpm or None, policy.rpd.get(state.model) or None, key_rpd or None)


def health(state: ModelState, now: datetime, policy: Policy) -> Health:
    if state.dead:
        return Health.DEAD
    if state.opened_at is not None:
        return Health.OPEN if now < state.opened_at + policy.breaker_reset else Health.HALF_OPEN
    if state.cooldown_until is not None and state.cooldown_until > now:
        return Health.COOLDOWN
    return Health.READY


def next_send(state: ModelState, usage: Usage, now: datetime, policy: Policy) -> datetime | None:
    """The earliest instant (`now` or later) this model may be sent a request; None if dead.

    Each constraint, once satisfied, stays satisfied until another request is sent, so
    the earliest instant for all of them is the latest of their own instants.
    """
    if state.dead:
        return None
    known = limits(state, policy)
    instants = [now, window_frees(usage.recent, known.rpm, now, policy)]
    if state.cooldown_until is not None:
        instants.append(state.cooldown_until)
    if state.opened_at is not None:
        instants.append(state.opened_at + policy.breaker_reset)
    if (known.rpd and usage.today >= known.rpd) or (known.key_rpd and usage.key_today >= known.key_rpd):
        instants.append(next_utc_midnight(now))
    return max(instants)


def window_frees(recent: Sequence[datetime], rpm: int | None, now: datetime, policy: Policy) -> datetime:
    """When one more request fits in the sliding window (`now` if it fits already)."""
    span = policy.window + policy.margin
    inside = sorted(at for at in recent if at > now - span)
    if rpm is None or len(inside) < rpm:
        return now
    return inside[len(inside) - rpm] + span


def next_utc_midnight(now: datetime) -> datetime:
    day = now.astimezone(UTC).date() + timedelta(days=1)
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def utc_midnight(now: datetime) -> datetime:
    return next_utc_midnight(now) - timedelta(days=1)


def choose(candidates: Sequence[tuple[ModelState, Usage]], now: datetime, policy: Policy) -> Choice:
    """The first candidate (in order) that can be sent now; else the earliest instant any can."""
    earliest: datetime | None = None
    for state, usage in candidates:
        at = next_send(state, usage, now, policy)
        if at is None:
            continue
        if at <= now:
            return Choice(state.model, probe=health(state, now, policy) is Health.HALF_OPEN)
        earliest = at if earliest is None else min(earliest, at)
    return Choice(None, earliest)


def paid(model: str, priced: Mapping[str, bool], unknown_price_paid: bool = True) -> bool:
    """Has a price: as the catalogue says when it lists the model; else (OpenRouter's naming) any
    id without `:free`, or nothing at all on a server you run (`unknown_price_paid` False)."""
    known = priced.get(model)
    if known is None:
        return unknown_price_paid and not is_free(model)
    return known


def refused(model: str, policy: Policy, priced: Mapping[str, bool]) -> bool:
    """Strict free-only mode: a paid model is refused unless paid models or this one are allowed."""
    return (not policy.allow_paid and model not in policy.paid_models
            and paid(model, priced, policy.unknown_price_paid))


def over_budget(requests_today: int, cost_today: float, now: datetime, policy: Policy) -> Choice | None:
    """A daily cap reached: nothing is sent until the next UTC midnight (None: within budget)."""
    until = next_utc_midnight(now)
    if policy.request_cap is not None and requests_today >= policy.request_cap:
        spent = f"daily_request_cap reached ({requests_today} of {policy.request_cap} requests today)"
    elif policy.cost_cap is not None and cost_today >= policy.cost_cap:
        spent = f"daily_cost_cap_usd reached (${cost_today:.4f} of ${policy.cost_cap:g} spent today)"
    else:
        return None
    return Choice(None, until, reason=f"{spent}; waits until {until.isoformat()} (the next UTC day)")


def remaining(state: ModelState, usage: Usage, now: datetime, policy: Policy) -> tuple[int | None, int | None]:
    """Requests left in the current window and today (None: no known limit)."""
    known = limits(state, policy)
    span = policy.window + policy.margin
    minute = None if known.rpm is None else max(0, known.rpm - sum(1 for at in usage.recent if at > now - span))
    days = [limit - used for limit, used in ((known.rpd, usage.today), (known.key_rpd, usage.key_today)) if limit]
    return minute, (max(0, min(days)) if days else None)


# -- transitions (the store writes back what these return) ---------------------------------


def after_success(state: ModelState) -> ModelState:
    return replace(state, failures=0, opened_at=None)


def after_failure(state: ModelState, now: datetime, policy: Policy) -> ModelState:
    """One more consecutive failure; the breaker opens at N, or again when a probe failed."""
    failures = state.failures + 1
    opens = failures >= policy.breaker_failures or state.opened_at is not None
    return replace(state, failures=failures, opened_at=now if opens else None)


def after_unreachable(state: ModelState, now: datetime) -> ModelState:
    """The server cannot be reached: the breaker opens at once (no count of tries), so the tasks
    wait for its probe instead of failing one by one."""
    return replace(state, failures=state.failures + 1, opened_at=now)


def after_probe(state: ModelState, now: datetime) -> ModelState:
    """A half-open probe was granted: re-arm the breaker so no second probe goes out meanwhile."""
    return replace(state, opened_at=now)


def after_rate_limit(state: ModelState, until: datetime, limit: int | None, now: datetime) -> ModelState:
    """Cool down until `until`, never shortening a cooldown already running."""
    current = state.cooldown_until if state.cooldown_until is not None and state.cooldown_until > now else None
    return replace(state, cooldown_until=max(until, current) if current else until,
                   learned_rpm=limit if limit and limit > 0 else state.learned_rpm)


def after_gone(state: ModelState) -> ModelState:
    return replace(state, dead=True)
