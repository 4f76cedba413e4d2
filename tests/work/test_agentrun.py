"""Agent runner tasks through a real Pool: the `command` runner with small real scripts in a real repo."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tests.support.gitrepo import git
from tests.support.waiting import wait_for

from ohd.clock import SystemClock
from ohd.core import layout
from ohd.core.taskfile import TaskSpec
from ohd.core.tasktypes import Job
from ohd.models.llm import Completion
from ohd.repo import worktrees
from ohd.store.agentruns import AgentRuns
from ohd.store.store import Store
from ohd.work.agentproc import AgentConfig
from ohd.work.agentrun import AgentSetup
from ohd.work.worker import Pool


async def no_model(model: str, messages: list[dict[str, str]], timeout_s: float, job: Job) -> Completion:
    raise AssertionError("an agent task makes no model call of its own")


def agent_script(tmp_path: Path, body: str) -> Path:
    """A 'coding agent': a Python script run in the worktree, with the prompt file as its argument."""
    path = tmp_path / f"agent_{abs(hash(body))}.py"
    path.write_text("import os, sys, pathlib, subprocess, time\nprompt = pathlib.Path(sys.argv[1]).read_text()\n"
                    + body)
    return path


def setup_for(tmp_path: Path, script: Path) -> AgentSetup:
    return AgentSetup(state_dir=tmp_path / "state",
                      config=AgentConfig(command=(sys.executable, str(script), "{prompt_file}", "{target}")))


def queue(store: Store, repo: Path, **fields: Any) -> int:
    spec = TaskSpec.model_validate({"type": "change", "target": "shop/pricing.py", "runner": "command",
                                    "description": "add a constant", "max_attempts": 1, "timeout_s": 60.0,
                                    **fields})
    return store.enqueue(str(repo), spec, SystemClock().now(), base_commit=worktrees.base_commit(repo))


def run(store: Store, setup: AgentSetup) -> Pool:
    pool = Pool(store, no_model, SystemClock(), models=["m1"], size=1, agents=setup)
    asyncio.run(pool.run_until_idle())
    return pool


def no_worktrees(tmp_path: Path, repo: Path) -> bool:
    folder = layout.worktrees_dir(tmp_path / "state")
    return (not folder.exists() or list(folder.iterdir()) == []) and git(repo, "worktree", "list").count("\n") == 1


EDIT = """
path = pathlib.Path(sys.argv[2])
path.write_text(path.read_text() + "\\nADDED = 1\\n")
assert "add a constant" in prompt
assert "OPENROUTER_API_KEY" not in os.environ and os.environ["OHD_AGENT_KEY"]
print("edited", path)
"""


def test_an_agent_that_edits_a_file_delivers_a_patch_and_leaves_the_working_copy_alone(
        repo: Path, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-real-key")
    (repo / "shop" / "pricing.py").write_text((repo / "shop" / "pricing.py").read_text() + "# mine\n")
    before = (repo / "shop" / "pricing.py").read_text()
    task_id = queue(store, repo, check_command=[sys.executable, "-c", "import shop.pricing"])
    run(store, setup_for(tmp_path, agent_script(tmp_path, EDIT)))
    task = store.get_task(task_id)
    assert task.status == "completed", task.error
    assert task.output_path == layout.patch_path(task_id) and task.report_path == layout.summary_path(task_id)
    patch = (repo / layout.patch_path(task_id)).read_text()
    assert "+ADDED = 1" in patch and "# mine" not in patch
    summary = (repo / layout.summary_path(task_id)).read_text()
    assert "runner: command" in summary and "check_command" in summary and "pricing.py" in summary
    assert (repo / "shop" / "pricing.py").read_text() == before      # the user's copy, their edit kept
    [agent_run] = AgentRuns(store.db).for_task(task_id)
    assert (agent_run.outcome, agent_run.exit_code, agent_run.diff) == ("accepted", 0, patch)
    assert "edited shop/pricing.py" in agent_run.stdout
    assert not any("sk-real-key" in part for part in agent_run.argv)
    assert no_worktrees(tmp_path, repo)


def test_an_agent_that_exits_1_is_rejected_with_its_output(repo: Path, store: Store, tmp_path: Path) -> None:
    task_id = queue(store, repo, max_attempts=2)
    script = agent_script(tmp_path, "print('cannot do it', file=sys.stderr)\nsys.exit(1)\n")
    run(store, setup_for(tmp_path, script))
    task = store.get_task(task_id)
    assert task.status == "failed" and task.attempts == 2
    assert "the agent exited with code 1: cannot do it" in (task.error or "")
    runs = AgentRuns(store.db).for_task(task_id)
    assert [(r.attempt, r.outcome, r.exit_code) for r in runs] == [(1, "rejected", 1), (2, "rejected", 1)]
    assert no_worktrees(tmp_path, repo)


def test_the_second_attempt_is_told_why_the_first_was_refused(repo: Path, store: Store, tmp_path: Path) -> None:
    task_id = queue(store, repo, max_attempts=2)
    script = agent_script(tmp_path, "if 'Earlier attempts were refused' not in prompt:\n    sys.exit(3)\n" + EDIT)
    run(store, setup_for(tmp_path, script))
    task = store.get_task(task_id)
    assert task.status == "completed", task.error
    assert [r.outcome for r in AgentRuns(store.db).for_task(task_id)] == ["rejected", "accepted"]


def test_an_agent_that_changes_nothing_is_rejected(repo: Path, store: Store, tmp_path: Path) -> None:
    task_id = queue(store, repo)
    run(store, setup_for(tmp_path, agent_script(tmp_path, "print('nothing to do')\n")))
    assert "the agent changed nothing" in (store.get_task(task_id).error or "")


def test_an_agent_that_writes_into_the_users_repo_is_rejected(repo: Path, store: Store, tmp_path: Path) -> None:
    task_id = queue(store, repo)
    escape = "root = subprocess.run(['git', 'rev-parse', '--git-common-dir'], capture_output=True, text=True).stdout\n" \
             "pathlib.Path(root.strip()).parent.joinpath('evil.txt').write_text('x')\n" + EDIT
    run(store, setup_for(tmp_path, agent_script(tmp_path, escape)))
    task = store.get_task(task_id)
    assert task.status == "failed" and "wrote outside its worktree" in (task.error or "") and "evil.txt" in task.error
    assert not (repo / layout.patch_path(task_id)).exists()


def test_an_agent_that_writes_into_the_repos_hooks_is_rejected(repo: Path, store: Store, tmp_path: Path) -> None:
    task_id = queue(store, repo)
    hook = "root = subprocess.run(['git', 'rev-parse', '--git-common-dir'], capture_output=True, text=True).stdout\n" \
           "pathlib.Path(root.strip(), 'hooks', 'post-commit').write_text('#!/bin/sh\\necho owned\\n')\n" + EDIT
    run(store, setup_for(tmp_path, agent_script(tmp_path, hook)))
    assert ".git/hooks/post-commit" in (store.get_task(task_id).error or "")


def test_a_symlink_out_of_the_repo_is_rejected(repo: Path, store: Store, tmp_path: Path) -> None:
    task_id = queue(store, repo)
    run(store, setup_for(tmp_path, agent_script(tmp_path, "os.symlink('/etc/passwd', 'shop/leak')\n")))
    assert "pointing outside the repo" in (store.get_task(task_id).error or "")


def test_a_python_file_that_does_not_parse_or_a_failing_check_is_rejected(repo: Path, store: Store,
                                                                         tmp_path: Path) -> None:
    broken = queue(store, repo)
    run(store, setup_for(tmp_path, agent_script(tmp_path, "pathlib.Path(sys.argv[2]).write_text('def (:\\n')\n")))
    assert "shop/pricing.py does not parse as Python at line 1" in (store.get_task(broken).error or "")
    checked = queue(store, repo, check_command="sh -c 'echo the tests fail; exit 4'")
    run(store, setup_for(tmp_path, agent_script(tmp_path, EDIT)))
    error = store.get_task(checked).error or ""
    assert "exited with code 4" in error and "the tests fail" in error


def test_an_agent_that_hangs_is_killed_at_the_time_limit_with_its_group(repo: Path, store: Store,
                                                                       tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    task_id = queue(store, repo, timeout_s=2.0)
    hang = f"child = subprocess.Popen(['sleep', '300'])\npathlib.Path({str(pid_file)!r}).write_text(str(child.pid))\n" \
           "time.sleep(300)\n"
    started = time.monotonic()
    run(store, setup_for(tmp_path, agent_script(tmp_path, hang)))
    assert time.monotonic() - started < 60
    task = store.get_task(task_id)
    assert "did not finish within the task's time limit (2s)" in (task.error or "")
    wait_for(lambda: not _alive(int(pid_file.read_text())), timeout=10, what="the grandchild's end")
    assert no_worktrees(tmp_path, repo)


def test_a_missing_agent_binary_fails_naming_the_setting(repo: Path, store: Store, tmp_path: Path) -> None:
    task_id = queue(store, repo, runner="aider")
    setup = AgentSetup(state_dir=tmp_path / "state", config=AgentConfig(aider=("no-such-aider-binary",)))
    run(store, setup)
    error = store.get_task(task_id).error or ""
    assert "'no-such-aider-binary' is not installed" in error and "[agents] aider" in error
    assert no_worktrees(tmp_path, repo)


def test_branch_delivery_commits_on_a_branch_never_checked_out(repo: Path, store: Store, tmp_path: Path) -> None:
    head = git(repo, "rev-parse", "HEAD").strip()
    task_id = queue(store, repo, deliver="branch")
    run(store, setup_for(tmp_path, agent_script(tmp_path, EDIT)))
    task = store.get_task(task_id)
    assert task.status == "completed" and task.output_path == f"ohd/task-{task_id}"
    assert "ADDED = 1" in git(repo, "show", f"ohd/task-{task_id}:shop/pricing.py")
    assert git(repo, "rev-parse", "HEAD").strip() == head and "ADDED" not in (repo / "shop/pricing.py").read_text()


def test_apply_delivery_applies_to_a_clean_copy_and_else_delivers_the_patch(repo: Path, store: Store,
                                                                           tmp_path: Path) -> None:
    setup = setup_for(tmp_path, agent_script(tmp_path, EDIT))
    clean = queue(store, repo, deliver="apply")
    run(store, setup)
    assert store.get_task(clean).status == "completed"
    assert "ADDED = 1" in (repo / "shop" / "pricing.py").read_text()
    git(repo, "commit", "-qam", "applied")
    (repo / "shop" / "pricing.py").write_text((repo / "shop" / "pricing.py").read_text() + "# editing\n")
    dirty = queue(store, repo, deliver="apply")
    run(store, setup)
    task = store.get_task(dirty)
    assert task.status == "completed" and task.output_path == layout.patch_path(dirty)
    assert "not applied: the working copy has changes in shop/pricing.py" in (
        repo / layout.summary_path(dirty)).read_text()
    assert (repo / "shop" / "pricing.py").read_text().endswith("# editing\n")


def test_cancelling_a_running_agent_kills_its_process_group(repo: Path, store: Store, tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    task_id = queue(store, repo, timeout_s=600.0)
    hang = f"child = subprocess.Popen(['sleep', '300'])\npathlib.Path({str(pid_file)!r}).write_text(str(child.pid))\n" \
           "time.sleep(300)\n"
    setup = setup_for(tmp_path, agent_script(tmp_path, hang))
    clock = SystemClock()

    async def main() -> None:
        stop = asyncio.Event()
        pool = Pool(store, no_model, clock, models=["m1"], size=1, agents=setup)
        runner = asyncio.create_task(pool.run(stop, grace_s=5))
        await asyncio.to_thread(wait_for, lambda: pid_file.exists() and pid_file.read_text(), timeout=60,
                                what="the agent's grandchild")
        store.cancel(task_id, clock.now())
        await asyncio.to_thread(wait_for, lambda: store.get_task(task_id).status == "cancelled", timeout=60,
                                what="the cancel")
        stop.set()
        await runner

    asyncio.run(main())
    wait_for(lambda: not _alive(int(pid_file.read_text())), timeout=10, what="the grandchild's end")
    [agent_run] = AgentRuns(store.db).for_task(task_id)
    assert agent_run.outcome == "cancelled" and agent_run.ended_at is not None
    assert no_worktrees(tmp_path, repo)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except (ProcessLookupError, FileNotFoundError):
        return False
    return state != "Z"


def test_show_diff_prints_the_patch_and_apply_applies_it_once_the_files_are_clean(
        repo: Path, store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ohd.cli.commands import main

    task_id = queue(store, repo)
    run(store, setup_for(tmp_path, agent_script(tmp_path, EDIT)))
    assert main(["show", str(task_id), "--diff"]) == 0
    assert capsys.readouterr().out == (repo / layout.patch_path(task_id)).read_text()
    (repo / "shop" / "pricing.py").write_text((repo / "shop" / "pricing.py").read_text() + "# editing\n")
    assert main(["apply", str(task_id)]) == 1
    assert "shop/pricing.py changed in the working copy" in capsys.readouterr().err
    git(repo, "checkout", "--", "shop/pricing.py")
    assert main(["apply", str(task_id)]) == 0
    assert "ADDED = 1" in (repo / "shop" / "pricing.py").read_text()
    llm = store.enqueue(str(repo), TaskSpec.model_validate({"type": "review", "target": "shop/pricing.py"}),
                        SystemClock().now())
    assert main(["show", str(llm), "--diff"]) == 1
    assert "not run by an agent" in capsys.readouterr().err


GOOD_TEST = "from shop.pricing import total\n\n\ndef test_total_sums() -> None:\n    assert total([1.0, 2.0]) == 3.0\n"
WRITE_TEST = "pathlib.Path('tests/test_pricing_agent.py').write_text({content!r})\n"


def test_a_unit_test_runs_test_file_is_judged_by_the_ladder(repo: Path, store: Store, tmp_path: Path) -> None:
    from ohd.ladder.ladder import Ladder

    setup = setup_for(tmp_path, agent_script(tmp_path, WRITE_TEST.format(content=GOOD_TEST)))
    good = queue(store, repo, type="unit_test")
    pool = Pool(store, no_model, SystemClock(), models=["m1"], size=1, agents=setup, ladder=Ladder())
    asyncio.run(pool.run_until_idle())
    task = store.get_task(good)
    assert task.status == "completed", task.error
    assert "tests/test_pricing_agent.py accepted by the validation ladder" in (
        repo / layout.summary_path(good)).read_text()
    no_assert = "from shop.pricing import total\n\n\ndef test_total() -> None:\n    total([1.0])\n"
    bad = queue(store, repo, type="unit_test")
    pool.agents = setup_for(tmp_path, agent_script(tmp_path, WRITE_TEST.format(content=no_assert)))
    asyncio.run(pool.run_until_idle())
    assert "was rejected by the validation ladder" in (store.get_task(bad).error or "")
    nothing = queue(store, repo, type="unit_test")
    pool.agents = setup_for(tmp_path, agent_script(tmp_path, EDIT))
    asyncio.run(pool.run_until_idle())
    assert "must write a test file" in (store.get_task(nothing).error or "")


USERS_REPO = "root = pathlib.Path(subprocess.run(['git', 'rev-parse', '--git-common-dir'], capture_output=True, " \
             "text=True).stdout.strip()).parent\n"
CACHES = USERS_REPO + """
# the user's editable install: Python compiles the user's module into the user's __pycache__
subprocess.run([sys.executable, '-P', '-c', 'import shop.pricing'], env={**os.environ, 'PYTHONPATH': str(root)}, check=True)
assert list((root / 'shop' / '__pycache__').glob('pricing.*.pyc'))
(root / '.coverage').write_text('coverage data')
(root / '.hypothesis' / 'examples').mkdir(parents=True)
(root / '.hypothesis' / 'examples' / 'a').write_text('x')
(root / 'tests' / 'test_ohd_candidate_0123456789_abcdef.py').write_text('# a validation of ohd')
(root / 'tests' / 'test_other.py').write_text(OTHER)
tmp = pathlib.Path(os.environ['TMPDIR'])
assert tmp.is_relative_to(root)
(tmp / 'scratch.txt').write_text('scratch')
# the agent's git housekeeping in its worktree: gc rewrites the repo's .git/info/refs (update-server-info)
subprocess.run(['git', 'gc', '-q'], check=True)
assert (root / '.git' / 'info' / 'refs').is_file()
""" + EDIT
OTHER = "def test_other() -> None:\n    assert True\n"


def test_caches_ohds_own_files_and_the_agents_temp_dir_in_the_repo_are_not_writes_outside(
        repo: Path, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What changes in the user's repo while the agent runs that is not the user's work: bytecode and
    other caches, ohd's state dir and the agent's TMPDIR when they are inside the repo (the run's
    prompt and output files change there), another task's output ohd wrote (as recorded), a
    validation's transient file. None of these refuses the run."""
    from ohd.repo.outputs import sha256_text

    monkeypatch.setenv("TMPDIR", str(repo / ".tmp"))
    (repo / ".tmp").mkdir()
    other = queue(store, repo)
    store.record_written(str(repo), "tests/test_other.py", sha256_text(OTHER), other, SystemClock().now())
    store.cancel(other, SystemClock().now())
    task_id = queue(store, repo)
    script = agent_script(tmp_path, f"OTHER = {OTHER!r}\n" + CACHES)
    setup = AgentSetup(state_dir=repo / ".ohd-state",
                       config=AgentConfig(command=(sys.executable, str(script), "{prompt_file}", "{target}")))
    run(store, setup)
    task = store.get_task(task_id)
    assert task.status == "completed", task.error
    assert "+ADDED = 1" in (repo / layout.patch_path(task_id)).read_text()


@pytest.mark.parametrize("escape", [
    "(root / 'shop' / 'pricing.py').write_text('# replaced\\n')",              # the user's tracked file
    "(root / 'tests' / 'test_other.py').write_text('# not what ohd wrote\\n')",   # a path ohd wrote, other bytes
    "(root / 'notes.txt').write_text('a new file')",
    "subprocess.run(['git', 'config', 'core.hooksPath', '/tmp/evil'], check=True)",   # the repo's shared config
])
def test_a_real_write_into_the_users_repo_is_still_caught(repo: Path, store: Store, tmp_path: Path,
                                                          escape: str) -> None:
    other = queue(store, repo)
    store.record_written(str(repo), "tests/test_other.py", "0" * 64, other, SystemClock().now())
    store.cancel(other, SystemClock().now())
    task_id = queue(store, repo)
    run(store, setup_for(tmp_path, agent_script(tmp_path, USERS_REPO + escape + "\n" + EDIT)))
    task = store.get_task(task_id)
    assert task.status == "failed" and "wrote outside its worktree" in (task.error or ""), task.error
