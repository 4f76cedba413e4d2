"""Metrics: a snapshot of what ohd measured, as JSON-ready data and as Prometheus text.

`collect(history, now, uptime_s)` reads the aggregates (`ohd.store.history`) once and builds
a frozen `Metrics`; `summarize` (pure) turns usage rows and latency lists into per-model
and per-(model, task type) `CallStats`; `prometheus(metrics)` writes the text exposition
format 0.0.4 by hand (HELP and TYPE before each family's samples, label values escaped
for backslash, double quote and newline). Invariant: nothing here writes or keeps state
between snapshots; the uptime and the time come in as values.

Definitions: success rate = accepted / calls (every call, 429s included, but not a coding
agent's requests, which get no verdict of their own: `agent_requests` counts them); latency
percentiles are nearest-rank over calls that got an answer (accepted, rejected,
malformed, agent requests), so fast refusals do not make a model look quick; cost is in USD,
with an unknown cost counted as 0.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import chain
from typing import Any

from ohd.store.history import AGENT_REQUEST, History, Usage, percentile

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
    uptime_s: float
    tasks: Mapping[str, int]
    totals: CallStats
    throughput: Throughput
    models: tuple[ModelMetrics, ...]

    def model(self, model_id: str) -> ModelMetrics | None:
        return next((m for m in self.models if m.model == model_id), None)

    def as_dict(self) -> dict[str, Any]:
        return {"generated_at": self.generated_at.isoformat(), "uptime_s": round(self.uptime_s, 3),
                "tasks": dict(self.tasks), "totals": self.totals.as_dict(),
                "throughput": self.throughput.as_dict(), "models": [m.as_dict() for m in self.models]}


# -- building a snapshot ----------------------------------------------------------------


def collect(history: History, now: datetime, uptime_s: float, window: timedelta = DEFAULT_WINDOW) -> Metrics:
    """Read the aggregates once and build the snapshot at `now`."""
    totals, models = summarize(history.usage(), history.latencies())
    throughput = Throughput(completed_last_hour=history.completed_between(now - HOUR, now),
                            window_s=window.total_seconds(),
                            completed_in_window=history.completed_between(now - window, now))
    return Metrics(generated_at=now, uptime_s=uptime_s, tasks=history.task_counts(), totals=totals,
                   throughput=throughput, models=models)


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


# -- Prometheus text exposition format 0.0.4 ------------------------------------------

Sample = tuple[Mapping[str, str], float]
Series = tuple[str, Mapping[str, str], float]     # a sample with its name's suffix (a summary's `_sum`)


def prometheus(metrics: Metrics) -> str:
    """The snapshot in the Prometheus text format; ends with a newline.

    `promtool check metrics` passes on it: units are spelled out (`_seconds`), and the latency
    percentiles are a summary, the only type a `quantile` label belongs to.
    """
    families: list[tuple[str, str, str, Sequence[Sample | Series]]] = [
        ("ohd_uptime_seconds", "gauge", "Seconds since the daemon started.", [({}, metrics.uptime_s)]),
        ("ohd_tasks", "gauge", "Tasks in the store, by status.",
         [({"status": status}, count) for status, count in sorted(metrics.tasks.items())]),
        ("ohd_tasks_completed_last_hour", "gauge", "Tasks completed in the last hour.",
         [({}, metrics.throughput.completed_last_hour)]),
        ("ohd_throughput_tasks_per_minute", "gauge",
         f"Tasks completed per minute over the last {metrics.throughput.window_s:g} seconds.",
         [({}, metrics.throughput.per_minute)]),
        ("ohd_model_calls_total", "counter", "Model calls, by model, task type and outcome.", _call_samples(metrics)),
        ("ohd_model_tokens_total", "counter", "Tokens used, by model, task type and kind (prompt, completion).",
         _token_samples(metrics)),
        ("ohd_model_cost_usd_total", "counter", "Cost of model calls in USD (unknown cost counts as 0).",
         [({"model": m.model, "task_type": kind}, s.cost) for m in metrics.models for kind, s in m.by_task_type]),
        ("ohd_model_success_ratio", "gauge", "Accepted results / calls, by model.",
         [({"model": m.model}, rate) for m in metrics.models if (rate := m.stats.success_rate) is not None]),
        ("ohd_model_latency_seconds", "summary",
         "Latency of the calls that got an answer, by model: percentiles (nearest rank), sum and count.",
         _latency_series(metrics)),
    ]
    lines = []
    for name, kind, help_text, samples in families:
        lines += [f"# HELP {name} {escape_help(help_text)}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{suffix}{format_labels(labels)} {format_value(value)}"
                  for suffix, labels, value in map(_series, samples)]
    return "\n".join(lines) + "\n"


def _series(sample: Sample | Series) -> Series:
    return sample if len(sample) == 3 else ("", sample[0], sample[1])


def _call_samples(metrics: Metrics) -> list[Sample]:
    samples: list[Sample] = []
    for m in metrics.models:
        for kind, stats in m.by_task_type:
            outcomes = list(OUTCOMES) + sorted(set(stats.outcomes) - set(OUTCOMES))
            samples += [({"model": m.model, "task_type": kind, "outcome": outcome}, stats.count(outcome))
                        for outcome in outcomes]
    return samples


def _token_samples(metrics: Metrics) -> list[Sample]:
    return [({"model": m.model, "task_type": kind, "kind": which}, tokens)
            for m in metrics.models for kind, s in m.by_task_type
            for which, tokens in (("prompt", s.prompt_tokens), ("completion", s.completion_tokens))]


def _latency_series(metrics: Metrics) -> list[Series]:
    series: list[Series] = []
    for m in metrics.models:
        if not m.stats.answered:
            continue
        for label, value in zip(QUANTILES, (m.stats.latency_p50_ms, m.stats.latency_p95_ms), strict=True):
            if value is not None:
                series.append(("", {"model": m.model, "quantile": label}, value / 1000))
        series += [("_sum", {"model": m.model}, m.stats.latency_sum_ms / 1000),
                   ("_count", {"model": m.model}, m.stats.answered)]
    return series


def escape_label(value: str) -> str:
    """A label value as the format wants it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """HELP text escapes backslash and newline (quotes stay as they are)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{escape_label(value)}"' for key, value in labels.items()) + "}"


def format_value(value: float) -> str:
    """Integers without a decimal point; NaN and infinities as Prometheus spells them."""
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))
