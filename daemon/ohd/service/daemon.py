"""The daemon's wiring: build every object from `Settings`, start them, stop them well.

Start-up: take the single-instance lock, migrate the store, return expired leases to
the queue, scan each repo's `tasks.d/` (files dropped while we were down), start the
observers, the workers and the socket; git-hook events waiting in each repo's spool go to
the on_change rules once the rule files are read. The daemon runs under a umask of 0o077 and makes
its state and runtime dirs 0700 and their files 0600 at start (`statedir`). SIGTERM/SIGINT only set a flag: the pool stops
claiming, running tasks get `grace_s` to finish, the rest go back to `queued` (no attempt spent)
and their test runs are killed; a start-up GET /models in flight is cancelled at once.
Threads (watchdog, the socket server) reach the event loop only through
`call_soon_threadsafe`.

Under systemd (`Type=notify`) the daemon says READY once the socket listens, STATUS (a
one-line queue summary, at most once a second and only when it changed), STOPPING on
SIGTERM, and WATCHDOG=1 at half of `WatchdogSec`. SIGHUP re-reads the configuration and
the rules without dropping a task: `workers` resizes the pool (surplus workers finish
their task first); `models`, the logging, the governor's limits and budgets, model
selection and the validation settings apply at once (`supervision.LIVE_KEYS`); keys that
cannot change live are named in a warning.
"""

from __future__ import annotations

import asyncio
import faulthandler
import fcntl
import hashlib
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ohd import __version__
from ohd.clock import Clock, SystemClock
from ohd.config import DEFAULT_MODELS, Settings, key_file
from ohd.core import selection
from ohd.core.routing import Policy
from ohd.core.taskfile import TaskSpec, TaskType
from ohd.core.tasktypes import Job
from ohd.core.views import eta_seconds
from ohd.errors import ConfigError, DaemonAlreadyRunning, OhdError, StorageUnavailable, TaskFileError, unwritable_reason
from ohd.intake.ingest import Ingestor
from ohd.intake.rules import RuleBook, read_rules
from ohd.intake.spool import SpoolReader, find_spool
from ohd.intake.watch import TasksDirWatcher
from ohd.intake.watch import SpoolWatcher, TreeWatcher
from ohd.ladder import sandbox, validate
from ohd.ladder.ladder import Ladder
from ohd.ladder.testrun import CANDIDATE_NAME
from ohd.ladder.testrun import Options as TestRunOptions
from ohd.ladder.testrun import Processes as TestProcesses
from ohd.logfmt import Redactor
from ohd.models.catalogue import Catalogue
from ohd.models.llm import Completion, ModelClient, OfflineProvider, http_client
from ohd.repo import outputs
from ohd.service import statedir
from ohd.service.metrics import DEFAULT_WINDOW, HOUR, Metrics, Throughput, collect, prometheus, with_stats
from ohd.service.notify import Notifier, watchdog_interval
from ohd.service.server import ApiServer
from ohd.service.supervision import LADDER_KEYS, POLICY_KEYS, SELECTION_KEYS, apply_logging, first, live_changes, reread_rules, summary
from ohd.store.calls import CallHistory
from ohd.store.history import History
from ohd.store.store import Store, TaskStatus, open_database, sqlite_path
from ohd.work import delivery
from ohd.work.delivery import Outcome
from ohd.work.worker import Caller, Pool

log = logging.getLogger("ohd.daemon")

OFFLINE_MODEL = "offline"


class InstanceLock:
    """An exclusive `flock` on `<state_dir>/ohd.lock`, holding our pid; released on exit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock; DaemonAlreadyRunning if another daemon holds it, StorageUnavailable when the
        state dir's disk is full or read-only (said in one line, not a traceback)."""
        try:
            self._acquire()
        except OSError as exc:
            if (reason := unwritable_reason(exc)) is None:
                raise
            self.release()
            raise StorageUnavailable(str(self.path), reason, str(exc), what="the lock file") from None

    def _acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        self.handle = handle
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            text = handle.read().strip()
            handle.close()
            self.handle = None
            raise DaemonAlreadyRunning(str(self.path), int(text) if text.isdigit() else None) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            try:
                self.handle.close()
            except OSError:      # the pid could not be flushed (a full disk): nothing to keep
                pass
            self.handle = None


def rulebook_for(settings: Settings, store: Store, clock: Clock) -> RuleBook:
    """The standing rules, with the cron timezone (None: local) and grace from the settings."""
    zone = None
    if settings.timezone:
        try:
            zone = ZoneInfo(settings.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"unknown timezone {settings.timezone!r} (use an IANA name)") from None
    return RuleBook(store, clock, timezone=zone, grace=timedelta(seconds=settings.schedule_grace_s))


def repos_of(settings: Settings) -> list[Path]:
    """The repos to serve: those configured, else the current directory."""
    return list(settings.repos) or [Path.cwd().resolve()]


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


def discovers(settings: Settings) -> bool:
    """Models come from the server's catalogue: `discover = true` or `models = ["auto"]`."""
    return settings.discover or list(settings.models) == ["auto"]


def models_of(settings: Settings) -> list[str]:
    """The configured models; with `models = ["auto"]` OpenRouter's built-in free list until the first
    refresh, and on a server you run nothing until its `/models` is read (its ids are its own)."""
    if list(settings.models) != ["auto"]:
        return list(settings.models)
    return list(DEFAULT_MODELS) if settings.openrouter else []


def key_id_of(settings: Settings) -> str:
    """A label for the API key's daily quota: a short digest, never the key itself."""
    if settings.api_key is None:
        return "default"
    return "key-" + hashlib.sha256(settings.api_key.get_secret_value().encode()).hexdigest()[:12]


def selection_of(settings: Settings) -> selection.Config:
    """Model selection's priors, tags and knobs as plain values."""
    priors = {model: selection.Prior(p.quality, p.success, p.latency_ms) for model, p in settings.model_priors.items()}
    return selection.Config(priors=priors, tags={m: tuple(tags) for m, tags in settings.model_tags.items()},
                            epsilon=settings.selection_epsilon, prior_calls=settings.selection_prior_calls,
                            latency_ref_ms=settings.selection_latency_ref_ms, history=settings.selection_history)


def ranker(history: History, config: selection.Config,
           rng: random.Random | None = None) -> selection.Rank:
    """The pool's `rank`: (task type, models) -> best first by measured history (explores with `rng`)."""
    return lambda kind, models: selection.order(
        selection.rank(models, kind, history.measured(kind, config.history), config, rng))


class Daemon:
    def __init__(self, settings: Settings, clock: Clock | None = None, *,
                 reload: Callable[[], Settings] | None = None, notifier: Notifier | None = None,
                 watchdog_s: float | None = None) -> None:
        self.settings = settings
        self.reloader = reload              # reads the configuration again (SIGHUP)
        self.notifier = notifier or Notifier(None)
        self.watchdog_s = watchdog_s
        self.reload_event = asyncio.Event()
        self.clock: Clock = clock or SystemClock()
        self.repos = repos_of(settings)
        self.store = Store(open_database(settings.database), lock_wait_s=settings.store_lock_wait_s)
        self.stop_event = asyncio.Event()
        self.test_runs = TestProcesses()    # every pytest run of the ladder; killed at the grace deadline
        self.started = self.clock.monotonic()
        self.pool: Pool | None = None
        self.model_client: ModelClient | None = None
        self.rulebook: RuleBook | None = None

    def request_stop(self) -> None:
        """Signal-safe: only sets the flag (called on the loop thread)."""
        if not self.stop_event.is_set():
            log.info("stopping: no new tasks are claimed; running tasks get %gs", self.settings.grace_s)
            self.notifier.stopping(f"stopping: running tasks get {self.settings.grace_s:g}s to finish")
        self.stop_event.set()

    def _end_test_runs(self) -> None:
        """The grace period is over: the test runs of the tasks cut off are killed, none starts again."""
        killed = self.test_runs.stop()
        if killed:
            log.info("stopping: %d test run(s) of tasks going back to the queue killed", killed)

    def request_reload(self) -> None:
        """SIGHUP (on the loop thread): only sets the flag; `_reloads` does the work."""
        self.reload_event.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        async with AsyncExitStack() as stack:
            call, models = await self._models(stack)
            self.store.migrate()
            self._recover()
            pool = Pool(self.store, call, self.clock, models=models, size=self.settings.workers,
                        lease=timedelta(seconds=self.settings.lease_s), policy=policy_of(self.settings),
                        key_id=key_id_of(self.settings), rank=self._rank(self.settings))
            self.pool = pool
            pool.calls = CallHistory(self.store.db, self.settings.call_history_max_bytes, self.settings.call_history)
            pool.ladder = ladder_of(self.settings, self.test_runs)
            self._log_sandbox(pool.ladder)
            catalogue = self._catalogue(pool)
            if catalogue is not None and catalogue.discover and not self.settings.openrouter:
                # a server you run: its own list, not OpenRouter's, from the start (a SIGTERM ends the wait)
                await catalogue.refresh_until_stopped(self.stop_event)
            if self.model_client is not None:
                self.model_client.before_retry = pool.pace   # retries count against the quotas too
            rulebook = self.rulebook = rulebook_for(self.settings, self.store, self.clock)
            ingestor = Ingestor(self.store, self.clock, settle_s=self.settings.settle_s,
                                on_rule=lambda repo, rel, spec: self._on_rule(loop, rulebook, repo, rel, spec))
            for repo in self.repos:
                ingestor.scan(repo)
            watcher = TasksDirWatcher(lambda repo, path: loop.call_soon_threadsafe(ingestor.submit_path, repo, path))
            for repo in self.repos:
                watcher.watch(repo)
            watcher.start()
            stack.callback(watcher.stop)
            tree = TreeWatcher(self.clock, quiet_s=self.settings.quiet_s)
            for repo in self.repos:
                tree.watch(repo)
            tree.start(loop)
            stack.callback(tree.stop)
            spool = SpoolReader(lambda repo, paths, origin: self._hook_paths(loop, rulebook, pool, repo, paths,
                                                                            origin))
            spool_watcher = SpoolWatcher(spool.process)   # events are handled on its thread
            for repo in self.repos:
                if (inbox := find_spool(repo)) is not None:
                    spool_watcher.watch(repo, inbox)
            spool_watcher.start()
            stack.callback(spool_watcher.stop)
            server = ApiServer(self.settings.socket_path, self.store, repos=self.repos, clock=self.clock,
                               metrics=lambda: prometheus(self.metrics()),
                               metrics_json=lambda: self.metrics().as_dict(),
                               annotate_models=lambda states: with_stats(states, self.metrics()),
                               status=self.status, wake=lambda: loop.call_soon_threadsafe(pool.wake),
                               models=pool.model_states)
            server.start()
            stack.callback(server.stop)
            log.info("ohd %s ready: pid %d, %d worker(s), models %s, repos %s, socket %s", __version__,
                     os.getpid(), pool.size, ", ".join(pool.models) or
                     f"(those {self.settings.base_url}/models lists, once it answers)", ", ".join(map(str, self.repos)),
                     self.settings.socket_path)
            self.notifier.ready(await asyncio.to_thread(self.summary, pool.snapshot()))
            extra = [self._report_status(pool)] if self.notifier.enabled else []
            if self.watchdog_s is not None:
                extra.append(self.notifier.keep_alive(self.stop_event, self.watchdog_s))
            await asyncio.gather(
                *extra,
                self._reloads(pool, rulebook),
                pool.run(self.stop_event, grace_s=self.settings.grace_s, cut_off=self._end_test_runs),
                ingestor.run(self.stop_event, on_task=lambda _id: pool.wake()),
                self._housekeeping(pool),
                *([catalogue.run(self.stop_event)] if catalogue is not None else []),
                rulebook.run(self.stop_event, on_tasks=lambda _ids: pool.wake()),
                tree.run(self.stop_event, lambda repo, paths: self._tree_changed(rulebook, pool, repo, paths)),
                self._scan_spools(spool, rulebook),
            )
        self.store.close()
        log.info("stopped")

    def _recover(self) -> None:
        """The tasks our dead predecessor was running: on SQLite every one back to the queue now (we
        hold the state dir's lock, so no other daemon can run them), on PostgreSQL those whose lease
        expired (another daemon may share the database); each counts a crash, and a task at
        `crash_limit` is failed with its report. Then the leftovers of interrupted writes go."""
        now, limit = self.clock.now(), self.settings.crash_limit
        sqlite = sqlite_path(self.settings.database) is not None
        for task_id in self.store.recover(now, limit) if sqlite else self.store.reap(now, limit):
            task = self.store.get_task(task_id)
            if task.status == TaskStatus.FAILED.value:
                failed = delivery.report_failure(self.store, task, None, Outcome(TaskStatus.FAILED, error=task.error))
                self.store.record_report(task_id, TaskStatus.FAILED, failed.report_path, failed.error or "", now)
            else:   # a cancel that came in while it ran gets its report; a requeued task nothing
                delivery.report_cancel(self.store, task_id, now, while_running=True)
        for repo in self.repos:
            self._remove_leftovers(repo)

    @staticmethod
    def _remove_leftovers(repo: Path) -> None:
        """Temp files of writes and candidate test files a killed daemon left: one line per repo."""
        gone = []
        for path in outputs.leftovers(repo, CANDIDATE_NAME):
            try:
                path.unlink()
            except OSError as exc:
                log.warning("cannot remove the leftover %s: %s", path, exc.strerror or exc)
            else:
                gone.append(path.relative_to(repo).as_posix())
        if gone:
            log.info("removed %d leftover file(s) of interrupted writes and validations in %s: %s%s", len(gone),
                     repo, ", ".join(gone[:5]), ", ..." if len(gone) > 5 else "")

    async def _models(self, stack: AsyncExitStack) -> tuple[Caller, list[str]]:
        """The caller and model list: OpenRouter (or any OpenAI-compatible server), or offline."""
        if self.settings.use_offline:
            offline = OfflineProvider(self.clock)
            log.warning("no API key (%s is not set): using the offline provider; results are "
                        "reported as model 'offline'", self.settings.api_key_env)

            async def call_offline(model: str, messages: list[dict[str, str]], timeout_s: float,
                                   job: Job) -> Completion:
                return await offline.complete(model, messages, timeout_s, job)

            return call_offline, [OFFLINE_MODEL]
        http = await stack.enter_async_context(http_client(self.settings.proxy))
        key = self.settings.api_key.get_secret_value() if self.settings.api_key else None
        if not self.settings.openrouter:
            log.info("model server %s (not OpenRouter): %s; models it lists without a price cost nothing",
                     self.settings.base_url, f"API key from ${self.settings.api_key_env}" if key
                     else "no API key sent")
        client = ModelClient(http, self.settings.base_url, key, self.clock, app_url=self.settings.app_url,
                             app_title=self.settings.app_title, max_tokens=self.settings.max_tokens,
                             temperature=self.settings.temperature)
        self.model_client = client

        request_timeout_s = self.settings.request_timeout_s

        async def call_model(model: str, messages: list[dict[str, str]], timeout_s: float,
                             job: Job) -> Completion:
            # each request within request_timeout_s; the whole task within its own timeout_s
            return await client.complete(model, messages, min(timeout_s, request_timeout_s))

        return call_model, models_of(self.settings)

    def _catalogue(self, pool: Pool) -> Catalogue | None:
        """Online only: GET /models for prices, revivals of relisted models and (discovery) the list."""
        if self.model_client is None:
            return None
        async def listed() -> None:     # tasks waiting for the list (or for a model it dropped) decide again
            if await asyncio.to_thread(self.store.promote_due, self.clock.now(), True):
                pool.wake()

        return Catalogue(self.model_client.list_models, pool.governor, self.clock, pool,
                         discover=discovers(self.settings), refresh_s=self.settings.catalogue_refresh_s,
                         unknown_price_paid=self.settings.openrouter, on_change=listed)

    @staticmethod
    def _on_rule(loop: asyncio.AbstractEventLoop, rulebook: RuleBook, repo: Path, relpath: str,
                 spec: TaskSpec) -> None:
        """Ingest found a rule file (ingest's thread): register it, re-plan the schedule loop."""
        rulebook.register(repo, relpath, spec)
        loop.call_soon_threadsafe(rulebook.wake)

    @staticmethod
    async def _tree_changed(rulebook: RuleBook, pool: Pool, repo: Path, paths: list[str]) -> None:
        """Quiet, not ignored working-tree paths → the on_change rules."""
        if await asyncio.to_thread(rulebook.changed, repo, paths, "watch"):
            pool.wake()

    async def _scan_spools(self, spool: SpoolReader, rulebook: RuleBook) -> None:
        """Hook events left while the daemon was down, once the rules of tasks.d/ are known
        (read here: ingest registers them only after they settle)."""
        for repo in self.repos:
            for relpath, spec in await asyncio.to_thread(read_rules, repo):
                try:
                    rulebook.register(repo, relpath, spec)
                except TaskFileError:
                    pass   # ingest rejects the file and says why
            await asyncio.to_thread(spool.scan, repo, self.clock.now())

    @staticmethod
    def _hook_paths(loop: asyncio.AbstractEventLoop, rulebook: RuleBook, pool: Pool, repo: Path,
                    paths: list[str], origin: str) -> None:
        """Paths from a git-hook event (a worker or observer thread) → the on_change rules."""
        if rulebook.changed(repo, paths, origin):
            loop.call_soon_threadsafe(pool.wake)

    async def _housekeeping(self, pool: Pool) -> None:
        """Periodically return expired leases and wake tasks whose `not_before` passed. It never
        ends before the daemon does: a round that fails (a full disk) is one log line, and the next
        round tries again."""
        interval = max(0.5, min(5.0, self.settings.lease_s / 2))
        while not self.stop_event.is_set():
            try:
                await asyncio.wait_for(self.stop_event.wait(), timeout=interval)
            except TimeoutError:
                pass
            try:
                await self._housekeeping_round(pool)
            except StorageUnavailable as exc:
                log.warning("housekeeping: %s; trying again in %gs", exc, interval)
            except Exception as exc:
                log.error("housekeeping failed (%s: %s); trying again in %gs", type(exc).__name__, exc, interval)

    async def _housekeeping_round(self, pool: Pool) -> None:
        now = self.clock.now()
        if self.store.trouble is not None:     # an idle daemon finds out too that the store is back
            await asyncio.to_thread(self.store.probe)
        # not the tasks our own workers hold: their lease ran out because the store refused its renewal
        reaped = await asyncio.to_thread(self.store.reap, now, self.settings.crash_limit, list(pool.busy.values()))
        if self.rulebook is not None:
            await asyncio.to_thread(self.rulebook.release_held, now)   # a re-run follows at once
        promoted = await asyncio.to_thread(self.store.promote_due, now)
        if reaped or promoted:
            log.info("housekeeping: %d lease(s) expired, %d task(s) due again", len(reaped), promoted)
            pool.wake()

    # -- systemd: status line and SIGHUP ---------------------------------------------

    def summary(self, workers: dict[str, Any]) -> str:
        """The one-line STATUS (reads the store: call it in a thread)."""
        return summary(self.store.counts(), workers)

    async def _report_status(self, pool: Pool) -> None:
        """STATUS=<summary> whenever it changed, at most once a second."""
        last = ""
        while not self.stop_event.is_set():
            line = await asyncio.to_thread(self.summary, pool.snapshot())
            if line != last:
                self.notifier.status(line)
                last = line
            await first(self.stop_event, timeout=1.0)

    async def _reloads(self, pool: Pool, rulebook: RuleBook) -> None:
        while not self.stop_event.is_set():
            await first(self.stop_event, self.reload_event)
            if self.reload_event.is_set() and not self.stop_event.is_set():
                self.reload_event.clear()
                await self.reload(pool, rulebook)

    async def reload(self, pool: Pool, rulebook: RuleBook) -> None:
        """Read the configuration and the rule files again; running and queued tasks stay."""
        self.notifier.reloading(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)
        log.info("reloading the configuration and the rules (SIGHUP)")
        try:
            if self.reloader is not None:
                self._apply(await asyncio.to_thread(self.reloader), pool)
        except OhdError as exc:
            log.error("reload: keeping the running configuration: %s", exc)
        await asyncio.to_thread(reread_rules, self.repos, rulebook)
        rulebook.wake()
        pool.wake()
        self.notifier.ready(await asyncio.to_thread(self.summary, pool.snapshot()))

    def _apply(self, new: Settings, pool: Pool) -> None:
        """The live keys of `new` onto the running pool (see `supervision.LIVE_KEYS`)."""
        live = live_changes(self.settings, new)
        apply_logging(self.settings, live)      # level, format, file (reopened: a rotated one is let go)
        if "workers" in live:
            log.info("reload: workers %d -> %d", pool.size, new.workers)
            pool.resize(new.workers)
        if "models" in live and not self.settings.use_offline:
            pool.models = list(new.models)
        if LADDER_KEYS & live.keys():
            try:
                pool.ladder = ladder_of(new, self.test_runs)
                self._log_sandbox(pool.ladder)
            except ConfigError as exc:
                log.error("reload: keeping the running validation settings: %s", exc)
                live = {key: value for key, value in live.items() if key not in LADDER_KEYS}
        self.settings = self.settings.model_copy(update=live)
        if POLICY_KEYS & live.keys():
            pool.governor.policy = policy_of(self.settings)
        if SELECTION_KEYS & live.keys():
            pool.rank = self._rank(self.settings)
        if (POLICY_KEYS | {"models"}) & live.keys():    # what pending tasks wait for may have changed
            if self.store.promote_due(self.clock.now(), True):
                pool.wake()
        log.info("reload: applied %s", ", ".join(sorted(live)) or "no configuration change")

    @staticmethod
    def _log_sandbox(ladder: Ladder) -> None:
        jail = ladder.tests.sandbox()
        if jail.level is sandbox.Level.NAMESPACE:
            log.info("generated tests run in the sandbox: %s", jail.describe())
        else:
            log.warning("generated tests run in a weaker sandbox: %s", jail.describe())

    def _rank(self, settings: Settings) -> selection.Rank | None:
        """The pool's ranking of `auto` models (None: `model_selection = false`, configured order)."""
        if not settings.model_selection:
            return None
        return ranker(History(self.store.db, self.store.m), selection_of(settings), random.Random())

    def metrics(self) -> Metrics:
        """A metrics snapshot now, read from the store (called on the socket server's threads)."""
        return collect(History(self.store.db, self.store.m), self.clock.now(),
                       self.clock.monotonic() - self.started)

    def status(self) -> dict[str, Any]:
        pool = self.pool
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(self.clock.monotonic() - self.started, 1),
            "workers": pool.snapshot() if pool else {"size": 0, "busy": 0},
            "models": pool.model_states() if pool else [],
            "offline": self.settings.use_offline,
            "sandbox": pool.ladder.tests.sandbox().as_dict() if pool else None,
            "database": _redact(self.settings.database),
            "storage": self._storage(),
            **self._progress(),
        }

    def _storage(self) -> dict[str, Any] | None:
        """Why the daemon waits for storage (the last write the store refused), None when it can write."""
        trouble = self.store.trouble
        if trouble is None:
            return None
        return {"error": str(trouble), "reason": trouble.reason, "path": trouble.path}

    def _progress(self) -> dict[str, Any]:
        """Now, today's tokens and cost, recent throughput and the queue's ETA (`ohd status`)."""
        now = self.clock.now()
        history = History(self.store.db, self.store.m)
        window = DEFAULT_WINDOW
        throughput = Throughput(completed_last_hour=history.completed_between(now - HOUR, now),
                                window_s=window.total_seconds(),
                                completed_in_window=history.completed_between(now - window, now))
        today = self.store.totals_today(now)
        return {"now": now.isoformat(), "today": today, "throughput": throughput.as_dict(),
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


def _redact(url: str) -> str:
    """A database URL without its password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}" if ":" in creds else url
    return url


def private_files(settings: Settings) -> list[Path]:
    """ohd's own files outside the state dir, to keep 0600: a SQLite database elsewhere (and its
    `-wal`, `-shm`), the log file, and the service's key file (the API key, written by hand)."""
    files = [key_file(), *([settings.log_file] if settings.log_file else [])]
    database = sqlite_path(settings.database)
    if database is not None:
        files += [database, database.with_name(database.name + "-wal"), database.with_name(database.name + "-shm")]
    return files


def serve(settings: Settings, reload: Callable[[], Settings] | None = None) -> None:
    """Run the daemon in the foreground until SIGTERM/SIGINT (the `ohd daemon` command).

    `reload` reads the configuration again on SIGHUP. systemd's NOTIFY_SOCKET,
    WATCHDOG_USEC and WATCHDOG_PID are read here and removed from the environment, so
    the processes ohd starts (git, pytest) do not talk to systemd in its name.
    """
    # a hung daemon killed with SIGABRT (systemd's watchdog does so) leaves every thread's stack
    # on stderr, the journal, first
    faulthandler.enable(all_threads=True)
    notifier = Notifier(os.environ.pop("NOTIFY_SOCKET", None))
    watchdog_s = watchdog_interval(os.environ.pop("WATCHDOG_USEC", None), os.environ.pop("WATCHDOG_PID", None),
                                   os.getpid())
    sandbox.seal(os.environ, {settings.api_key_env, "OPENROUTER_API_KEY"})   # the key: in `settings` only
    statedir.private_umask()   # the store, its WAL, the log, the lock, the socket: 0600 (outputs: their folder's)
    lock = InstanceLock(settings.state_dir / "ohd.lock")
    lock.acquire()
    try:
        statedir.secure(settings.state_dir, settings.runtime_dir, private_files(settings))
        asyncio.run(Daemon(settings, reload=reload, notifier=notifier, watchdog_s=watchdog_s).run())
    finally:
        lock.release()
