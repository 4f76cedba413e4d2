"""The command line, in process: exit codes, `init`, `validate`, `schema`, store reads."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from ohd.cli.commands import main
from ohd.core import taskfile
from ohd.core.taskfile import TaskSpec
from ohd.core.tasktypes import Job
from ohd.models.llm import Completion, OfflineProvider
from ohd.store.store import Store, open_database
from ohd.work.worker import Pool
from tests.support.clock import FakeClock
from tests.support.gitrepo import git


def test_status_without_a_daemon_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status"]) == 3
    assert "not running" in capsys.readouterr().err


def test_dashboard_says_how_to_turn_the_listener_on(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dashboard"]) == 1
    assert 'set http_listen = "127.0.0.1:8767"' in capsys.readouterr().err
    monkeypatch.setenv("OHD_HTTP_LISTEN", "127.0.0.1:8767")
    assert main(["dashboard"]) == 1          # on, but the daemon has not made its token yet
    assert "no token in" in capsys.readouterr().err


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
    assert [t["id"] for t in json.loads(capsys.readouterr().out)["tasks"]] == [task_id]
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


def test_init_picks_a_real_importable_module_with_functions_as_the_example(
        repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (repo / "shop" / "pricing.py").unlink()   # the repo looks like a PyPI project instead
    files = {
        "setup.py": "from setuptools import setup\n\n\ndef read(name):\n    return name\n\n\nsetup()\n",
        "conftest.py": "def pytest_configure(config):\n    pass\n",
        "shop/_version.py": "# file generated by setuptools_scm\n# don't change, don't track in version control\n"
                            "__version__ = version = '1.0'\n\n\ndef get():\n    return version\n",
        "shop/constants.py": "RATE = 2\n",
        "shop/broken.py": "def f(:\n",
        "docs/conf.py": "def setup(app):\n    pass\n",
        "my-script.py": "def main():\n    pass\n",
        "shop/util/__init__.py": "",
        "shop/util/text.py": "def shout(s):\n    return s.upper()\n",
        "shop/cart.py": "class Cart:\n    pass\n",
    }
    for rel, text in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "a project")
    assert main(["init", "--repo", str(repo)]) == 0
    assert "(target: shop/cart.py)" in capsys.readouterr().out
    example = (repo / "tasks.d" / "examples" / "unit-test.yaml").read_text()
    assert "target: shop/cart.py" in example
    # following the hint works: the example task, run as ohd runs it without a key, completes
    store = Store(open_database(f"sqlite:///{repo.parent / 'init.db'}"))
    store.migrate()
    clock = FakeClock()
    task_id = store.enqueue(str(repo), taskfile.parse(example), clock.now())
    provider = OfflineProvider(clock)

    async def call(model: str, messages: list[dict[str, str]], timeout_s: float, job: Job) -> Completion:
        return await provider.complete(model, messages, timeout_s, job)

    asyncio.run(Pool(store, call, clock, models=["offline"], size=1).run_until_idle())
    task = store.get_task(task_id)
    assert (task.status, task.error) == ("completed", None)


# -- ohd webhooks test --------------------------------------------------------------------

def test_webhooks_test_sends_a_signed_sample_without_a_daemon(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from tests.support.receiver import Receiver

    receiver = Receiver().start()
    monkeypatch.setenv("MY_HOOK_SECRET", "sample-secret")
    try:
        assert main(["webhooks", "test", receiver.url, "--secret-env", "MY_HOOK_SECRET"]) == 0
        assert main(["webhooks", "test", receiver.url, "--format", "discord", "--event", "task.failed"]) == 0
        receiver.answer = 500
        assert main(["webhooks", "test", receiver.url]) == 1
    finally:
        receiver.stop()
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("task.completed delivered, HTTP 200") and "HTTP 500" in out[2]
    signed, discord, _ = receiver.tried()
    assert signed.signed_with("sample-secret") and signed.json["data"]["sample"] is True
    assert signed.event == "task.completed" and signed.delivery == "0"
    assert list(discord.json) == ["content"] and "x-ohd-signature" not in discord.headers


def test_webhooks_test_says_why_it_was_not_delivered(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["webhooks", "test", f"http://127.0.0.1:{port}/x", "--json"]) == 1
    answer = json.loads(capsys.readouterr().out)
    assert answer["delivered"] is False and answer["status"] is None and "ConnectError" in answer["error"]
    assert main(["webhooks", "test", "ftp://example.com/x"]) == 2
    assert main(["webhooks", "test", "https://example.com/x", "--secret-env", "UNSET_SECRET_VAR"]) == 2
    assert main(["webhooks", "test", "https://example.com/x", "--event", "task.exploded"]) == 2
    err = capsys.readouterr().err
    assert "http:// or https://" in err and "UNSET_SECRET_VAR" in err and "task.exploded" in err
