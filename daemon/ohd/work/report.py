"""The report room: render a task's outcome as JSON (for tools) and Markdown (for people).

Pure: a plain dict in, text out; no clock, no files. Invariant: the same data always
renders to the same bytes (sorted JSON keys, fixed table columns), so re-applying a
report after a crash rewrites identical files; terminal escape sequences (pytest's
colours when a repo's `addopts` has `--color=yes`) never reach a report.

`data` holds: `task` (a `Task.as_dict()`-like dict), `verdict` (`Verdict.as_dict()` or
None when no candidate was validated), `attempts` ([{attempt, model, outcome,
latency_ms, tokens, error}]; `Execution.as_dict()` rows with prompt/completion tokens are
fine too), `decision` ("written" | "written_as_ohd_new" | "unchanged" | "rejected" |
"failed" | "cancelled" | "quarantined"), `output_path`, and optionally `intended_output`, `conflict`
(why a result went to `.ohd-new`: "not_written_by_ohd" | "edited_since_ohd_wrote"), `error`
and `possible_bug` (the test file kept, not written, because it fails against the code).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ohd.core import layout
from ohd.core.tasktypes import fence

log = logging.getLogger("ohd.report")

# CSI (colours, cursor moves), OSC (titles, links) and other two-byte ESC sequences
_ESCAPES = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")


def render_json(data: Mapping[str, Any]) -> str:
    """Stable, indented JSON with sorted keys and a final newline."""
    return json.dumps(plain(data), indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"


def plain(value: Any) -> Any:
    """`value` with terminal escape sequences removed from every string in it."""
    if isinstance(value, str):
        return _ESCAPES.sub("", value)
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def render_markdown(data: Mapping[str, Any]) -> str:
    """A readable page: title, decision, rules, score, attempts."""
    data = plain(data)
    task: Mapping[str, Any] = data.get("task") or {}
    verdict: Mapping[str, Any] | None = data.get("verdict")
    parts = [
        _title(task),
        decision_sentence(data),
        _task_facts(task),
        _rules_section(verdict),
        _not_counted(verdict),
        _score_line(verdict, task),
        _possible_bug_section(data, verdict),
        _pytest_section(verdict, data.get("decision")),
        _attempts_section(data.get("attempts") or []),
    ]
    return "\n\n".join(p for p in parts if p) + "\n"


def decision_sentence(data: Mapping[str, Any]) -> str:
    """One sentence saying what ohd did with the output."""
    task: Mapping[str, Any] = data.get("task") or {}
    decision = data.get("decision")
    path = data.get("output_path") or task.get("output_path") or task.get("output") or "the output"
    if decision == "written":
        return f"Wrote {path}."
    if decision == "written_as_ohd_new":
        intended = data.get("intended_output") or (path.removesuffix(layout.OHD_NEW_SUFFIX))
        if data.get("conflict") == "not_written_by_ohd":
            return (f"{intended} exists and was not written by ohd, so ohd did not replace it; "
                    f"the new content is in {path}.")
        if data.get("conflict") == "edited_since_ohd_wrote":
            return (f"{intended} was changed since ohd last wrote it, so ohd did not replace it; "
                    f"the new content is in {path}.")
        return f"{intended} was not replaced; the new content is in {path}."
    if decision == "unchanged":
        return f"{path} already holds this content; nothing was written."
    if decision == "quarantined":
        intended = data.get("intended_output") or task.get("output") or "the output"
        return (f"Possible bug: the generated tests fail against the current code of "
                f"{task.get('target', 'the target')} in every run, so they were NOT written to {intended}. "
                "Either the code or the tests are wrong; the tests and pytest's output are below.")
    reason = str(data.get("error") or task.get("error") or "").rstrip(".")
    if decision == "rejected":
        return f"Nothing was written: {reason or 'no candidate passed validation'}."
    if decision == "failed":
        return f"Nothing was written: {reason or 'every attempt failed'}."
    if decision == "cancelled":
        return f"Nothing was written: {reason or 'cancelled by the user'}."
    return f"Decision: {decision}."


def _possible_bug_section(data: Mapping[str, Any], verdict: Mapping[str, Any] | None) -> str:
    code = data.get("possible_bug")
    if data.get("decision") != "quarantined" or not code:
        return ""
    run: Mapping[str, Any] = (verdict or {}).get("test_run") or {}
    failing = ", ".join(run.get("failed_tests") or []) or "see pytest's output"
    return (f"## Possible bug\n\nFailing tests: {_cell(failing)}\n\n"
            f"The quarantined tests:\n\n{fence(str(code), 'python')}")


def _pytest_section(verdict: Mapping[str, Any] | None, decision: Any) -> str:
    run: Mapping[str, Any] | None = (verdict or {}).get("test_run")
    if not run:
        return ""
    python = f" with {run['python']}" if run.get("python") else ""
    jail = f", in the {run['sandbox']} sandbox" if run.get("sandbox") else ""
    head = f"## pytest\n\n{run.get('status')} ({', '.join(str(o) for o in run.get('outcomes') or [])}){python}{jail}"
    if run.get("status") == "passed" and decision != "quarantined":
        return head + "."
    return f"{head}:\n\n{fence(str(run.get('output') or ''), 'text')}"


def _title(task: Mapping[str, Any]) -> str:
    ident = task.get("id", "?")
    return f"# ohd task {ident}: {task.get('type', '?')} of {task.get('target', '?')}"


def _task_facts(task: Mapping[str, Any]) -> str:
    facts = [
        ("status", f"{task.get('status')} (quarantined)" if task.get("quarantined") else task.get("status")),
        ("priority", task.get("priority")),
        ("description", task.get("description")),
        ("source", task.get("source")),
        ("finished", task.get("finished_at")),
    ]
    return "\n".join(f"- {name}: {_cell(value)}" for name, value in facts if value)


def _rules_section(verdict: Mapping[str, Any] | None) -> str:
    if not verdict:
        return "## Validation\n\nNo candidate was validated."
    rows = [
        (r.get("rule"), r.get("level"), "pass" if r.get("passed") else "FAIL", r.get("message"))
        for r in verdict.get("rules", [])
    ]
    return "## Validation\n\n" + _table(("rule", "level", "verdict", "message"), rows)


def _not_counted(verdict: Mapping[str, Any] | None) -> str:
    """The optional tools that ran but could not measure (their rule is left out of the score)."""
    lines = [f"- `{rule}` not counted: {(verdict or {})[key]['error']}" for rule, key in (("lint", "lint"),
             ("coverage_delta", "coverage")) if ((verdict or {}).get(key) or {}).get("error")]
    return "\n".join(lines)


def _score_line(verdict: Mapping[str, Any] | None, task: Mapping[str, Any]) -> str:
    if not verdict:
        return ""
    score = float(verdict.get("score", 0.0))
    needed = task.get("min_quality")
    need = f" (needed {float(needed):.2f})" if needed is not None else ""
    outcome = "accepted" if verdict.get("accepted") else "rejected"
    return f"Score: {score:.2f}{need}, {outcome}."


def _attempts_section(attempts: Sequence[Mapping[str, Any]]) -> str:
    if not attempts:
        return "## Attempts\n\nNo model was called."
    rows = [
        (a.get("attempt"), a.get("model"), a.get("outcome"), _latency(a.get("latency_ms")),
         _tokens(a), a.get("error"))
        for a in attempts
    ]
    return "## Attempts\n\n" + _table(("attempt", "model", "outcome", "latency", "tokens", "error"), rows)


def _tokens(attempt: Mapping[str, Any]) -> Any:
    """`tokens`, or prompt + completion tokens of an `Execution.as_dict()` row."""
    if attempt.get("tokens") is not None:
        return attempt["tokens"]
    parts = [attempt.get("prompt_tokens"), attempt.get("completion_tokens")]
    return sum(int(p) for p in parts if p is not None) if any(p is not None for p in parts) else None


def _latency(value: Any) -> str:
    return "" if value is None else f"{value} ms"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    """A value fit for one Markdown table cell: no pipes, no line breaks."""
    if value is None:
        return ""
    text = str(value).replace("|", "\\|")
    return " ".join(text.split())
