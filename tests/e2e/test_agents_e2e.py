"""Agent runners in a real `ohd daemon`: a daemon killed with SIGKILL while its agent runs leaves no
worktree and no agent behind once it is started again."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from ohd.clock import SystemClock
from ohd.core import layout

from tests.e2e.helpers import DaemonProcess, daemon_env
from tests.support.gitrepo import git, make_repo
from tests.support.waiting import wait_for

AGENT = """\
import pathlib, subprocess, sys, time
child = subprocess.Popen(["sleep", "300"])
pathlib.Path(sys.argv[1]).write_text(f"{child.pid}")
time.sleep(300)
"""
TASK = "type: change\ntarget: shop/pricing.py\ndescription: hang\nrunner: command\ntimeout_s: 600\n"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False



def run_change(env: dict[str, str], repo: Path, log: Path, description: str) -> tuple[dict[str, Any], str]:
    """One `type: change` task by the `command` runner in a real daemon: `ohd show` of it once it
    ended, and its diff."""
    daemon = DaemonProcess(env, repo, log).start()
    try:
        (repo / "tasks.d" / "change.yaml").write_text(
            f"type: change\ntarget: shop/pricing.py\ndescription: {description}\nrunner: command\n")
        wait_for(lambda: daemon.json("show", "1")["status"] in ("completed", "failed"), timeout=120,
                 what="the agent task's end")
        return daemon.json("show", "1"), daemon.ohd("show", "1", "--diff").stdout
    finally:
        assert daemon.stop() == 0


def test_a_daemon_killed_mid_run_leaves_no_worktree_and_no_agent_after_restart(tmp_path: Path) -> None:
    runtime = Path(tempfile.mkdtemp(prefix="ohd-rt-"))
    repo = make_repo(tmp_path / "repo")
    agent, pids = tmp_path / "agent.py", tmp_path / "grandchild.pid"
    agent.write_text(AGENT)
    (tmp_path / "config.toml").write_text(
        f"[agents]\ncommand = {json.dumps([sys.executable, str(agent), str(pids)])}\n")
    env = daemon_env(tmp_path, runtime, OHD_OFFLINE="true")
    log = tmp_path / "daemon.log"
    worktree = layout.worktrees_dir(tmp_path / "state") / "task-1-1"
    daemon = DaemonProcess(env, repo, log).start()
    try:
        (repo / "tasks.d" / "hang.yaml").write_text(TASK)
        wait_for(lambda: pids.exists() and pids.read_text(), timeout=60, what="the agent's grandchild")
        assert worktree.is_dir() and str(worktree) in git(repo, "worktree", "list")
        grandchild = int(pids.read_text())
    finally:
        assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    assert alive(grandchild) and worktree.is_dir()      # its own session: a SIGKILLed daemon cannot take it along
    daemon = DaemonProcess(env, repo, log).start()
    try:
        wait_for(lambda: not alive(grandchild), timeout=30, what="the orphaned agent's group killed")
        wait_for(lambda: daemon.json("show", "1")["attempts"] >= 2 or not worktree.exists(), timeout=30,
                 what="the orphaned worktree removed")
        assert str(worktree) not in git(repo, "worktree", "list")
        assert "killed with its process group" in log.read_text()
    finally:
        daemon.ohd("cancel", "1")
        assert daemon.stop() == 0
    assert git(repo, "worktree", "list").count("\n") == 1     # the re-run's worktree went with its cancel
    assert not worktree.exists()


PROXIED_AGENT = """\
import json, os, pathlib, sys, urllib.request
base_url, target, key = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3]).read_text()
assert key not in os.environ.values() and key not in pathlib.Path(sys.argv[4]).read_text()
assert not any(key in str(p.read_bytes()) for p in pathlib.Path(".").rglob("*") if p.is_file())
request = urllib.request.Request(base_url + "/chat/completions", method="POST", data=json.dumps(
    {"model": "whatever", "messages": [{"role": "user", "content": "name a constant"}], "temperature": 0.5,
     "tools": [{"type": "function", "function": {"name": "finish", "parameters": {"type": "object"}}}]}).encode(),
    headers={"Authorization": "Bearer " + os.environ["OHD_AGENT_KEY"], "Content-Type": "application/json"})
answer = json.load(urllib.request.urlopen(request, timeout=60))
path = pathlib.Path(target)
path.write_text(path.read_text() + "\\nANSWER = " + repr(answer["choices"][0]["message"]["content"]) + "\\n")
print("answered by", answer["model"])
"""


def test_an_agents_requests_go_through_the_governor_and_rotate_on_429(tmp_path: Path) -> None:
    from ohd.repo import worktrees
    from ohd.store.agentruns import AgentRuns
    from ohd.store.quotas import Governor

    from tests.support.databases import open_store
    from tests.support.fake_openrouter import FakeOpenRouter, ok, rate_limited

    a, b, key = "vendor/model-a", "vendor/model-b", "sk-or-v1-e2e-secret"
    runtime = Path(tempfile.mkdtemp(prefix="ohd-rt-"))
    repo = make_repo(tmp_path / "repo")
    agent = tmp_path / "agent.py"
    agent.write_text(PROXIED_AGENT)
    (tmp_path / "key.txt").write_text(key)      # for the agent to look for it: never in its env, worktree, prompt
    (tmp_path / "config.toml").write_text("[agents]\ncommand = " + json.dumps(
        [sys.executable, str(agent), "{base_url}", "{target}", str(tmp_path / "key.txt"), "{prompt_file}"]) + "\n")
    with FakeOpenRouter(api_key=key, models=[a, b]) as server:
        server.script(a, [rate_limited(retry_after=600)])
        server.script(b, [ok("42")])
        env = daemon_env(tmp_path, runtime, OPENROUTER_API_KEY=key, OHD_BASE_URL=server.url,
                         OHD_MODELS=f"{a},{b}", OHD_MODEL_SELECTION="false")
        shown, diff = run_change(env, repo, tmp_path / "daemon.log", "add the answer")
        sent = [request.model for request in server.completions()]
        relayed = server.completions()[-1].body
        assert all(request.headers.get("authorization") == f"Bearer {key}" for request in server.completions())
    assert shown["status"] == "completed", (shown["error"], (tmp_path / "daemon.log").read_text()[-3000:])
    assert sent == [a, b]                                          # the 429, then the next model
    assert relayed["temperature"] == 0.5 and relayed["tools"][0]["function"]["name"] == "finish"   # sent on whole
    assert "+ANSWER = '42'" in diff and key not in diff
    store = open_store(tmp_path / "state" / "ohd.db")
    try:
        [run] = AgentRuns(store.db).for_task(1)
        assert (run.requests, run.models, run.outcome) == (1, (b,), "accepted")
        assert "answered by vendor/model-b" in run.stdout and all(key not in part for part in run.argv)
        assert [(e.model, e.outcome) for e in store.executions(1)] == [(a, "rate_limited"), (b, "agent_request")]
        governor = Governor(store)
        assert governor.state(a).cooldown_until is not None                   # a cools down, in the store
        assert governor.requests_today(SystemClock().now()) == 2              # both requests counted
    finally:
        store.close()
    assert "ANSWER" not in (repo / "shop" / "pricing.py").read_text()
    assert worktrees.base_commit(repo) == shown["base_commit"]


TOOL_AGENT = """\
import json, os, pathlib, sys
from openai import OpenAI
base_url, prompt = sys.argv[1], pathlib.Path(sys.argv[2]).read_text()
client = OpenAI(base_url=base_url, api_key=os.environ["OHD_AGENT_KEY"], max_retries=0, timeout=60)
tools = [{"type": "function", "function": {"name": "append_to_file", "parameters": {"type": "object", "properties": {
    "path": {"type": "string"}, "text": {"type": "string"}}, "required": ["path", "text"]}}}]
messages = [{"role": "user", "content": prompt}]
for turn in range(5):
    with client.chat.completions.stream(model="any", messages=messages, tools=tools, temperature=0) as events:
        for _ in events:
            pass
        message = events.get_final_completion().choices[0].message
    messages.append({"role": "assistant", "content": message.content, "tool_calls": [
        {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
        for c in message.tool_calls or []]} if message.tool_calls else {"role": "assistant", "content": message.content})
    if not message.tool_calls:
        break
    for call in message.tool_calls:
        args = json.loads(call.function.arguments)
        path = pathlib.Path(args["path"])
        path.write_text(path.read_text() + args["text"])
        messages.append({"role": "tool", "tool_call_id": call.id, "content": "appended"})
print("finished after", turn + 1, "turns:", message.content)
"""


def test_a_tool_calling_agent_edits_through_the_proxy(tmp_path: Path) -> None:
    """An agent that works by native tool calls (as OpenHands' SDK does), on the OpenAI SDK, streaming:
    the model's tool call comes back through a real daemon's proxy, the agent runs it in its worktree,
    the tool's result goes back to the model, and the edit is the delivered diff."""
    from tests.support.databases import open_store
    from tests.support.fake_openrouter import FakeOpenRouter, ok, tool_calls

    a, key = "vendor/model-a", "sk-or-v1-e2e-tools"
    runtime = Path(tempfile.mkdtemp(prefix="ohd-rt-"))
    repo = make_repo(tmp_path / "repo")
    agent = tmp_path / "agent.py"
    agent.write_text(TOOL_AGENT)
    (tmp_path / "config.toml").write_text("[agents]\ncommand = " + json.dumps(
        [sys.executable, str(agent), "{base_url}", "{prompt_file}"]) + "\n")
    with FakeOpenRouter(api_key=key, models=[a]) as server:
        server.script(a, [tool_calls([("append_to_file", {"path": "shop/pricing.py", "text": "\nTOOL = 1\n"})]),
                          ok("Appended the constant.")])
        env = daemon_env(tmp_path, runtime, OPENROUTER_API_KEY=key, OHD_BASE_URL=server.url, OHD_MODELS=a,
                         OHD_MODEL_SELECTION="false")
        shown, diff = run_change(env, repo, tmp_path / "daemon.log", "add TOOL = 1")
        bodies = [request.body for request in server.completions()]
    assert shown["status"] == "completed", (shown["error"], (tmp_path / "daemon.log").read_text()[-3000:])
    assert "+TOOL = 1" in diff
    assert [b["model"] for b in bodies] == [a, a] and all(b["tools"][0]["function"]["name"] == "append_to_file"
                                                          for b in bodies)
    assert [m["role"] for m in bodies[1]["messages"]] == ["user", "assistant", "tool"]
    assert bodies[1]["messages"][1]["tool_calls"][0]["function"]["name"] == "append_to_file"
    store = open_store(tmp_path / "state" / "ohd.db")
    try:
        assert [(e.model, e.outcome) for e in store.executions(1)] == [(a, "agent_request"), (a, "agent_request")]
    finally:
        store.close()
