"""The settings turned into the plain values and the few objects built from them.

Both sides read the configuration at the top and hand the rest of ohd values: the daemon
builds its pool, ladder, rules and ranking from these, and the `ohd` commands that read
the store themselves (`select-model`, `rules`) build theirs from the same functions, so a
command shows what the running daemon does. Nothing here starts a thread or keeps state;
`ladder_of` probes the sandbox (a few short processes), the rest only compute.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ohd.clock import Clock
from ohd.config import DEFAULT_MODELS, Settings, key_file
from ohd.core import selection
from ohd.core.events import Hook
from ohd.core.routing import Policy
from ohd.core.taskfile import TaskType
from ohd.errors import ConfigError
from ohd.intake.rules import RuleBook
from ohd.ladder import sandbox, validate
from ohd.ladder.ladder import Ladder
from ohd.ladder.testrun import Options as TestRunOptions
from ohd.ladder.testrun import Processes as TestProcesses
from ohd.logfmt import Redactor
from ohd.repo import gitrepo
from ohd.store.history import History
from ohd.store.ledger import KeptHistory
from ohd.store.quotas import Governor
from ohd.store.store import Store, sqlite_path
from ohd.webhooks.sender import Retry, Target
from ohd.work.agentproc import AgentConfig
from ohd.work.agentrun import AgentSetup

log = logging.getLogger("ohd.daemon")   # the sandbox's line is the daemon's, as it always was

OFFLINE_MODEL = "offline"


def repos_of(settings: Settings) -> list[Path]:
    """The repos to serve: those configured, else the current directory."""
    return list(settings.repos) or [Path.cwd().resolve()]


def identities_of(settings: Settings, repos: list[Path]) -> dict[str, str]:
    """Each repo's identity (`gitrepo.repo_identity`: its configured name, else its root commit and
    origin, else its path), by path; computed once, at the daemon's start."""
    return {str(repo): gitrepo.repo_identity(repo, settings.repo_names.get(str(repo))) for repo in repos}


def hooks_of(settings: Settings) -> list[Hook]:
    """The webhooks as the store writes their outbox rows: each one's key and events."""
    return [Hook(hook.key, frozenset(hook.events)) for hook in settings.webhooks]


def webhook_targets(settings: Settings) -> list[Target]:
    """The webhooks as the sender posts to them, each with its timeout and backoff (its own, else
    the `webhook_*` settings); a `secret_env` that is not set is a ConfigError (the daemon's: the
    commands that only read need no secret)."""
    for number, hook in enumerate(settings.webhooks):
        if hook.secret_env and hook.secret is None:
            raise ConfigError(f"webhooks[{number}] ({hook.key}): secret_env names {hook.secret_env}, "
                              "which is not set (or empty) in the daemon's environment")
    default = webhook_retry(settings)
    return [Target(hook.url, hook.format, hook.secret,
                   replace(default, timeout_s=hook.timeout_s or default.timeout_s,
                           first_s=hook.retry_s or default.first_s, max_s=hook.retry_max_s or default.max_s))
            for hook in settings.webhooks]


def webhook_retry(settings: Settings) -> Retry:
    return Retry(first_s=settings.webhook_retry_s, max_s=settings.webhook_retry_max_s,
                 max_age=timedelta(seconds=settings.webhook_max_age_s), timeout_s=settings.webhook_timeout_s)


def rulebook_for(settings: Settings, store: Store, clock: Clock) -> RuleBook:
    """The standing rules, with the cron timezone (None: local) and grace from the settings."""
    zone = None
    if settings.timezone:
        try:
            zone = ZoneInfo(settings.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"unknown timezone {settings.timezone!r} (use an IANA name)") from None
    return RuleBook(store, clock, timezone=zone, grace=timedelta(seconds=settings.schedule_grace_s))


def policy_of(settings: Settings) -> Policy:
    """The governor's limits and breaker settings as plain values."""
    return Policy(free_rpm=settings.free_rpm or None, free_rpd=settings.free_rpd or None,
                  rpm=dict(settings.rate_limits), rpd=dict(settings.daily_limits),
                  breaker_failures=settings.breaker_failures,
                  breaker_reset=timedelta(seconds=settings.breaker_reset_s),
                  window=timedelta(seconds=settings.quota_window_s),
                  margin=timedelta(seconds=settings.quota_margin_s),
                  allow_paid=settings.allow_paid or settings.use_offline,   # offline costs nothing
                  paid_models=frozenset(settings.paid_models),
                  unknown_price_paid=settings.openrouter,   # a server you run: unpriced models are free
                  request_cap=settings.daily_request_cap or None,
                  cost_cap=settings.daily_cost_cap_usd or None)


def key_id_of(settings: Settings) -> str:
    """A label for the API key's daily quota: a short digest, never the key itself."""
    if settings.api_key is None:
        return "default"
    return "key-" + hashlib.sha256(settings.api_key.get_secret_value().encode()).hexdigest()[:12]


def governor_of(settings: Settings, store: Store) -> Governor:
    """The governor as the daemon's pool has it: the settings' limits, the API key's quota label."""
    return Governor(store, policy_of(settings), key_id_of(settings))


def ladder_of(settings: Settings, processes: TestProcesses | None = None) -> Ladder:
    """How candidates are judged: pytest runs (never with the API key), `rule_levels`, and
    ruff / coverage.py where installed, in the strongest sandbox that works here (probed now), with
    ohd's own files hidden; `allow_risky_tests` switches the static screen (`safe_tests`) off unless
    `rule_levels` names it; ConfigError names an unknown task type, rule or level. The test runs are
    registered in `processes` (the daemon's, which a stop ends)."""
    try:
        levels = validate.parse_levels(settings.rule_levels, tuple(t.value for t in TaskType))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if settings.allow_risky_tests:
        levels = {**levels, "*": {"safe_tests": None, **levels.get("*", {})}}
    hide = sandbox.hidden_paths([settings.state_dir, settings.runtime_dir, key_file().parent,
                                 *private_files(settings)])
    tests = TestRunOptions(runs=settings.test_runs, timeout_s=settings.test_timeout_s,
                           secret_env=(settings.api_key_env,), python=settings.test_python,
                           slots=threading.BoundedSemaphore(settings.test_parallel or os.cpu_count() or 1),
                           redact=Redactor([settings.api_key.get_secret_value()] if settings.api_key else []).redact,
                           jail=sandbox.detect(hide, settings.test_sandbox, memory_mb=settings.test_memory_mb),
                           processes=processes)
    return Ladder.detect(tests, levels)


def log_sandbox(ladder: Ladder) -> None:
    """Say in which sandbox the generated tests run (a warning when it is not the namespace one)."""
    jail = ladder.tests.sandbox()
    if jail.level is sandbox.Level.NAMESPACE:
        log.info("generated tests run in the sandbox: %s", jail.describe())
    else:
        log.warning("generated tests run in a weaker sandbox: %s", jail.describe())


def discovers(settings: Settings) -> bool:
    """Models come from the server's catalogue: `discover = true` or `models = ["auto"]`."""
    return settings.discover or list(settings.models) == ["auto"]


def models_of(settings: Settings) -> list[str]:
    """The configured models; with `models = ["auto"]` OpenRouter's built-in free list until the first
    refresh, and on a server you run nothing until its `/models` is read (its ids are its own)."""
    if list(settings.models) != ["auto"]:
        return list(settings.models)
    return list(DEFAULT_MODELS) if settings.openrouter else []


def selection_of(settings: Settings) -> selection.Config:
    """Model selection's priors, tags and knobs as plain values."""
    priors = {model: selection.Prior(p.quality, p.success, p.latency_ms) for model, p in settings.model_priors.items()}
    return selection.Config(priors=priors, tags={m: tuple(tags) for m, tags in settings.model_tags.items()},
                            epsilon=settings.selection_epsilon, prior_calls=settings.selection_prior_calls,
                            latency_ref_ms=settings.selection_latency_ref_ms, history=settings.selection_history)


def history_of(store: Store) -> History:
    """The store's read-only history (executions, usage, throughput)."""
    return History(store.db, store.m)


def kept_history_of(store: Store) -> KeptHistory:
    """The history a running daemon's status and metrics read: its whole-history sums kept up to
    date, each request reading only the executions since the last (`store/ledger.py`)."""
    return KeptHistory(store.db, store.m)


def ranker(history: History, config: selection.Config,
           rng: random.Random | None = None) -> selection.Rank:
    """The pool's `rank`: (task type, models) -> best first by measured history (explores with `rng`)."""
    return lambda kind, models: selection.order(
        selection.rank(models, kind, history.measured(kind, config.history), config, rng))


def rank_of(settings: Settings, store: Store) -> selection.Rank | None:
    """The pool's ranking of `auto` models (None: `model_selection = false`, configured order)."""
    if not settings.model_selection:
        return None
    return ranker(history_of(store), selection_of(settings), random.Random())


def selection_report(settings: Settings, store: Store, task_type: str, now: datetime) -> dict[str, Any]:
    """How `auto` ranks the models for `task_type` (`ohd select-model`): each model's score
    components and its state at the governor, which skips all but the ready ones. The models
    are the configured ones; when they are discovered (the list lives in the daemon) those with
    a measured history are added."""
    config = selection_of(settings)
    measured = history_of(store).measured(task_type, config.history)
    models = [OFFLINE_MODEL] if settings.use_offline else [m for m in settings.models if m != "auto"]
    if not settings.use_offline and discovers(settings):
        models += sorted(set(measured) - set(models))
    ranking = selection.rank(models, task_type, measured, config)
    states = {view.model: view.health.value for view in governor_of(settings, store).views(models, now)}
    return {"task_type": task_type, "enabled": settings.model_selection, "weights": dict(selection.WEIGHTS),
            "ranking": [{**r.as_dict(), "state": states.get(r.model)} for r in ranking]}


def private_files(settings: Settings) -> list[Path]:
    """ohd's own files outside the state dir, to keep 0600: a SQLite database elsewhere (and its
    `-wal`, `-shm`), the log file, and the service's key file (the API key, written by hand)."""
    files = [key_file(), *([settings.log_file] if settings.log_file else [])]
    database = sqlite_path(settings.database)
    if database is not None:
        files += [database, database.with_name(database.name + "-wal"), database.with_name(database.name + "-shm")]
    return files


def agent_config_of(settings: Settings) -> AgentConfig:
    """`[agents]` as the agent runners' plain values."""
    agents = settings.agents
    aider = (os.path.expanduser(agents.aider[0]), *agents.aider[1:])
    return AgentConfig(aider=aider, openhands_python=os.path.expanduser(agents.openhands_python),
                       command=tuple(agents.command), pass_env=tuple(agents.pass_env))


def agents_of(settings: Settings) -> AgentSetup:
    """What the pool runs agent tasks with: the state dir (their worktrees), `[agents]`, the call
    history's cap for their output (the proxy is added by the daemon once it runs)."""
    return AgentSetup(state_dir=settings.state_dir, config=agent_config_of(settings),
                      max_bytes=settings.call_history_max_bytes)
