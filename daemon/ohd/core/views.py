"""Plain-text views of the JSON that the CLI prints: status, task lists, one task, models.

Pure: dicts in, strings out. The CLI prints them; `--json` prints the dicts instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from ohd.errors import StorageUnavailable

TYPE_CHECKING = False   # not `typing`'s: importing typing costs `ohd status` more than this module (issue 17)
if TYPE_CHECKING:
    from typing import Any

QUEUE_ORDER = ("pending", "queued", "running", "completed", "failed", "cancelled")


def status_text(status: dict[str, Any]) -> str:
    queue = status.get("queue", {})
    workers = status.get("workers", {})
    now = _when(status.get("now"))
    lines = [
        f"ohd {status.get('version', '?')}  pid {status.get('pid', '?')}  up {_duration(status.get('uptime_s', 0))}"
        + ("  (offline provider: no API key)" if status.get("offline") else ""),
        "repos:   " + ", ".join(status.get("repos", [])),
        "queue:   " + "  ".join(f"{name} {queue.get(name, 0)}" + (
            f" ({status['quarantined']} quarantined)" if name == "completed" and status.get("quarantined") else "")
            for name in QUEUE_ORDER),
        f"workers: {workers.get('busy', 0)}/{workers.get('size', 0)} busy",
    ]
    if status.get("storage"):
        storage = status["storage"]
        if storage.get("reason") == StorageUnavailable.UNREACHABLE:
            lines.append(f"storage: waiting for the database: {storage['error']}; no task is claimed until it "
                         "answers, held tasks go on then")
        else:
            lines.append(f"storage: waiting for storage: {storage['error']}; held tasks go on once "
                         "the store can be written")
    if status.get("sandbox"):
        lines.append(f"tests:   {status['sandbox']['level']} sandbox ({status['sandbox']['description']})")
    lines.extend(fleet_lines(status.get("fleet") or [], now))
    for task in status.get("running", []):
        started = _when(task.get("started_at"))
        since = (f"for {_duration((now - started).total_seconds())}" if now and started
                 else f"since {task.get('started_at', '?')}")
        lines.append(f"  running #{task['id']} {task['type']} {task['target']} {since}")
    today = status.get("today")
    if today is not None:
        lines.append(f"today:   {today.get('calls', 0)} calls, {today.get('prompt_tokens', 0)}+"
                     f"{today.get('completion_tokens', 0)} tokens, ${float(today.get('cost') or 0):.4f}")
    budget = status.get("budget")
    if budget is not None:
        lines.append("budget:  " + _budget_line(budget))
    lines.extend(efficiency_lines(status.get("efficiency")))
    throughput = status.get("throughput")
    if throughput is not None:
        eta = status.get("eta_s")
        waiting = queue.get("queued", 0) + queue.get("pending", 0)
        lines.append(f"rate:    {throughput.get('per_minute', 0):g} tasks/min over the last "
                     f"{_duration(throughput.get('window_s', 0))}, {throughput.get('completed_last_hour', 0)} "
                     f"in the last hour;  ETA for {waiting} waiting: "
                     + ("none" if not waiting else _duration(eta) if eta is not None else "unknown"))
    models = status.get("models", [])
    if models:
        lines.append("models:")
        lines.extend("  " + _model_line(m, now) for m in models)
    hooks = status.get("webhooks", [])
    if hooks:
        lines.append("webhooks:")
        lines.extend("  " + _hook_line(hook) for hook in hooks)
    return "\n".join(lines)


def fleet_lines(fleet: Sequence[dict[str, Any]], now: datetime | None) -> list[str]:
    """The daemons on the database when there is more than one that is not stopped (one daemon alone
    shows none): one line each, the stopped ones counted."""
    listed = [d for d in fleet if d.get("state") != "stopped"]
    if len(listed) < 2:
        return []
    states = {state: sum(1 for d in fleet if d.get("state") == state) for state in ("alive", "lost", "stopped")}
    lines = ["fleet:   " + ", ".join(f"{count} {state}" for state, count in states.items() if count)]
    for d in listed:
        started = _when(d.get("started_at"))
        up = _duration((now - started).total_seconds()) if now and started else "?"
        lines.append(f"  {d.get('state', '?'):<5} {d.get('id')}{' (this daemon)' if d.get('self') else ''}  "
                     f"v{d.get('version', '?')}, {d.get('workers', 0)} workers, up {up}, heartbeat "
                     f"{_duration(d.get('heartbeat_age_s') or 0)} ago, {d.get('running', 0)} running")
    return lines


def _hook_line(hook: dict[str, Any]) -> str:
    line = f"{hook['hook']}: {hook['delivered']} delivered, {hook['pending']} pending, {hook['dead']} dead"
    if hook.get("last_error"):
        line += f"; last error {hook['last_error_at']}: {hook['last_error']}"
    return line


def _budget_line(budget: dict[str, Any]) -> str:
    """'12 of 40 requests today (daily_request_cap), $0.0000 (no daily_cost_cap_usd); paid models refused'."""
    cap, usd = budget.get("daily_request_cap"), budget.get("daily_cost_cap_usd")
    line = (f"{budget.get('requests_today', 0)}" + (f" of {cap}" if cap else "") + " requests today"
            + (" (daily_request_cap)" if cap else " (no daily_request_cap)")
            + f", ${float(budget.get('cost_today') or 0):.4f}" + (f" of ${usd:g} (daily_cost_cap_usd)" if usd
                                                                 else " (no daily_cost_cap_usd)"))
    if budget.get("allow_paid"):
        return line + "; paid models allowed"
    allowed = budget.get("paid_models") or []
    return line + "; paid models refused (strict free-only" + (f", except {', '.join(allowed)}" if allowed
                                                               else "") + ")"


def efficiency_lines(efficiency: dict[str, Any] | None) -> list[str]:
    """`quota:` and a line per model and task type: requests sent, accepted outputs per request, and
    the requests the replay cache saved (nothing before the first call)."""
    if not efficiency or not efficiency.get("by_model"):
        return []

    def figures(row: dict[str, Any]) -> str:
        per = row.get("accepted_per_request")
        return (f"{row.get('requests', 0)} requests, {row.get('accepted', 0)} accepted outputs"
                f" ({'-' if per is None else f'{per:.2f}'} per request), {row.get('saved', 0)} saved by the cache")

    return ["quota:   " + figures(efficiency)] + [f"  {row['model']} {row['task_type']}: {figures(row)}"
                                                   for row in efficiency["by_model"]]


def eta_seconds(queue: dict[str, int], per_minute: float, wait_s: float = 0.0) -> float | None:
    """Seconds until the queued and pending tasks are done at `per_minute`, and no sooner than the
    last pending task may run (`wait_s` from now: a cooldown, a probe, UTC midnight); None if unknown."""
    waiting = queue.get("queued", 0) + queue.get("pending", 0)
    if waiting == 0:
        return 0.0
    if per_minute <= 0:
        return None
    rate = waiting / per_minute * 60
    after_wait = max(0.0, wait_s) + 60 / per_minute if queue.get("pending", 0) and wait_s > 0 else 0.0
    return round(max(rate, after_wait), 1)


def tasks_text(tasks: Sequence[dict[str, Any]]) -> str:
    if not tasks:
        return "no tasks"
    rows = [("ID", "STATUS", "PRIORITY", "TYPE", "TARGET", "ATTEMPTS", "UPDATED")]
    rows += [(str(t["id"]), status_label(t), t["priority"], t["type"], t["target"], str(t["attempts"]),
              str(t.get("updated_at", ""))[:19]) for t in tasks]
    return _table(rows)


def task_text(task: dict[str, Any]) -> str:
    lines = [f"task {task['id']}: {task['type']} {task['target']} ({task['repo']})",
             f"  status:   {status_label(task)}"
             + (f" (not before {task['not_before']})" if task.get("not_before") else ""),
             f"  priority: {task['priority']}   attempts: {task['attempts']}/{task['max_attempts']}",
             f"  source:   {task.get('source') or '-'}"]
    if task.get("description"):
        lines.append(f"  about:    {task['description']}")
    for key, label in (("output_path", "output"), ("report_path", "report"), ("error", "error")):
        if task.get(key):
            lines.append(f"  {label + ':':9} {task[key]}")
    executions = task.get("executions", [])
    if executions:
        lines.append("  calls:")
        lines.extend("    " + _execution_line(e) for e in executions)
    return "\n".join(lines)


def status_label(task: dict[str, Any]) -> str:
    """The task's status as people read it: a quarantined completion is "completed (quarantined)"."""
    return f"{task['status']} (quarantined)" if task.get("quarantined") else str(task["status"])


def models_text(models: Sequence[dict[str, Any]]) -> str:
    return "\n".join(_model_line(m) for m in models) if models else "no models"


def _model_line(model: dict[str, Any], now: datetime | None = None) -> str:
    line = f"{model['id']}: {model.get('state', '?')}"
    until = _when(model.get("cooldown_until"))
    if until and now:
        line += f" (cooldown {_duration(max(0.0, (until - now).total_seconds()))} left)"
    elif model.get("cooldown_until"):
        line += f" until {model['cooldown_until']}"
    left = [f"{model[key]} {label}" for key, label in (("requests_left_minute", "this minute"),
                                                        ("requests_left_today", "today"))
            if model.get(key) is not None]
    if left:
        line += "  requests left: " + ", ".join(left)
    stats = model.get("stats")
    if stats and stats.get("calls"):
        line += (f"  calls {stats['calls']}, accepted {stats.get('accepted', 0)}, "
                 f"success {stats.get('success_rate') or 0:.0%}, 429s {stats.get('rate_limited', 0)}, "
                 + (f"agent requests {stats['agent_requests']}, " if stats.get("agent_requests") else "")
                 + f"p50 {stats.get('latency_p50_ms') or '-'} ms, p95 {stats.get('latency_p95_ms') or '-'} ms")
    elif stats is not None:
        line += "  no calls yet"
    return line


def _execution_line(e: dict[str, Any]) -> str:
    cost = e.get("cost")
    line = (f"#{e.get('attempt', '?')} {e['model']}: {e['outcome']}, {e.get('latency_ms', 0)} ms, "
            f"{e.get('prompt_tokens', 0)}+{e.get('completion_tokens', 0)} tokens"
            + (f", ${cost:.6f}" if isinstance(cost, (int, float)) else "")
            + (f", validated in {e['validation_ms']} ms" if e.get("validation_ms") is not None else "")
            + (", cached: replayed, no request sent" if e.get("cached") else ""))
    if e.get("error"):
        line += f" ({e['error']})"
    return line


def _when(value: Any) -> datetime | None:
    try:
        when = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None
    return when.replace(tzinfo=UTC) if when is not None and when.tzinfo is None else when


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip() for row in rows)
