"""History: read-only SQL aggregates over the execution and task tables, for metrics and selection.

Takes the database and the tables a `Store` was built with (`History(store.db, store.m)`, the
`schema`'s models bound to it); it is a sibling of `store` in the edge layer, so it does not import it.
Invariant: nothing here writes. Every query groups in SQL except latencies, which come
back as sorted lists so that percentiles are exact (`percentile`, nearest rank).
Datetimes are timezone-aware UTC in and out, like the store's. An execution marked `cached` (an
answer the replay cache replayed: no request was sent) is no call: `usage`, the latencies and
`measured` leave it out, and `efficiency` counts it as a request saved.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import peewee

from ohd.core.selection import Measured
from ohd.store.fields import hour_of, read_hour
from ohd.store.records import tuple_rows
from ohd.store.schema import Tables, TaskStatus
from ohd.store.transactions import connect

log = logging.getLogger("ohd.history")

UNKNOWN_TYPE = "unknown"   # an execution whose task row is gone
AGENT_REQUEST = "agent_request"   # an answer to a coding agent's request (through the proxy): no verdict of its own
# Outcomes of calls that got an answer from the model; only these measure its latency
# (a 429 or a refused connection comes back at once and would make a model look fast).
ANSWERED = ("accepted", "rejected", "malformed", AGENT_REQUEST)
UNJUDGED = ("rate_limited", AGENT_REQUEST)   # left out of a model's success on a task type (selection)
HOUR = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class Efficiency:
    """What the quota bought on one task type from one model: `requests` sent (every call recorded,
    429s and errors included, replays not), `accepted` outputs (replayed ones included) and
    `saved`, the requests the replay cache did not send."""

    model: str
    task_type: str
    requests: int
    accepted: int
    saved: int

    @property
    def accepted_per_request(self) -> float | None:
        """Accepted outputs per request sent; None before the first request."""
        return round(self.accepted / self.requests, 4) if self.requests else None

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "task_type": self.task_type, "requests": self.requests,
                "accepted": self.accepted, "saved": self.saved, "accepted_per_request": self.accepted_per_request}


@dataclass(frozen=True, slots=True)
class Usage:
    """Calls of one model on one task type that ended with one outcome, summed."""

    model: str
    task_type: str
    outcome: str
    calls: int
    prompt_tokens: int
    completion_tokens: int
    cost: float


@dataclass(frozen=True, slots=True)
class HourCount:
    """Tasks that finished in the hour from `start` (UTC, on the hour), by how they ended."""

    start: datetime
    completed: int
    failed: int


@dataclass(frozen=True, slots=True)
class ModelActivity:
    """One model's calls that started in a window: accepted, rejected, any other outcome (errors,
    429s, malformed answers, agent requests), their tokens and cost (unknown counts as 0); replays
    left out (no request was sent), as in `usage`."""

    model: str
    accepted: int
    rejected: int
    other: int
    prompt_tokens: int
    completion_tokens: int
    cost: float

    @property
    def calls(self) -> int:
        return self.accepted + self.rejected + self.other


@dataclass(frozen=True, slots=True)
class Activity:
    """The last hours as the dashboard's charts draw them: `hours`, one per clock hour from `since`
    (the last one the current, partial hour); `models`, each model's calls since `since`."""

    since: datetime
    until: datetime
    hours: tuple[HourCount, ...]
    models: tuple[ModelActivity, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"since": self.since.isoformat(), "until": self.until.isoformat(),
                "hours": [{"start": h.start.isoformat(), "completed": h.completed, "failed": h.failed}
                          for h in self.hours],
                "models": [{"model": m.model, "calls": m.calls, "accepted": m.accepted, "rejected": m.rejected,
                            "other": m.other, "prompt_tokens": m.prompt_tokens,
                            "completion_tokens": m.completion_tokens, "cost": round(m.cost, 10)}
                           for m in self.models]}


def percentile(sorted_values: Sequence[int], q: float) -> int | None:
    """The nearest-rank `q` percentile (0 < q <= 1) of ascending values; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class History:
    """Aggregates of what ohd did, read from the store's tables."""

    def __init__(self, db: peewee.Database, models: Tables) -> None:
        self.db = db
        self.m = models

    def _read(self) -> None:
        connect(self.db)

    def usage(self) -> list[Usage]:
        """Per (model, task type, outcome): calls, tokens and cost (cost unknown counts as 0)."""
        self._read()
        e, t, fn = self.m.execution, self.m.task, peewee.fn
        query = (e.select(e.model, t.type, e.outcome, fn.COUNT(e.id), fn.SUM(e.prompt_tokens),
                          fn.SUM(e.completion_tokens), fn.SUM(e.cost))
                 .join(t, peewee.JOIN.LEFT_OUTER, on=(e.task_id == t.id))
                 .where(e.cached == False)  # noqa: E712 (SQL)
                 .group_by(e.model, t.type, e.outcome)
                 .order_by(e.model, t.type, e.outcome))
        return [Usage(str(model), str(kind or UNKNOWN_TYPE), str(outcome), int(calls), int(prompt or 0),
                      int(completion or 0), float(cost or 0.0))
                for model, kind, outcome, calls, prompt, completion, cost in tuple_rows(query)]

    def latencies(self) -> dict[tuple[str, str], list[int]]:
        """Latency (ms) of every answered call, ascending, per (model, task type)."""
        self._read()
        e, t = self.m.execution, self.m.task
        query = (e.select(e.model, t.type, e.latency_ms)
                 .join(t, peewee.JOIN.LEFT_OUTER, on=(e.task_id == t.id))
                 .where(e.outcome.in_(ANSWERED) & (e.cached == False)))  # noqa: E712
        found: dict[tuple[str, str], list[int]] = {}
        for model, kind, latency in tuple_rows(query):
            found.setdefault((str(model), str(kind or UNKNOWN_TYPE)), []).append(int(latency))
        return {key: sorted(values) for key, values in found.items()}

    def measured(self, task_type: str, recent: int | None = None) -> dict[str, Measured]:
        """Per model, its history on `task_type` as model selection weighs it (429s and agent requests
        left out of its calls, which are judged by the run's diff; their latency counts);
        with `recent`, only the newest `recent` executions of any kind count (models change, and
        a per-task query must not grow with the whole history)."""
        self._read()
        e, t, fn = self.m.execution, self.m.task, peewee.fn
        window = self._newer_than(recent)
        query = (e.select(e.model, e.outcome, fn.COUNT(e.id), fn.COUNT(e.score), fn.SUM(e.score))
                 .join(t, on=(e.task_id == t.id))
                 .where((t.type == task_type) & e.outcome.not_in(UNJUDGED) & (e.id > window)
                        & (e.cached == False))  # noqa: E712 (a replay is no new evidence of the model)
                 .group_by(e.model, e.outcome))
        rows: dict[str, list[tuple[str, int, int, float]]] = {}
        for model, outcome, calls, scored, total in tuple_rows(query):
            rows.setdefault(str(model), []).append((str(outcome), int(calls), int(scored), float(total or 0.0)))
        latencies = self._latencies_of(task_type, window)
        return {model: Measured(calls=sum(r[1] for r in found),
                                accepted=sum(r[1] for r in found if r[0] == "accepted"),
                                scored=sum(r[2] for r in found), score_sum=sum(r[3] for r in found),
                                answered=len(latencies.get(model, ())),
                                latency_p50_ms=percentile(latencies.get(model, ()), 0.5))
                for model, found in rows.items()}

    def _newer_than(self, recent: int | None) -> int:
        """The execution id after which the newest `recent` executions start (0: all of them)."""
        if recent is None:
            return 0
        e = self.m.execution
        newest = e.select(peewee.fn.MAX(e.id)).scalar()     # the primary key's index: no scan
        return max(0, int(newest or 0) - recent)

    def _latencies_of(self, task_type: str, window: int = 0) -> dict[str, list[int]]:
        e, t = self.m.execution, self.m.task
        query = (e.select(e.model, e.latency_ms).join(t, on=(e.task_id == t.id))
                 .where((t.type == task_type) & e.outcome.in_(ANSWERED) & (e.id > window)
                        & (e.cached == False)))  # noqa: E712
        found: dict[str, list[int]] = {}
        for model, latency in tuple_rows(query):
            found.setdefault(str(model), []).append(int(latency))
        return {model: sorted(values) for model, values in found.items()}

    def efficiency(self) -> list[Efficiency]:
        """Per (model, task type): requests sent, accepted outputs and requests saved by the replay cache."""
        self._read()
        e, t, fn = self.m.execution, self.m.task, peewee.fn
        sent = fn.SUM(peewee.Case(None, [(e.cached == False, 1)], 0))  # noqa: E712
        accepted = fn.SUM(peewee.Case(None, [(e.outcome == "accepted", 1)], 0))
        saved = fn.SUM(peewee.Case(None, [(e.cached == True, 1)], 0))  # noqa: E712
        query = (e.select(e.model, t.type, sent, accepted, saved)
                 .join(t, peewee.JOIN.LEFT_OUTER, on=(e.task_id == t.id))
                 .group_by(e.model, t.type).order_by(e.model, t.type))
        return [Efficiency(str(model), str(kind or UNKNOWN_TYPE), int(n or 0), int(ok or 0), int(hits or 0))
                for model, kind, n, ok, hits in tuple_rows(query)]

    def task_counts(self) -> dict[str, int]:
        """Tasks per status; every status present."""
        self._read()
        t = self.m.task
        counts = {status.value: 0 for status in TaskStatus}
        for status, count in tuple_rows(t.select(t.status, peewee.fn.COUNT(t.id)).group_by(t.status)):
            counts[str(status)] = int(count)
        return counts

    def completed_between(self, since: datetime, until: datetime) -> int:
        """Tasks that finished as completed in [since, until]."""
        self._read()
        t = self.m.task
        return int(t.select(t.id)
                   .where((t.status == TaskStatus.COMPLETED.value) & (t.finished_at >= since)
                          & (t.finished_at <= until))
                   .count())

    def activity(self, now: datetime, hours: int) -> Activity:
        """The `hours` clock hours up to `now` (the last one partial): tasks completed and failed per
        hour, and each model's calls, tokens and cost since the first hour began. Two grouped queries,
        each an index range over the window only (0015's indexes), not over the whole history."""
        self._read()
        first = now.replace(minute=0, second=0, microsecond=0) - (hours - 1) * HOUR
        starts = [first + n * HOUR for n in range(hours)]
        t, e, fn = self.m.task, self.m.execution, peewee.fn
        ended = (TaskStatus.COMPLETED.value, TaskStatus.FAILED.value)
        counts: dict[str, list[int]] = {status: [0] * hours for status in ended}
        index = {start: n for n, start in enumerate(starts)}
        hour = hour_of(t.finished_at)
        for status, key, count in tuple_rows(t.select(t.status, hour, fn.COUNT(t.id))
                                             .where(t.status.in_(ended) & (t.finished_at >= first))
                                             .group_by(t.status, hour)):
            if (n := index.get(read_hour(key))) is not None:
                counts[str(status)][n] = int(count)
        buckets = tuple(HourCount(start, done, failed)
                        for start, done, failed in zip(starts, counts["completed"], counts["failed"], strict=True))
        calls: dict[str, dict[str, Any]] = {}
        query = (e.select(e.model, e.outcome, fn.COUNT(e.id), fn.SUM(e.prompt_tokens), fn.SUM(e.completion_tokens),
                          fn.SUM(e.cost))
                 .where((e.started_at >= first) & (e.cached == False))  # noqa: E712 (a replay sent no request)
                 .group_by(e.model, e.outcome))
        for model, outcome, n, prompt, completion, cost in tuple_rows(query):
            row = calls.setdefault(str(model), {"accepted": 0, "rejected": 0, "other": 0, "prompt": 0,
                                                "completion": 0, "cost": 0.0})
            row[outcome if outcome in ("accepted", "rejected") else "other"] += int(n)
            row["prompt"] += int(prompt or 0)
            row["completion"] += int(completion or 0)
            row["cost"] += float(cost or 0.0)
        models = tuple(ModelActivity(model, r["accepted"], r["rejected"], r["other"], r["prompt"], r["completion"],
                                     round(r["cost"], 10)) for model, r in sorted(calls.items()))
        return Activity(since=first, until=now, hours=buckets, models=models)
