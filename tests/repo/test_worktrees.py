"""An agent run's worktree: made at the base commit, its diff validated, removed, orphans swept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tests.support.gitrepo import git

from ohd.core import layout
from ohd.errors import OhdError
from ohd.repo import worktrees
from ohd.repo.worktrees import AgentResultError


def worktree_of(repo: Path, tmp_path: Path, name: str = "task-1-1") -> tuple[Path, str]:
    base = worktrees.base_commit(repo)
    return worktrees.add(repo, layout.worktrees_dir(tmp_path / "state") / name, base), base


def test_a_worktree_is_detached_at_the_base_commit_and_leaves_the_working_copy_alone(repo: Path,
                                                                                   tmp_path: Path) -> None:
    (repo / "shop" / "pricing.py").write_text("# the user's edit\n")     # uncommitted
    wt, base = worktree_of(repo, tmp_path)
    assert git(wt, "rev-parse", "HEAD").strip() == base
    assert git(wt, "status", "--porcelain") == ""
    assert "the user's edit" not in (wt / "shop" / "pricing.py").read_text()
    (wt / "shop" / "pricing.py").write_text("changed = 1\n")
    (wt / "shop" / "new.py").write_text("x = 2\n")
    patch = worktrees.diff(wt, base)
    assert "+changed = 1" in patch and "shop/new.py" in patch
    assert worktrees.check_paths(wt, base) == ["shop/new.py", "shop/pricing.py"]
    worktrees.check_applies(repo, base, patch)
    assert (repo / "shop" / "pricing.py").read_text() == "# the user's edit\n"
    assert git(repo, "rev-parse", "HEAD").strip() == base


def test_an_agents_own_files_and_folders_are_not_its_change(repo: Path, tmp_path: Path) -> None:
    """Aider leaves `.aider.chat.history.md` and a `.aider.tags.cache.v4/` folder: neither is part of
    the diff (a run against llama.cpp that got no answer at all was accepted on that folder alone)."""
    wt, base = worktree_of(repo, tmp_path)
    (wt / ".aider.chat.history.md").write_text("# chat\n")
    (wt / ".aider.tags.cache.v4").mkdir()
    (wt / ".aider.tags.cache.v4" / "cache.db").write_bytes(b"SQLite format 3\x00")
    assert worktrees.diff(wt, base, (".aider*",)) == ""
    (wt / "shop" / "new.py").write_text("x = 2\n")
    patch = worktrees.diff(wt, base, (".aider*",))
    assert "shop/new.py" in patch and ".aider" not in patch


def test_remove_forgets_the_worktree_in_its_repo(repo: Path, tmp_path: Path) -> None:
    wt, _ = worktree_of(repo, tmp_path)
    layout.run_file(wt, layout.PROMPT_SUFFIX).write_text("do it")
    worktrees.remove(repo, wt)
    assert not wt.exists() and not layout.run_file(wt, layout.PROMPT_SUFFIX).exists()
    assert str(wt) not in git(repo, "worktree", "list")


def test_sweep_removes_the_worktrees_no_running_task_owns(repo: Path, tmp_path: Path) -> None:
    orphan, _ = worktree_of(repo, tmp_path, "task-1-1")
    owned, _ = worktree_of(repo, tmp_path, "task-2-1")
    layout.run_file(orphan, layout.STDOUT_SUFFIX).write_text("output")
    assert worktrees.sweep(tmp_path / "state", keep={"task-2-1"}) == ["task-1-1"]
    assert not orphan.exists() and owned.is_dir()
    assert not layout.run_file(orphan, layout.STDOUT_SUFFIX).exists()
    listed = git(repo, "worktree", "list")
    assert str(orphan) not in listed and str(owned) in listed


def test_a_repo_without_a_commit_has_no_base(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "-q")
    with pytest.raises(OhdError, match="has no commit yet"):
        worktrees.base_commit(empty)


def test_a_symlink_pointing_out_of_the_repo_is_refused(repo: Path, tmp_path: Path) -> None:
    wt, base = worktree_of(repo, tmp_path)
    os.symlink("/etc/passwd", wt / "shop" / "leak")
    worktrees.diff(wt, base)
    with pytest.raises(AgentResultError, match="symlink shop/leak -> /etc/passwd"):
        worktrees.check_paths(wt, base)


def test_a_patch_for_another_text_does_not_apply(repo: Path, tmp_path: Path) -> None:
    wt, base = worktree_of(repo, tmp_path)
    (wt / "shop" / "pricing.py").write_text("changed = 1\n")
    patch = worktrees.diff(wt, base)
    (repo / "shop" / "pricing.py").write_text("other\n")
    git(repo, "commit", "-qam", "other")
    with pytest.raises(AgentResultError, match="does not apply"):
        worktrees.check_applies(repo, git(repo, "rev-parse", "HEAD").strip(), patch)


def test_the_guard_sees_a_write_into_the_working_copy_or_the_hooks(repo: Path, tmp_path: Path) -> None:
    (repo / "tasks.d" / "new.yaml").write_text("type: review\n")   # ohd's own traffic is not a change
    before = worktrees.guard_snapshot(repo)
    (repo / "tasks.d" / "other.yaml").write_text("type: review\n")
    assert worktrees.guard_changes(before, worktrees.guard_snapshot(repo)) == []
    (repo / "evil.txt").write_text("x")
    hook = repo / ".git" / "hooks" / "post-commit"
    hook.write_text("#!/bin/sh\n")
    assert worktrees.guard_changes(before, worktrees.guard_snapshot(repo)) == [".git/hooks/post-commit",
                                                                               "evil.txt"]


def test_branch_delivery_commits_without_checking_out(repo: Path, tmp_path: Path) -> None:
    wt, base = worktree_of(repo, tmp_path)
    (wt / "shop" / "pricing.py").write_text("changed = 1\n")
    worktrees.diff(wt, base)
    sha = worktrees.commit_to_branch(wt, repo, layout.branch_ref(1), "ohd task 1")
    assert git(repo, "rev-parse", "ohd/task-1").strip() == sha
    assert git(repo, "log", "-1", "--format=%an", "ohd/task-1").strip() == "ohd"
    assert git(repo, "rev-parse", "HEAD").strip() == base
    assert git(repo, "symbolic-ref", "HEAD").strip() == "refs/heads/main"
