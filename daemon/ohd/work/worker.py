"""The worker pool: claim -> choose a model -> call -> extract -> validate -> write -> record.

A task is claimed with a lease that a running worker renews; every model call becomes
an execution row before the next step; the output and its report are written only
after the decision is committed, and writing is idempotent. Before each call the
store-backed governor (`quotas.Governor`) reserves a request slot on the first model
that is not cooling, open, dead or over a known limit; a 429 cools the model down (in
the store) and moves the task to the next model without spending an attempt; when no
model can be sent now the task goes back to `pending` until the earliest instant one
can, and a loop timer wakes the pool precisely then.

The pool talks to models through one `Caller` (the daemon builds it from the
OpenRouter client or the offline provider) and never reads configuration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from ohd.clock import Clock
from ohd.core import routing, tasktypes
from ohd.core.alarm import Alarm
from ohd.ladder import ladder, validate
from ohd.repo import gitrepo, outputs
from ohd.work import delivery
from ohd.work.delivery import Outcome, Run
from ohd.errors import (
    AuthFailed,
    BadRequest,
    ContextOverflow,
    MalformedAnswer,
    ModelError,
    ModelGone,
    OhdError,
    RateLimited,
    Refused,
    StorageUnavailable,
    Unreachable,
)
from ohd.core.routing import Policy
from ohd.core.taskfile import TaskType
from ohd.core.tasktypes import Job
from ohd.logfmt import task_context
from ohd.models.llm import Completion
from ohd.store.calls import CallHistory
from ohd.store.quotas import Governor
from ohd.store.store import Claim, Store, Task, TaskStatus

log = logging.getLogger("ohd.worker")

Caller = Callable[[str, list[dict[str, str]], float, Job], Awaitable[Completion]]
T = TypeVar("T")
RERUNS = 3   # times a task runs again because its target changed while it ran
LIST_WAIT = timedelta(seconds=60)   # a task with no model yet looks again (the catalogue wakes it sooner)
STORAGE_WAIT_S = 2.0   # the longest wait between two tries of a write the store refused (a full disk)


class Pool:
    """`size` worker coroutines over one store; `run_until_idle` steps it in tests."""

    def __init__(self, store: Store, call: Caller, clock: Clock, *, models: Sequence[str],
                 size: int = 4, lease: timedelta = timedelta(seconds=60), name: str = "w",
                 policy: Policy | None = None, key_id: str = "default", hold_s: float = 1.0,
                 rank: Callable[[str, list[str]], list[str]] | None = None) -> None:
        self.store = store
        self.call = call
        self.clock = clock
        self.models = list(models)
        self.size = size
        self.lease = lease
        self.name = name
        self.governor = Governor(store, policy, key_id)
        self.hold_s = hold_s        # a slot this close is waited for in place instead of deferring
        self.ladder = ladder.Ladder()   # how candidates are judged: pytest runs, rule levels, lint (daemon sets)
        self.rank = rank            # (task type, models) -> best first (`auto`); None: configured order
        self.calls = CallHistory(store.db)   # prompts and responses (the daemon applies call_history*)
        self.unreachable: dict[str, str] = {}   # model -> why its server could not be reached (until it answers)
        self.busy: dict[str, int] = {}
        self.wake_event = asyncio.Event()
        self.alarm: Alarm | None = None   # wakes the pool when a deferred task is due (in `run`)
        self.workers: dict[str, asyncio.Task[None]] = {}   # live worker coroutines (in `run`)
        self.retiring: set[str] = set()   # surplus after a shrink: exit once their task is done
        self.serial = 0
        self.stop: asyncio.Event | None = None
        self.prepared: dict[int, Run] = {}   # task id -> its run once prepared (for a failure's report)

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

    async def pace(self, model: str) -> None:
        """Reserve a slot for a retry inside one model call (llm's `before_retry`); none left: a 429,
        or, when the model's breaker is open, the server is unreachable."""
        at = await self._store(self.governor.reserve, model, self.clock.now())
        if at is None:
            return
        if await self._store(self.governor.breaker_open, model, self.clock.now()):
            # another task found the server unreachable meanwhile: not a quota, not a 429
            raise Unreachable(model, "not retried: the model's breaker opened meanwhile (the server could not "
                                     "be reached); its probe decides when to go on", sent=True)
        raise RateLimited(model, at, "no request left within the known limits for a retry")

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

    async def run_once(self, worker_id: str, renew: bool = True) -> bool:
        claim = await self._store(self.store.claim_next, worker_id, self.clock.now(), self.lease)
        if claim is None:
            return False
        await self.execute(claim, renew=renew)
        return True

    async def _worker(self, worker_id: str, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set() and worker_id not in self.retiring:
                self.wake_event.clear()     # before the claim: a wake during it is not lost
                try:
                    if await self.run_once(worker_id):
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
        with task_context(task.id):     # the model client's lines carry the task too
            work = asyncio.create_task(self._outcome(claim))
            watcher = asyncio.create_task(self._watch(claim, work)) if renew else None
            try:
                outcome = await self._await_work(claim, work)
            except StorageUnavailable as exc:
                await self._hold(claim, exc)
                return
            finally:
                if watcher is not None:
                    watcher.cancel()
                self.busy.pop(claim.worker_id, None)
                run = self.prepared.pop(task.id, None)
            if outcome is not None and outcome.status is TaskStatus.FAILED and outcome.report_path is None:
                outcome = await asyncio.to_thread(delivery.report_failure, self.store, task, run, outcome)
            if outcome is not None and await self._stored(self._commit, claim, outcome) is TaskStatus.CANCELLED:
                await self._report_cancel(task.id, run)

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

    async def _await_work(self, claim: Claim, work: asyncio.Task[Outcome]) -> Outcome | None:
        current = asyncio.current_task()
        try:
            async with asyncio.timeout(claim.task.timeout_s):
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
                await self._release(claim)     # the pool is stopping: back to the queue
                raise
            return await self._after_watch(claim)

    async def _after_watch(self, claim: Claim) -> Outcome | None:
        """The watcher stopped the work: cancelled by the user, or the lease went elsewhere."""
        task = await self._store(self.store.get_task, claim.task.id)
        if task.cancel_requested:       # `_commit` logs the transition
            return Outcome(TaskStatus.CANCELLED, error="cancelled by the user while running")
        log.warning("task %d: lease lost; leaving it to its new owner", task.id)
        return None

    async def _outcome(self, claim: Claim) -> Outcome:
        for _ in range(RERUNS + 1):
            try:
                run = await asyncio.to_thread(self._prepare, claim.task)
            except OhdError as exc:
                return Outcome(TaskStatus.FAILED, error=str(exc))
            self.prepared[claim.task.id] = run
            outcome = await asyncio.to_thread(self._redeliver, run) or await self._attempts(run)
            if not outcome.stale:
                return outcome
            log.info("task %d: %s changed while the task ran; running it again", claim.task.id, claim.task.target)
        return Outcome(TaskStatus.FAILED, error=f"{claim.task.target} kept changing while the task ran")

    def _redeliver(self, run: Run) -> Outcome | None:
        """A task whose answer was accepted before a crash (its execution is recorded) is delivered
        again from that answer in the call history, without asking the model: the same bytes, so
        an output already written is left as it is. Without the answer (call history off or cut)
        the accepted attempt is given back, so the model is asked once more instead of the task
        failing for want of attempts. None: nothing was accepted for the target's current text (the
        normal run; also when the target changed since that answer was judged: it is asked again)."""
        accepted = [e for e in self.store.executions(run.task.id) if e.outcome == "accepted"]
        if not accepted or accepted[-1].source_sha256 != outputs.sha256_text(run.job.source):
            return None
        calls = self.calls.for_task(run.task.id)
        try:
            content = tasktypes.extract(run.job.task_type, calls[-1]["response"]) if calls else None
        except MalformedAnswer:
            content = None
        if content is None or calls[-1]["model"] != accepted[-1].model:
            log.warning("task %d: its accepted answer is not in the call history; asking again", run.task.id)
            run.attempts -= 1
            return None
        log.info("task %d: delivering the answer accepted before the daemon stopped (not asked again)", run.task.id)
        run.history.append({"model": accepted[-1].model, "started": accepted[-1].started_at, "completion": None})
        return delivery.deliver(self.store, run, content, self.clock.now())

    def _prepare(self, task: Task) -> Run:
        """Read the target and decide what to ask for (file reads happen here)."""
        repo = Path(task.repo)
        source = outputs.read_source(repo, task.target, tasktypes.MAX_TARGET_BYTES)
        task_type = TaskType(task.type)
        tasktypes.check_target(task_type, task.target, source)    # before any model, as ladder.ready
        is_package = lambda rel: (repo / rel / "__init__.py").is_file()  # noqa: E731
        output = task.output or tasktypes.default_output(
            task_type, task.target, (repo / "tests").is_dir(),
            gitrepo.test_files(repo) if task_type is TaskType.UNIT_TEST else ())
        outputs.check_output(repo, output)
        outputs.check_reports(repo, task.target)     # accepted earlier; the tree may have changed since
        context = outputs.related(repo, output) if task_type is TaskType.UNIT_TEST else ()
        job = Job(task_type=task_type, target=task.target, source=source,
                  module=tasktypes.module_name(task.target, is_package), output=output,
                  description=task.description, prompt=task.prompt, context=context)
        ladder.ready(repo, job, ladder.for_task(self.ladder, task.type, task.rule_levels))  # before any model
        return Run(task=task, repo=repo, job=job, attempts=task.attempts)

    async def _attempts(self, run: Run) -> Outcome:
        candidates = routing.candidates(run.task.models, await self._auto_models(run.task))
        if not candidates:      # `auto` on a server whose model list has not been read yet
            return Outcome(TaskStatus.PENDING, not_before=self.clock.now() + LIST_WAIT, error=(
                "waiting for the model server's list of models (GET /models has not answered yet); "
                "the task resumes once it is read"))
        if outcome := await self._rejudge(run, candidates):
            return outcome
        while run.attempts < run.task.max_attempts:
            if refusal := self._too_long(run, candidates):
                return refusal
            if not candidates:
                return Outcome(TaskStatus.FAILED, error="every model failed: " + "; ".join(run.model_errors.values())
                               if run.model_errors else "every model failed; see the executions")
            choice = await self._store(self.governor.acquire, candidates, self.clock.now())
            if choice.model is None:
                if choice.at is None:
                    return Outcome(TaskStatus.FAILED, error=choice.reason or "no usable model: every candidate is gone")
                wait = (choice.at - self.clock.now()).total_seconds()
                down = next((self.unreachable[m] for m in candidates if m in self.unreachable), None)
                # a server that is down is not waited for in place, nor a slot an older task waits for
                if wait > self.hold_s or down or await self._store(self.store.waits_before, run.task, choice.at):
                    return Outcome(TaskStatus.PENDING, not_before=choice.at, error=choice.reason or (
                        f"waiting for the model server: {down}; the next probe at {choice.at.isoformat()}, "
                        "and the task resumes once the server answers" if down else
                        f"no model can take a request now (cooling, over quota or breaker open); "
                        f"resumes at {choice.at.isoformat()}"))
                await self.clock.sleep(max(0.0, wait))
                continue
            if outcome := await self._try_model(run, choice.model, candidates):
                return outcome
        return await self._give_up(run)

    async def _rejudge(self, run: Run, candidates: list[str]) -> Outcome | None:
        """An answer received before a crash and never judged (its call is still pending in the call
        history) is judged now, not asked for again: its request was counted when it was sent. Only
        for the target's current text; an edited target, a cut response or call history off: asked
        again. None: nothing to judge, or judged and rejected (the loop asks with its feedback)."""
        found = await self._store(self.calls.pending_answer, run.task.id)
        if found is None or run.attempts >= run.task.max_attempts:
            return None
        response, pending = found
        if pending.get("source_sha256") != outputs.sha256_text(run.job.source):
            log.info("task %d: %s changed since the answer received before the crash; asking again",
                     run.task.id, run.task.target)
            return None
        try:
            completion = Completion(content=response, **pending["completion"])
            started, model = datetime.fromisoformat(pending["started"]), completion.model
        except (KeyError, TypeError, ValueError) as exc:    # written by another version of ohd
            log.warning("task %d: the answer received before the crash cannot be read back (%s); asking again",
                        run.task.id, exc)
            return None
        log.info("task %d: judging the answer %s gave before the daemon stopped (not asked again)", run.task.id,
                 completion.answered_by)
        try:
            content = tasktypes.extract(run.job.task_type, response)
        except MalformedAnswer as exc:
            exc.model, exc.answer = completion.answered_by, response
            await self._record(run, model, started, completion, "malformed", exc, counts=True)
            return await self._unusable(run, model, exc, candidates)
        run.history.append({"model": completion.answered_by, "completion": completion, "started": started})
        return await self._judge(run, model, content, candidates)

    def _too_long(self, run: Run, candidates: list[str]) -> Outcome | None:
        """Drop the candidates whose known context (`/models`) the prompt exceeds, before any call;
        a refusal naming them when none is left."""
        contexts = self.governor.contexts
        tokens = prompt_tokens(tasktypes.messages(run.job))
        small = [m for m in candidates if (contexts.get(m) or tokens) < tokens]
        if not small:
            return None
        for model in small:
            candidates.remove(model)
        if candidates:
            log.info("task %d: the prompt (about %d tokens) is too large for %s; not asked", run.task.id, tokens,
                     ", ".join(small))
            return None
        sizes = ", ".join(f"{m}: {contexts[m]} tokens" for m in small)
        return Outcome(TaskStatus.FAILED, error=(
            f"the prompt (about {tokens} tokens) is larger than the context of every candidate model ({sizes}); "
            "split the target or use a model with a larger context"))

    async def _try_model(self, run: Run, model: str, candidates: list[str]) -> Outcome | None:
        """One request to `model` (its slot is reserved); None: choose a model again."""
        try:
            content = await self._ask(run, model)
        except RateLimited as exc:
            await self._store(self.governor.rate_limited, model, exc.reset_at, exc.limit, self.clock.now())
            log.debug("task %d: %s rate limited until %s; next model", run.task.id, model, exc.reset_at)
            return None
        except ContextOverflow as exc:      # another model may have a larger context; no attempt spent
            candidates.remove(model)
            log.info("task %d: the prompt does not fit %s's context; %s", run.task.id, model,
                     "next model" if candidates else "no model left")
            return None if candidates else Outcome(TaskStatus.FAILED, error=(
                f"the prompt is larger than the context of every candidate model ({exc}); "
                "split the target or use a model with a larger context"))
        except (AuthFailed, BadRequest) as exc:
            return Outcome(TaskStatus.FAILED, error=str(exc))
        except Refused as exc:          # this model will not take it (402, 403); the next one may
            run.model_errors[model] = str(exc)
            candidates.remove(model)
            log.info("task %d: %s refused the request (%s); %s", run.task.id, model, exc.message,
                     "next model" if candidates else "no model left")
            return None
        except Unreachable as exc:      # no attempt spent; the open breaker defers the task to its probe
            if not exc.sent:
                await self._store(self.governor.unsent, model)
            await self._store(self.governor.unreachable, model, self.clock.now(), exc.message)
            self.unreachable[model] = str(exc)
            return None
        except MalformedAnswer as exc:
            await self._answered(model)   # it did answer
            return await self._unusable(run, model, exc, candidates)
        except ModelError as exc:
            note = self.governor.gone if isinstance(exc, ModelGone) else self.governor.failed
            await self._store(note, model, self.clock.now())
            run.model_errors[model] = str(exc)
            log.debug("task %d: %s failed (%s); next model", run.task.id, model, exc.error_class)
            candidates.remove(model)
            return None
        await self._answered(model)
        run.unusable_from = None
        if content in run.rejected:
            return await self._repeated(run, model, content, candidates)
        return await self._judge(run, model, content, candidates)

    async def _unusable(self, run: Run, model: str, exc: MalformedAnswer, candidates: list[str]) -> Outcome | None:
        """An answer with nothing usable in it is fed back; the second in a row from `model` moves
        on to the next model, and the same text twice drops `model` (it will answer so again)."""
        said = exc.answer if exc.answer is not None else exc.message
        before, run.unusable_from = run.unusable_from, (model, said)
        run.unusable = exc.message
        run.job = tasktypes.with_feedback(run.job, (f"Your previous answer was unusable: {exc.message}",))
        if before is None or before[0] != model:
            return None
        if before[1] != said:
            if len(candidates) > 1:
                candidates.append(candidates.pop(candidates.index(model)))
            return None
        candidates.remove(model)
        run.unusable = f"{model} gave the same unusable answer twice: {exc.message}; it was not asked again"
        log.info("task %d: %s; %s", run.task.id, run.unusable, "next model" if candidates else "giving up")
        return None if candidates else await self._give_up(run)

    async def _repeated(self, run: Run, model: str, content: str, candidates: list[str]) -> Outcome | None:
        """The same candidate as an earlier, rejected one (a deterministic provider): its verdict
        cannot change, so it is not judged again and `model` gets no more attempts."""
        verdict = run.verdict = run.rejected[content]
        await self._record(run, model, run.history[-1]["started"], run.history[-1]["completion"], "rejected", None,
                           verdict, counts=True)
        candidates.remove(model)
        log.info("task %d: %s gave an answer it gave before (rejected: %s); %s", run.task.id, model,
                 "; ".join(verdict.feedback()), "next model" if candidates else "giving up")
        return None if candidates else await self._give_up(run)

    async def _answered(self, model: str) -> None:
        """The model answered: its breaker closes, and tasks waiting for it decide again now."""
        self.unreachable.pop(model, None)
        if await self._store(self.governor.succeeded, model, self.clock.now()):
            await self._store(self.store.promote_due, self.clock.now(), True)
            self.wake_event.set()

    async def _ask(self, run: Run, model: str) -> str:
        """Call one model and record the execution; returns the extracted candidate."""
        started = self.clock.now()
        try:
            completion = await self.call(model, messages := tasktypes.messages(run.job), run.task.timeout_s, run.job)
        except ModelError as exc:
            # an answer, if a useless one, costs an attempt (counted with its execution row)
            await self._record(run, model, started, None, _outcome_of(exc), exc,
                               counts=isinstance(exc, MalformedAnswer))
            raise
        await self._store(self.calls.record, run.task.id, completion.answered_by, started, messages, completion.content,
                          _pending(completion, started, run.job.source))
        try:
            content = tasktypes.extract(run.job.task_type, completion.content)
        except MalformedAnswer as exc:
            exc.model, exc.answer = completion.answered_by, completion.content
            await self._record(run, model, started, completion, "malformed", exc, counts=True)
            raise
        run.history.append({"model": completion.answered_by, "completion": completion, "started": started})
        return content

    async def _judge(self, run: Run, model: str, content: str, candidates: list[str]) -> Outcome | None:
        """Validate (a unit_test candidate is run with pytest); a rejection feeds the next prompt,
        a possible bug is kept for the report, the same error twice moves on to the next model."""
        written = await self._store(self.store.written, run.task.repo, run.job.output)
        ours = written is not None and written.holds(outputs.current_sha(outputs.resolve_inside(run.repo, run.job.output)))
        judging = self.clock.monotonic()
        verdict = run.verdict = await asyncio.to_thread(
            ladder.judge, run.repo, run.job, content, run.task.min_quality,
            ladder.for_task(self.ladder, run.task.type, run.task.rule_levels), ours)
        validation_ms = round((self.clock.monotonic() - judging) * 1000)
        answered = run.history[-1]
        outcome = "accepted" if verdict.accepted else "rejected"
        await self._record(run, model, answered["started"], answered["completion"], outcome, None, verdict,
                           validation_ms, counts=True)
        if not verdict.accepted:
            run.rejected[content] = verdict
            run.quarantined = (content, verdict) if verdict.possible_bug() else run.quarantined
            run.job = tasktypes.with_feedback(run.job, verdict.prompt_feedback())
            if run.last_error == (model, verdict.feedback()) and len(candidates) > 1:
                candidates.append(candidates.pop(candidates.index(model)))
            run.last_error = (model, verdict.feedback())
            return None
        return await asyncio.to_thread(delivery.deliver, self.store, run, content, self.clock.now())

    async def _give_up(self, run: Run) -> Outcome:
        return await asyncio.to_thread(delivery.give_up, self.store, run)

    # -- models ----------------------------------------------------------------

    async def _auto_models(self, task: Task) -> list[str]:
        """What `auto` expands to: the configured models, ranked for the task type if a ranking is set."""
        if self.rank is None or "auto" not in (task.models or ("auto",)):
            return self.models
        return await self._store(self.rank, task.type, self.models)

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
            status = await self._store(self.store.defer, task.id, claim.worker_id, outcome.not_before, now,
                                       outcome.error or "waiting")
            if status is TaskStatus.PENDING:
                log.info("task %d pending until %s", task.id, outcome.not_before.isoformat(),
                         extra={"task_id": task.id, "status": status.value})
                if self.alarm is not None:
                    self.alarm.set(outcome.not_before)
            elif status is not None:
                log.info("task %d cancelled (a cancel came in while it ran)", task.id,
                         extra={"task_id": task.id, "status": status.value})
            return status
        if not await self._store(self.store.finish, task.id, claim.worker_id, outcome.status, now,
                                 outcome.error, outcome.output_path, outcome.report_path):
            return None
        log.info("task %d %s: %s", task.id, outcome.status.value, outcome.note or outcome.error or "done",
                 extra={"task_id": task.id, "status": outcome.status.value})
        return outcome.status

    async def _report_cancel(self, task_id: int, run: Run | None) -> None:
        """The cancel is committed: its report says what had happened so far (never fails)."""
        await asyncio.to_thread(delivery.report_cancel, self.store, task_id, self.clock.now(), run, True)

    async def _record(self, run: Run, model: str, started: datetime, completion: Completion | None,
                      outcome: str, exc: ModelError | None, verdict: validate.Verdict | None = None,
                      validation_ms: int | None = None, counts: bool = False) -> None:
        """One execution row under the model the server says answered: latency is the call's own (the
        answer's, else the call's span), never the validation's, which is recorded beside it.
        `counts`: an answer, which spends an attempt in the same transaction (a crash before its
        verdict spends none)."""
        if counts:
            run.attempts += 1
        await self._store(functools.partial(
            self.store.record_execution, run.task.id, run.attempts, completion.answered_by if completion else model,
            started, self.clock.now(),
            completion.prompt_tokens if completion else 0, completion.completion_tokens if completion else 0,
            completion.cost if completion else None, outcome,
            exc.error_class if exc else None, str(exc) if exc else None, verdict.score if verdict else None,
            latency_ms=completion.latency_ms if completion else None, validation_ms=validation_ms, counts=counts,
            source_sha256=outputs.sha256_text(run.job.source) if counts else None))

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

    async def _release(self, claim: Claim) -> None:
        status = await self._store(self.store.release, claim.task.id, claim.worker_id, self.clock.now())
        if status is not None:
            log.info("task %d %s", claim.task.id, "released back to the queue" if status is TaskStatus.QUEUED
                     else "cancelled (a cancel came in while it ran)",
                     extra={"task_id": claim.task.id, "status": status.value})
        if status is TaskStatus.CANCELLED:
            await self._report_cancel(claim.task.id, self.prepared.get(claim.task.id))

    async def _store(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a store call in a thread so a busy SQLite lock never stalls the loop."""
        return await asyncio.to_thread(fn, *args)


def prompt_tokens(messages: Sequence[dict[str, str]]) -> int:
    """About how many tokens `messages` are (4 characters a token, as for English and code)."""
    return -(-sum(len(message.get("content", "")) for message in messages) // 4)


def _pending(completion: Completion, started: datetime, source: str) -> dict[str, Any]:
    """What rebuilds `completion` (with its response) for a verdict after a crash (`Pool._rejudge`)."""
    usage = {k: v for k, v in dataclasses.asdict(completion).items() if k != "content"}
    return {"completion": usage, "started": started.isoformat(), "source_sha256": outputs.sha256_text(source)}


def _outcome_of(exc: ModelError) -> str:
    return "rate_limited" if isinstance(exc, RateLimited) else "malformed" if isinstance(exc, MalformedAnswer) else "error"

