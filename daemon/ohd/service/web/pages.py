"""The dashboard's pages (issue 14): server-rendered HTML over the socket API's own JSON.

`/` the overview (the queue by state, running tasks with their elapsed time, each model's state,
cooldown, requests left, success rate and p50 latency: `/status` and `/models` as the API answers
them, nothing derived again here), `/tasks` the task list with filters as GET parameters, and
`/tasks/{id}` one task (its executions, the validation of each, the report, the output or diff and
the prompt/response history). Every page reads without JavaScript; `/static/dashboard.js` adds the
live updates (it polls `/api/status`) and the cancel and retry buttons, which POST with the token
from the page's `<meta name="ohd-token">` (the listener refuses a change that carries the cookie
alone). The content security policy forbids inline script and style: both are files under
`static/`, shipped in the wheel.

The pages get their data from `api` (the socket's `ApiServer.dispatch`), `calls` (a task's recorded
prompts and responses) and `diff` (an agent task's accepted diff), the last two from the store
through the daemon: nothing here opens the store or reads the config. The output and the report are
the files the task wrote, read from the paths the store gives.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from ohd.core.taskfile import TaskType
from ohd.core.views import QUEUE_ORDER, status_label
from ohd.service.server import Reply
from ohd.service.web.charts import charts_section

Dispatch = Callable[[str, str, bytes, str], Reply]
Calls = Callable[[int], list[dict[str, Any]]]
Diff = Callable[[int], str | None]
STATIC_DIR = Path(__file__).parent / "static"
VIA = "dashboard"
LIST_LIMIT = 500            # tasks the list page reads before its type/repo/model filters
FILE_SHOWN = 200_000        # characters of an output or report shown on the task page
FILTERS = ("status", "type", "repo", "model")


class PageError(Exception):
    """The API refused (a 404 for a task, a 400 for a filter): shown as a page with its status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def page_routes(api: Dispatch, calls: Calls, diff: Diff, token: str) -> list[BaseRoute]:
    """The pages and `/static`, ahead of the listener's own routes (this `/` replaces its placeholder)."""

    def get(target: str) -> Any:
        reply = api("GET", target, b"", VIA)
        data = json.loads(reply.body) if reply.body else {}
        if reply.status != 200:
            raise PageError(reply.status, str(data.get("error", f"GET {target}: {reply.status}")))
        return data

    def overview_html(request: Request) -> str:
        status, models, activity = get("/status"), get("/models")["models"], get("/activity")
        return page("ohd", token, overview(status, models, activity))

    def tasks_html(request: Request) -> str:
        chosen = {key: request.query_params.get(key, "").strip() for key in FILTERS}
        query = {"limit": LIST_LIMIT, **({"status": chosen["status"]} if chosen["status"] else {})}
        target = "/tasks?" + urlencode(query)
        tasks = get(target)["tasks"]
        models = [m["id"] for m in get("/models")["models"]]
        used: dict[int, set[str]] = {}
        if chosen["model"]:     # the list has no executions: each task's, of those the other filters keep
            for task in tasks:
                if passes(task, chosen):
                    used[task["id"]] = {str(e["model"]) for e in get(f"/tasks/{task['id']}")["executions"]}
        return page("ohd: tasks", token, task_list(tasks, chosen, models, get("/status").get("repos", []), used))

    def task_html(request: Request) -> str:
        task_id = int(request.path_params["task_id"])
        task = get(f"/tasks/{task_id}")
        return page(f"ohd: task {task_id}", token, task_page(task, calls(task_id), diff(task_id)))

    def body_of(request: Request) -> str:
        return {"/": overview_html, "/tasks": tasks_html}.get(request.url.path, task_html)(request)

    async def handler(request: Request) -> Response:
        try:
            return HTMLResponse(await run_in_threadpool(body_of, request))
        except PageError as exc:
            return HTMLResponse(page(f"ohd: error {exc.status}", token, f"<p class=error>{escape(str(exc))}</p>"),
                                status_code=exc.status)

    return [Route("/", handler, methods=["GET"]), Route("/tasks", handler, methods=["GET"]),
            Route("/tasks/{task_id:int}", handler, methods=["GET"]),
            Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static")]


# -- HTML (pure: dicts in, strings out) -------------------------------------------------------


def page(title: str, token: str, content: str) -> str:
    nav = "".join(f'<a href="{href}">{text}</a>' for href, text in (("/", "overview"), ("/tasks", "tasks"),
                                                                      ("/metrics", "metrics")))
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            '<meta name=viewport content="width=device-width, initial-scale=1">'
            f'<meta name=ohd-token content="{escape(token)}">'
            f"<title>{escape(title)}</title>"
            '<link rel=stylesheet href="/static/dashboard.css">'
            '<script src="/static/dashboard.js" defer></script></head>'
            f"<body><header><strong>ohd</strong><nav>{nav}</nav></header><main>{content}</main>"
            '<footer>JSON: <a href="/api/status">/api/status</a> <a href="/api/tasks">/api/tasks</a> '
            '<a href="/api/models">/api/models</a></footer></body></html>')


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], ident: str = "", empty: str = "none") -> str:
    """A table of already-escaped cells."""
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    attr = f' id="{ident}"' if ident else ""
    if not body:
        body = f'<tr class=empty><td colspan="{len(headers)}">{escape(empty)}</td></tr>'
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def since(start: Any, now: datetime | None) -> float | None:
    when = when_of(start)
    return (now - when).total_seconds() if when and now else None


def when_of(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None


def task_link(task: Mapping[str, Any]) -> str:
    return f'<a href="/tasks/{int(task["id"])}">#{int(task["id"])}</a>'


def overview(status: Mapping[str, Any], models: Sequence[Mapping[str, Any]], activity: Mapping[str, Any]) -> str:
    queue, now = status.get("queue", {}), when_of(status.get("now"))
    counts = "".join(f'<div class="count {name}"><a href="/tasks?status={name}"><span class=n data-queue="{name}">'
                     f'{int(queue.get(name, 0))}</span><span class=label>{name}</span></a></div>'
                     for name in QUEUE_ORDER)
    workers = status.get("workers", {})
    running = table(["task", "type", "target", "running for"],
                    ([task_link(t), escape(str(t.get("type"))), escape(str(t.get("target"))),
                      f'<span data-started="{escape(str(t.get("started_at") or ""))}">'
                      f'{duration(since(t.get("started_at"), now))}</span>'] for t in status.get("running", [])),
                    ident="running", empty="nothing running")
    model_rows = []
    for m in models:
        stats = m.get("stats") or {}
        left = since(now.isoformat() if now else None, when_of(m.get("cooldown_until"))) if now else None
        rate = stats.get("success_rate")
        model_rows.append([escape(str(m.get("id"))), f'<span class="state {escape(str(m.get("state")))}">'
                           f'{escape(str(m.get("state", "?")))}</span>',
                           duration(left) if left and left > 0 else "-",
                           escape(str(m.get("requests_left_minute", "-") if m.get("requests_left_minute") is not None
                                      else "-")),
                           escape(str(m.get("requests_left_today") if m.get("requests_left_today") is not None
                                      else "-")),
                           str(int(stats.get("calls") or 0)),
                           f"{rate:.0%}" if isinstance(rate, (int, float)) and stats.get("calls") else "-",
                           f"{stats['latency_p50_ms']} ms" if stats.get("latency_p50_ms") is not None else "-"])
    throughput = status.get("throughput") or {}
    return (f'<h1>Overview</h1><p class=meta>ohd {escape(str(status.get("version", "?")))}, up '
            f'<span id=uptime>{duration(status.get("uptime_s"))}</span>, workers <span id=workers>'
            f'{int(workers.get("busy", 0))}/{int(workers.get("size", 0))}</span> busy, '
            f'<span id=last-hour data-live>{int(throughput.get("completed_last_hour", 0))}</span> '
            'completed in the last hour '
            f'<span id=live class=live>(live updates need JavaScript)</span></p>'
            f'<section><h2>Queue</h2><div class=counts id=queue>{counts}</div></section>'
            f"<section><h2>Running</h2>{running}</section>"
            f"<section id=models-section data-live><h2>Models</h2>"
            + table(["model", "state", "cooldown left", "requests left this minute", "requests left today", "calls",
                     "success", "p50 latency"], model_rows, ident="models", empty="no models")
            + "</section>" + charts_section(activity))


def passes(task: Mapping[str, Any], chosen: Mapping[str, str]) -> bool:
    """The type and repo filters (status is the API's own)."""
    return all(not chosen.get(key) or str(task.get(key)) == chosen[key] for key in ("type", "repo"))


def task_list(tasks: Sequence[Mapping[str, Any]], chosen: Mapping[str, str], models: Sequence[str],
              repos: Sequence[str], used: Mapping[int, set[str]]) -> str:
    """The tasks that pass the filters: status by the API; type and repo here; model, the tasks one
    of whose executions ran on it (`used`: task id -> its executions' models)."""
    def keep(task: Mapping[str, Any]) -> bool:
        return passes(task, chosen) and (not chosen.get("model") or chosen["model"] in used.get(task["id"], set()))

    def select(name: str, options: Iterable[str]) -> str:
        opts = '<option value="">any</option>' + "".join(
            f'<option value="{escape(o)}"{" selected" if chosen.get(name) == o else ""}>{escape(o)}</option>'
            for o in options)
        return f'<label>{name} <select name="{name}" id="filter-{name}">{opts}</select></label>'

    kept = [t for t in tasks if keep(t)]
    types = [t.value for t in TaskType]
    form = ('<form method=get action="/tasks" class=filters>'
            + select("status", QUEUE_ORDER) + select("type", types) + select("repo", repos)
            + select("model", sorted(set(models))) + '<button type=submit id=apply>filter</button></form>')
    rows = ([task_link(t), f'<span class="status {escape(str(t["status"]))}">{escape(status_label(dict(t)))}</span>',
             escape(str(t.get("priority"))), escape(str(t.get("type"))), escape(str(t.get("target"))),
             escape(str(t.get("repo"))), str(int(t.get("attempts") or 0)), escape(str(t.get("updated_at", ""))[:19])]
            for t in kept)
    return (f"<h1>Tasks</h1>{form}<p class=meta>{len(kept)} of the last {len(tasks)} tasks</p>"
            + table(["id", "status", "priority", "type", "target", "repo", "attempts", "updated"], rows,
                    ident="tasks", empty="no task matches"))


def shown_file(repo: Any, rel: Any) -> str | None:
    """A file the task wrote (its output or report: a path in its repo), as text, cut at FILE_SHOWN;
    None if absent or outside the repo."""
    if not isinstance(rel, str) or not rel or not isinstance(repo, str):
        return None
    root = Path(repo).resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        return None
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return text if len(text) <= FILE_SHOWN else text[:FILE_SHOWN] + f"\n... ({len(text) - FILE_SHOWN} more characters)"


def task_page(task: Mapping[str, Any], calls: Sequence[Mapping[str, Any]], diff: str | None) -> str:
    task_id, status = int(task["id"]), str(task["status"])
    label = escape(status_label(dict(task)))
    facts = [("status", f'<span id=task-status class="status {escape(status)}">{label}</span>'),
             ("type", escape(str(task.get("type")))), ("target", escape(str(task.get("target")))),
             ("repo", escape(str(task.get("repo")))), ("priority", escape(str(task.get("priority")))),
             ("attempts", f'{int(task.get("attempts") or 0)}/{int(task.get("max_attempts") or 0)}'),
             ("source", escape(str(task.get("source") or "-"))), ("created", escape(str(task.get("created_at", "")))),
             ("updated", escape(str(task.get("updated_at", ""))))]
    for key in ("description", "not_before", "output_path", "report_path", "error"):
        if task.get(key):
            facts.append((key.replace("_", " "), escape(str(task[key]))))
    dl = "".join(f"<dt>{escape(k)}</dt><dd>{v}</dd>" for k, v in facts)
    buttons = (f'<div class=actions><button type=button id=cancel data-task="{task_id}" data-action=cancel disabled>'
               f'cancel</button><button type=button id=retry data-task="{task_id}" data-action=retry disabled>retry'
               '</button><span id=action-note class=note>cancel and retry need JavaScript (or '
               f'<code>ohd cancel {task_id}</code>, <code>ohd retry {task_id}</code>)</span></div>')
    executions = task.get("executions", [])
    exec_rows = ([str(int(e.get("attempt") or 0)), escape(str(e.get("model"))),
                  escape(str(e.get("started_at", ""))[:19]),
                  f'{int(e.get("latency_ms") or 0)} ms',
                  f'{int(e.get("prompt_tokens") or 0)}+{int(e.get("completion_tokens") or 0)}',
                  f'${e["cost"]:.6f}' if isinstance(e.get("cost"), (int, float)) else "-",
                  escape(str(e.get("outcome"))) + (" (cached: replayed, no request sent)" if e.get("cached") else ""),
                  escape(str(e.get("error") or ""))] for e in executions)
    validation_rows = ([str(int(e.get("attempt") or 0)), escape(str(e.get("model"))), escape(str(e.get("outcome"))),
                        f'{e["score"]:g}' if isinstance(e.get("score"), (int, float)) else "-",
                        f'{e["validation_ms"]} ms' if e.get("validation_ms") is not None else "-",
                        escape(str(e.get("error_class") or ""))] for e in executions)
    exec_table = table(["attempt", "model", "started", "latency", "tokens", "cost", "outcome", "error"], exec_rows,
                       ident="executions", empty="no model calls yet")
    validation_table = table(["attempt", "model", "verdict", "score", "judged in", "class"], validation_rows,
                             ident="validation", empty="nothing judged yet")
    sections = [f"<h1>Task {task_id}</h1><dl class=facts id=facts data-live>{dl}</dl>{buttons}",
                f"<section id=executions-section data-live><h2>Executions</h2>{exec_table}</section>",
                f"<section id=validation-section data-live><h2>Validation</h2>{validation_table}</section>"]
    report = shown_file(task.get("repo"), task.get("report_path"))
    sections.append("<section id=report-section data-live><h2>Report</h2>"
                    + (f"<pre id=report>{escape(report)}</pre>" if report is not None
                       else "<p class=meta>no report</p>")
                    + "</section>")
    output = shown_file(task.get("repo"), task.get("output_path"))
    sections.append("<section id=output-section data-live><h2>Output</h2>"
                    + (f"<pre id=output>{escape(output)}</pre>" if output is not None
                       else "<p class=meta>no output file</p>")
                    + (f"<h3>diff (the agent's accepted change)</h3><pre id=diff>{escape(diff)}</pre>" if diff else "")
                    + "</section>")
    history = "".join(f'<details class=call><summary>call {n}: {escape(str(c.get("model")))} at '
                      f'{escape(str(c.get("started_at", ""))[:19])}'
                      + (f' (replayed from call id {int(c["replay_of"])}: no request sent)'
                         if c.get("replay_of") is not None else "")
                      + '</summary><h3>prompt</h3><pre>'
                      f'{escape(str(c.get("prompt") or ""))}</pre><h3>response</h3><pre>'
                      f'{escape(str(c.get("response") or ""))}</pre></details>' for n, c in enumerate(calls, 1))
    sections.append("<section id=calls data-live><h2>Prompts and responses</h2>"
                    + (history or "<p class=meta>no recorded calls (call_history off, or the task made none)</p>")
                    + "</section>")
    return "".join(sections)
