"""Metrics: a snapshot of what ohd measured, as JSON-ready data and as Prometheus text.

`collect(history, now, uptime_s)` reads the aggregates (`ohd.store.history`) once and builds
a frozen `Metrics`; `summarize` (pure) turns usage rows and latency lists into per-model
and per-(model, task type) `CallStats`; `prometheus(metrics)` is the text exposition format,
written by prometheus_client from `SnapshotCollector`'s families. Invariant: nothing here writes
or keeps state between snapshots; the uptime (None without a daemon) and the time come in as values.

Definitions: success rate = accepted / calls (every call, 429s included, but not a coding
agent's requests, which get no verdict of their own: `agent_requests` counts them); latency
percentiles are nearest-rank over calls that got an answer (accepted, rejected,
malformed, agent requests), so fast refusals do not make a model look quick; cost is in USD,
with an unknown cost counted as 0. An answer the replay cache replayed is no call (it sent no
request): `efficiency` gives, per model and task type, the requests sent, the accepted outputs
(replayed ones included), accepted outputs per request, and the requests the cache saved.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import chain
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ohd.store.history import AGENT_REQUEST, Efficiency, History, Usage, percentile

log = logging.getLogger("ohd.metrics")

OUTCOMES = ("accepted", "rejected", "error", "malformed", "rate_limited", AGENT_REQUEST)
QUANTILES = ("0.5", "0.95")   # the label values of the two latency percentiles
HOUR = timedelta(hours=1)
DEFAULT_WINDOW = timedelta(minutes=10)


@dataclass(frozen=True, slots=True)
class CallStats:
    """Model calls summed over some group, with their outcomes, tokens, cost and latency."""

    outcomes: Mapping[str, int]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    latency_p50_ms: int | None = None
    latency_p95_ms: int | None = None
    answered: int = 0              # the calls the latencies are of (those that got an answer)
    latency_sum_ms: int = 0

    @property
    def calls(self) -> int:
        return sum(self.outcomes.values())

    def count(self, outcome: str) -> int:
        return self.outcomes.get(outcome, 0)

    @property
    def success_rate(self) -> float | None:
        """accepted / calls (an agent's requests left out); None before the first such call."""
        judged = self.calls - self.count(AGENT_REQUEST)
        return self.count("accepted") / judged if judged else None

    def as_dict(self) -> dict[str, Any]:
        rate = self.success_rate
        return {"calls": self.calls, "accepted": self.count("accepted"), "rejected": self.count("rejected"),
                "errors": self.count("error"), "malformed": self.count("malformed"),
                "rate_limited": self.count("rate_limited"), "agent_requests": self.count(AGENT_REQUEST),
                "success_rate": None if rate is None else round(rate, 4),
                "latency_p50_ms": self.latency_p50_ms, "latency_p95_ms": self.latency_p95_ms,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "cost": round(self.cost, 8)}


NO_CALLS = CallStats(outcomes={})


@dataclass(frozen=True, slots=True)
class ModelMetrics:
    model: str
    stats: CallStats
    by_task_type: tuple[tuple[str, CallStats], ...]

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, **self.stats.as_dict(),
                "by_task_type": [{"task_type": kind, **stats.as_dict()} for kind, stats in self.by_task_type]}


@dataclass(frozen=True, slots=True)
class Throughput:
    completed_last_hour: int
    window_s: float
    completed_in_window: int

    @property
    def per_minute(self) -> float:
        """Tasks completed per minute over the window."""
        return self.completed_in_window / (self.window_s / 60) if self.window_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"completed_last_hour": self.completed_last_hour, "window_s": self.window_s,
                "completed_in_window": self.completed_in_window, "per_minute": round(self.per_minute, 4)}


@dataclass(frozen=True, slots=True)
class Metrics:
    """One snapshot; `as_dict` is the JSON of `GET /metrics.json` and `ohd metrics --json`."""

    generated_at: datetime
    uptime_s: float | None          # None: no daemon (`ohd metrics --textfile` reads the store itself)
    tasks: Mapping[str, int]
    totals: CallStats
    throughput: Throughput
    models: tuple[ModelMetrics, ...]
    efficiency: tuple[Efficiency, ...] = ()    # per (model, task type): requests, accepted, saved

    def model(self, model_id: str) -> ModelMetrics | None:
        return next((m for m in self.models if m.model == model_id), None)

    def as_dict(self) -> dict[str, Any]:
        uptime = None if self.uptime_s is None else round(self.uptime_s, 3)
        return {"generated_at": self.generated_at.isoformat(), "uptime_s": uptime,
                "tasks": dict(self.tasks), "totals": self.totals.as_dict(),
                "throughput": self.throughput.as_dict(), "models": [m.as_dict() for m in self.models],
                "efficiency": efficiency_dict(self.efficiency)}


def efficiency_dict(rows: Sequence[Efficiency]) -> dict[str, Any]:
    """The quota's efficiency as JSON: the totals (accepted outputs per request sent, requests saved
    by the replay cache) and the same per model and task type."""
    total = Efficiency("*", "*", sum(r.requests for r in rows), sum(r.accepted for r in rows),
                       sum(r.saved for r in rows))
    return {"requests": total.requests, "accepted": total.accepted, "saved": total.saved,
            "accepted_per_request": total.accepted_per_request, "by_model": [r.as_dict() for r in rows]}


# -- building a snapshot ----------------------------------------------------------------


def collect(history: History, now: datetime, uptime_s: float | None,
            window: timedelta = DEFAULT_WINDOW) -> Metrics:
    """Read the aggregates once and build the snapshot at `now`."""
    totals, models = summarize(history.usage(), history.latencies())
    throughput = Throughput(completed_last_hour=history.completed_between(now - HOUR, now),
                            window_s=window.total_seconds(),
                            completed_in_window=history.completed_between(now - window, now))
    return Metrics(generated_at=now, uptime_s=uptime_s, tasks=history.task_counts(), totals=totals,
                   throughput=throughput, models=models, efficiency=tuple(history.efficiency()))


def summarize(usage: Sequence[Usage], latencies: Mapping[tuple[str, str], Sequence[int]]
              ) -> tuple[CallStats, tuple[ModelMetrics, ...]]:
    """System totals and per-model stats (each with its per-task-type stats)."""
    models = []
    for model in sorted({row.model for row in usage}):
        rows = [row for row in usage if row.model == model]
        kinds = sorted({row.task_type for row in rows})
        by_type = tuple((kind, call_stats([r for r in rows if r.task_type == kind], latencies.get((model, kind), ())))
                        for kind in kinds)
        merged = sorted(chain.from_iterable(latencies.get((model, kind), ()) for kind in kinds))
        models.append(ModelMetrics(model, call_stats(rows, merged), by_type))
    return call_stats(usage, sorted(chain.from_iterable(latencies.values()))), tuple(models)


def call_stats(rows: Iterable[Usage], sorted_latencies: Sequence[int]) -> CallStats:
    """Sum usage rows; percentiles from the (ascending) latencies of the same calls."""
    outcomes: dict[str, int] = {}
    prompt = completion = 0
    cost = 0.0
    for row in rows:
        outcomes[row.outcome] = outcomes.get(row.outcome, 0) + row.calls
        prompt += row.prompt_tokens
        completion += row.completion_tokens
        cost += row.cost
    # rounded: a float SUM drifts in the last digits (0.020000000000000004)
    return CallStats(outcomes=outcomes, prompt_tokens=prompt, completion_tokens=completion, cost=round(cost, 10),
                     latency_p50_ms=percentile(sorted_latencies, 0.5),
                     latency_p95_ms=percentile(sorted_latencies, 0.95),
                     answered=len(sorted_latencies), latency_sum_ms=sum(sorted_latencies))


def with_stats(states: Sequence[Mapping[str, Any]], metrics: Metrics) -> list[dict[str, Any]]:
    """Model states (from the pool) with each model's measured stats under "stats"."""
    merged = []
    for state in states:
        measured = metrics.model(str(state.get("id")))
        stats = measured.as_dict() if measured else {"model": state.get("id"), **NO_CALLS.as_dict(),
                                                     "by_task_type": []}
        stats.pop("model")
        merged.append({**state, "stats": stats})
    return merged


# -- Prometheus: the snapshot as metric families, written by prometheus_client ----------------


class SnapshotCollector(Collector):
    """A prometheus_client collector over one snapshot (the store-derived figures): the families
    below, in this order. The exposition itself (HELP and TYPE lines, escaping, number format) is
    prometheus_client's `generate_latest`; no format code is ohd's."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        if m.uptime_s is not None:      # none without a daemon (`ohd metrics --textfile`)
            yield GaugeMetricFamily("ohd_uptime_seconds", "Seconds since the daemon started.", value=m.uptime_s)
        tasks = GaugeMetricFamily("ohd_tasks", "Tasks in the store, by status.", labels=["status"])
        for status, count in sorted(m.tasks.items()):
            tasks.add_metric([status], count)
        yield tasks
        yield GaugeMetricFamily("ohd_tasks_completed_last_hour", "Tasks completed in the last hour.",
                                value=m.throughput.completed_last_hour)
        yield GaugeMetricFamily("ohd_throughput_tasks_per_minute",
                                f"Tasks completed per minute over the last {m.throughput.window_s:g} seconds.",
                                value=m.throughput.per_minute)
        yield from self._calls()
        success = GaugeMetricFamily("ohd_model_success_ratio", "Accepted results / calls, by model.", labels=["model"])
        for model in m.models:
            if (rate := model.stats.success_rate) is not None:
                success.add_metric([model.model], rate)
        yield success
        yield self._latency()
        yield from self._efficiency()

    def _efficiency(self) -> Iterator[Metric]:
        saved = CounterMetricFamily("ohd_model_requests_saved", "Requests the replay cache did not send (an "
                                    "accepted answer to the same request replayed), by model and task type.",
                                    labels=["model", "task_type"])
        ratio = GaugeMetricFamily("ohd_accepted_outputs_per_request", "Accepted outputs (replayed ones included) "
                                  "per model request sent, by model and task type.", labels=["model", "task_type"])
        for row in self.metrics.efficiency:
            saved.add_metric([row.model, row.task_type], row.saved)
            if (per := row.accepted_per_request) is not None:
                ratio.add_metric([row.model, row.task_type], per)
        yield from (saved, ratio)

    def _calls(self) -> Iterator[Metric]:
        calls = CounterMetricFamily("ohd_model_calls", "Model calls, by model, task type and outcome.",
                                    labels=["model", "task_type", "outcome"])
        tokens = CounterMetricFamily("ohd_model_tokens", "Tokens used, by model, task type and kind (prompt, "
                                     "completion).", labels=["model", "task_type", "kind"])
        cost = CounterMetricFamily("ohd_model_cost_usd", "Cost of model calls in USD (unknown cost counts as 0).",
                                   labels=["model", "task_type"])
        for model in self.metrics.models:
            for kind, stats in model.by_task_type:
                for outcome in list(OUTCOMES) + sorted(set(stats.outcomes) - set(OUTCOMES)):
                    calls.add_metric([model.model, kind, outcome], stats.count(outcome))
                tokens.add_metric([model.model, kind, "prompt"], stats.prompt_tokens)
                tokens.add_metric([model.model, kind, "completion"], stats.completion_tokens)
                cost.add_metric([model.model, kind], stats.cost)
        yield from (calls, tokens, cost)

    def _latency(self) -> Metric:
        """A summary with quantiles (prometheus_client's SummaryMetricFamily has none: samples by hand)."""
        name = "ohd_model_latency_seconds"
        latency = Metric(name, "Latency of the calls that got an answer, by model: percentiles (nearest rank), "
                               "sum and count.", "summary")
        for model in self.metrics.models:
            stats = model.stats
            if not stats.answered:
                continue
            for label, value in zip(QUANTILES, (stats.latency_p50_ms, stats.latency_p95_ms), strict=True):
                if value is not None:
                    latency.add_sample(name, {"model": model.model, "quantile": label}, value / 1000)
            latency.add_sample(name + "_sum", {"model": model.model}, stats.latency_sum_ms / 1000)
            latency.add_sample(name + "_count", {"model": model.model}, stats.answered)
        return latency


def prometheus(metrics: Metrics) -> str:
    """The snapshot in the Prometheus text format (0.0.4), as `generate_latest` writes it.

    `promtool check metrics` passes on it: units are spelled out (`_seconds`), counters end in
    `_total`, and the latency percentiles are a summary, the only type a `quantile` label belongs to.
    """
    return generate_latest(SnapshotCollector(metrics)).decode("utf-8")
