"""The daemon's wiring: build every object from `Settings`, start them, stop them well.

Only the wiring lives here; the rooms it wires are beside it: `assemble` turns the settings
into values and objects (the CLI builds from it too), `reload` does a SIGHUP, `live` is the
one writer of what changes in the running pool, `status` is what `ohd status`, the metrics
and STATUS read, and `statedir` keeps the state dir private and holds its lock.

Start-up: take the single-instance lock, migrate the store, return expired leases to the queue,
scan each repo's `tasks.d/` (files dropped while we were down), start the observers, the workers,
the socket and (`http_listen`) the web listener; git-hook events waiting in each repo's spool go
to the on_change rules once the rule files are read. The daemon runs under a umask of 0o077 and
makes its state and runtime dirs 0700 and their files 0600 at start (`statedir`). SIGTERM/SIGINT
only set a flag: the pool stops claiming, running tasks get `grace_s` to finish, the rest go back
to `queued` (no attempt spent) and their test runs are killed; a start-up GET /models in flight is
cancelled at once. Threads (watchdog, the socket server) reach the event loop only through
`call_soon_threadsafe`.

Under systemd (`Type=notify`) the daemon says READY once the socket listens, STATUS (a
one-line queue summary, at most once a second and only when it changed), STOPPING on
SIGTERM, and WATCHDOG=1 at half of `WatchdogSec`. SIGHUP re-reads the configuration and
the rules without dropping a task: `workers` resizes the pool (surplus workers finish
their task first); `models`, the logging, the governor's limits and budgets, model
selection and the validation settings apply at once (`supervision.LIVE_KEYS`, `reload`); keys
that cannot change live are named in a warning.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from ohd import __version__
from ohd.clock import Clock, SystemClock, first
from ohd.config import Settings
from ohd.core import layout, storeid
from ohd.core.taskfile import TaskSpec
from ohd.core.tasktypes import Job
from ohd.errors import StorageUnavailable
from ohd.intake.ingest import Ingestor
from ohd.intake.rules import RuleBook
from ohd.intake.spool import SpoolReader, find_spool
from ohd.intake.watch import SpoolWatcher, TasksDirWatcher, TreeWatcher
from ohd.ladder import sandbox
from ohd.ladder.testrun import Processes as TestProcesses
from ohd.models.catalogue import Catalogue
from ohd.models.llm import Completion, ModelClient, OfflineProvider, http_client
from ohd.models.proxy import Proxy
from ohd.repo import outputs, worktrees
from ohd.service import statedir
from ohd.service.assemble import (
    OFFLINE_MODEL,
    agents_of,
    discovers,
    hooks_of,
    identities_of,
    kept_history_of,
    key_id_of,
    ladder_of,
    log_sandbox,
    models_of,
    policy_of,
    private_files,
    rank_of,
    repos_of,
    rulebook_for,
    webhook_retry,
    webhook_targets,
)
from ohd.service.live import Live
from ohd.service.metrics import prometheus, with_stats
from ohd.service.notify import Notifier, watchdog_interval
from ohd.service.reload import Reloader
from ohd.service.server import ApiServer
from ohd.service.status import StatusView
from ohd.service.web.listener import WebListener
from ohd.service.web.pages import page_routes
from ohd.store.agentruns import AgentRuns
from ohd.store.calls import CallHistory
from ohd.store.fleet import Fleet, new_daemon_id, worker_prefix
from ohd.store.outbox import Outbox
from ohd.store.quotas import Governor
from ohd.store.store import Store, TaskStatus, open_database, sqlite_path
from ohd.webhooks import sender as webhooks
from ohd.work import agentproc, delivery
from ohd.work.delivery import Outcome
from ohd.work.governed import Relay
from ohd.work.worker import Caller, Pool, pace_retries

log = logging.getLogger("ohd.daemon")


class Daemon:
    def __init__(self, settings: Settings, clock: Clock | None = None, *,
                 reload: Callable[[], Settings] | None = None, notifier: Notifier | None = None,
                 watchdog_s: float | None = None) -> None:
        self.notifier = notifier or Notifier(None)
        self.watchdog_s = watchdog_s
        self.clock: Clock = clock or SystemClock()
        self.repos = repos_of(settings)
        self.hooks = webhook_targets(settings)   # first: a hook's secret missing stops the start here
        self.store = Store(open_database(settings.database), lock_wait_s=settings.store_lock_wait_s,
                           hooks=hooks_of(settings))
        # this start's row in the fleet (`daemon` table); its id prefixes our workers' lease owners
        self.host = socket.gethostname()
        self.daemon_id = new_daemon_id(self.host, os.getpid())
        self.fleet = Fleet(self.store.db)
        self.stop_event = asyncio.Event()
        self.test_runs = TestProcesses()    # every pytest run of the ladder; killed at the grace deadline
        # SIGHUP: `reload` reads the configuration again; the reloader holds the running settings
        self.reloader = Reloader(settings, self.store, self.clock, self.repos, self.test_runs, self.notifier, reload)
        self.reloader.webhooks = self.use_webhooks
        self.sender: webhooks.Sender | None = None     # set once it runs (always: a reload may add hooks)
        self.view = StatusView(self.store, kept_history_of(self.store), self.clock, offline=settings.use_offline,
                               database=settings.database, webhooks=[(t.key, t.label) for t in self.hooks])
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

    @property
    def settings(self) -> Settings:
        """The running settings (a SIGHUP applies its live keys to them)."""
        return self.reloader.settings

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reloader.request)
        async with AsyncExitStack() as stack:
            governor = Governor(self.store, policy_of(self.settings), key_id_of(self.settings))
            call, models = await self._models(stack, pace_retries(governor, self.clock))  # retries count too
            self.store.migrate()
            self._adopt_clones()
            self._register()
            self._recover()
            agents = agents_of(self.settings)
            agents.proxy = proxy = Proxy(self.clock)     # the agents' model requests, through the governor
            agents.relay = self._relay()
            await proxy.start()
            stack.push_async_callback(proxy.stop)
            pool = Pool(self.store, call, self.clock, models=models, size=self.settings.workers,
                        name=worker_prefix(self.daemon_id),
                        lease=timedelta(seconds=self.settings.lease_s), governor=governor,
                        rank=rank_of(self.settings, self.store), ladder=ladder_of(self.settings, self.test_runs),
                        calls=CallHistory(self.store.db, self.settings.call_history_max_bytes,
                                          self.settings.call_history), agents=agents,
                        request_params=self._request_params())
            self.pool = self.view.pool = pool
            self.view.fleet = self.fleet_status
            live = Live(pool)     # from now on the one writer of its models, policy, ranking and ladder
            log_sandbox(pool.ladder)
            catalogue = self._catalogue(pool, live)
            if catalogue is not None and catalogue.discover and not self.settings.openrouter:
                # a server you run: its own list, not OpenRouter's, from the start (a SIGTERM ends the wait)
                await catalogue.refresh_until_stopped(self.stop_event)
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
            def metrics_text() -> str:
                return prometheus(self.view.metrics())

            server = ApiServer(self.settings.socket_path, self.store, repos=self.repos, clock=self.clock,
                               metrics=metrics_text,
                               metrics_json=lambda: self.view.metrics().as_dict(),
                               annotate_models=lambda states: with_stats(states, self.view.metrics()),
                               status=self.view.status, wake=lambda: loop.call_soon_threadsafe(pool.wake),
                               models=pool.model_states, daemons=self.fleet_status,
                               activity=self.view.history.activity,
                               store_id=storeid.store_id(self.settings.database))
            server.start()
            stack.callback(server.stop)
            if (address := self.settings.http_address) is not None:
                token = statedir.web_token(layout.web_token_path(self.settings.state_dir))
                pages = page_routes(server.dispatch, CallHistory(self.store.db).for_task,
                                    AgentRuns(self.store.db).accepted_diff, token)
                web = WebListener(*address, token, server.dispatch, metrics_text,
                                  metrics_public=self.settings.http_metrics_public, pages=pages)
                await web.start()
                stack.push_async_callback(web.stop)
            log.info("ohd %s ready: pid %d, %d worker(s), models %s, repos %s, socket %s", __version__,
                     os.getpid(), pool.size, ", ".join(pool.models) or
                     f"(those {self.settings.base_url}/models lists, once it answers)", ", ".join(map(str, self.repos)),
                     self.settings.socket_path)
            self.notifier.ready(await asyncio.to_thread(self.view.summary, pool.snapshot()))
            extra = [self._report_status(pool)] if self.notifier.enabled else []
            extra.append(await self._webhooks(stack))
            if self.watchdog_s is not None:
                extra.append(self.notifier.keep_alive(self.stop_event, self.watchdog_s, self.clock))
            await asyncio.gather(
                *extra,
                self.reloader.run(self.stop_event, live, rulebook, self.view.summary),
                pool.run(self.stop_event, grace_s=self.settings.grace_s, cut_off=self._end_test_runs),
                ingestor.run(self.stop_event, on_task=lambda _id: pool.wake()),
                self._housekeeping(pool),
                self._heartbeat(pool),
                *([catalogue.run(self.stop_event)] if catalogue is not None else []),
                rulebook.run(self.stop_event, on_tasks=lambda _ids: pool.wake()),
                tree.run(self.stop_event, lambda repo, paths: self._tree_changed(rulebook, pool, repo, paths)),
                self._scan_spools(spool, rulebook),
            )
        self._deregister()
        self.store.close()
        log.info("stopped")

    # -- the fleet: our row, our heartbeat, the leases of daemons that are gone -------------------

    @property
    def lost_after(self) -> timedelta:
        return timedelta(seconds=self.settings.daemon_lost_s)

    def _register(self) -> None:
        """Our row in the `daemon` table: a daemon of an earlier start on this host and state dir is
        lost from now on (we hold the state dir's lock), so its leases are returned at once."""
        self.fleet.register(self.daemon_id, host=self.host, pid=os.getpid(), version=__version__,
                            state_dir=str(self.settings.state_dir), repos=[str(repo) for repo in self.repos],
                            workers=self.settings.workers, now=self.clock.now())
        log.info("daemon %s registered (heartbeat every %gs; lost after %gs without one)", self.daemon_id,
                 self.settings.heartbeat_s, self.settings.daemon_lost_s)

    def _adopt_clones(self) -> None:
        """Our repos' identities (issue 15): we claim only their tasks and run each in our clone."""
        identities = identities_of(self.settings, self.repos)
        self.store.adopt_clones(identities)
        seen: dict[str, str] = {}
        for path, identity in identities.items():
            if identity in seen:
                log.warning("repos %s and %s are clones of one repo (%s): its tasks run in %s only; name them "
                            "apart in repo_names to serve both", seen[identity], path, identity, path)
            seen[identity] = path
            if identity != path:
                log.info("repo %s is %s (its tasks are every clone's)", path, identity)

    def _deregister(self) -> None:
        """A clean stop: our row says so, and the fleet lists us as stopped (never fails the stop)."""
        try:
            self.fleet.deregister(self.daemon_id, self.clock.now())
        except StorageUnavailable as exc:
            log.warning("cannot record the stop in the fleet (%s); others see this daemon as lost", exc)

    def fleet_status(self) -> list[dict[str, object]]:
        """The daemons on this database (`ohd status`, GET /daemons; any thread)."""
        return [{**info.as_dict(), "self": info.id == self.daemon_id}
                for info in self.fleet.daemons(self.clock.now(), self.lost_after)]

    async def _heartbeat(self, pool: Pool) -> None:
        """Every `heartbeat_s`: our heartbeat, then the tasks of daemons lost or stopped go back to the
        queue at once (not at their lease's expiry). A round that fails is one log line."""
        while not self.stop_event.is_set():
            await first(self.clock, self.stop_event, timeout=self.settings.heartbeat_s)
            if self.stop_event.is_set():
                return
            try:
                if await asyncio.to_thread(self._heartbeat_round, pool.size):
                    pool.wake()
            except StorageUnavailable as exc:
                log.warning("heartbeat: %s; trying again in %gs", exc, self.settings.heartbeat_s)
            except Exception as exc:
                log.error("heartbeat failed (%s: %s); trying again in %gs", type(exc).__name__, exc,
                          self.settings.heartbeat_s)

    def _heartbeat_round(self, workers: int) -> list[int]:
        now = self.clock.now()
        if not self.fleet.heartbeat(self.daemon_id, now, workers):     # our row was dropped meanwhile
            self._register()
        returned = self.store.return_leases(self.fleet.gone(now, self.lost_after), now, self.settings.crash_limit)
        self._reported(returned, now)
        if returned:
            log.info("heartbeat: %d task(s) of lost daemons back in the queue", len(returned))
        return returned

    async def _webhooks(self, stack: AsyncExitStack) -> Coroutine[Any, Any, None]:
        """The sender of the webhooks' outbox, until the daemon stops (events left undelivered wait
        in the store for the next start)."""
        http = await stack.enter_async_context(webhooks.http_client())
        outbox = Outbox(self.store.db, self.settings.store_lock_wait_s)
        sender = self.sender = webhooks.Sender(outbox, http, self.clock, self.hooks, webhook_retry(self.settings))
        if self.hooks:
            log.info("webhooks: %s", ", ".join(target.label for target in self.hooks))
        return sender.run(self.stop_event)

    def use_webhooks(self, settings: Settings) -> None:
        """A reload's `webhooks` and their timeouts and backoff: from now on the store writes the rows
        of these hooks, the sender posts to them and `ohd status` shows them. A ConfigError, with
        nothing changed, for a hook whose `secret_env` the daemon did not read at its start."""
        targets = webhook_targets(settings)
        self.hooks = targets
        self.store.hooks = tuple(hooks_of(settings))
        self.view.webhooks = tuple((t.key, t.label) for t in targets)
        if self.sender is not None:
            self.sender.use(targets)
        log.info("reload: webhooks %s", ", ".join(t.label for t in targets) or "none")

    def _recover(self) -> None:
        """The tasks our dead predecessor was running: on SQLite every one back to the queue now (we
        hold the state dir's lock, so no other daemon can run them), on PostgreSQL those of daemons
        lost or stopped (our predecessor on this host and state dir among them: we hold its lock) and
        those whose lease expired; each counts a crash, and a task at `crash_limit` is failed with its
        report. Then the leftovers of interrupted writes go."""
        now, limit = self.clock.now(), self.settings.crash_limit
        if sqlite_path(self.settings.database) is not None:
            returned = self.store.recover(now, limit)
        else:
            gone = self.fleet.gone(now, self.lost_after)
            returned = self.store.return_leases(gone, now, limit) + self.store.reap(now, limit)
        self._reported(returned, now)
        for repo in self.repos:
            self._remove_leftovers(repo)
        self._remove_orphan_agents(now)

    def _reported(self, interrupted: list[int], now: datetime) -> None:
        """Interrupted tasks that were failed (at `crash_limit`) get their report, and cancelled ones
        theirs; a requeued task nothing."""
        for task_id in interrupted:
            task = self.store.get_task(task_id)
            if task.status == TaskStatus.FAILED.value:
                failed = delivery.report_failure(self.store, task, None, Outcome(TaskStatus.FAILED, error=task.error))
                self.store.record_report(task_id, TaskStatus.FAILED, failed.report_path, failed.error or "", now)
            else:   # a cancel that came in while it ran gets its report; a requeued task nothing
                delivery.report_cancel(self.store, task_id, now, while_running=True)

    def _remove_orphan_agents(self, now: datetime) -> None:
        """No task runs yet: an agent a crash left running is killed with its group, and every agent
        worktree under our state dir (an orphan) removed; their runs are marked interrupted."""
        runs, folder = AgentRuns(self.store.db), layout.worktrees_dir(self.settings.state_dir)
        for run in runs.unfinished(str(folder)):
            if run.pid is not None and agentproc.kill_orphan(run.pid, Path(run.worktree)):
                log.warning("task %d: its agent (pid %d) outlived the last daemon; killed with its process group",
                            run.task_id, run.pid, extra={"task_id": run.task_id})
        worktrees.sweep(self.settings.state_dir)
        ended = runs.end_unfinished(now, "the daemon stopped while the agent ran", str(folder))
        if ended:
            log.info("%d agent run(s) interrupted by the last stop marked ended; their worktrees are removed", ended)

    @staticmethod
    def _remove_leftovers(repo: Path) -> None:
        """Temp files of writes and candidate test files a killed daemon left: one line per repo."""
        gone = []
        for path in outputs.leftovers(repo, layout.CANDIDATE_NAME):
            try:
                path.unlink()
            except OSError as exc:
                log.warning("cannot remove the leftover %s: %s", path, exc.strerror or exc)
            else:
                gone.append(path.relative_to(repo).as_posix())
        if gone:
            log.info("removed %d leftover file(s) of interrupted writes and validations in %s: %s%s", len(gone),
                     repo, ", ".join(gone[:5]), ", ..." if len(gone) > 5 else "")

    async def _models(self, stack: AsyncExitStack, before_retry: Callable[[str], Awaitable[None]]
                      ) -> tuple[Caller, list[str]]:
        """The caller and model list: OpenRouter (or any OpenAI-compatible server), or offline;
        `before_retry` paces the retries inside one model call."""
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
                             temperature=self.settings.temperature, before_retry=before_retry)
        self.model_client = client

        request_timeout_s = self.settings.request_timeout_s

        async def call_model(model: str, messages: list[dict[str, str]], timeout_s: float,
                             job: Job) -> Completion:
            # each request within request_timeout_s; the whole task within its own timeout_s
            return await client.complete(model, messages, min(timeout_s, request_timeout_s))

        return call_model, models_of(self.settings)

    def _relay(self) -> Relay | None:
        """How an agent's request reaches the model server whole (None offline: its text, to the offline
        provider); each within `request_timeout_s`, as ohd's own requests."""
        client, request_timeout_s = self.model_client, self.settings.request_timeout_s
        if client is None:
            return None

        async def relay(model: str, messages: list[dict[str, Any]], params: dict[str, Any],
                        timeout_s: float) -> Completion:
            return await client.relay(model, messages, params, min(timeout_s, request_timeout_s))

        return relay

    def _request_params(self) -> dict[str, Any]:
        """What a model request is made of besides its model and messages: the replay cache's key
        has them, so another server or another max_tokens or temperature asks anew."""
        if self.settings.use_offline:
            return {"provider": OFFLINE_MODEL}
        return {"base_url": self.settings.base_url, "max_tokens": self.settings.max_tokens,
                "temperature": self.settings.temperature}

    def _catalogue(self, pool: Pool, live: Live) -> Catalogue | None:
        """Online only: GET /models for prices, revivals of relisted models and (discovery) the list."""
        if self.model_client is None:
            return None
        async def listed() -> None:     # tasks waiting for the list (or for a model it dropped) decide again
            if await asyncio.to_thread(self.store.promote_due, self.clock.now(), True):
                pool.wake()

        return Catalogue(self.model_client.list_models, pool.governor, self.clock, pool,
                         discover=discovers(self.settings), refresh_s=self.settings.catalogue_refresh_s,
                         unknown_price_paid=self.settings.openrouter, on_change=listed,
                         use_models=live.use_models)

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
            await asyncio.to_thread(rulebook.load, repo)
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
            await first(self.clock, self.stop_event, timeout=interval)
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

    # -- systemd: the status line ------------------------------------------------------

    async def _report_status(self, pool: Pool) -> None:
        """STATUS=<summary> whenever it changed, at most once a second."""
        last = ""
        while not self.stop_event.is_set():
            line = await asyncio.to_thread(self.view.summary, pool.snapshot())
            if line != last:
                self.notifier.status(line)
                last = line
            await first(self.clock, self.stop_event, timeout=1.0)


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
    # the key and the webhooks' secrets: in `settings` only
    sandbox.seal(os.environ, {settings.api_key_env, "OPENROUTER_API_KEY", *settings.hook_secret_envs})
    statedir.private_umask()   # the store, its WAL, the log, the lock, the socket: 0600 (outputs: their folder's)
    lock = statedir.InstanceLock(layout.lock_path(settings.state_dir))
    lock.acquire()
    try:
        statedir.secure(settings.state_dir, settings.runtime_dir, private_files(settings))
        asyncio.run(Daemon(settings, reload=reload, notifier=notifier, watchdog_s=watchdog_s).run())
    finally:
        lock.release()
