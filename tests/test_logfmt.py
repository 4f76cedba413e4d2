"""Structured logging: text by default, JSON lines on request, secrets never written."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ohd import logfmt
from ohd.cli.commands import main

KEY = "sk-or-v1-0123456789abcdef"


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_json_lines_parse_and_carry_task_id_and_model(restore_root: None, tmp_path: Path) -> None:
    out = io.StringIO()
    logfmt.setup("INFO", "json", [KEY], tmp_path / "ohd.log", stream=out)
    logging.getLogger("ohd.worker").info("task %d completed", 7, extra={"task_id": 7, "model": "m/a:free"})
    logging.getLogger("ohd.daemon").info("started")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0]["task_id"] == 7 and lines[0]["model"] == "m/a:free"
    assert lines[0]["message"] == "task 7 completed" and lines[0]["level"] == "INFO"
    assert lines[0]["logger"] == "ohd.worker" and "T" in lines[0]["time"]
    assert "task_id" not in lines[1]
    assert [json.loads(x)["message"] for x in (tmp_path / "ohd.log").read_text().splitlines()] == \
        ["task 7 completed", "started"]


def test_text_is_the_default_and_shows_the_context(restore_root: None) -> None:
    out = io.StringIO()
    logfmt.setup("INFO", "text", stream=out)
    logging.getLogger("ohd.worker").info("called", extra={"task_id": 3, "model": "m"})
    assert out.getvalue().rstrip().endswith("INFO ohd.worker: called [task_id=3 model=m]")
    with pytest.raises(ValueError):
        logfmt.formatter("xml")


def test_the_redaction_filter_removes_the_key_and_bearer_tokens(restore_root: None) -> None:
    out = io.StringIO()
    logfmt.setup("DEBUG", "json", [KEY], stream=out)
    log = logging.getLogger("ohd.llm")
    log.info("headers: Authorization: Bearer %s", KEY)
    log.warning("key %s leaked in %r", KEY, {"api_key": KEY})
    log.info("Authorization: Bearer other-token-xyz")
    try:
        raise RuntimeError(f"bad key {KEY}")
    except RuntimeError:
        log.exception("failed")
    text = out.getvalue()
    assert KEY not in text and "other-token-xyz" not in text
    assert "Bearer ***" in text and text.count("***") >= 4
    assert logfmt.Redactor([KEY]).redact(f"x {KEY} y") == "x *** y"


def test_ohd_logs_prints_the_journalctl_recipe_or_the_file_tail(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text("")
    assert main(["--config", str(config), "logs"]) == 0
    assert "journalctl --user -u ohd -f" in capsys.readouterr().out
    log = tmp_path / "ohd.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    config.write_text(f'log_file = "{log}"\n')
    assert main(["--config", str(config), "logs", "-n", "3"]) == 0
    assert capsys.readouterr().out.splitlines() == ["line 97", "line 98", "line 99"]


def test_daemon_flag_rejects_an_unknown_format() -> None:
    result = subprocess.run([sys.executable, "-m", "ohd", "daemon", "--log-format", "xml"],
                            capture_output=True, text=True)
    assert result.returncode == 2


def test_a_task_message_carries_its_task_id(restore_root: None) -> None:
    out = io.StringIO()
    logfmt.setup("INFO", "json", stream=out)
    logging.getLogger("ohd.worker").info("task %d running: %s", 12, "unit_test")
    assert json.loads(out.getvalue())["task_id"] == 12
