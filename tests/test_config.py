"""config: `OHD_*` variables that name no setting are warned about (unknown TOML keys are errors)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ohd.cli.commands import main
from ohd.config import unknown_variables

ROOT = Path(__file__).resolve().parents[1]
# `--daemon-env OHD_KEY=VALUE`; the API-key check of config.py; a webhook's secret variable (named by
# its `secret_env`, so a daemon with that hook does not warn of it: see the webhook test below)
PLACEHOLDERS = {"OHD_KEY", "OHD_API_KEY", "OHD_HOOK_SECRET"}
MEANT_UNKNOWN = {"OHD_WORKER", "OHD_HOOK", "OHD_ZZZ", "OHD_OPENROUTER_KEY"}   # the tests' own typos


def test_an_unknown_variable_is_named_with_the_closest_setting() -> None:
    assert unknown_variables({"OHD_WORKER": "2", "OHD_WORKERS": "2", "HOME": "/root"}) == [
        "OHD_WORKER is not a setting ohd knows and is ignored; did you mean OHD_WORKERS?"]
    assert unknown_variables({"OHD_HOOK": "off"}) == [
        "OHD_HOOK is not a setting ohd knows and is ignored; did you mean OHD_HOOKS?"]
    [far] = unknown_variables({"OHD_ZZZ": "1"})
    assert far.startswith("OHD_ZZZ is not a setting ohd knows") and "did you mean" not in far


def test_the_api_key_in_an_ohd_variable_is_named_as_ignored_and_the_key_variable_is_not_warned() -> None:
    [problem] = unknown_variables({"OHD_API_KEY": "sk-x"})
    assert problem.startswith("OHD_API_KEY is ignored: the API key is read from OPENROUTER_API_KEY")
    assert unknown_variables({"OHD_OPENROUTER_KEY": "sk-x"}, api_key_env="OHD_OPENROUTER_KEY") == []


def test_no_variable_ohd_its_tests_or_its_benches_set_is_warned_about() -> None:
    sources = [p for folder in ("daemon/ohd", "tests", "bench", "hooks", ".ci") for p in (ROOT / folder).rglob("*")
               if p.is_file() and p.suffix in (".py", ".sh", "") and "__pycache__" not in p.parts]
    sources.append(ROOT / "README.md")
    used = {match for path in sources
            for match in re.findall(r"[\"' {(](OHD_[A-Z0-9_]+)(?:=|[\"'])", path.read_text(errors="replace"))}
    assert {"OHD_CONFIG", "OHD_HOOKS", "OHD_STATE_DIR", "OHD_RUNTIME_DIR", "OHD_TEST_POSTGRES_URL"} <= used
    assert unknown_variables(dict.fromkeys(used - PLACEHOLDERS - MEANT_UNKNOWN, "1")) == []


def test_a_cli_command_warns_on_stderr_once(monkeypatch: pytest.MonkeyPatch, repo: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("OHD_WORKER", "2")
    assert main(["rules", "--repo", str(repo)]) == 0
    err = capsys.readouterr().err
    assert err == "ohd: warning: OHD_WORKER is not a setting ohd knows and is ignored; did you mean OHD_WORKERS?\n"
    assert main(["rules", "--repo", str(repo)]) == 0        # each command warns (once)
    assert "OHD_WORKER" in capsys.readouterr().err


# -- webhooks ---------------------------------------------------------------------------

def _hooks_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hooks.toml"
    path.write_text(text)
    return path


def test_a_webhook_takes_every_event_unless_told_and_reads_its_secret_from_the_variable(tmp_path: Path) -> None:
    from ohd import config
    from ohd.core import events

    path = _hooks_config(tmp_path, 'webhooks = [{url = "https://example.com/h", secret_env = "MY_HOOK_SECRET"},\n'
                                   '            {url = "http://127.0.0.1:9/x", events = ["task.failed"], '
                                   'format = "slack"}]\n')
    conf = config.load(path, env={"MY_HOOK_SECRET": "abc"})
    first, second = conf.webhooks
    assert first.events == list(events.EVENTS) and second.events == ["task.failed"]
    assert first.secret is not None and first.secret.get_secret_value() == "abc" and second.secret is None
    assert "abc" not in repr(conf) and "abc" not in conf.model_dump_json()
    assert conf.hook_secret_envs == {"MY_HOOK_SECRET"}
    assert unknown_variables({"OHD_HOOK_SECRET": "x"}, secrets=frozenset({"OHD_HOOK_SECRET"})) == []


@pytest.mark.parametrize(("entry", "message"), [
    ('{url = "https://e.com/h", events = ["task.done"]}', "unknown webhook event 'task.done'"),
    ('{url = "ftp://e.com/h"}', "http:// or https://"),
    ('{url = "https:///nohost"}', "http:// or https://"),
    ('{url = "https://e.com/h", secret = "inline"}', "do not put a webhook's secret in the config file"),
    ('{url = "https://e.com/h", secret_env = "not a name"}', "secret_env"),
    ('{url = "https://e.com/h", format = "teams"}', "format"),
])
def test_a_bad_webhook_is_a_config_error_naming_it(tmp_path: Path, entry: str, message: str) -> None:
    from ohd import config
    from ohd.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        config.load(_hooks_config(tmp_path, f"webhooks = [{entry}]\n"), env={})


def test_the_daemon_refuses_a_webhook_whose_secret_variable_is_not_set(tmp_path: Path) -> None:
    from ohd import config
    from ohd.errors import ConfigError
    from ohd.service.assemble import webhook_targets

    conf = config.load(_hooks_config(tmp_path, 'webhooks = [{url = "https://e.com/h", secret_env = "GONE"}]\n'),
                       env={})
    with pytest.raises(ConfigError, match="secret_env names GONE, which is not set"):
        webhook_targets(conf)
