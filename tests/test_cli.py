"""The command line, in process: exit codes, `init`, `validate`, `schema`, store reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ohd.cli import main
from ohd.store import Store, open_database
from ohd.taskfile import TaskSpec
from tests.support.clock import FakeClock


def test_status_without_a_daemon_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status"]) == 3
    assert "not running" in capsys.readouterr().err


def test_no_command_and_bad_arguments_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["submit", "--type", "nonsense", "--target", "x.py"])
    assert exc.value.code == 2


def test_a_bad_config_file_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("workers = 'many'\n")
    assert main(["--config", str(config), "tasks"]) == 2
    assert "workers" in capsys.readouterr().err


def test_validate_reports_each_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("type: review\ntarget: src/a.py\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("type: review\ntarget: src/a.py\npriority: urgent\n")
    assert main(["validate", "--json", str(good), str(bad)]) == 1
    results = json.loads(capsys.readouterr().out)
    assert results[0]["ok"] is True
    assert results[1]["ok"] is False and "priority" in results[1]["error"] and ":3" in results[1]["error"]
    typo = tmp_path / "typo.yaml"
    typo.write_text("type: review\ntarget: src/a.py\nrule_levels:\n  lynt: error\n")
    assert main(["validate", "--json", str(typo)]) == 1
    assert "unknown rule(s) 'lynt'" in json.loads(capsys.readouterr().out)[0]["error"]


def test_schema_is_json_schema_of_a_task_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"type", "target", "priority"} <= set(schema["properties"])


def test_init_writes_examples_and_excludes_once(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "--repo", str(repo)]) == 0
    assert main(["init", "--repo", str(repo)]) == 0
    example = (repo / "tasks.d" / "examples" / "unit-test.yaml").read_text()
    assert "target: shop/pricing.py" in example          # a real file of this repo
    exclude = (repo / ".git" / "info" / "exclude").read_text()
    assert exclude.count(".ohd/") == 1 and "tasks.d/.done/" in exclude
    assert main(["validate", str(repo / "tasks.d" / "examples" / "unit-test.yaml")]) == 0


def test_tasks_and_show_read_the_store_without_a_daemon(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os

    store = Store(open_database(f"sqlite:///{Path(os.environ['OHD_STATE_DIR']) / 'ohd.db'}"))
    store.migrate()
    task_id = store.enqueue(str(repo), TaskSpec.model_validate({"type": "review", "target": "shop/pricing.py"}),
                            FakeClock().now(), source="cli")
    assert main(["tasks", "--json"]) == 0
    assert [t["id"] for t in json.loads(capsys.readouterr().out)] == [task_id]
    assert main(["show", str(task_id)]) == 0
    assert "review shop/pricing.py" in capsys.readouterr().out
    assert main(["show", "999"]) == 1
    assert "no task 999" in capsys.readouterr().err


def test_output_into_a_closed_pipe_ends_quietly_as_head_expects() -> None:
    """`ohd schema | head -1`: the reader goes away; no BrokenPipe traceback, SIGPIPE's 141."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "ohd", "schema"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()                         # before the child writes: its writes fail with EPIPE
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, stderr
    assert stderr == ""
