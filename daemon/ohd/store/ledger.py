"""A History whose aggregates (usage, latencies, efficiency, the charts' activity) are kept, not re-read each time.

`History.usage`, `History.latencies` and `History.efficiency` read every execution each time (the latencies as rows, for
exact percentiles): the daemon's status, `/models`, `/metrics` and the dashboard asked for them on
every request, and at 10,000 executions that was most of their time. `KeptHistory` answers the
same from sums and sorted latency lists it holds, and each call reads only the executions it has
not counted yet (replays left out of the usage and latencies, as there). That is exact because ohd only ever inserts
executions (never updates or deletes one, nor changes whether one is a replay) and a task's type
never changes. Ids are not committed in order on PostgreSQL with several
daemons (a lower id may commit after a higher one was read), so the ids of the newest `OVERLAP`
executions are looked at again each time (from the primary key's index) and any not yet counted
are read then. `activity` (the dashboard's charts, a pass over the last hours' rows) is kept with
a marker of what it was read from, and read again when the marker moves. Thread-safe (the socket
server's threads and the web listener's share one).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime
from typing import Any, cast

import peewee

from ohd.store.history import ANSWERED, HOUR, UNKNOWN_TYPE, Activity, Efficiency, History, Usage
from ohd.store.records import tuple_rows
from ohd.store.schema import Tables, TaskStatus

OVERLAP = 1000      # the newest ids looked at again each time, for a lower id committed late
CHUNK = 500         # ids per `IN (...)` when reading the executions not yet counted


class KeptHistory(History):
    """History with `usage`, `latencies` and `efficiency` kept incrementally, and `activity` kept until the store
    says it changed (see the module's docstring)."""

    def __init__(self, db: peewee.Database, models: Tables) -> None:
        super().__init__(db, models)
        self._lock = threading.Lock()
        self._usage: dict[tuple[str, str, str], list[float]] = {}   # calls, prompt, completion, cost
        self._latencies: dict[tuple[str, str], list[int]] = {}
        self._efficiency: dict[tuple[str, str], list[int]] = {}    # requests sent, accepted, replays
        self._recent: set[int] = set()      # counted ids above `_high - OVERLAP`
        self._high = 0                      # the highest id counted
        self._activity: tuple[tuple[object, ...], Activity] | None = None   # (its marker, the answer)

    def usage(self) -> list[Usage]:
        with self._lock:
            self._catch_up()
            return [Usage(model, kind, outcome, int(calls), int(prompt), int(completion), cost)
                    for (model, kind, outcome), (calls, prompt, completion, cost) in sorted(self._usage.items())]

    def latencies(self) -> dict[tuple[str, str], list[int]]:
        with self._lock:
            self._catch_up()
            return {key: list(values) for key, values in self._latencies.items()}

    def efficiency(self) -> list[Efficiency]:
        with self._lock:
            self._catch_up()
            return [Efficiency(model, kind, sent, accepted, saved)
                    for (model, kind), (sent, accepted, saved) in sorted(self._efficiency.items())]

    def activity(self, now: datetime, hours: int) -> Activity:
        """`History.activity`, read again only when its marker moved: the window's first hour, the
        tasks per status with the last finish of each ended status (a task that completes, fails or
        is retried moves one), and the executions' count and highest id (an execution is only ever
        inserted). Each is one index lookup or index count, not a pass over the window's rows."""
        first = now.replace(minute=0, second=0, microsecond=0) - (hours - 1) * HOUR
        marker = (first, hours, *self._marks())
        with self._lock:
            kept = self._activity
        if kept is None or kept[0] != marker:
            kept = (marker, super().activity(now, hours))
            with self._lock:
                self._activity = kept
        return replace(kept[1], until=now)

    def _marks(self) -> tuple[object, ...]:
        self._read()
        t, e, fn = self.m.task, self.m.execution, peewee.fn
        counts = tuple(sorted(self.task_counts().items()))
        last = tuple(t.select(fn.MAX(t.finished_at)).where(t.status == status).scalar()
                     for status in (TaskStatus.COMPLETED.value, TaskStatus.FAILED.value))
        executions = tuple(cast(Any, self.db).execute(e.select(fn.COUNT(e.id), fn.MAX(e.id))).fetchone())
        return counts, last, executions

    def _catch_up(self) -> None:
        """Count the executions committed since the last call."""
        self._read()
        e = self.m.execution
        floor = max(0, self._high - OVERLAP)
        db = cast(Any, self.db)
        # one row first (an index count): the ids themselves only when something new committed
        above, high = db.execute(e.select(peewee.fn.COUNT(e.id), peewee.fn.MAX(e.id)).where(e.id > floor)).fetchone()
        if int(above) == len(self._recent) and int(high or 0) <= self._high:     # every id above floor counted
            return
        # plain tuples from the cursor: no row objects for the ids looked at again
        ids = db.execute(e.select(e.id).where(e.id > floor)).fetchall()
        unseen = [int(i) for (i,) in ids if int(i) not in self._recent]
        if not unseen:
            return
        for start in range(0, len(unseen), CHUNK):
            self._count(self._rows(unseen[start:start + CHUNK]))
        self._recent.update(unseen)
        self._high = max(self._high, *unseen)
        self._recent = {i for i in self._recent if i > self._high - OVERLAP}

    def _rows(self, ids: list[int]) -> Iterable[tuple[object, ...]]:
        e, t = self.m.execution, self.m.task
        return tuple_rows(e.select(e.model, t.type, e.outcome, e.prompt_tokens, e.completion_tokens, e.cost,
                                   e.latency_ms, e.cached)
                          .join(t, peewee.JOIN.LEFT_OUTER, on=(e.task_id == t.id)).where(e.id.in_(ids)))

    def _count(self, rows: Iterable[tuple[object, ...]]) -> None:
        for model, kind, outcome, prompt, completion, cost, latency, cached in rows:
            key = (str(model), str(kind or UNKNOWN_TYPE))
            counts = self._efficiency.setdefault(key, [0, 0, 0])
            counts[2 if cached else 0] += 1
            counts[1] += outcome == "accepted"
            if cached:      # a replay sent no request: in the efficiency only, as in History
                continue
            sums = self._usage.setdefault((*key, str(outcome)), [0, 0, 0, 0.0])
            sums[0] += 1
            sums[1] += int(prompt or 0)             # type: ignore[call-overload]
            sums[2] += int(completion or 0)         # type: ignore[call-overload]
            sums[3] += float(cost or 0.0)           # type: ignore[arg-type]
            if outcome in ANSWERED:
                bisect.insort(self._latencies.setdefault(key, []), int(latency))   # type: ignore[call-overload]
