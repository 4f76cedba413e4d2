"""Delivering a task's result: the accepted output written, never over the user's edits,
and the report (JSON for machines, Markdown for people) next to the source.

Blocking file and store work, run by the pool in a worker thread. Writing is
idempotent: what ohd writes is recorded in the store before the file is replaced, so a
crash and a re-run give the same bytes, and a file whose hash ohd did not write is the
user's (the new content goes to `<output>.ohd-new`). A target that changed while its
task ran is not written against: the outcome says `stale` and the pool runs it again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from ohd.core import layout
from ohd.core.taskfile import TaskType
from ohd.core.tasktypes import Job
from ohd.errors import TargetError
from ohd.ladder import astrules, validate
from ohd.repo import outputs
from ohd.store.schema import QUARANTINED
from ohd.store.store import Execution, Store, Task, TaskStatus, Written
from ohd.work import report

log = logging.getLogger("ohd.delivery")


@dataclass
class Outcome:
    """How one task ended, as the pool decided it."""

    status: TaskStatus
    error: str | None = None
    output_path: str | None = None
    report_path: str | None = None
    not_before: datetime | None = None
    stale: bool = False     # the target changed while the task ran: run it again on the new text
    note: str | None = None  # how it went, for the pool's log line once the outcome is committed


@dataclass
class Run:
    """The working state of one claimed task while it runs."""

    task: Task
    repo: Path
    job: Job
    attempts: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    verdict: validate.Verdict | None = None
    quarantined: tuple[str, validate.Verdict] | None = None    # the last candidate that is a possible bug
    last_error: tuple[str, tuple[str, ...]] | None = None      # (model, failed rules) of the last rejection
    rejected: dict[str, validate.Verdict] = field(default_factory=dict)   # candidate -> its verdict
    unusable: str | None = None       # why the last answer could not be used (no candidate in it)
    unusable_from: tuple[str, str] | None = None   # (model, its text) of the last answer, when unusable
    model_errors: dict[str, str] = field(default_factory=dict)   # model -> why it failed and was dropped


def deliver(store: Store, run: Run, content: str, now: datetime) -> Outcome:
    """Write the accepted output (never over the user's edits) and the report."""
    if is_stale(run):
        return Outcome(TaskStatus.RUNNING, stale=True)
    intended = outputs.check_output(run.repo, run.job.output)
    repo, output, before = run.task.repo, run.job.output, store.written(run.task.repo, run.job.output)
    current = outputs.current_sha(intended)
    written, previous = (before.sha256, before.previous_sha256) if before is not None else (None, None)
    plan = outputs.plan(intended, content, current, written, replaceable(run, intended, content), previous)
    if not plan.unchanged and not plan.conflict:   # recorded first; what it replaces stays ohd's till the finish
        store.record_written(repo, output, plan.sha256, run.task.id, now, replacing=replacing(before, current))
    elif plan.conflict:   # ohd wrote the proposal too: `mv` over the output is ohd's content, not an edit
        store.record_written(repo, output + layout.OHD_NEW_SUFFIX, plan.sha256, run.task.id, now)
    if not plan.unchanged:
        try:
            outputs.apply(plan, root=run.repo)
        except TargetError:
            if before is not None and not plan.conflict:   # nothing written (a full disk): the old file is
                store.record_written(repo, output, before.sha256, before.task_id or run.task.id, now,
                                     replacing=before.previous_sha256)   # still what it was
            raise
    decision = ("written_as_ohd_new" if plan.conflict else "unchanged" if plan.unchanged and not wrote_it(before, run)
                else "written")
    rel = plan.path.relative_to(run.repo.resolve()).as_posix()
    report_rel = write_report(store, run, decision, rel, conflict=plan.conflict_reason)
    note = (f"model={run.history[-1]['model']}, attempts={run.attempts}, "
            f"score={run.verdict.score if run.verdict else 0.0:.2f}, output={rel}")
    return Outcome(TaskStatus.COMPLETED, output_path=rel, report_path=report_rel, note=note)


def replacing(before: Written | None, current: str | None) -> str | None:
    """What a write replaces, kept as ohd's until its task finishes: no file (''), or ohd's own bytes; a user's
    file a docstring task may replace stays the user's (None), replaceable only by that proof again."""
    if current is None:
        return ""
    return current if before is not None and before.holds(current) else None


def wrote_it(before: Written | None, run: Run) -> bool:
    """This task's own write, recorded by a run a kill cut short before the task finished (so its
    output is already there): the task wrote it, it is not 'unchanged'."""
    return before is not None and before.landing and before.task_id == run.task.id


def give_up(store: Store, run: Run) -> Outcome:
    """No accepted answer within max_attempts: a possible bug is reported, anything else fails."""
    if run.quarantined is not None:   # tests that fail against the code: a possible bug, reported
        run.verdict = run.quarantined[1]
        report_rel = write_report(store, run, "quarantined", None)
        return Outcome(TaskStatus.COMPLETED, report_path=report_rel, error=f"{QUARANTINED}the tests fail "
                       "against the current code (a possible bug); see the report")
    messages = (rejection_reason(run.verdict, run.task.min_quality) if run.verdict
                else f"no usable answer ({run.unusable})" if run.unusable else "no usable answer")
    error = f"rejected after {run.attempts} attempt(s): {messages}"
    report_rel = write_report(store, run, "rejected", None, error)
    return Outcome(TaskStatus.FAILED, error=error, report_path=report_rel)


def replaceable(run: Run, intended: Path, content: str) -> str | None:
    """The hash of the text the task read, when `content` may replace it although ohd did not write it.

    Only a docstring task's own target, and only when `content` changes nothing but
    docstrings (code, comments and layout checked); `plan` still compares the file's
    current bytes with it, so a file changed since the task read it is never replaced.
    """
    if run.job.task_type is not TaskType.DOCSTRING or intended != outputs.resolve_inside(run.repo, run.job.target):
        return None
    return outputs.sha256_text(run.job.source) if astrules.docstring_change(run.job.source, content) is None else None


def rejection_reason(verdict: validate.Verdict, min_quality: float) -> str:
    """What decided a rejection first: the failed error-level rules, else the score below
    min_quality; then the warnings and infos that lowered it."""
    failed = sorted((r for r in verdict.rules if not r.passed), key=lambda r: list(validate.Level).index(r.level))
    messages = [r.message for r in failed]
    if verdict.errors_passed():
        messages.insert(0, f"the score {verdict.score:.2f} is below min_quality {min_quality:g}")
    return "; ".join(messages)


def report_failure(store: Store, task: Task, run: Run | None, outcome: Outcome) -> Outcome:
    """A task that failed outside the validation (refused before any call, every model failed,
    a timeout, an error in ohd) still gets its report; when none can be written (the target's
    folder is gone or outside the repo, a full disk) the error says why."""
    report_rel, why = _report_beside(store, task, run, "failed", outcome.error)
    if report_rel is None:
        why = "either" if why and why in (outcome.error or "") else f"({why})"    # a full repo: said once
        return replace(outcome, error=f"{outcome.error}; no report was written {why}")
    return replace(outcome, report_path=report_rel)


def report_cancel(store: Store, task_id: int, now: datetime, run: Run | None = None,
                  while_running: bool = False) -> Task:
    """A cancelled task's report: cancelled by the user, and what had happened so far (attempts,
    the last verdict or call); its path and that sentence go to the task, or why no report could be
    written. Called once the store committed the cancel; idempotent, and it never raises (the
    cancel stands whatever happens here). Returns the task as stored."""
    try:
        task = store.get_task(task_id)
        if task.status != TaskStatus.CANCELLED or task.report_path is not None:
            return task
        executions = store.executions(task_id)
        if run is not None:
            run = replace(run, task=task, attempts=task.attempts)
        error = cancel_reason(task, executions, run.verdict if run else None, while_running)
        report_rel, why = _report_beside(store, task, run, "cancelled", error)
        if report_rel is None:
            error = f"{error}; no report was written ({why})"
        store.record_report(task_id, TaskStatus.CANCELLED, report_rel, error, now)
        return store.get_task(task_id)
    except Exception:   # a defect here must not undo or fail the cancel: the store already says cancelled
        log.exception("task %d: the cancelled task's report failed", task_id)
        return store.get_task(task_id)


def cancel_reason(task: Task, executions: list[Execution], verdict: validate.Verdict | None,
                  while_running: bool) -> str:
    """'cancelled by the user [while running]', then what had happened: the attempts, and the last
    verdict (why it was rejected) or the last call's outcome."""
    said = "cancelled by the user while running" if while_running else "cancelled by the user"
    if not executions:
        return f"{said}, before any model answered"
    done = f"{said}, after {task.attempts} attempt(s)"
    if verdict is not None and not verdict.accepted:
        return f"{done}; the last answer was rejected: {rejection_reason(verdict, task.min_quality)}"
    last = executions[-1]
    detail = f": {last.error}" if last.error else f" (score {last.score:.2f})" if last.score is not None else ""
    return f"{done}; the last call: {last.model} {last.outcome}{detail}"


def _report_beside(store: Store, task: Task, run: Run | None, decision: str,
                   error: str | None) -> tuple[str | None, str | None]:
    """Write the report of a task that ended without an output: (its path, None), or (None, why
    none could be written: the target's folder is gone or outside the repo, a full disk)."""
    repo = Path(task.repo)
    if run is None:   # ended before the target was read: the report says what is known
        job = Job(task_type=TaskType(task.type), target=task.target, source="", module="",
                  output=task.output or "")
        run = Run(task=task, repo=repo, job=job, attempts=task.attempts)
    try:
        folder = outputs.report_paths(repo, task.target, task.type)[0].parent.parent
        if not folder.is_dir():
            raise TargetError(task.target, f"its folder {folder.name or '.'}/ does not exist")
        return write_report(store, run, decision, None, error), None
    except TargetError as exc:
        log.warning("task %d: no report written: %s", task.id, exc)
        return None, str(exc)


def write_report(store: Store, run: Run, decision: str, output: str | None, error: str | None = None,
                 conflict: str | None = None) -> str:
    """The task's report beside the source, `<dir>/.ohd/<file>.<type>.<task id>.json|.md`, and
    the same at `<dir>/.ohd/<file>.<type>.json|.md` (the latest); the first's repo-relative path."""
    data = {
        "task": {**run.task.as_dict(), "attempts": run.attempts,
                 "status": TaskStatus.CANCELLED.value if decision == "cancelled" else
                 TaskStatus.FAILED.value if decision in ("rejected", "failed") else TaskStatus.COMPLETED.value,
                 "quarantined": decision == "quarantined"},
        "verdict": run.verdict.as_dict() if run.verdict else None,
        "attempts": [e.as_dict() for e in store.executions(run.task.id)],
        "decision": decision,
        "output_path": output,
        "intended_output": run.job.output or None,
        "conflict": conflict,
        "error": error,
        "possible_bug": run.quarantined[0] if decision == "quarantined" and run.quarantined else None,
    }
    as_json, as_markdown = report.render_json(data), report.render_markdown(data)
    own = outputs.report_paths(run.repo, run.task.target, run.task.type, run.task.id)
    for json_path, md_path in (own, outputs.report_paths(run.repo, run.task.target, run.task.type)):
        outputs.atomic_write(json_path, as_json, root=run.repo)
        outputs.atomic_write(md_path, as_markdown, root=run.repo)
    return own[0].relative_to(run.repo.resolve()).as_posix()


def is_stale(run: Run) -> bool:
    """Whether the target's text is no longer what the model was shown (gone counts as changed)."""
    try:
        return outputs.read_source(run.repo, run.task.target) != run.job.source
    except TargetError:
        return True
