"""One claimed task run to an outcome: its target read, a model chosen and asked, each answer
judged, the accepted one delivered; the pool (`worker.py`) supervises it and commits the outcome.

A `TaskRun` goes round by round: a `Round` reads the target once (`prepare`) and asks the
candidate models until an outcome; a target that changed while it ran starts the next round
(at most `RERUNS`). A round's state is explicit: its `delivery.Run` (attempts, history,
verdicts, feedback), its candidates (best first; a model that refuses, fails or repeats itself
is dropped). Every model call becomes an execution row before the next step. Before each call
the store-backed governor (`quotas.Governor`) reserves a request slot on the first candidate
that is not cooling, open, dead or over a known limit; a 429 cools the model down (in the
store) and moves to the next model without spending an attempt; when no model can be sent
now the round ends `pending` until the earliest instant one can. What a run uses of its pool
(`Means`) is read when it is used, so a reload (the ladder, the models, the ranking) applies
from the next step on. Store calls run in a thread, so a busy SQLite lock never stalls the loop.

The replay cache comes before the governor: a request whose key (`calls.request_key`: the model,
the messages, the request's parameters) was answered before and that answer was accepted is not
sent; that answer, from the call history, is judged again and delivered like a fresh one, with an
execution row marked `cached` (no request slot reserved, no quota, no tokens). A task with
`cache: false` never replays. One part of a prompt is left out of the key: the text at the output
path when it is what ohd itself wrote there (its own earlier answer, which replaying reproduces),
so a rule re-run on an unchanged target finds the first run's key; a test file you edited is in it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from ohd.core import routing, tasktypes
from ohd.core.routing import Choice
from ohd.core.taskfile import TaskType
from ohd.core.tasktypes import Job
from ohd.errors import (
    AuthFailed,
    BadRequest,
    ContextOverflow,
    MalformedAnswer,
    ModelError,
    OhdError,
    RateLimited,
    Refused,
    Unreachable,
)
from ohd.ladder import ladder, validate
from ohd.ladder.ladder import Ladder
from ohd.models.llm import Completion
from ohd.repo import gitrepo, outputs
from ohd.store.calls import Replay, request_key
from ohd.store.store import Task, TaskStatus
from ohd.work import delivery
from ohd.work.delivery import Outcome, Run
from ohd.work.governed import Caller as Caller  # re-exported: the pool's and the daemon's type
from ohd.work.governed import Means as Means  # re-exported: what a run uses of its pool
from ohd.work.governed import (
    answered,
    failed,
    in_thread,
    kept,
    outcome_of,
    prompt_tokens,
    rate_limited,
    record,
    unreachable,
)

log = logging.getLogger("ohd.worker")

RERUNS = 3   # times a task runs again because its target changed while it ran
LIST_WAIT = timedelta(seconds=60)   # a task with no model yet looks again (the catalogue wakes it sooner)


class TaskRun:
    """One claimed task, run round by round until an outcome (which the pool commits)."""

    def __init__(self, task: Task, means: Means) -> None:
        self.task = task
        self.pool = means
        self.run: Run | None = None    # the current round's state once prepared (for a failure's report)

    async def outcome(self) -> Outcome:
        for _ in range(RERUNS + 1):
            try:
                self.run = await asyncio.to_thread(prepare, self.task, self.pool.ladder)
            except OhdError as exc:
                return Outcome(TaskStatus.FAILED, error=str(exc))
            outcome = await Round(self.run, self.pool).outcome()
            if not outcome.stale:
                return outcome
            log.info("task %d: %s changed while the task ran; running it again", self.task.id, self.task.target)
        return Outcome(TaskStatus.FAILED, error=f"{self.task.target} kept changing while the task ran")


def prepare(task: Task, judges: Ladder) -> Run:
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
    ladder.ready(repo, job, ladder.for_task(judges, task.type, task.rule_levels))  # before any model
    return Run(task=task, repo=repo, job=job, attempts=task.attempts)


class Round:
    """One pass of a task over its target's current text: `run` is its state, `candidates` the
    models still in play (best first)."""

    def __init__(self, run: Run, means: Means) -> None:
        self.run = run
        self.task = run.task
        self.pool = means
        self.candidates: list[str] = []
        self.replayed: set[str] = set()   # the keys whose answer this round replayed (each at most once)

    async def outcome(self) -> Outcome:
        return await asyncio.to_thread(self._redeliver) or await self._attempts()

    def _redeliver(self) -> Outcome | None:
        """A task whose answer was accepted before a crash (its execution is recorded) is delivered
        again from that answer in the call history, without asking the model: the same bytes, so
        an output already written is left as it is. Without the answer (call history off or cut)
        the accepted attempt is given back, so the model is asked once more instead of the task
        failing for want of attempts. None: nothing was accepted for the target's current text (the
        normal run; also when the target changed since that answer was judged: it is asked again)."""
        run, store = self.run, self.pool.store
        accepted = [e for e in store.executions(self.task.id) if e.outcome == "accepted"]
        if not accepted or accepted[-1].source_sha256 != outputs.sha256_text(run.job.source):
            return None
        calls = self.pool.calls.for_task(self.task.id)
        try:
            content = tasktypes.extract(run.job.task_type, calls[-1]["response"]) if calls else None
        except MalformedAnswer:
            content = None
        if content is None or calls[-1]["model"] != accepted[-1].model:
            log.warning("task %d: its accepted answer is not in the call history; asking again", self.task.id)
            run.attempts -= 1
            return None
        log.info("task %d: delivering the answer accepted before the daemon stopped (not asked again)", self.task.id)
        run.history.append({"model": accepted[-1].model, "started": accepted[-1].started_at, "completion": None})
        return delivery.deliver(store, run, content, self.pool.clock.now())

    async def _attempts(self) -> Outcome:
        self.candidates = routing.candidates(self.task.models, await self._auto_models())
        if not self.candidates:      # `auto` on a server whose model list has not been read yet
            return Outcome(TaskStatus.PENDING, not_before=self.pool.clock.now() + LIST_WAIT, error=(
                "waiting for the model server's list of models (GET /models has not answered yet); "
                "the task resumes once it is read"))
        if outcome := await self._rejudge():
            return outcome
        while self.run.attempts < self.task.max_attempts:
            if outcome := await self._turn():
                return outcome
        return await self._give_up()

    async def _auto_models(self) -> list[str]:
        """What `auto` expands to: the configured models, ranked for the task type if a ranking is set."""
        rank, models = self.pool.rank, self.pool.models
        if rank is None or "auto" not in (self.task.models or ("auto",)):
            return models
        return await in_thread(rank, self.task.type, models)

    async def _turn(self) -> Outcome | None:
        """Ask the first candidate that may be sent a request now; None: go on."""
        if refusal := self._too_long():
            return refusal
        if not self.candidates:
            return Outcome(TaskStatus.FAILED, error="every model failed: " + "; ".join(self.run.model_errors.values())
                           if self.run.model_errors else "every model failed; see the executions")
        if (found := await in_thread(self._cached)) is not None:
            return await self._replay(*found)
        now = self.pool.clock.now()
        down = any(m in self.pool.unreachable for m in self.candidates)
        # a slot within `hold_s` is held for this task (not when a server is down: its probe decides)
        hold = None if down else timedelta(seconds=self.pool.hold_s)
        choice = await in_thread(self.pool.governor.acquire, self.candidates, now, hold, self.task)
        if choice.model is None:
            return await self._wait(choice)
        if choice.at is not None:       # its slot, held: sent when it frees
            await self.pool.clock.sleep(max(0.0, (choice.at - self.pool.clock.now()).total_seconds()))
        return await self._try_model(choice.model)

    async def _wait(self, choice: Choice) -> Outcome | None:
        """No candidate can be sent a request now: a slot this close is waited for in place (None),
        else the task waits in the queue until `choice.at`."""
        if choice.at is None:
            return Outcome(TaskStatus.FAILED, error=choice.reason or "no usable model: every candidate is gone")
        wait = (choice.at - self.pool.clock.now()).total_seconds()
        down = next((self.pool.unreachable[m] for m in self.candidates if m in self.pool.unreachable), None)
        # a server that is down is not waited for in place, nor a slot an older task waits for
        if wait > self.pool.hold_s or down or await in_thread(self.pool.store.waits_before, self.task, choice.at):
            return Outcome(TaskStatus.PENDING, not_before=choice.at, error=choice.reason or (
                f"waiting for the model server: {down}; the next probe at {choice.at.isoformat()}, "
                "and the task resumes once the server answers" if down else
                f"no model can take a request now (cooling, over quota or breaker open); "
                f"resumes at {choice.at.isoformat()}"))
        await self.pool.clock.sleep(max(0.0, wait))
        return None

    async def _rejudge(self) -> Outcome | None:
        """An answer received before a crash and never judged (its call is still pending in the call
        history) is judged now, not asked for again: its request was counted when it was sent. Only
        for the target's current text; an edited target, a cut response or call history off: asked
        again. None: nothing to judge, or judged and rejected (the loop asks with its feedback)."""
        found = await self._pending_answer()
        if found is None:
            return None
        completion, started, cached = found
        model, response = completion.model, completion.content
        log.info("task %d: judging the answer %s gave before the daemon stopped (not asked again)", self.task.id,
                 completion.answered_by)
        try:
            content = tasktypes.extract(self.run.job.task_type, response)
        except MalformedAnswer as exc:
            exc.model, exc.answer = completion.answered_by, response
            await self._record(model, started, completion, "malformed", exc, counts=True, cached=cached)
            return await self._unusable(model, exc)
        self.run.history.append({"model": completion.answered_by, "completion": completion, "started": started,
                                 "cached": cached})
        return await self._judge(model, content)

    async def _pending_answer(self) -> tuple[Completion, datetime, bool] | None:
        """The answer received before a crash and never judged, with when it was asked for and whether
        it was a replay (the replay cache); None: none, no attempt left, or not for the target's
        current text or not readable (asked again)."""
        found = await in_thread(self.pool.calls.pending_answer, self.task.id)
        if found is None or self.run.attempts >= self.task.max_attempts:
            return None
        response, pending = found
        if pending.get("source_sha256") != outputs.sha256_text(self.run.job.source):
            log.info("task %d: %s changed since the answer received before the crash; asking again",
                     self.task.id, self.task.target)
            return None
        try:
            return (Completion(content=response, **pending["completion"]), datetime.fromisoformat(pending["started"]),
                    pending.get("replay_of") is not None)
        except (KeyError, TypeError, ValueError) as exc:    # written by another version of ohd
            log.warning("task %d: the answer received before the crash cannot be read back (%s); asking again",
                        self.task.id, exc)
            return None

    def _too_long(self) -> Outcome | None:
        """Drop the candidates whose known context (`/models`) the prompt exceeds, before any call;
        a refusal naming them when none is left."""
        contexts = self.pool.governor.contexts
        tokens = prompt_tokens(tasktypes.messages(self.run.job))
        small = [m for m in self.candidates if (contexts.get(m) or tokens) < tokens]
        if not small:
            return None
        for model in small:
            self.candidates.remove(model)
        if self.candidates:
            log.info("task %d: the prompt (about %d tokens) is too large for %s; not asked", self.task.id, tokens,
                     ", ".join(small))
            return None
        sizes = ", ".join(f"{m}: {contexts[m]} tokens" for m in small)
        return Outcome(TaskStatus.FAILED, error=(
            f"the prompt (about {tokens} tokens) is larger than the context of every candidate model ({sizes}); "
            "split the target or use a model with a larger context"))

    # -- one request -------------------------------------------------------------

    async def _try_model(self, model: str) -> Outcome | None:
        """One request to `model` (its slot is reserved); None: choose a model again."""
        try:
            content = await self._ask(model)
        except ModelError as exc:
            return await self._failed(model, exc)
        await self._answered(model)
        self.run.unusable_from = None
        if content in self.run.rejected:
            return await self._repeated(model, content)
        return await self._judge(model, content)

    async def _failed(self, model: str, exc: ModelError) -> Outcome | None:
        """What a request that brought no candidate leads to; None: choose a model again."""
        match exc:
            case RateLimited():
                await rate_limited(self.pool, model, exc)
                log.debug("task %d: %s rate limited until %s; next model", self.task.id, model, exc.reset_at)
                return None
            case ContextOverflow():      # another model may have a larger context; no attempt spent
                return self._overflowed(model, exc)
            case AuthFailed() | BadRequest():
                return Outcome(TaskStatus.FAILED, error=str(exc))
            case Refused():              # this model will not take it (402, 403); the next one may
                self._refused(model, exc)
            case Unreachable():          # no attempt spent; the open breaker defers the task to its probe
                await unreachable(self.pool, model, exc)
            case MalformedAnswer():
                await self._answered(model)   # it did answer
                return await self._unusable(model, exc)
            case _:
                await self._dropped(model, exc)
        return None

    def _overflowed(self, model: str, exc: ContextOverflow) -> Outcome | None:
        self.candidates.remove(model)
        log.info("task %d: the prompt does not fit %s's context; %s", self.task.id, model,
                 "next model" if self.candidates else "no model left")
        return None if self.candidates else Outcome(TaskStatus.FAILED, error=(
            f"the prompt is larger than the context of every candidate model ({exc}); "
            "split the target or use a model with a larger context"))

    def _refused(self, model: str, exc: Refused) -> None:
        self.run.model_errors[model] = str(exc)
        self.candidates.remove(model)
        log.info("task %d: %s refused the request (%s); %s", self.task.id, model, exc.message,
                 "next model" if self.candidates else "no model left")

    async def _dropped(self, model: str, exc: ModelError) -> None:
        """Any other failure: noted on the model (gone, or one more towards its breaker) and the
        model is not asked again for this task."""
        await failed(self.pool, model, exc)
        self.run.model_errors[model] = str(exc)
        log.debug("task %d: %s failed (%s); next model", self.task.id, model, exc.error_class)
        self.candidates.remove(model)

    async def _unusable(self, model: str, exc: MalformedAnswer) -> Outcome | None:
        """An answer with nothing usable in it is fed back; the second in a row from `model` moves
        on to the next model, and the same text twice drops `model` (it will answer so again)."""
        run, candidates = self.run, self.candidates
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
        log.info("task %d: %s; %s", self.task.id, run.unusable, "next model" if candidates else "giving up")
        return None if candidates else await self._give_up()

    async def _repeated(self, model: str, content: str) -> Outcome | None:
        """The same candidate as an earlier, rejected one (a deterministic provider): its verdict
        cannot change, so it is not judged again and `model` gets no more attempts."""
        run = self.run
        verdict = run.verdict = run.rejected[content]
        await self._record(model, run.history[-1]["started"], run.history[-1]["completion"], "rejected", None,
                           verdict, counts=True, cached=run.history[-1].get("cached", False))
        self.candidates.remove(model)
        log.info("task %d: %s gave an answer it gave before (rejected: %s); %s", self.task.id, model,
                 "; ".join(verdict.feedback()), "next model" if self.candidates else "giving up")
        return None if self.candidates else await self._give_up()

    async def _answered(self, model: str) -> None:
        await answered(self.pool, model)

    async def _ask(self, model: str) -> str:
        """Call one model and record the execution; returns the extracted candidate."""
        run, started = self.run, self.pool.clock.now()
        key = await in_thread(self._key, model)
        try:
            completion = await self.pool.call(model, messages := tasktypes.messages(run.job), self.task.timeout_s,
                                              run.job)
        except ModelError as exc:
            # an answer, if a useless one, costs an attempt (counted with its execution row)
            await self._record(model, started, None, outcome_of(exc), exc, counts=isinstance(exc, MalformedAnswer))
            raise
        # kept: the answer is recorded even across a database restart, so a held run is not asked again
        await kept(self.pool, functools.partial(self.pool.calls.record, self.task.id, completion.answered_by,
                                                started, messages, completion.content,
                                                _pending(completion, started, run.job.source), key=key))
        try:
            content = tasktypes.extract(run.job.task_type, completion.content)
        except MalformedAnswer as exc:
            exc.model, exc.answer = completion.answered_by, completion.content
            await self._record(model, started, completion, "malformed", exc, counts=True)
            raise
        run.history.append({"model": completion.answered_by, "completion": completion, "started": started})
        return content

    # -- verdicts ------------------------------------------------------------------

    async def _judge(self, model: str, content: str) -> Outcome | None:
        """Validate (a unit_test candidate is run with pytest); a rejection feeds the next prompt,
        a possible bug is kept for the report, the same error twice moves on to the next model."""
        run, clock = self.run, self.pool.clock
        written = await in_thread(self.pool.store.written, self.task.repo, run.job.output)
        current = outputs.current_sha(outputs.resolve_inside(run.repo, run.job.output))
        ours = written is not None and written.holds(current)
        judging = clock.monotonic()
        verdict = run.verdict = await asyncio.to_thread(
            ladder.judge, run.repo, run.job, content, self.task.min_quality,
            ladder.for_task(self.pool.ladder, self.task.type, self.task.rule_levels), ours)
        validation_ms = round((clock.monotonic() - judging) * 1000)
        answered = run.history[-1]
        await self._record(model, answered["started"], answered["completion"],
                           "accepted" if verdict.accepted else "rejected", None, verdict, validation_ms, counts=True,
                           cached=answered.get("cached", False))
        if not verdict.accepted:
            self._rejected(model, content, verdict)
            return None
        return await asyncio.to_thread(delivery.deliver, self.pool.store, run, content, clock.now())

    def _rejected(self, model: str, content: str, verdict: validate.Verdict) -> None:
        """The verdict feeds the next prompt; the same failed rules twice from `model` try the next model."""
        run = self.run
        run.rejected[content] = verdict
        run.quarantined = (content, verdict) if verdict.possible_bug() else run.quarantined
        run.job = tasktypes.with_feedback(run.job, verdict.prompt_feedback())
        if run.last_error == (model, verdict.feedback()) and len(self.candidates) > 1:
            self.candidates.append(self.candidates.pop(self.candidates.index(model)))
        run.last_error = (model, verdict.feedback())

    async def _give_up(self) -> Outcome:
        return await asyncio.to_thread(delivery.give_up, self.pool.store, self.run)

    async def _record(self, model: str, started: datetime, completion: Completion | None,
                      outcome: str, exc: ModelError | None, verdict: validate.Verdict | None = None,
                      validation_ms: int | None = None, counts: bool = False, cached: bool = False) -> None:
        """One execution row under the model the server says answered: latency is the call's own (the
        answer's, else the call's span), never the validation's, which is recorded beside it.
        `counts`: an answer, which spends an attempt in the same transaction (a crash before its
        verdict spends none); `cached`: a replayed answer (no request was sent)."""
        run = self.run
        if counts:
            run.attempts += 1
        await record(self.pool, self.task.id, run.attempts, model, started, completion, outcome, exc,
                     score=verdict.score if verdict else None, validation_ms=validation_ms, counts=counts,
                     source_sha256=outputs.sha256_text(run.job.source) if counts else None, cached=cached)

    # -- the replay cache ----------------------------------------------------------

    def _key(self, model: str) -> str:
        """The replay cache's key of the next request to `model` (a thread: it reads the store and
        the output file). The output file's text is left out of it when it is what ohd wrote there."""
        job = self.run.job
        if job.context:
            written = self.pool.store.written(self.task.repo, job.output)
            current = outputs.current_sha(outputs.resolve_inside(self.run.repo, job.output))
            if written is not None and written.holds(current):
                job = dataclasses.replace(job, context=tuple((p, t) for p, t in job.context if p != job.output))
        return request_key(model, tasktypes.messages(job), self.pool.request_params)

    def _cached(self) -> tuple[str, str, Replay] | None:
        """The first candidate whose next request was answered before and accepted: (model, key, the
        answer); None: ask a model (also with `cache: false`). A thread: it reads the store."""
        if not self.task.cache:
            return None
        for model in self.candidates:
            key = self._key(model)
            if key not in self.replayed and (found := self.pool.calls.replay(key)) is not None:
                return model, key, found
        return None

    async def _replay(self, model: str, key: str, found: Replay) -> Outcome | None:
        """Judge (and deliver) the answer `found` instead of asking `model`: no request slot, no
        quota, no tokens; the call history records it as a replay of its call. None: go on."""
        run, started = self.run, self.pool.clock.now()
        self.replayed.add(key)
        completion = Completion(model=model, content=found.response, prompt_tokens=0, completion_tokens=0, cost=0.0,
                                latency_ms=0, finish_reason=None, generation_id=None, served=found.model)
        log.info("task %d: replaying the answer %s gave to the same request (call %d, accepted then); "
                 "no request sent", self.task.id, found.model, found.call_id)
        pending = {**_pending(completion, started, run.job.source), "replay_of": found.call_id}
        await in_thread(functools.partial(self.pool.calls.record, self.task.id, completion.answered_by, started,
                                          tasktypes.messages(run.job), found.response, pending, key=key,
                                          replay_of=found.call_id))
        try:
            content = tasktypes.extract(run.job.task_type, found.response)
        except MalformedAnswer as exc:    # another version of ohd accepted it
            exc.model, exc.answer = completion.answered_by, found.response
            await self._record(model, started, completion, "malformed", exc, counts=True, cached=True)
            return await self._unusable(model, exc)
        run.history.append({"model": completion.answered_by, "completion": completion, "started": started,
                            "cached": True})
        if content in run.rejected:
            return await self._repeated(model, content)
        return await self._judge(model, content)




def _pending(completion: Completion, started: datetime, source: str) -> dict[str, Any]:
    """What rebuilds `completion` (with its response) for a verdict after a crash (`Round._rejudge`)."""
    usage = {k: v for k, v in dataclasses.asdict(completion).items() if k != "content"}
    return {"completion": usage, "started": started.isoformat(), "source_sha256": outputs.sha256_text(source)}
