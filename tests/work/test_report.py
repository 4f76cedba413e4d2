"""report: stable JSON and a readable Markdown page from a task's outcome."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from ohd.core.taskfile import TaskType
from ohd.ladder.validate import check
from ohd.work.report import decision_sentence, render_json, render_markdown


def sample(decision: str = "written", output_path: str = "tests/test_auth.py") -> dict[str, Any]:
    verdict = check(TaskType.UNIT_TEST, "tests/test_auth.py", "def test_a():\n    pass\n",
                    target_exists=True, module="app.auth", min_quality=0.7)
    return {
        "task": {"id": 12, "type": "unit_test", "target": "src/app/auth.py", "status": "completed",
                 "priority": "high", "min_quality": 0.7, "error": None,
                 "finished_at": datetime(2024, 5, 1, 12, 0, tzinfo=UTC).isoformat()},
        "verdict": verdict.as_dict(),
        "attempts": [
            {"attempt": 1, "model": "a/b:free", "outcome": "rate_limited", "latency_ms": 80,
             "tokens": 0, "error": "429 | slow down\nplease"},
            {"attempt": 1, "model": "c/d:free", "outcome": "accepted", "latency_ms": 1234,
             "tokens": 456, "error": None},
        ],
        "decision": decision,
        "output_path": output_path,
    }


def test_json_is_stable_sorted_and_round_trips() -> None:
    data = sample()
    text = render_json(data)
    assert text == render_json(dict(reversed(list(data.items()))))
    assert text.endswith("\n")
    assert json.loads(text) == data
    assert text.index('"attempts"') < text.index('"decision"') < text.index('"task"')


def test_json_accepts_datetimes() -> None:
    text = render_json({"at": datetime(2024, 1, 2, tzinfo=UTC)})
    assert "2024-01-02 00:00:00+00:00" in text


def test_markdown_has_title_decision_rules_score_attempts() -> None:
    page = render_markdown(sample())
    lines = page.splitlines()
    assert lines[0] == "# ohd task 12: unit_test of src/app/auth.py"
    assert "Wrote tests/test_auth.py." in page
    assert "| rule | level | verdict | message |" in page
    assert "| valid_python | error | pass |" in page
    assert "| has_assertions | warning | FAIL | the tests assert nothing" in page
    assert "Score: 0." in page and "(needed 0.70)" in page
    assert "| attempt | model | outcome | latency | tokens | error |" in page
    assert "| 1 | c/d:free | accepted | 1234 ms | 456 |  |" in page


def test_markdown_cells_cannot_break_the_table() -> None:
    page = render_markdown(sample())
    assert "| 429 \\| slow down please |" in page


def test_conflict_sentence_names_both_paths_and_which_case_it_is() -> None:
    data = sample("written_as_ohd_new", "tests/test_auth.py.ohd-new")
    assert decision_sentence({**data, "conflict": "edited_since_ohd_wrote"}) == (
        "tests/test_auth.py was changed since ohd last wrote it, so ohd did not replace it; "
        "the new content is in tests/test_auth.py.ohd-new."
    )
    assert decision_sentence({**data, "conflict": "not_written_by_ohd"}) == (
        "tests/test_auth.py exists and was not written by ohd, so ohd did not replace it; "
        "the new content is in tests/test_auth.py.ohd-new."
    )
    assert "edited" not in decision_sentence(data)      # no reason recorded: no claim either


def test_failed_task_without_verdict_or_attempts() -> None:
    data = {"task": {"id": 3, "type": "review", "target": "a.py", "error": "a.py: the file is binary"},
            "verdict": None, "attempts": [], "decision": "failed", "output_path": None}
    page = render_markdown(data)
    assert "Nothing was written: a.py: the file is binary." in page
    assert "No candidate was validated." in page
    assert "No model was called." in page
    assert "Score" not in page


def test_other_decisions() -> None:
    assert "no candidate passed validation" in decision_sentence(sample("rejected"))
    assert "already holds this content" in decision_sentence(sample("unchanged"))


def test_markdown_is_deterministic() -> None:
    assert render_markdown(sample()) == render_markdown(sample())


def test_worker_shaped_data() -> None:
    """The worker passes Execution.as_dict() rows, `intended_output` and a top-level `error`."""
    data = sample("written_as_ohd_new", "tests/test_auth.py.ohd-new")
    data["intended_output"] = "tests/test_auth.py"
    data["conflict"] = "edited_since_ohd_wrote"
    data["attempts"] = [{"attempt": 1, "model": "m", "outcome": "accepted", "latency_ms": 5,
                         "prompt_tokens": 100, "completion_tokens": 23, "error": None}]
    page = render_markdown(data)
    assert "| 1 | m | accepted | 5 ms | 123 |  |" in page
    assert "tests/test_auth.py was changed since ohd last wrote it" in page
    rejected = sample("rejected", "")
    rejected["error"] = "rejected after 3 attempt(s): no tests"
    assert decision_sentence(rejected) == "Nothing was written: rejected after 3 attempt(s): no tests."


def test_terminal_escapes_never_reach_a_report() -> None:
    data = sample("rejected")
    data["error"] = "\x1b[31mFAILED\x1b[0m tests/test_auth.py::test_a"
    data["verdict"]["test_run"] = {"status": "failed", "outcomes": ["failed"],
                                   "output": "\x1b[1m\x1b[31mE   assert 1 == 2\x1b[0m\n\x1b]8;;file:///x\x07link\x1b]8;;\x07"}
    page, text = render_markdown(data), render_json(data)
    assert "\x1b" not in page and "\\u001b" not in text
    assert "E   assert 1 == 2" in page and "FAILED tests/test_auth.py::test_a" in page and "link" in page
