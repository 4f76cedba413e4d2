"""One governed model request, and what every request of a task does around its call.

`governed_call` is a request that is not the single-call path's: a coding agent's, which the agent
proxy (`models/proxy.py`) forwards. It does for that one request what a `taskrun.Round` does around
each of its calls: the governor reserves a request slot on the first candidate that may be sent one
(quotas counted in the same transaction); a slot within `hold_s` is waited for in place on the
clock, a later one, or one an older pending task may take (FIFO, `Store.waits_before`), raises
`RateLimited` with its instant (the proxy answers 429 + Retry-After); a 429 from the server cools
the model down and asks the next candidate at once; a refused connection opens the model's breaker;
a model that is gone, fails or answers with nothing usable is dropped for this request. With a
`Relay` (the daemon's model client) the request is sent as the agent made it (tools, parameters) and
its answer keeps its choices (tool calls); without one, only its text. Every call becomes an
execution row (`agent_request` for an answer, which spends no attempt: the agent's run is judged by
its diff), and every answer goes into the call history, so `ohd show --calls`, the cost, latency and
budget figures include the agent's requests.

The helpers beside it (the store in a thread, the governor's notes after a call, the execution row)
are the ones `taskrun.Round` uses too: both paths note a call's outcome the same way.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from ohd.clock import Clock
from ohd.core.routing import Choice
from ohd.core.taskfile import TaskType
from ohd.core.tasktypes import Job
from ohd.errors import (
    AuthFailed,
    BadRequest,
    ContextOverflow,
    MalformedAnswer,
    ModelError,
    ModelGone,
    RateLimited,
    Refused,
    StorageUnavailable,
    Unreachable,
)
from ohd.ladder.ladder import Ladder
from ohd.models.llm import Completion
from ohd.store.calls import CallHistory
from ohd.store.history import AGENT_REQUEST
from ohd.store.quotas import Governor
from ohd.store.store import Store, Task

log = logging.getLogger("ohd.worker")

Caller = Callable[[str, list[dict[str, str]], float, Job], Awaitable[Completion]]   # (model, messages, timeout, job)
# (model, messages, params, timeout): an agent's request sent on whole (`ModelClient.relay`)
Relay = Callable[[str, list[dict[str, Any]], dict[str, Any], float], Awaitable[Completion]]
T = TypeVar("T")


class Means(Protocol):
    """What a task's run uses of its pool (`worker.Pool`)."""

    store: Store
    clock: Clock
    call: Caller
    governor: Governor
    calls: CallHistory      # prompts and responses
    ladder: Ladder          # how candidates are judged
    hold_s: float           # a slot this close is waited for in place instead of deferring
    models: list[str]       # what `auto` expands to
    rank: Callable[[str, list[str]], list[str]] | None   # (task type, models) -> best first; None: as configured
    unreachable: dict[str, str]   # model -> why its server could not be reached (until it answers)
    request_params: dict[str, Any]   # what else a request is made of (server, max_tokens, ...): the cache key's

    stop: asyncio.Event | None   # set when the pool stops

    def wake(self) -> None: ...


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a store call in a thread so a busy SQLite lock never stalls the loop."""
    return await asyncio.to_thread(fn, *args)


KEEP_TRIES = 12   # about 15 s of backoff (0.1 s doubling, at most 2 s apart)


async def kept(means: Means, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a thread, tried again while the store refuses it (its PostgreSQL server
    restarting: a second or two), for at most `KEEP_TRIES` tries or until the pool stops, then the
    refusal is raised (the run is held, as any refused write). For the write of an answer the model
    gave: a held run asks the model again for one that was never recorded."""
    def stopping(state: RetryCallState) -> bool:
        return state.attempt_number >= KEEP_TRIES or (means.stop is not None and means.stop.is_set())

    async for attempt in AsyncRetrying(retry=retry_if_exception_type(StorageUnavailable), stop=stopping,
                                       wait=wait_exponential(multiplier=0.1, max=2.0), sleep=means.clock.sleep,
                                       reraise=True):
        with attempt:
            return await in_thread(fn, *args)
    raise AssertionError("unreachable: tenacity re-raises the last failure")


# -- the governor's notes after a call -------------------------------------------------------


async def answered(means: Means, model: str) -> None:
    """The model answered: its breaker closes, and tasks waiting for it decide again now."""
    means.unreachable.pop(model, None)
    if await in_thread(means.governor.succeeded, model, means.clock.now()):
        await in_thread(means.store.promote_due, means.clock.now(), True)
        means.wake()


async def rate_limited(means: Means, model: str, exc: RateLimited) -> None:
    """A 429: the model cools down until the server's instant (and its limit is learned)."""
    await in_thread(means.governor.rate_limited, model, exc.reset_at, exc.limit, means.clock.now())


async def unreachable(means: Means, model: str, exc: Unreachable) -> None:
    """The server could not be reached: a request that never left counts against no limit; the breaker opens."""
    if not exc.sent:
        await in_thread(means.governor.unsent, model)
    await in_thread(means.governor.unreachable, model, means.clock.now(), exc.message)
    means.unreachable[model] = str(exc)


async def failed(means: Means, model: str, exc: ModelError) -> None:
    """Any other failure: the model is gone (404) or one failure nearer its breaker."""
    note = means.governor.gone if isinstance(exc, ModelGone) else means.governor.failed
    await in_thread(note, model, means.clock.now())


async def record(means: Means, task_id: int, attempt: int, model: str, started: datetime,
                 completion: Completion | None, outcome: str, exc: ModelError | None, *,
                 score: float | None = None, validation_ms: int | None = None, counts: bool = False,
                 source_sha256: str | None = None, cached: bool = False) -> None:
    """One execution row under the model the server says answered: latency is the call's own (the
    answer's, else the call's span), never the validation's, which is recorded beside it; `cached`:
    an answer replayed from the call history (no request was sent)."""
    c = completion
    await in_thread(functools.partial(
        means.store.record_execution, task_id, attempt, c.answered_by if c else model, started, means.clock.now(),
        c.prompt_tokens if c else 0, c.completion_tokens if c else 0, c.cost if c else None, outcome,
        exc.error_class if exc else None, str(exc) if exc else None, score,
        latency_ms=c.latency_ms if c else None, validation_ms=validation_ms, counts=counts,
        source_sha256=source_sha256, cached=cached))


def outcome_of(exc: ModelError) -> str:
    """The execution outcome of a call that raised `exc`."""
    if isinstance(exc, RateLimited):
        return "rate_limited"
    return "malformed" if isinstance(exc, MalformedAnswer) else "error"


def prompt_tokens(messages: Sequence[dict[str, str]]) -> int:
    """About how many tokens `messages` are (4 characters a token, as for English and code)."""
    return -(-sum(len(message.get("content", "")) for message in messages) // 4)


# -- one governed request ------------------------------------------------------------------------


async def governed_call(means: Means, task: Task, candidates: list[str], messages: list[dict[str, Any]],
                        params: dict[str, Any], timeout_s: float, *, attempt: int | None = None,
                        relay: Relay | None = None) -> Completion:
    """Ask the first candidate the governor allows now, rotating as a task's call does, and return
    its answer; raises the `ModelError` that ends the request (`RateLimited` with the instant a
    model can take one, when that is further than `hold_s` or when an older task waits for that
    slot). With `relay` the request goes as it came: its messages whole and `params`, its other
    fields (tools, tool_choice, sampling settings, ...; the agent's `model` is never routed on),
    and the answer keeps its choices (tool calls). Without it (the offline provider) only the
    messages' text is sent, through the pool's caller. `attempt`: the task's attempt the rows are
    filed under (default: the one in progress)."""
    request = _Request(means, task, candidates, messages, params, timeout_s,
                       task.attempts + 1 if attempt is None else attempt, relay)
    if params.get("model"):
        log.debug("task %d: agent request for %r; the governor chooses among %s", task.id, params["model"],
                  ", ".join(candidates))
    return await request.answer()


class _Request:
    """One request's walk over its candidates (best first; a model dropped is not asked again)."""

    def __init__(self, means: Means, task: Task, candidates: list[str], messages: list[dict[str, Any]],
                 params: dict[str, Any], timeout_s: float, attempt: int, relay: Relay | None) -> None:
        self.means, self.task, self.raw, self.params, self.relay = means, task, messages, params, relay
        self.messages = [_text(m) for m in messages]     # what the call history and the context check read
        self.timeout_s, self.attempt = timeout_s, attempt
        self.left = list(dict.fromkeys(candidates))
        self.job = _job(task)
        self.last: ModelError | None = None

    async def answer(self) -> Completion:
        self._fit()
        while self.left:
            choice = await in_thread(self.means.governor.acquire, self.left, self.means.clock.now())
            if choice.model is None:
                await self._wait(choice)
                continue
            try:
                return await self._ask(choice.model)
            except ModelError as exc:
                await self._failed(choice.model, exc)
        raise self.last or ModelGone("none", "no candidate model for this task")

    def _fit(self) -> None:
        """Drop the candidates whose known context (`/models`) the messages exceed, before any call."""
        contexts, tokens = self.means.governor.contexts, prompt_tokens(self.messages)
        small = [m for m in self.left if (contexts.get(m) or tokens) < tokens]
        self.left = [m for m in self.left if m not in small]
        if small and not self.left:
            sizes = ", ".join(f"{m}: {contexts[m]} tokens" for m in small)
            raise ContextOverflow(", ".join(small), f"the request (about {tokens} tokens) is larger than the "
                                  f"context of every candidate model ({sizes})")

    async def _wait(self, choice: Choice) -> None:
        """No candidate can be sent a request now: a slot this close is waited for in place, a later
        one (or a server that is down, or a slot an older task waits for: FIFO, as a task's call
        does) is the asker's to wait for."""
        means, names = self.means, ", ".join(self.left)
        if choice.at is None:
            raise ModelGone(names, choice.reason or "no usable model: every candidate is gone")
        wait = (choice.at - means.clock.now()).total_seconds()
        down = next((means.unreachable[m] for m in self.left if m in means.unreachable), None)
        if wait > means.hold_s or down:
            raise RateLimited(names, choice.at, choice.reason or (
                f"waiting for the model server ({down}); try again after {choice.at.isoformat()}" if down else
                f"no model can take a request now (cooling, over quota or breaker open); "
                f"try again after {choice.at.isoformat()}"))
        if await in_thread(means.store.waits_before, self.task, choice.at):
            raise RateLimited(names, choice.at, f"an older task waits for the next request slot; try again after "
                                                f"{choice.at.isoformat()}")
        await means.clock.sleep(max(0.0, wait))

    async def _ask(self, model: str) -> Completion:
        """One call to `model` (its slot is reserved), recorded whatever its outcome."""
        means, task, started = self.means, self.task, self.means.clock.now()
        try:
            if self.relay is not None:
                completion = await self.relay(model, self.raw, self.params, self.timeout_s)
            else:
                completion = await means.call(model, self.messages, self.timeout_s, self.job)
        except ModelError as exc:
            await record(means, task.id, self.attempt, model, started, None, outcome_of(exc), exc)
            raise
        await answered(means, model)
        await in_thread(means.calls.record, task.id, completion.answered_by, started, self.messages,
                        _said(completion))
        await record(means, task.id, self.attempt, model, started, completion, AGENT_REQUEST, None)
        log.debug("task %d: agent request answered by %s", task.id, completion.answered_by)
        return completion

    async def _failed(self, model: str, exc: ModelError) -> None:
        """Note what the call's failure says about `model`; raise what ends the request."""
        self.last = exc
        match exc:
            case RateLimited():          # cooling now: the next acquire passes it over, no attempt spent
                await rate_limited(self.means, model, exc)
                log.debug("task %d: %s rate limited until %s; next model", self.task.id, model, exc.reset_at)
                return
            case ContextOverflow() | Refused():   # another model may take it
                pass
            case AuthFailed() | BadRequest():     # no model will take this request as it is
                raise exc
            case Unreachable():          # its breaker is open now: the next acquire passes it over
                await unreachable(self.means, model, exc)
                return
            case MalformedAnswer():      # it did answer, with nothing usable (or the key): not asked again
                await answered(self.means, model)
            case _:
                await failed(self.means, model, exc)
        self.left.remove(model)
        log.debug("task %d: %s failed for an agent request (%s); %s", self.task.id, model, exc.error_class,
                  "next model" if self.left else "no model left")


def _text(message: dict[str, Any]) -> dict[str, str]:
    """A chat message as text: its role and its text (parts joined), the tool calls it makes after it
    (the call history's prompt, the context estimate; without a relay, what the model is sent)."""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    text = (content if isinstance(content, str) else "") + _calls_text(message.get("tool_calls"))
    return {"role": str(message.get("role", "user")), "content": text}


def _said(completion: Completion) -> str:
    """What the call history keeps of an answer: its text, and each tool call it makes."""
    if not completion.choices:
        return completion.content
    message = completion.choices[0].get("message")
    return completion.content + (_calls_text(message.get("tool_calls")) if isinstance(message, dict) else "")


def _calls_text(calls: Any) -> str:
    if not isinstance(calls, list):
        return ""
    lines = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            lines.append(f"\n[tool call] {function.get('name')}({function.get('arguments') or ''})")
    return "".join(lines)


def _job(task: Task) -> Job:
    """What the caller is told of the task (the offline provider answers from it)."""
    kind = TaskType(task.type) if task.type in set(TaskType) else TaskType.CUSTOM
    return Job(task_type=kind, target=task.target, source="", module="", output=task.output or "",
               description=task.description, prompt=task.prompt)
