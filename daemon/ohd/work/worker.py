"""The worker pool: `size` worker coroutines that claim tasks and run each to an outcome.

A task is claimed with a lease that a running worker renews; its run (`taskrun.TaskRun`:
choose a model -> call -> extract -> validate -> write) goes on while the lease holds, and
stops when the task is cancelled or the lease went elsewhere; the outcome is committed
under the lease (a deferred task sets the loop timer that wakes the pool precisely when it
is due). The pool grows and shrinks without cancelling a task, and at a stop gives the
running ones a grace period before they go back to the queue. A write the store refuses (a
full disk) holds the task until the store can be written again.

The pool talks to models through one `Caller` (the daemon builds it from the
OpenRouter client or the offline provider) and never reads configuration.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from ohd.clock import Clock
from ohd.core.alarm import Alarm
from ohd.core.routing import Policy
from ohd.errors import OhdError, RateLimited, StorageUnavailable, Unreachable
from ohd.ladder.ladder import Ladder
from ohd.logfmt import task_context
from ohd.store.calls import CallHistory
from ohd.store.quotas import Governor
from ohd.store.store import Claim, Store, TaskStatus
from ohd.work import delivery
from ohd.work.agentrun import AgentRun, AgentSetup
from ohd.work.delivery import Outcome, Run
from ohd.work.taskrun import Caller as Caller  # re-exported: the daemon builds one
from ohd.work.taskrun import TaskRun

log = logging.getLogger("ohd.worker")

T = TypeVar("T")
STORAGE_WAIT_S = 2.0   # the longest wait between two tries of a write the store refused (a full disk)
CLAIM_WAIT_S = 5.0     # the longest wait between two claims while the store cannot be reached


class Pool:
    """`size` worker coroutines over one store; `run_until_idle` steps it in tests."""

    def __init__(self, store: Store, call: Caller, clock: Clock, *, models: Sequence[str],
                 size: int = 4, lease: timedelta = timedelta(seconds=60), name: str = "w",
                 governor: Governor | None = None, policy: Policy | None = None, key_id: str = "default",
                 hold_s: float = 1.0, rank: Callable[[str, list[str]], list[str]] | None = None,
                 calls: CallHistory | None = None, ladder: Ladder | None = None,
                 agents: AgentSetup | None = None, request_params: Mapping[str, Any] | None = None) -> None:
        """`governor`: the quotas (the daemon's also paces its model client's retries, `pace_retries`);
        by default one over `store` with `policy` and `key_id`. `calls`: where prompts and responses
        go (default: kept in full); `ladder`: how candidates are judged (default: `Ladder()`); `agents`:
        how agent runners' tasks run (None: they fail, saying so); `request_params`: what a request
        is made of besides the model and messages (the server, max_tokens, temperature), part of the
        replay cache's key."""
        self.store = store
        self.call = call
        self.clock = clock
        self.models = list(models)
        self.size = size
        self.lease = lease
        self.name = name
        self.governor = governor if governor is not None else Governor(store, policy, key_id)
        self.hold_s = hold_s        # a slot this close is waited for in place instead of deferring
        self.ladder = ladder if ladder is not None else Ladder()   # pytest runs, rule levels, lint (a reload swaps it)
        self.rank = rank            # (task type, models) -> best first (`auto`); None: configured order
        self.calls = calls if calls is not None else CallHistory(store.db)   # prompts and responses
        self.agents = agents        # the agent runners' state dir, [agents] settings and proxy
        self.request_params = dict(request_params or {})   # in the replay cache's key (`calls.request_key`)
        self.unreachable: dict[str, str] = {}   # model -> why its server could not be reached (until it answers)
        self.busy: dict[str, int] = {}
        self.wake_event = asyncio.Event()
        self.alarm: Alarm | None = None   # wakes the pool when a deferred task is due (in `run`)
        self.workers: dict[str, asyncio.Task[None]] = {}   # live worker coroutines (in `run`)
        self.retiring: set[str] = set()   # surplus after a shrink: exit once their task is done
        self.serial = 0
        self.stop: asyncio.Event | None = None

    # -- running -------------------------------------------------------------

    def wake(self) -> None:
        """Tell idle workers that a task may be ready (call on the loop thread)."""
        self.wake_event.set()

    def snapshot(self) -> dict[str, Any]:
        return {"size": self.size, "busy": len(self.busy), "running": sorted(self.busy.values()),
                "retiring": len(self.retiring)}

    def resize(self, size: int) -> None:
        """Grow: start workers now. Shrink: the surplus (idle ones first) exit once their
        current task is committed; nothing is cancelled or released (call on the loop thread)."""
        if size < 1:
            raise ValueError(f"a pool needs at least one worker, not {size}")
        self.size = size
        if self.stop is None or self.stop.is_set():
            return
        active = sorted((w for w in self.workers if w not in self.retiring),
                        key=lambda w: (w in self.busy, -int(w.removeprefix(self.name))))
        if size > len(active):
            self._spawn(size - len(active))
        else:
            self.retiring.update(active[: len(active) - size])
            self.wake_event.set()

    def _spawn(self, count: int) -> None:
        assert self.stop is not None
        for _ in range(count):
            worker_id, self.serial = f"{self.name}{self.serial}", self.serial + 1
            self.workers[worker_id] = asyncio.create_task(self._worker(worker_id, self.stop))

    def model_states(self) -> list[dict[str, Any]]:
        """State, cooldown and requests left of each configured model, from the store (any thread)."""
        return [view.as_dict() for view in self.governor.views(self.models, self.clock.now())]

    async def run(self, stop: asyncio.Event, grace_s: float = 30.0,
                  cut_off: Callable[[], object] | None = None) -> None:
        """Run `size` workers until `stop` is set, then give running tasks `grace_s` to finish; those
        still running are cancelled and go back to the queue. `cut_off` is called at that deadline,
        before they are released: it ends what they started in threads (the daemon kills their test
        runs), which a cancel cannot reach and the process's exit would wait for."""
        self.stop = stop
        self._spawn(self.size)
        self.alarm = Alarm(self.clock, self._promote)
        await self._promote()       # and tasks deferred before a restart resume on time
        await stop.wait()
        self.alarm.cancel()
        self.alarm = None
        self.wake_event.set()
        workers = list(self.workers.values())
        done, pending = await asyncio.wait(workers, timeout=grace_s) if workers else (set(), set())
        for job in pending:
            job.cancel()
        if cut_off is not None:
            cut_off()
        await asyncio.gather(*pending, return_exceptions=True)

    async def run_until_idle(self, worker_id: str = "w-test") -> int:
        """Run tasks one at a time until none is ready; returns how many ran (tests)."""
        count = 0
        await self._store(self.store.promote_due, self.clock.now())
        while await self.run_once(worker_id, renew=False):
            count += 1
        return count

    async def run_once(self, worker_id: str, renew: bool = True, patient: bool = False) -> bool:
        """Claim one task and run it; False if none is ready. `patient` (the workers): a store that
        cannot be read is waited for (`_claim`) instead of raising."""
        claim = await (self._claim(worker_id) if patient else
                       self._store(self.store.claim_next, worker_id, self.clock.now(), self.lease))
        if claim is None:
            return False
        await self.execute(claim, renew=renew)
        return True

    async def _claim(self, worker_id: str) -> Claim | None:
        """The next ready task under a lease, or None. While the store cannot be read or written (its
        PostgreSQL server restarting, down or cut off; a full disk) nothing is claimed: the claim is
        tried again with exponential backoff up to `CLAIM_WAIT_S` apart (tenacity), a line logged at
        the first failure and one when it answers again, until it does or the pool stops."""
        failed: list[StorageUnavailable] = []

        def stopping(_state: RetryCallState) -> bool:
            return self.stop is not None and self.stop.is_set()

        def waiting(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            if not failed and isinstance(exc, StorageUnavailable):
                log.warning("worker %s: %s; claiming nothing until it answers (tried again with backoff)",
                            worker_id, exc)
                failed.append(exc)

        async for attempt in AsyncRetrying(retry=retry_if_exception_type(StorageUnavailable), stop=stopping,
                                           wait=wait_exponential(multiplier=0.25, max=CLAIM_WAIT_S),
                                           sleep=self.clock.sleep, before_sleep=waiting, reraise=True):
            with attempt:
                claim = await self._store(self.store.claim_next, worker_id, self.clock.now(), self.lease)
        if failed:
            log.info("worker %s: the store answers again; claiming", worker_id)
        return claim

    async def _worker(self, worker_id: str, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set() and worker_id not in self.retiring:
                self.wake_event.clear()     # before the claim: a wake during it is not lost
                try:
                    if await self.run_once(worker_id, patient=True):
                        continue
                except StorageUnavailable as exc:     # one line a try, not a traceback a second
                    log.warning("worker %s: %s; trying again", worker_id, exc)
                except Exception:
                    log.exception("worker %s: iteration failed", worker_id)
                try:
                    await asyncio.wait_for(self.wake_event.wait(), timeout=1.0)
                except TimeoutError:
                    pass
        finally:
            self.workers.pop(worker_id, None)
            if worker_id in self.retiring:
                self.retiring.discard(worker_id)
                log.info("worker %s retired (the pool shrank to %d)", worker_id, self.size)

    # -- one task --------------------------------------------------------------

    async def execute(self, claim: Claim, renew: bool = True) -> None:
        """Run one claimed task to an outcome and commit it; never raises for task errors.

        With `renew` a watcher extends the lease and stops the work when the task was
        cancelled or its lease was lost (`run_until_idle` steps tasks without it).
        """
        task = claim.task
        self.busy[claim.worker_id] = task.id
        log.info("task %d running: %s %s (worker %s)", task.id, task.type, task.target, claim.worker_id,
                 extra={"task_id": task.id, "status": TaskStatus.RUNNING.value})
        taskrun: TaskRun | AgentRun = AgentRun(task, self) if task.agent else TaskRun(task, self)
        with task_context(task.id):     # the model client's lines carry the task too
            work = asyncio.create_task(taskrun.outcome())
            watcher = asyncio.create_task(self._watch(claim, work)) if renew else None
            try:
                outcome = await self._await_work(claim, taskrun, work)
            except StorageUnavailable as exc:
                await self._hold(claim, exc)
                return
            finally:
                if watcher is not None:
                    watcher.cancel()
                self.busy.pop(claim.worker_id, None)
                run = taskrun.run
            if outcome is not None:
                await self._conclude(claim, run, outcome)

    async def _conclude(self, claim: Claim, run: Run | None, outcome: Outcome) -> None:
        """A failure gets its report, then the outcome is committed; a cancel that came in meanwhile
        gets its report once committed."""
        if outcome.status is TaskStatus.FAILED and outcome.report_path is None:
            outcome = await asyncio.to_thread(delivery.report_failure, self.store, claim.task, run, outcome)
        if await self._stored(self._commit, claim, outcome) is TaskStatus.CANCELLED:
            await self._report_cancel(claim.task.id, run)

    async def _hold(self, claim: Claim, exc: StorageUnavailable) -> None:
        """The store refused a write of the task's (its disk full, read-only, locked): nothing of this
        run is recorded, so the task goes back to the queue as it was, once a write succeeds again
        (tried at most `STORAGE_WAIT_S` apart); it is run again from the start then."""
        log.warning("task %d: %s; holding the task until the store can be written", claim.task.id, exc,
                    extra={"task_id": claim.task.id})
        if await self._stored(self._store, self.store.release, claim.task.id, claim.worker_id,
                              self.clock.now()) is not None:
            log.info("task %d: the store can be written again; back in the queue", claim.task.id,
                     extra={"task_id": claim.task.id, "status": TaskStatus.QUEUED.value})
        self.wake_event.set()

    async def _stored(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """`await fn(*args)`, tried again while the store cannot be written, until it can (or the pool
        stops: then the task stays running, and the next start puts it back in the queue)."""
        def stopping(_state: RetryCallState) -> bool:
            return self.stop is not None and self.stop.is_set()

        async for attempt in AsyncRetrying(retry=retry_if_exception_type(StorageUnavailable), stop=stopping,
                                           wait=wait_exponential(multiplier=0.1, max=STORAGE_WAIT_S),
                                           sleep=self.clock.sleep, reraise=True):
            with attempt:
                return await fn(*args)
        raise AssertionError("unreachable: tenacity re-raises the last failure")

    async def _await_work(self, claim: Claim, taskrun: TaskRun | AgentRun,
                          work: asyncio.Task[Outcome]) -> Outcome | None:
        current = asyncio.current_task()
        # an agent's run has `timeout_s` each attempt (agentrun), its checks after it theirs
        limit = None if claim.task.agent else claim.task.timeout_s
        try:
            async with asyncio.timeout(limit):
                return await work
        except TimeoutError:
            return Outcome(TaskStatus.FAILED, error=f"timed out after {claim.task.timeout_s:g}s")
        except StorageUnavailable:     # not the task's failure: `execute` holds it
            raise
        except OhdError as exc:    # e.g. the output cannot be written (a full disk): the task says why
            log.error("task %d: %s", claim.task.id, exc)
            return Outcome(TaskStatus.FAILED, error=str(exc))
        except Exception as exc:   # a defect in ohd: say so now, not when the lease runs out
            log.exception("task %d: internal error", claim.task.id)
            return Outcome(TaskStatus.FAILED, error=f"internal error in ohd ({type(exc).__name__}: {exc}); "
                                                    f"the daemon log has the traceback; `ohd retry {claim.task.id}` "
                                                    "runs it again")
        except asyncio.CancelledError:
            if current is not None and current.cancelling():
                work.cancel()
                await self._release(claim, taskrun)     # the pool is stopping: back to the queue
                raise
            return await self._after_watch(claim)

    async def _after_watch(self, claim: Claim) -> Outcome | None:
        """The watcher stopped the work: cancelled by the user, or the lease went elsewhere."""
        task = await self._store(self.store.get_task, claim.task.id)
        if task.cancel_requested:       # `_commit` logs the transition
            return Outcome(TaskStatus.CANCELLED, error="cancelled by the user while running")
        log.warning("task %d: lease lost; leaving it to its new owner", task.id)
        return None

    async def _promote(self) -> None:
        """Due tasks back to the queue, workers woken, the alarm set for the next deferred task."""
        now = self.clock.now()
        await self._store(self.store.promote_due, now)
        self.wake_event.set()
        due = await self._store(self.governor.next_due, now)
        if due is not None and self.alarm is not None:
            self.alarm.set(due)

    # -- store -----------------------------------------------------------------

    async def _commit(self, claim: Claim, outcome: Outcome) -> TaskStatus | None:
        """Store the outcome, then log the transition the store made; the new status (None if the
        lease was lost)."""
        task, now = claim.task, self.clock.now()
        if outcome.status is TaskStatus.PENDING and outcome.not_before is not None:
            return await self._defer(claim, outcome.not_before, now, outcome.error or "waiting")
        if not await self._store(self.store.finish, task.id, claim.worker_id, outcome.status, now,
                                 outcome.error, outcome.output_path, outcome.report_path):
            return None
        log.info("task %d %s: %s", task.id, outcome.status.value, outcome.note or outcome.error or "done",
                 extra={"task_id": task.id, "status": outcome.status.value})
        return outcome.status

    async def _defer(self, claim: Claim, until: datetime, now: datetime, why: str) -> TaskStatus | None:
        """The task waits in the queue until `until` (the alarm wakes the pool then), unless a cancel
        came in while it ran."""
        task = claim.task
        status = await self._store(self.store.defer, task.id, claim.worker_id, until, now, why)
        if status is TaskStatus.PENDING:
            log.info("task %d pending until %s", task.id, until.isoformat(),
                     extra={"task_id": task.id, "status": status.value})
            if self.alarm is not None:
                self.alarm.set(until)
        elif status is not None:
            log.info("task %d cancelled (a cancel came in while it ran)", task.id,
                     extra={"task_id": task.id, "status": status.value})
        return status

    async def _report_cancel(self, task_id: int, run: Run | None) -> None:
        """The cancel is committed: its report says what had happened so far (never fails)."""
        await asyncio.to_thread(delivery.report_cancel, self.store, task_id, self.clock.now(), run, True)

    async def _watch(self, claim: Claim, work: asyncio.Task[Outcome]) -> None:
        """Extend the lease while the task runs; stop the work if it was cancelled or lost."""
        interval = min(1.0, self.lease.total_seconds() / 3)
        while not work.done():
            await self.clock.sleep(interval)
            try:
                ok = await self._store(self.store.renew, claim.task.id, claim.worker_id, self.clock.now(), self.lease)
            except StorageUnavailable:    # the store logged it; renewed again once it can be written
                continue
            if not ok:
                work.cancel()
                return

    async def _release(self, claim: Claim, taskrun: TaskRun | AgentRun) -> None:
        status = await self._store(self.store.release, claim.task.id, claim.worker_id, self.clock.now())
        if status is not None:
            log.info("task %d %s", claim.task.id, "released back to the queue" if status is TaskStatus.QUEUED
                     else "cancelled (a cancel came in while it ran)",
                     extra={"task_id": claim.task.id, "status": status.value})
        if status is TaskStatus.CANCELLED:
            await self._report_cancel(claim.task.id, taskrun.run)

    async def _store(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a store call in a thread so a busy SQLite lock never stalls the loop."""
        return await asyncio.to_thread(fn, *args)


def pace_retries(governor: Governor, clock: Clock) -> Callable[[str], Awaitable[None]]:
    """What reserves a slot for a retry inside one model call (llm's `before_retry`): retries count
    against the quotas too. None left: a 429, or, when the model's breaker is open, the server is
    unreachable."""
    async def pace(model: str) -> None:
        at = await asyncio.to_thread(governor.reserve, model, clock.now())
        if at is None:
            return
        if await asyncio.to_thread(governor.breaker_open, model, clock.now()):
            # another task found the server unreachable meanwhile: not a quota, not a 429
            raise Unreachable(model, "not retried: the model's breaker opened meanwhile (the server could not "
                                     "be reached); its probe decides when to go on", sent=True)
        raise RateLimited(model, at, "no request left within the known limits for a retry")

    return pace
