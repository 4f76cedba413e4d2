"""One claimed task done by a coding agent: a worktree per attempt, the agent run in it, its diff
judged, the accepted diff delivered; the pool (`worker.py`) supervises it as it does a `TaskRun`.

An attempt: a detached worktree of the task's base commit (`repo/worktrees.py`) under the state
dir; the prompt in a file beside it (never inside: it is not part of the diff); the model list
from the governor (candidates as for `llm`: `auto` expanded and ranked, dead models left out;
budgets and free-only mode apply to each request); a grant of the daemon's agent proxy
(`models/proxy.py`) whose every request is one `governed.governed_call` over those candidates, so
the agent's requests are paced, counted, rotated on 429 and recorded like ohd's own; the agent
started by `agentproc` with the task's `timeout_s` as its limit, its row in `agent_run` first. Its
result is the worktree's diff against the base commit, accepted only when it is not empty, stays
inside the repo and out of `.git/`, parses where it is Python, applies to the base commit and
passes `check_command`; nothing outside the worktree the agent could reach (the user's uncommitted
files, the repo's hooks and config; caches and ohd's own files aside) may have changed. A
rejected attempt spends one, and the next is told why. The worktree is removed after every
attempt, whatever happened (a crash leaves it to the daemon's start-up sweep).

Delivery never touches the user's working copy unless the task says `deliver: apply` and the
touched files are clean there: a patch `.ohd/task-<id>.patch` with its summary `.ohd/task-<id>.md`
(written like every output: never over a user's edit), or a commit on `ohd/task-<id>` (never
checked out), or applied (else delivered as a patch, the summary saying why).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from ohd.core import layout, pyparse, routing, tasktypes
from ohd.core.taskfile import TaskType
from ohd.core.tasktypes import Job
from ohd.errors import OhdError, TargetError
from ohd.ladder import ladder
from ohd.models.llm import Completion
from ohd.models.proxy import Forward, Grant, Proxy
from ohd.repo import gitrepo, outputs, worktrees
from ohd.repo.worktrees import AgentResultError
from ohd.store.agentruns import MAX_DIFF_BYTES, AgentRuns
from ohd.store.calls import DEFAULT_MAX_BYTES
from ohd.store.store import Store, Task, TaskStatus
from ohd.work import agentproc, governed
from ohd.work.agentproc import AgentConfig, AgentSetupError, Exit, Invocation
from ohd.work.delivery import Outcome, Run

log = logging.getLogger("ohd.agents")

LIST_WAIT = timedelta(seconds=60)   # no model list yet (`auto` before GET /models answered): look again then
TAIL_CHARS = 2000                   # of the agent's or the check's output in a rejection's feedback


@dataclass
class AgentSetup:
    """What the pool needs to run agent tasks (the daemon builds it from `[agents]`)."""

    state_dir: Path
    config: AgentConfig = field(default_factory=AgentConfig)
    proxy: Proxy | None = None        # started by the daemon; None: the agent gets no model access through ohd
    # how the proxy's requests reach the model server whole (tools, sampling, tool calls back); None
    # (the offline provider): only their text, through the pool's caller
    relay: governed.Relay | None = None
    max_bytes: int = DEFAULT_MAX_BYTES


class Means(governed.Means, Protocol):
    """What an agent task's run uses of its pool (`worker.Pool`): what a governed request needs, and
    the agent runners' setup."""

    agents: AgentSetup | None


@dataclass
class Attempt:
    """What one attempt left: for its row, the next prompt's feedback and the summary."""

    number: int
    models: list[str]
    exit: Exit | None = None
    diff: str | None = None
    diff_stat: str | None = None
    paths: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)     # what was checked and passed, for the summary
    requests: int = 0
    models_used: list[str] = field(default_factory=list)


class AgentRun:
    """One claimed agent task, attempt by attempt until an outcome (which the pool commits)."""

    def __init__(self, task: Task, means: Means) -> None:
        self.task = task
        self.pool = means
        self.run: Run | None = None     # a TaskRun's round state, which the pool's reports read; none here
        self.feedback: list[str] = []
        self.runs = AgentRuns(means.store.db, means.agents.max_bytes if means.agents else DEFAULT_MAX_BYTES)

    async def outcome(self) -> Outcome:
        setup, task = self.pool.agents, self.task
        if setup is None:
            return Outcome(TaskStatus.FAILED, error=f"runner {task.runner}: this daemon runs no agents")
        if task.base_commit is None:
            return Outcome(TaskStatus.FAILED, error="the task has no base commit (the repo had none when it was "
                                                    "created); commit, then submit it again")
        models = await self._models()
        if isinstance(models, Outcome):
            return models
        attempts = task.attempts
        while attempts < task.max_attempts:
            attempts += 1
            await asyncio.to_thread(self.pool.store.add_attempt, task.id, self.pool.clock.now())
            outcome = await self._attempt(setup, Attempt(attempts, models))
            if outcome is not None:
                return outcome
        return Outcome(TaskStatus.FAILED, error=f"rejected after {attempts} attempt(s): {self.feedback[-1]}"
                       if self.feedback else f"no attempt left ({task.max_attempts})")

    async def _models(self) -> list[str] | Outcome:
        """The candidates, best first, as the governor sees them now (dead ones left out)."""
        task, pool = self.task, self.pool
        configured = pool.models
        if pool.rank is not None and "auto" in (task.models or ("auto",)):
            configured = await asyncio.to_thread(pool.rank, task.type, configured)
        wanted = routing.candidates(task.models, configured)
        if not wanted:
            return Outcome(TaskStatus.PENDING, not_before=pool.clock.now() + LIST_WAIT,
                           error="waiting for the model server's list of models; the task resumes once it is read")
        views = await asyncio.to_thread(pool.governor.views, wanted, pool.clock.now())
        alive = [v.model for v in views if v.health is not routing.Health.DEAD]
        if not alive:
            return Outcome(TaskStatus.FAILED, error="no usable model: every candidate is gone")
        return alive

    async def _attempt(self, setup: AgentSetup, attempt: Attempt) -> Outcome | None:
        """One attempt; None: rejected (its reason is the next attempt's feedback)."""
        task, clock = self.task, self.pool.clock
        repo = Path(task.repo)
        base = task.base_commit
        assert base is not None
        worktree = layout.worktrees_dir(setup.state_dir) / layout.run_name(task.id, attempt.number)
        try:
            await asyncio.to_thread(worktrees.add, repo, worktree, base)
        except OhdError as exc:
            return Outcome(TaskStatus.FAILED, error=f"cannot make the agent's worktree: {exc}")
        run_id: int | None = None
        grant: Grant | None = None
        outcome: str = "failed"
        error: str | None = None
        try:
            prompt_file = layout.run_file(worktree, layout.PROMPT_SUFFIX)
            prompt_file.write_text(self._prompt(repo), encoding="utf-8")
            if setup.proxy is not None:
                grant = setup.proxy.open(self._forward(attempt), attempt.models)
                token, base_url = grant.token, setup.proxy.base_url
            else:
                token, base_url = secrets.token_urlsafe(24), ""
            try:
                invoked = agentproc.invocation(task.runner, setup.config, prompt_file=prompt_file,
                                               model=attempt.models[0], base_url=base_url, token=token,
                                               worktree=worktree, target=task.target)
            except AgentSetupError as exc:
                error = str(exc)
                return Outcome(TaskStatus.FAILED, error=error)
            guard = await asyncio.to_thread(self._snapshot, setup, repo, invoked)
            run_id = await asyncio.to_thread(self.runs.start, task.id, attempt.number, task.runner,
                                             list(invoked.argv), str(worktree), clock.now())
            log.info("task %d: attempt %d: %s starting in %s", task.id, attempt.number, task.runner, worktree,
                     extra={"task_id": task.id})
            started_id = run_id

            async def record_pid(pid: int) -> None:
                await asyncio.to_thread(self.runs.started, started_id, pid)

            attempt.exit = await agentproc.run(invoked, worktree, layout.run_file(worktree, layout.STDOUT_SUFFIX),
                                               layout.run_file(worktree, layout.STDERR_SUFFIX), task.timeout_s,
                                               on_start=record_pid)
            if grant is not None:
                attempt.requests, attempt.models_used = grant.requests, list(grant.models_used)
            try:
                await self._judge(setup, repo, worktree, base, guard, attempt, invoked)
            except AgentResultError as exc:
                outcome, error = "rejected", str(exc)
                self.feedback.append(error)
                log.info("task %d: attempt %d rejected: %s", task.id, attempt.number, error,
                         extra={"task_id": task.id})
                return None
            delivered = await asyncio.to_thread(deliver, self.pool.store, task, worktree, attempt, clock.now())
            outcome = "accepted"
            return delivered
        except asyncio.CancelledError:
            outcome, error = "cancelled", "stopped while the agent ran (a cancel, a lost lease or the daemon stopping)"
            raise
        except OhdError as exc:
            error = str(exc)
            return Outcome(TaskStatus.FAILED, error=error)
        finally:
            if grant is not None and setup.proxy is not None:
                setup.proxy.close(grant)
                attempt.requests, attempt.models_used = grant.requests, list(grant.models_used)
            await asyncio.shield(self._end(run_id, outcome, error, attempt, repo, worktree))

    async def _end(self, run_id: int | None, outcome: str, error: str | None, attempt: Attempt, repo: Path,
                   worktree: Path) -> None:
        """The attempt's row completed, then its worktree removed (both whatever happened)."""
        try:
            if run_id is not None:
                done = attempt.exit
                await asyncio.to_thread(
                    self.runs.finish, run_id, self.pool.clock.now(), outcome=outcome,
                    exit_code=done.code if done else None, error=error, stdout=done.stdout if done else "",
                    stderr=done.stderr if done else "", diff=attempt.diff, diff_stat=attempt.diff_stat,
                    requests=attempt.requests, models=attempt.models_used)
        finally:
            await asyncio.to_thread(worktrees.remove, repo, worktree)

    def _forward(self, attempt: Attempt) -> Forward:
        """What the proxy does with each of the agent's requests: one governed request over the
        attempt's candidates (paced, counted, rotated on 429, recorded under the attempt)."""
        task, pool = self.task, self.pool
        relay = pool.agents.relay if pool.agents else None

        async def one(messages: list[dict[str, Any]], params: dict[str, Any]) -> Completion:
            return await governed.governed_call(pool, task, attempt.models, messages, params, task.timeout_s,
                                                attempt=attempt.number, relay=relay)

        return one

    def _prompt(self, repo: Path) -> str:
        task = self.task
        task_type = TaskType(task.type)
        output = task.output
        if output is None and task_type in (TaskType.UNIT_TEST, TaskType.DOCSTRING, TaskType.REVIEW):
            output = tasktypes.default_output(task_type, task.target, (repo / "tests").is_dir(),
                                              gitrepo.test_files(repo) if task_type is TaskType.UNIT_TEST else ())
        return tasktypes.agent_prompt(task_type, task.target, task.description, output, self.feedback)

    def _snapshot(self, setup: AgentSetup, repo: Path, invoked: Invocation) -> dict[str, str]:
        """What the agent must not change outside its worktree (`worktrees.guard_snapshot`): ohd's state
        dir, the agent's temp dir and its runner's own files are not the user's (blocking)."""
        temp = invoked.env.get("TMPDIR")
        skip = [setup.state_dir, *([Path(temp)] if temp else [])]
        return worktrees.guard_snapshot(repo, skip, agentproc.LEFTOVERS.get(self.task.runner, ()))

    def _outside(self, before: dict[str, str], after: dict[str, str]) -> list[str]:
        """The paths changed outside the worktree while the agent ran, but for ohd's own doings there
        (another task's output written as recorded, a validation's or a write's transient file)."""
        store, repo = self.pool.store, self.task.repo
        found = []
        for rel in worktrees.guard_changes(before, after):
            if outputs.is_transient(PurePosixPath(rel).name):
                continue
            written = store.written(repo, rel)
            if written is not None and written.holds(after.get(rel)):
                continue
            found.append(rel)
        return found

    async def _judge(self, setup: AgentSetup, repo: Path, worktree: Path, base: str, guard: dict[str, str],
                     attempt: Attempt, invoked: Invocation) -> None:
        """AgentResultError unless the attempt's diff may be delivered."""
        done = attempt.exit
        assert done is not None
        changed = await asyncio.to_thread(self._outside, guard,
                                          await asyncio.to_thread(self._snapshot, setup, repo, invoked))
        if changed:
            raise AgentResultError("the agent wrote outside its worktree, into the user's repo: "
                                   f"{', '.join(changed[:10])} changed while it ran (its diff is not used)")
        if done.timed_out:
            raise AgentResultError(f"the agent did not finish within the task's time limit "
                                   f"({self.task.timeout_s:g}s); its process group was killed")
        if done.code != 0:
            raise AgentResultError(f"the agent exited with code {done.code}: {_tail(done.stderr or done.stdout)}")
        leftovers = agentproc.LEFTOVERS.get(self.task.runner, ())
        attempt.diff = await asyncio.to_thread(worktrees.diff, worktree, base, leftovers)
        attempt.diff_stat = await asyncio.to_thread(worktrees.diff_stat, worktree, base)
        if not attempt.diff.strip():
            raise AgentResultError("the agent changed nothing (its worktree has no diff against the task's commit)")
        if len(attempt.diff.encode("utf-8")) > MAX_DIFF_BYTES:
            raise AgentResultError(f"the diff is larger than {MAX_DIFF_BYTES:,} bytes")
        attempt.paths = await asyncio.to_thread(worktrees.check_paths, worktree, base)
        attempt.checks.append(f"{len(attempt.paths)} path(s) inside the repo, none under {layout.GIT_DIR}/")
        _parses(worktree, attempt.paths)
        attempt.checks.append("changed Python files parse")
        await asyncio.to_thread(worktrees.check_applies, repo, base, attempt.diff)
        attempt.checks.append(f"applies to {base[:12]}")
        if self.task.check_command:
            await self._check_command(setup, worktree, self.task.check_command)
            attempt.checks.append(f"check_command `{' '.join(self.task.check_command)}` exited 0")
        if self.task.type == TaskType.UNIT_TEST.value:
            await self._judge_tests(worktree, attempt)

    async def _judge_tests(self, worktree: Path, attempt: Attempt) -> None:
        """A unit_test run's test files, each judged by the ladder as an `llm` run's answer is (in the
        worktree: against the code as the agent left it)."""
        task = self.task
        tests = [rel for rel in attempt.paths if gitrepo.is_test_file(PurePosixPath(rel).name)
                 and (worktree / rel).is_file()]
        if not tests:
            raise AgentResultError(f"a unit_test run must write a test file (test_*.py); the agent changed "
                                   f"{', '.join(attempt.paths[:10])}")
        source = outputs.read_source(worktree, task.target, tasktypes.MAX_TARGET_BYTES)
        is_package = lambda rel: (worktree / rel / "__init__.py").is_file()  # noqa: E731
        judges = ladder.for_task(self.pool.ladder, task.type, task.rule_levels)
        for rel in tests:
            job = Job(task_type=TaskType.UNIT_TEST, target=task.target, source=source,
                      module=tasktypes.module_name(task.target, is_package), output=rel, description=task.description)
            content = (worktree / rel).read_text(encoding="utf-8")
            verdict = await asyncio.to_thread(ladder.judge, worktree, job, content, task.min_quality, judges, True)
            if not verdict.accepted:
                raise AgentResultError(f"{rel} was rejected by the validation ladder (score {verdict.score:.2f}): "
                                       + "; ".join(verdict.prompt_feedback()))
            attempt.checks.append(f"{rel} accepted by the validation ladder (score {verdict.score:.2f})")

    async def _check_command(self, setup: AgentSetup, worktree: Path, argv: Sequence[str]) -> None:
        env = {name: os.environ[name] for name in setup.config.pass_env if name in os.environ}
        if shutil.which(argv[0], path=env.get("PATH")) is None and not (worktree / argv[0]).is_file():
            raise AgentResultError(f"check_command: {argv[0]!r} is not installed or not on PATH")
        done = await agentproc.run(Invocation(argv=tuple(argv), env=env), worktree,
                                   layout.run_file(worktree, layout.STDOUT_SUFFIX),
                                   layout.run_file(worktree, layout.STDERR_SUFFIX), self.task.timeout_s)
        if done.timed_out:
            raise AgentResultError(f"check_command `{' '.join(argv)}` did not finish within {self.task.timeout_s:g}s")
        if done.code != 0:
            raise AgentResultError(f"check_command `{' '.join(argv)}` exited with code {done.code}:\n"
                                   f"{_tail(done.stdout + done.stderr)}")


def _parses(worktree: Path, paths: Sequence[str]) -> None:
    for rel in paths:
        path = worktree / rel
        if not rel.endswith(".py") or not path.is_file() or path.is_symlink():
            continue
        try:
            pyparse.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, ValueError, UnicodeDecodeError) as exc:
            where = f" at line {exc.lineno}" if isinstance(exc, SyntaxError) else ""
            raise AgentResultError(f"{rel} does not parse as Python{where}: "
                                   f"{exc.msg if isinstance(exc, SyntaxError) else exc}") from None


def _tail(text: str) -> str:
    text = text.strip()
    return text if len(text) <= TAIL_CHARS else "..." + text[-TAIL_CHARS:]


# -- delivery (blocking; in a worker thread) -------------------------------------------------

def deliver(store: Store, task: Task, worktree: Path, attempt: Attempt, now: datetime) -> Outcome:
    """Deliver the accepted diff as the task says; the user's working copy is only ever touched by
    `apply`, and only where the touched files are clean."""
    repo = Path(task.repo)
    diff = attempt.diff or ""
    how = task.deliver
    note = ""
    output: str
    if how == "branch":
        ref = layout.branch_ref(task.id)
        sha = worktrees.commit_to_branch(worktree, repo, ref, f"ohd task {task.id}: {task.type} {task.target}\n\n"
                                         f"{task.description}".strip())
        output = ref.removeprefix("refs/heads/")
        note = f"committed {sha[:12]} on branch {output} (not checked out)"
    elif how == "apply":
        dirty = worktrees.touched_dirty(repo, attempt.paths)
        if dirty:
            output = _write(store, task, layout.patch_path(task.id), diff, now)
            note = (f"not applied: the working copy has changes in {', '.join(dirty[:10])}; "
                    f"the patch is in {output} (`ohd apply {task.id}` once they are committed or stashed)")
        else:
            worktrees.apply_to_working_copy(repo, diff)
            output = ", ".join(attempt.paths)
            note = "applied to the working copy"
    else:
        output = _write(store, task, layout.patch_path(task.id), diff, now)
        note = f"patch in {output} (`ohd apply {task.id}` applies it)"
    summary = _write(store, task, layout.summary_path(task.id), summary_text(task, attempt, note), now)
    log.info("task %d: %s", task.id, note, extra={"task_id": task.id})
    return Outcome(TaskStatus.COMPLETED, output_path=output, report_path=summary,
                   note=f"runner={task.runner}, attempts={attempt.number}, requests={attempt.requests}; {note}")


def _write(store: Store, task: Task, rel: str, content: str, now: datetime) -> str:
    """One of ohd's files in the repo, recorded first and never over the user's edit (`<rel>.ohd-new` then)."""
    repo = Path(task.repo)
    try:
        intended = outputs.check_writable(repo, rel)
    except TargetError as exc:
        raise OhdError(str(exc)) from None
    before = store.written(task.repo, rel)
    plan = outputs.plan(intended, content, outputs.current_sha(intended), before.sha256 if before else None,
                        None, before.previous_sha256 if before else None)
    if not plan.unchanged:
        written_as = rel + layout.OHD_NEW_SUFFIX if plan.conflict else rel
        store.record_written(task.repo, written_as, plan.sha256, task.id, now)
        outputs.apply(plan, root=repo)
    return plan.path.relative_to(repo.resolve()).as_posix()


def summary_text(task: Task, attempt: Attempt, note: str) -> str:
    """The Markdown summary beside a delivered diff."""
    models = ", ".join(attempt.models_used) or f"none through ohd's proxy (offered: {', '.join(attempt.models)})"
    lines = [f"# ohd task {task.id}: {task.type} {task.target}", "",
             f"- runner: {task.runner}", f"- base commit: {task.base_commit}", f"- attempt: {attempt.number} of "
             f"{task.max_attempts}", f"- model(s): {models}", f"- model requests: {attempt.requests}",
             f"- delivered: {note}", "", "## Checks", ""]
    lines += [f"- {check}" for check in attempt.checks]
    lines += ["", "## Diff stat", "", "```", attempt.diff_stat or "", "```", ""]
    if task.description:
        lines[1:1] = ["", task.description]
    return "\n".join(lines)
