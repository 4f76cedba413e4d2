"""Standing rules: task files in `tasks.d/` with `schedule:` or `on_change:`.

A `RuleBook` holds each repo's rules. They are registered (and re-registered when
edited) by ingest through a callback the daemon wires, validated here (cron via
`schedule`, globs via `pathspec`'s gitignore semantics), and forgotten when their file
is gone (checked before every use, so a deleted rule never fires again).
`changed(repo, paths, origin)` turns changed files into tasks, `due(now)` turns cron
firings into tasks. Invariants: a rule never fires for ohd's own files (`.ohd/`,
`*.ohd-new`, `tasks.d/`) nor for a file whose content is what ohd last wrote there or
proposed beside it as `<file>.ohd-new` (no loops, and accepting a proposal is no change);
one pending/queued task per (rule, path); no task for content the last accepted run already saw
(`rulestore`). Safe to call from any thread.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any, Literal

import pathspec

from ohd.clock import Clock, first
from ohd.core import layout
from ohd.core.taskfile import TaskSpec, TaskType, parse_bytes
from ohd.errors import OhdError, TargetError, TaskFileError
from ohd.intake.schedule import Trigger, compile_cron, decide, next_fire
from ohd.repo import worktrees
from ohd.repo.gitrepo import git
from ohd.repo.outputs import current_sha, read_task_file, resolve_inside
from ohd.store.rulestore import RuleStore
from ohd.store.store import Store

log = logging.getLogger("ohd.rules")

MAX_WAIT_S = 60.0        # the schedule loop re-checks at least this often (suspend, clock jumps)
DEFAULT_GRACE = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class Rule:
    """One registered rule: its file, its spec and the compiled trigger / globs."""

    repo: Path
    relpath: str
    spec: TaskSpec
    trigger: Trigger | None
    globs: pathspec.GitIgnoreSpec | None

    def matches(self, relpath: str) -> bool:
        return self.globs is not None and self.globs.match_file(relpath) and not self.own_output(relpath)

    def own_output(self, relpath: str) -> bool:
        """A file this rule's tasks produce (other than the target itself, see `changed`)."""
        if self.spec.output is not None and relpath == self.spec.output:
            return True
        name = posixpath.basename(relpath)
        if self.spec.type is TaskType.UNIT_TEST:
            return name.startswith("test_") or name.endswith("_test.py")
        return name.endswith(".review.md")

    def task_spec(self, target: str) -> TaskSpec:
        """The one-shot spec of a task this rule creates for `target`."""
        values = self.spec.model_dump()
        values.update(target=target, schedule=None, on_change=None)
        return TaskSpec.model_validate(values)


def compile_globs(globs: Sequence[str], source: str) -> pathspec.GitIgnoreSpec:
    """`on_change` patterns with .gitignore semantics (`src/**/*.py` matches `src/app.py`)."""
    try:
        return pathspec.GitIgnoreSpec.from_lines(globs)
    except (ValueError, TypeError) as exc:
        raise TaskFileError(source, f"not a valid glob pattern: {exc}", field="on_change") from None


def is_ohd_file(relpath: str) -> bool:
    """ohd's own paths, which never trigger a rule."""
    parts = relpath.split("/")
    return (parts[0] in (layout.TASKS_DIR, layout.GIT_DIR) or layout.REPORT_DIR in parts[:-1]
            or relpath.endswith(layout.OHD_NEW_SUFFIX))


def file_sha(repo: Path, relpath: str) -> str | None:
    """The content hash of a regular file inside the repo; None for anything else
    (gone, a directory or submodule, a symlink leading out, unreadable, outside)."""
    if relpath.startswith("/") or relpath == ".." or relpath.startswith("../"):
        return None
    try:
        path = resolve_inside(repo, relpath)
        return current_sha(path) if path.is_file() else None
    except (OSError, TargetError):
        return None


def read_rules(repo: Path) -> list[tuple[str, TaskSpec]]:
    """The rule files at the top of `repo/tasks.d` that parse (for `ohd rules` without a daemon)."""
    found: list[tuple[str, TaskSpec]] = []
    folder = layout.tasks_dir(repo)
    for path in sorted(p for p in folder.iterdir() if layout.is_task_file_name(p.name)) if folder.is_dir() else []:
        relpath = layout.task_relpath(path.name)
        try:       # read as ingest reads: a FIFO, a link to /dev/zero or a deep nesting is skipped
            spec = parse_bytes(read_task_file(path), relpath)
        except (OSError, TaskFileError):
            continue
        if spec.is_rule:
            found.append((relpath, spec))
    return found


class RuleBook:
    """The standing rules of every repo, and the tasks they create."""

    def __init__(self, store: Store, clock: Clock, *, timezone: tzinfo | None = None,
                 grace: timedelta = DEFAULT_GRACE) -> None:
        self.store = store
        self.firings = RuleStore(store)
        self.clock = clock
        self.timezone = timezone
        self.grace = grace
        self._rules: dict[tuple[Path, str], Rule] = {}
        self._lock = threading.Lock()
        self._wakeup = asyncio.Event()

    # -- the registry ---------------------------------------------------------------

    def register(self, repo: Path, relpath: str, spec: TaskSpec) -> Rule:
        """Add or replace the rule of `relpath`; `TaskFileError` (and the old rule gone) if invalid."""
        repo = repo.resolve()
        try:
            trigger = compile_cron(spec.schedule, self.timezone, relpath) if spec.schedule else None
            globs = compile_globs(spec.on_change, relpath) if spec.on_change else None
        except TaskFileError:
            self.forget(repo, relpath)
            raise
        rule = Rule(repo, relpath, spec, trigger, globs)
        with self._lock:
            known = (repo, relpath) in self._rules
            self._rules[(repo, relpath)] = rule
        log.info("rule %s %s: %s %s", relpath, "re-read" if known else "registered", spec.type.value,
                 f"schedule '{spec.schedule}'" if spec.schedule else f"on_change {spec.on_change}")
        if globs is not None:
            self._warn_if_nothing_matches(rule)
        return rule

    def _warn_if_nothing_matches(self, rule: Rule) -> None:
        try:
            files = git(rule.repo, "ls-files", "-co", "--exclude-standard").splitlines()
        except OhdError:
            return
        if not any(rule.matches(f) for f in files):
            log.warning("rule %s: on_change %s matches no file in %s (yet)", rule.relpath,
                        rule.spec.on_change, rule.repo)

    def forget(self, repo: Path, relpath: str) -> None:
        with self._lock:
            gone = self._rules.pop((repo.resolve(), relpath), None)
        if gone is not None:
            log.info("rule %s forgotten", relpath)

    def rules(self, repo: Path | None = None) -> list[Rule]:
        """The registered rules (of one repo); nothing is looked at on disk."""
        wanted = None if repo is None else repo.resolve()
        with self._lock:
            return [rule for rule in self._rules.values() if wanted in (None, rule.repo)]

    def live_rules(self, repo: Path | None = None) -> list[Rule]:
        """The rules (of one repo) whose file is still there; those whose file is gone are forgotten
        first (a deleted rule file stops firing at once, before its deletion is ingested)."""
        for rule in self.rules(repo):
            if not (rule.repo / rule.relpath).is_file():
                self.forget(rule.repo, rule.relpath)
        return self.rules(repo)

    def load(self, repo: Path, on_error: Callable[[TaskFileError], object] = lambda _exc: None,
             forget_others: bool = False) -> list[Rule]:
        """Register every rule file of `repo`'s tasks.d/ (`read_rules`); a file `register` refuses goes
        to `on_error` (by default nowhere: ingest rejects it and says why). With `forget_others`, a rule
        of `repo` whose file is no rule now is forgotten (a SIGHUP's re-read)."""
        loaded: list[Rule] = []
        for relpath, spec in read_rules(repo):
            try:
                loaded.append(self.register(repo, relpath, spec))
            except TaskFileError as exc:
                on_error(exc)
        if forget_others:
            names = {rule.relpath for rule in loaded}
            for rule in self.rules(repo):
                if rule.relpath not in names:
                    self.forget(repo, rule.relpath)
        return loaded

    # -- changes --------------------------------------------------------------------

    def changed(self, repo: Path, relpaths: Sequence[str], origin: str) -> list[int]:
        """Tasks for the on_change rules matching these repo-relative paths; the new ids."""
        repo = repo.resolve()
        rules = [r for r in self.live_rules(repo) if r.globs is not None]
        created: list[int] = []
        for relpath in dict.fromkeys(posixpath.normpath(p) for p in relpaths):
            matching = [r for r in rules if r.matches(relpath)]
            if not matching or is_ohd_file(relpath):
                continue
            sha = file_sha(repo, relpath)
            if sha is None or sha in self._ohd_content(repo, relpath):
                continue   # gone, not a file, or exactly what ohd wrote: no loop
            for rule in matching:
                created.extend(self._fire_change(rule, relpath, sha, origin))
        return created

    def _ohd_content(self, repo: Path, relpath: str) -> set[str]:
        """Hashes of what ohd wrote at `relpath` and proposed beside it (`<relpath>.ohd-new`, which
        the user accepts by moving it over `relpath`)."""
        hashes = (self.store.written_hash(str(repo), path) for path in (relpath, relpath + layout.OHD_NEW_SUFFIX))
        return {sha for sha in hashes if sha is not None}

    def _fire_change(self, rule: Rule, relpath: str, sha: str, origin: str) -> list[int]:
        base = self._base_commit(rule)
        if base is False:
            return []
        fired = self.firings.fire_change(rule.repo, rule.relpath, rule.task_spec(relpath), sha, origin,
                                         self.clock.now(), base)
        if fired is None:
            log.debug("rule %s: %s needs no task (one is open, or this content was done)", rule.relpath, relpath)
            return []
        task_id, status = fired        # pending: it waits for the run in progress
        log.info("task %d %s by rule %s for %s (%s)", task_id, status.value, rule.relpath, relpath, origin,
                 extra={"task_id": task_id, "status": status.value})
        return [task_id]

    def _base_commit(self, rule: Rule) -> str | None | Literal[False]:
        """The repo's HEAD for an agent runner's task (None for `llm`); False when the repo has no
        commit: the firing makes no task and the log says why."""
        if not rule.spec.agent:
            return None
        try:
            return worktrees.base_commit(rule.repo)
        except OhdError as exc:
            log.error("rule %s: no task: %s", rule.relpath, exc)
            return False

    # -- schedules ------------------------------------------------------------------

    def due(self, now: datetime) -> list[int]:
        """Fire the schedules due at `now` (missed firings: once, within the grace period)."""
        created: list[int] = []
        for rule in self.live_rules():
            if rule.trigger is None:
                continue
            last = self.firings.baseline(rule.repo, rule.relpath, now)
            decision = decide(rule.trigger, last, now, self.grace)
            if decision.fire is not None:
                base = self._base_commit(rule)
                if base is False:    # refused (logged): not again before the next firing
                    self.firings.set_last_fire(rule.repo, rule.relpath, decision.fire)
                    continue
                task_id = self.firings.fire_schedule(rule.repo, rule.relpath, rule.task_spec(rule.spec.file),
                                                     decision.fire, now, base)
                if task_id is None:
                    log.info("rule %s: the firing of %s has its task already (another daemon of the fleet made it)",
                             rule.relpath, decision.fire.isoformat())
                    continue
                log.info("task %d queued by rule %s (firing of %s%s)", task_id, rule.relpath,
                         decision.fire.isoformat(), "; earlier missed firings collapsed" if decision.skipped else "",
                         extra={"task_id": task_id, "status": "queued"})
                created.append(task_id)
            elif decision.mark is not None:
                log.warning("rule %s: firing(s) missed beyond the %s grace period; skipped", rule.relpath, self.grace)
                self.firings.set_last_fire(rule.repo, rule.relpath, decision.mark)
        return created

    def release_held(self, now: datetime) -> list[int]:
        """Re-runs held behind a running task of their rule and path become due once it ended."""
        return self.firings.release_held(now)

    def next_firing(self, now: datetime) -> datetime | None:
        """The earliest pending firing of any schedule (may be in the past: then `due` it)."""
        times = []
        for rule in self.live_rules():
            if rule.trigger is not None:
                last = self.firings.last_fire(rule.repo, rule.relpath) or now
                fire = next_fire(rule.trigger, last)
                if fire is not None:
                    times.append(fire)
        return min(times, default=None)

    def wake(self) -> None:
        """Re-plan the schedule loop (call on the loop thread, e.g. after a registration)."""
        self._wakeup.set()

    async def run(self, stop: asyncio.Event, on_tasks: Callable[[list[int]], None]) -> None:
        """Call `due` at each firing time until `stop` is set."""
        while not stop.is_set():
            self._wakeup.clear()
            delay = MAX_WAIT_S
            try:
                now = self.clock.now()
                created = await asyncio.to_thread(self.due, now)
                if created:
                    on_tasks(created)
                upcoming = await asyncio.to_thread(self.next_firing, now)
                if upcoming is not None:
                    delay = min(MAX_WAIT_S, max(0.0, (upcoming - self.clock.now()).total_seconds()))
            except Exception:
                log.exception("rules: schedule iteration failed")
            await self._wait(stop, delay)

    async def _wait(self, stop: asyncio.Event, delay: float) -> None:
        await first(self.clock, stop, self._wakeup, timeout=delay)

    # -- listing --------------------------------------------------------------------

    def listing(self, now: datetime) -> list[dict[str, Any]]:
        """Each rule with its next firing time and its last task (for `ohd rules`)."""
        rows = []
        for rule in sorted(self.live_rules(), key=lambda r: (str(r.repo), r.relpath)):
            upcoming = None
            if rule.trigger is not None:
                upcoming = next_fire(rule.trigger, max(now, self.firings.last_fire(rule.repo, rule.relpath) or now))
            last = self.firings.last_task(rule.repo, rule.relpath)
            rows.append({"repo": str(rule.repo), "rule": rule.relpath, "type": rule.spec.type.value,
                         "target": rule.spec.target, "schedule": rule.spec.schedule,
                         "on_change": rule.spec.on_change,
                         "next_fire": upcoming.isoformat() if upcoming else None,
                         "last_task": None if last is None else {
                             "id": last.id, "status": last.status, "target": last.target,
                             "created_at": last.created_at.isoformat()}})
        return rows


def listing_text(rows: Sequence[dict[str, Any]]) -> str:
    """`ohd rules` as text: one line per rule."""
    if not rows:
        return f"no standing rules (a task file in {layout.TASKS_DIR}/ with schedule: or on_change:)"
    lines = []
    for row in rows:
        trigger = f"schedule '{row['schedule']}'" if row["schedule"] else f"on_change {row['on_change']}"
        last = row["last_task"]
        last_text = f"task {last['id']} {last['status']} ({last['target']})" if last else "no task yet"
        when = f"next {row['next_fire']}" if row["next_fire"] else "on change"
        lines.append(f"{row['rule']}  {row['type']}  {trigger}  {when}  last: {last_text}  [{row['repo']}]")
    return "\n".join(lines)
