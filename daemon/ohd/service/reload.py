"""SIGHUP: the configuration and the rule files read again, without dropping a task.

The signal only sets a flag (`request`); `run`, on the event loop, does the work: it reads
the settings (in a thread), applies their live keys (`supervision.LIVE_KEYS`) to the running
pool through its one writer (`live.Live`), registers the rule files of tasks.d/ again and
wakes the pool and the rules. `workers` resizes the pool (surplus workers finish their task
first); `models`, the logging, the governor's limits and budgets, model selection and the
validation settings apply at once; a key that cannot change live is named in a warning.
`settings` are the running ones: they never take a value that failed to apply, and a reload
that fails as a whole keeps them all. systemd hears RELOADING, then READY with the summary.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ohd.clock import Clock, first
from ohd.config import Settings
from ohd.errors import ConfigError, OhdError
from ohd.intake.rules import RuleBook
from ohd.ladder.testrun import Processes as TestProcesses
from ohd.service.assemble import agent_config_of, ladder_of, log_sandbox, policy_of, rank_of
from ohd.service.live import Live
from ohd.service.notify import Notifier
from ohd.service.supervision import (
    LADDER_KEYS,
    POLICY_KEYS,
    SELECTION_KEYS,
    WEBHOOK_KEYS,
    apply_logging,
    hook_secrets,
    live_changes,
    reread_rules,
    with_secrets,
)
from ohd.store.store import Store

log = logging.getLogger("ohd.daemon")   # a reload's lines are the daemon's, as they always were

Summary = Callable[[Mapping[str, Any]], str]   # the STATUS line from the pool's snapshot (reads the store)


class Reloader:
    """The running settings and what a SIGHUP does to them."""

    def __init__(self, settings: Settings, store: Store, clock: Clock, repos: list[Path], test_runs: TestProcesses,
                 notifier: Notifier, read: Callable[[], Settings] | None = None) -> None:
        self.settings = settings    # the running settings: the live keys of each reload applied
        self.store = store
        self.clock = clock
        self.repos = repos
        self.test_runs = test_runs  # where the ladder's test runs are registered (the daemon's)
        self.notifier = notifier
        self.read = read            # reads the configuration again; None: only the rules are re-read
        self.secrets = hook_secrets(settings)   # the webhooks' secrets: their variables leave the environment
        self.webhooks: Callable[[Settings], None] | None = None    # applies `webhooks` (the daemon's)
        self.event = asyncio.Event()

    def request(self) -> None:
        """SIGHUP (on the loop thread): only sets the flag; `run` does the work."""
        self.event.set()

    async def run(self, stop: asyncio.Event, live: Live, rulebook: RuleBook, summary: Summary) -> None:
        while not stop.is_set():
            await first(self.clock, stop, self.event)
            if self.event.is_set() and not stop.is_set():
                self.event.clear()
                await self.reload(live, rulebook, summary)

    async def reload(self, live: Live, rulebook: RuleBook, summary: Summary) -> None:
        """Read the configuration and the rule files again; running and queued tasks stay."""
        self.notifier.reloading(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)
        log.info("reloading the configuration and the rules (SIGHUP)")
        try:
            if self.read is not None:
                self.apply(await asyncio.to_thread(self.read), live)
        except OhdError as exc:
            log.error("reload: keeping the running configuration: %s", exc)
        await asyncio.to_thread(reread_rules, self.repos, rulebook)
        rulebook.wake()
        live.pool.wake()
        self.notifier.ready(await asyncio.to_thread(summary, live.pool.snapshot()))

    def apply(self, new: Settings, live: Live) -> None:
        """The live keys of `new` onto the running pool (see `supervision.LIVE_KEYS`)."""
        pool = live.pool
        changes = live_changes(self.settings, with_secrets(new, self.secrets))
        apply_logging(self.settings, changes)     # level, format, file (reopened: a rotated one is let go)
        if "workers" in changes:
            log.info("reload: workers %d -> %d", pool.size, new.workers)
            pool.resize(new.workers)
        if "models" in changes and not self.settings.use_offline:
            live.use_models(list(new.models))
        if "agents" in changes:
            live.use_agents(agent_config_of(new))
        if LADDER_KEYS & changes.keys():
            try:
                live.use_ladder(ladder_of(new, self.test_runs))
                log_sandbox(pool.ladder)
            except ConfigError as exc:
                log.error("reload: keeping the running validation settings: %s", exc)
                changes = {key: value for key, value in changes.items() if key not in LADDER_KEYS}
        if WEBHOOK_KEYS & changes.keys() and self.webhooks is not None:
            try:
                self.webhooks(self.settings.model_copy(update={k: v for k, v in changes.items() if k in WEBHOOK_KEYS}))
            except ConfigError as exc:
                log.error("reload: keeping the running webhooks: %s", exc)
                changes = {key: value for key, value in changes.items() if key not in WEBHOOK_KEYS}
        self.settings = self.settings.model_copy(update=changes)
        if POLICY_KEYS & changes.keys():
            live.use_policy(policy_of(self.settings))
        if SELECTION_KEYS & changes.keys():
            live.use_rank(rank_of(self.settings, self.store))
        if (POLICY_KEYS | {"models"}) & changes.keys():    # what pending tasks wait for may have changed
            if self.store.promote_due(self.clock.now(), True):
                pool.wake()
        log.info("reload: applied %s", ", ".join(sorted(changes)) or "no configuration change")

