"""An agent's process: its argv and scrubbed environment, its time limit, its whole group killed."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest

from ohd.work import agentproc
from ohd.work.agentproc import AgentConfig, AgentSetupError


def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie is dead: its parent (the agent, killed) is gone and init reaps it
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def invoke(tmp_path: Path, argv: list[str], **env: str) -> agentproc.Invocation:
    config = AgentConfig(command=tuple(argv))
    return agentproc.invocation("command", config, prompt_file=tmp_path / "p.md", model="m/x", base_url="http://b/v1",
                                token="tok-123", worktree=tmp_path, target="a.py",
                                environ={"PATH": os.environ["PATH"], "HOME": "/h", "OPENROUTER_API_KEY": "real", **env})


def test_the_template_is_filled_and_the_environment_scrubbed(tmp_path: Path) -> None:
    inv = invoke(tmp_path, [sys.executable, "{prompt_file}", "--model={model}", "{base_url}", "{api_key_env}",
                            "{worktree}", "{target}", "{{literal}}"], SECRET_TOKEN="s")
    assert inv.argv[1:] == (str(tmp_path / "p.md"), "--model=m/x", "http://b/v1", "OHD_AGENT_KEY", str(tmp_path),
                            "a.py", "{literal}")
    assert dict(inv.env) == {"PATH": os.environ["PATH"], "HOME": "/h", "OHD_AGENT_KEY": "tok-123"}
    assert "tok-123" not in inv.argv and "real" not in inv.argv


def test_aider_gets_its_documented_options_and_the_token_as_its_key(tmp_path: Path) -> None:
    config = AgentConfig(aider=(sys.executable, "-m", "aider"))
    inv = agentproc.invocation("aider", config, prompt_file=tmp_path / "p.md", model="m/x", base_url="http://b/v1",
                               token="tok", worktree=tmp_path, target="a.py", environ={"PATH": os.environ["PATH"]})
    assert {"--yes", "--no-auto-commits", "--no-stream", "--message-file"} <= set(inv.argv)
    assert inv.argv[inv.argv.index("--model") + 1] == "openai/m/x" and inv.argv[-1] == "a.py"
    assert inv.env["OPENAI_API_KEY"] == "tok" and "tok" not in inv.argv


@pytest.mark.parametrize(("runner", "config", "setting"), [
    ("command", AgentConfig(), "set [agents] command"),
    ("command", AgentConfig(command=("no-such-agent-xyz",)), "'no-such-agent-xyz' is not installed"),
    ("aider", AgentConfig(aider=("no-such-aider",)), "[agents] aider"),
    ("openhands", AgentConfig(openhands_python="/nonexistent/python"), "[agents] openhands_python"),
    ("command", AgentConfig(command=(sys.executable, "{prompt}")), "unknown placeholder"),
])
def test_a_missing_binary_or_template_names_the_setting(tmp_path: Path, runner: str, config: AgentConfig,
                                                       setting: str) -> None:
    with pytest.raises(AgentSetupError, match=setting.replace("[", r"\[").replace("]", r"\]")):
        agentproc.invocation(runner, config, prompt_file=tmp_path / "p", model="m", base_url="u", token="t",
                             worktree=tmp_path, target="a.py", environ={"PATH": os.environ["PATH"]})


def test_an_agent_that_hangs_is_killed_at_its_limit_with_its_grandchild(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    hang = script(tmp_path, "hang.sh", f"sleep 300 &\necho $! > {pids}\necho started\nsleep 300\n")
    inv = invoke(tmp_path, ["sh", str(hang)])
    started = time.monotonic()
    done = asyncio.run(agentproc.run(inv, tmp_path, tmp_path / "out", tmp_path / "err", limit_s=1.5))
    assert done.timed_out and done.code is None and done.stdout == "started\n"
    assert time.monotonic() - started < 30
    grandchild = int(pids.read_text())
    deadline = time.monotonic() + 60     # a hang bound: a killed process is gone at once
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild)


def test_a_cancel_kills_the_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    hang = script(tmp_path, "hang.sh", f"trap '' TERM\nsleep 300 &\necho $! > {pids}\nwhile :; do sleep 1; done\n")
    inv = invoke(tmp_path, ["sh", str(hang)])

    async def cancelled() -> None:
        job = asyncio.create_task(agentproc.run(inv, tmp_path, tmp_path / "out", tmp_path / "err", limit_s=300))
        while not pids.exists() or not pids.read_text().strip():
            await asyncio.sleep(0.05)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job

    asyncio.run(cancelled())     # SIGTERM is ignored by the agent: SIGKILL after the grace
    grandchild = int(pids.read_text())
    deadline = time.monotonic() + 60     # a hang bound: a killed process is gone at once
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild)


def test_an_exit_code_and_the_output_are_kept(tmp_path: Path) -> None:
    fail = script(tmp_path, "fail.sh", "echo out; echo err >&2; test -z \"$OPENROUTER_API_KEY\" && exit 1\n")
    done = asyncio.run(agentproc.run(invoke(tmp_path, ["sh", str(fail)]), tmp_path, tmp_path / "o", tmp_path / "e",
                                     limit_s=30))
    assert (done.code, done.timed_out, done.stdout, done.stderr) == (1, False, "out\n", "err\n")
