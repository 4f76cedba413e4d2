"""Agent runners in a real `ohd daemon`: a daemon killed with SIGKILL while its agent runs leaves no
worktree and no agent behind once it is started again."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from pathlib import Path

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
