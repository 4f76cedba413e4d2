"""Model selection: rank the models for one task type by what they measured, best first.

Pure: measured values, priors and tags in, a ranking out; randomness is an injected
`random.Random` (None: no exploration). The score of a model for a task type is

    0.40 quality + 0.30 success + 0.20 latency + 0.10 specialization

with every component in 0..1:
- quality: the mean validation score of its results (calls that got a verdict);
- success: accepted / calls, over calls that reached the model (a 429 is the governor's
  business: it cools the model down; it says nothing about the model's work);
- latency: `ref / (ref + p50)` of its answered calls (1 at 0 ms, 0.5 at `ref`);
- specialization: 1 when one of its configured tags suits the task type, 0 when it has
  tags and none suits, 0.5 when it has none.
Each measured component is shrunk toward the model's prior (configured, else neutral
0.5) by `prior_calls` pseudo-calls: `(n * measured + k * prior) / (n + k)`, so a model
with two lucky calls does not beat one with a hundred good ones, and a model with no
history scores its prior. Exploration: with probability `epsilon` the least measured
other model goes first (marked `explored`), so new models get measured.
Invariant: the same inputs and Random state give the same ranking; ties keep the given
(configured) order.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

log = logging.getLogger("ohd.selection")

Rank = Callable[[str, list[str]], list[str]]   # (task type, models) -> best first: the pool's `rank`
WEIGHTS: Mapping[str, float] = {"quality": 0.40, "success": 0.30, "latency": 0.20, "specialization": 0.10}
NEUTRAL = 0.5
# The tags that suit each task type (config `model_tags` gives each model its tags).
SUITS: Mapping[str, frozenset[str]] = {
    "unit_test": frozenset({"quality", "reasoning"}),
    "docstring": frozenset({"speed", "balanced"}),
    "review": frozenset({"quality"}),
    "custom": frozenset({"balanced"}),
}


@dataclass(frozen=True, slots=True)
class Measured:
    """One model's history on one task type (from the execution rows)."""

    calls: int = 0                 # calls that reached the model (429s not counted)
    accepted: int = 0
    scored: int = 0                # results that got a verdict (and so a score)
    score_sum: float = 0.0
    answered: int = 0              # calls with an answer: the ones whose latency counts
    latency_p50_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Prior:
    """What to assume of a model before (and, shrinking, while) it is measured."""

    quality: float = NEUTRAL
    success: float = NEUTRAL
    latency_ms: float | None = None    # None: a neutral latency score


@dataclass(frozen=True, slots=True)
class Config:
    priors: Mapping[str, Prior] = field(default_factory=dict)
    tags: Mapping[str, Sequence[str]] = field(default_factory=dict)
    epsilon: float = 0.05
    prior_calls: float = 5.0           # the prior weighs as much as this many measured calls
    latency_ref_ms: float = 10_000.0   # the p50 that scores 0.5
    history: int = 1000                # only the newest this many executions are weighed


@dataclass(frozen=True, slots=True)
class Ranked:
    """One model's place in a ranking: each component, the weighted total, the evidence."""

    model: str
    quality: float
    success: float
    latency: float
    specialization: float
    total: float
    calls: int
    latency_p50_ms: int | None = None
    explored: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "total": round(self.total, 4), "quality": round(self.quality, 4),
                "success": round(self.success, 4), "latency": round(self.latency, 4),
                "specialization": round(self.specialization, 4), "calls": self.calls,
                "latency_p50_ms": self.latency_p50_ms, "explored": self.explored}


def shrink(value: float | None, n: int, prior: float, k: float) -> float:
    """The measured `value` over `n` observations pulled toward `prior` by `k` pseudo-observations."""
    if value is None or n <= 0:
        return prior
    if k <= 0:
        return value
    return (n * value + k * prior) / (n + k)


def latency_score(ms: float, ref_ms: float) -> float:
    """1 at 0 ms, 0.5 at `ref_ms`, toward 0 as it grows (faster is better)."""
    return ref_ms / (ref_ms + max(0.0, ms)) if ref_ms > 0 else NEUTRAL


def specialization(tags: Sequence[str], task_type: str) -> float:
    if not tags:
        return NEUTRAL
    suits = SUITS.get(task_type, frozenset())
    return 1.0 if any(tag.strip().lower() in suits for tag in tags) else 0.0


def weighted(quality: float, success: float, latency: float, special: float) -> float:
    return (WEIGHTS["quality"] * quality + WEIGHTS["success"] * success + WEIGHTS["latency"] * latency
            + WEIGHTS["specialization"] * special)


def score(model: str, task_type: str, measured: Measured, config: Config) -> Ranked:
    """One model's components and total for one task type."""
    prior = config.priors.get(model, Prior())
    k = config.prior_calls
    quality = shrink(measured.score_sum / measured.scored if measured.scored else None,
                     measured.scored, prior.quality, k)
    success = shrink(measured.accepted / measured.calls if measured.calls else None,
                     measured.calls, prior.success, k)
    prior_latency = NEUTRAL if prior.latency_ms is None else latency_score(prior.latency_ms, config.latency_ref_ms)
    p50 = measured.latency_p50_ms
    latency = shrink(None if p50 is None else latency_score(p50, config.latency_ref_ms),
                     measured.answered, prior_latency, k)
    special = specialization(config.tags.get(model, ()), task_type)
    return Ranked(model, quality, success, latency, special, weighted(quality, success, latency, special),
                  measured.calls, p50)


def rank(models: Sequence[str], task_type: str, measured: Mapping[str, Measured], config: Config,
         rng: random.Random | None = None) -> list[Ranked]:
    """`models` best first for `task_type`; with `rng`, sometimes an under-measured one first."""
    scored = [score(model, task_type, measured.get(model, Measured()), config) for model in dict.fromkeys(models)]
    ranked = sorted(scored, key=lambda r: -r.total)     # stable: ties keep the given order
    if rng is None or len(ranked) < 2 or rng.random() >= config.epsilon:
        return ranked
    others = ranked[1:]
    fewest = min(r.calls for r in others)
    pick = rng.choice([r for r in others if r.calls == fewest])
    log.debug("selection: exploring %s for %s (%d call(s) so far)", pick.model, task_type, pick.calls)
    return [replace(pick, explored=True)] + [r for r in ranked if r is not pick]


def order(ranking: Sequence[Ranked]) -> list[str]:
    return [r.model for r in ranking]


def ranking_text(task_type: str, ranking: Sequence[Mapping[str, Any]]) -> str:
    """The ranking as `ohd select-model` prints it (from `Ranked.as_dict` rows)."""
    header = (f"{'model':<44} {'total':>6} {'quality':>7} {'success':>7} {'latency':>7} {'special':>7} "
              f"{'calls':>5}  state")
    lines = [f"task type {task_type}: score = 0.40 quality + 0.30 success + 0.20 latency + 0.10 specialization",
             header]
    for row in ranking:
        lines.append(f"{row['model']:<44} {row['total']:>6.3f} {row['quality']:>7.3f} {row['success']:>7.3f} "
                     f"{row['latency']:>7.3f} {row['specialization']:>7.3f} {row['calls']:>5}  "
                     f"{row.get('state') or '-'}" + ("  (exploring)" if row.get("explored") else ""))
    return "\n".join(lines)
