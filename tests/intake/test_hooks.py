"""hooks: the sh hooks record commits into the spool; install/uninstall; the spool reader.

Real git repos, real `git commit` runs (git runs the installed hooks), the hook scripts
run directly under `sh` and `dash`, and a real watchdog observer on the spool.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from ohd.cli import commands as cli
from ohd.repo.gitrepo import (commit_paths, hook_script, hooks_dir, install_hooks, is_ohd_hook,
                         uninstall_hooks)
from ohd.core.layout import CHAINED_SUFFIX
from ohd.core.taskfile import parse
from ohd.intake.rules import RuleBook
from ohd.intake.spool import (EventError, SpoolEvent, SpoolReader, Unfinished, parse_event, read_event, spool_dir,
                              unquote)
from ohd.intake.watch import SpoolWatcher
from ohd.store.store import Store, open_database
from tests.e2e.helpers import DaemonProcess, daemon_env
from tests.support.clock import FakeClock
from tests.support.gitrepo import git, make_repo
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
HOOKS = ROOT / "hooks"
SHELLS = [s for s in ("sh", "dash") if shutil.which(s)]
SHA = "0123456789abcdef0123456789abcdef01234567"


class Recorder:
    """An `on_paths` callback that records its calls (from any thread)."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.lock = threading.Lock()
        self.calls: list[tuple[Path, list[str], str]] = []

    def __call__(self, repo: Path, paths: list[str], origin: str) -> None:
        if self.fail:
            raise RuntimeError("rules are broken today")
        with self.lock:
            self.calls.append((repo, paths, origin))


def commit(repo: Path, files: dict[str, str], message: str = "change", *extra: str) -> None:
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    git(repo, "add", *files)
    git(repo, "commit", "-q", "-m", message, *extra)


def events(repo: Path, kind: str | None = None) -> list[SpoolEvent]:
    """The events waiting in the spool, each completed as the reader would (its paths)."""
    spool = spool_dir(repo)
    found = [read_event(p) for p in sorted(spool.glob("*.event"))] if spool.is_dir() else []
    return [complete(repo, e) for e in found if kind is None or e.kind == kind]


def complete(repo: Path, event: SpoolEvent) -> SpoolEvent:
    if event.paths is not None or event.head is None:
        return event
    return dataclasses.replace(event, paths=tuple(commit_paths(repo, event.head)))


def run_hook(shell: str, name: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(cwd.parent), **(env or {})}
    return subprocess.run([shell, str(HOOKS / name)], cwd=cwd, capture_output=True, text=True,
                          env=full_env, timeout=30)


# -- the hooks, run by git --------------------------------------------------------------


def test_a_commit_of_two_files_leaves_one_post_commit_event_with_both_paths(repo: Path) -> None:
    install_hooks(repo)
    commit(repo, {"shop/a.py": "A = 1\n", "shop/b.py": "B = 2\n"})
    (event,) = events(repo, "post-commit")
    assert event.paths == ("shop/a.py", "shop/b.py")
    assert event.head == git(repo, "rev-parse", "HEAD").strip()
    assert event.origin == f"post-commit {event.head[:12]}"


def test_the_pre_commit_event_holds_the_staged_paths_only(repo: Path) -> None:
    install_hooks(repo)
    (repo / "unstaged.py").write_text("X = 0\n")
    commit(repo, {"shop/a.py": "A = 1\n", "docs/b.md": "# b\n"})
    (event,) = events(repo, "pre-commit")
    assert event.paths is not None and set(event.paths) == {"shop/a.py", "docs/b.md"}
    assert event.head is None and event.origin == "pre-commit"
    assert event.time is not None


def test_commit_all_reports_the_modified_tracked_file(repo: Path) -> None:
    install_hooks(repo)
    (repo / "shop" / "pricing.py").write_text("# changed\n")
    git(repo, "commit", "-q", "-a", "-m", "edit")
    assert [e.paths for e in events(repo)] == [("shop/pricing.py",), ("shop/pricing.py",)]


def test_a_commit_from_a_subdirectory_and_with_git_dir_is_recorded(repo: Path) -> None:
    install_hooks(repo)
    (repo / "shop" / "sub.py").write_text("")
    git(repo / "shop", "add", "sub.py")
    git(repo / "shop", "commit", "-q", "-m", "from a subdirectory")
    (repo / "top.py").write_text("")
    outside = repo.parent
    git(outside, f"--git-dir={repo / '.git'}", f"--work-tree={repo}", "add", "top.py")
    git(outside, f"--git-dir={repo / '.git'}", f"--work-tree={repo}", "commit", "-q", "-m", "with --git-dir")
    assert sorted(e.paths or () for e in events(repo)) == [("shop/sub.py",), ("shop/sub.py",),
                                                            ("top.py",), ("top.py",)]


def test_the_first_commit_of_a_new_repo_is_recorded(tmp_path: Path) -> None:
    repo = tmp_path / "fresh"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "T")
    install_hooks(repo)
    commit(repo, {"a.py": "", "b.py": ""}, "root")
    pre, post = events(repo, "pre-commit"), events(repo, "post-commit")
    assert pre[0].head is None and pre[0].paths == ("a.py", "b.py")
    assert post[0].paths == ("a.py", "b.py")


def test_unusual_path_names_survive_the_trip(repo: Path) -> None:
    install_hooks(repo)
    names = ["new\nline.py", 'quote".py', "café.py", "tab\there.py", "back\\slash.py", "sp ace.py"]
    commit(repo, {name: "x = 1\n" for name in names})
    (event,) = events(repo, "post-commit")
    assert sorted(event.paths or ()) == sorted(names)
    (pre,) = events(repo, "pre-commit")
    assert sorted(pre.paths or ()) == sorted(names)


def test_a_merge_commit_records_what_it_brought_in(repo: Path) -> None:
    """git runs post-commit for a merge committed with `git commit` (after --no-commit or
    a conflict); a clean `git merge` runs post-merge instead, which ohd does not hook."""
    git(repo, "checkout", "-q", "-b", "side")
    commit(repo, {"side.py": ""})
    git(repo, "checkout", "-q", "main")
    commit(repo, {"main.py": ""})
    install_hooks(repo)
    git(repo, "merge", "-q", "--no-ff", "--no-commit", "side")
    git(repo, "commit", "-q", "--no-edit")
    (event,) = events(repo, "post-commit")
    assert event.paths == ("side.py",)


# -- the hooks never fail ---------------------------------------------------------------


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("name", ["pre-commit", "post-commit"])
def test_a_hook_outside_a_repo_exits_0_and_says_nothing(tmp_path: Path, shell: str, name: str) -> None:
    outside = tmp_path / "plain"
    outside.mkdir()
    done = run_hook(shell, name, outside)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("name", ["pre-commit", "post-commit"])
def test_a_hook_in_a_bare_repo_exits_0_and_records_nothing(repo: Path, tmp_path: Path, shell: str,
                                                           name: str) -> None:
    bare = tmp_path / "bare.git"
    git(tmp_path, "clone", "-q", "--bare", str(repo), str(bare))
    done = run_hook(shell, name, bare)
    assert (done.returncode, done.stderr) == (0, "")
    assert not (bare / "ohd").exists()


@pytest.mark.parametrize("shell", SHELLS)
def test_a_hook_with_an_unwritable_spool_exits_0(repo: Path, shell: str) -> None:
    (repo / ".git" / "ohd").write_text("a file where the spool folder should be")
    for name in ("pre-commit", "post-commit"):
        done = run_hook(shell, name, repo)
        assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_spool_does_not_fail_the_commit(repo: Path) -> None:
    install_hooks(repo)
    spool = spool_dir(repo)
    spool.chmod(0o500)
    try:
        commit(repo, {"a.py": ""})
    finally:
        spool.chmod(0o700)
    assert events(repo) == []


@pytest.mark.parametrize("shell", SHELLS)
def test_each_shell_records_the_staged_paths(repo: Path, shell: str) -> None:
    (repo / "a.py").write_text("")
    git(repo, "add", "a.py")
    done = run_hook(shell, "pre-commit", repo)
    assert (done.returncode, done.stderr) == (0, "")
    assert [e.paths for e in events(repo)] == [("a.py",)]
    assert not [p for p in spool_dir(repo).iterdir() if p.name.startswith(".")], "temp file left"


def test_ohd_hooks_off_skips_the_recording(repo: Path) -> None:
    (repo / "a.py").write_text("")
    git(repo, "add", "a.py")
    assert run_hook("sh", "pre-commit", repo, {"OHD_HOOKS": "off"}).returncode == 0
    assert events(repo) == []


# -- install / uninstall ----------------------------------------------------------------


def test_install_writes_executable_hooks_and_is_idempotent(repo: Path) -> None:
    install_hooks(repo)
    folder = repo / ".git" / "hooks"
    for name in ("pre-commit", "post-commit"):
        assert (folder / name).read_text() == (HOOKS / name).read_text() == hook_script(name)
        assert os.access(folder / name, os.X_OK)
    second = install_hooks(repo)
    assert "pre-commit: already installed" in second and "post-commit: already installed" in second
    assert not list(folder.glob(f"*{CHAINED_SUFFIX}"))


def test_an_existing_hook_is_chained_then_restored_exactly(repo: Path) -> None:
    folder = repo / ".git" / "hooks"
    user_hook = folder / "post-commit"
    user_text = '#!/bin/sh\necho "user hook ran" >> "$(git rev-parse --git-dir)/user-hook.log"\n'
    user_hook.write_text(user_text)
    user_hook.chmod(0o750)
    install_hooks(repo)
    install_hooks(repo)   # a second install must not chain ohd's own hook
    assert is_ohd_hook(user_hook)
    assert (folder / f"post-commit{CHAINED_SUFFIX}").read_text() == user_text
    commit(repo, {"a.py": ""})
    assert (repo / ".git" / "user-hook.log").read_text() == "user hook ran\n"
    assert len(events(repo, "post-commit")) == 1
    lines = uninstall_hooks(repo)
    assert "post-commit: removed ohd's hook; your hook is back" in lines
    assert user_hook.read_text() == user_text
    assert stat.S_IMODE(user_hook.stat().st_mode) == 0o750
    assert not (folder / "pre-commit").exists()
    assert not (folder / f"post-commit{CHAINED_SUFFIX}").exists()
    assert "pre-commit: not installed" in uninstall_hooks(repo)


def test_a_chained_symlink_hook_is_restored_as_the_same_symlink(repo: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared-hook"
    shared.write_text("#!/bin/sh\nexit 0\n")
    shared.chmod(0o755)
    link = repo / ".git" / "hooks" / "pre-commit"
    link.symlink_to(shared)
    install_hooks(repo)
    assert not link.is_symlink() and is_ohd_hook(link)
    uninstall_hooks(repo)
    assert link.is_symlink() and os.readlink(link) == str(shared)


def test_a_blocking_user_pre_commit_hook_still_blocks_and_nothing_is_recorded(repo: Path) -> None:
    user_hook = repo / ".git" / "hooks" / "pre-commit"
    user_hook.write_text("#!/bin/sh\necho 'no commits on Fridays' >&2\nexit 3\n")
    user_hook.chmod(0o755)
    install_hooks(repo)
    (repo / "a.py").write_text("")
    git(repo, "add", "a.py")
    done = subprocess.run(["git", "commit", "-q", "-m", "x"], cwd=repo, capture_output=True, text=True)
    assert done.returncode != 0
    assert "no commits on Fridays" in done.stderr
    assert events(repo) == []
    chained = repo / ".git" / "hooks" / f"pre-commit{CHAINED_SUFFIX}"
    assert subprocess.run([str(chained)], cwd=repo, capture_output=True).returncode == 3


def test_core_hooks_path_is_respected(repo: Path) -> None:
    git(repo, "config", "core.hooksPath", "githooks")
    assert hooks_dir(repo) == (repo / "githooks").resolve()
    install_hooks(repo)
    assert is_ohd_hook(repo / "githooks" / "post-commit")
    assert not (repo / ".git" / "hooks" / "post-commit").exists()
    commit(repo, {"a.py": ""})
    assert sorted(e.kind for e in events(repo)) == ["post-commit", "pre-commit"]
    uninstall_hooks(repo)
    assert not (repo / "githooks" / "post-commit").exists()


def test_install_refuses_when_a_foreign_hook_and_a_chained_one_both_exist(repo: Path) -> None:
    folder = repo / ".git" / "hooks"
    (folder / "pre-commit").write_text("#!/bin/sh\n")
    (folder / f"pre-commit{CHAINED_SUFFIX}").write_text("#!/bin/sh\n")
    with pytest.raises(Exception, match="exists already"):
        install_hooks(repo)
    assert not (folder / "post-commit").exists()   # nothing half-done


def test_the_cli_installs_and_uninstalls(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["hooks", "install", "--repo", str(repo)]) == cli.EXIT_OK
    assert "pre-commit: installed" in capsys.readouterr().out
    assert cli.main(["hooks", "uninstall", "--repo", str(repo)]) == cli.EXIT_OK
    assert "pre-commit: removed" in capsys.readouterr().out


def test_the_cli_refuses_a_folder_that_is_not_a_repo(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert cli.main(["hooks", "install", "--repo", str(tmp_path)]) == cli.EXIT_ERROR
    assert "not a git repository" in capsys.readouterr().err


# -- the event format -------------------------------------------------------------------


def test_parse_event_reads_every_field() -> None:
    event = parse_event(f"ohd-event 1\nkind post-commit\ntime 1700000000\nhead {SHA}\nfuture x\npaths\n"
                        'a.py\n"new\\nline.py"\n"caf\\303\\251.py"\na.py\n\n')
    assert event.kind == "post-commit" and event.head == SHA
    assert event.time.timestamp() == 1700000000
    assert event.paths == ("a.py", "new\nline.py", "café.py")


@pytest.mark.parametrize("text, message", [
    ("", "not an ohd event"),
    ("\x00\x01garbage", "not an ohd event"),
    ("ohd-event 2\nkind pre-commit\ntime 1\nhead \npaths\n", "not an ohd event"),
    ("ohd-event 1\nkind pre-commit\ntime 1\nhead \n", "incomplete"),
    ("ohd-event 1\nkind pre-push\ntime 1\nhead \npaths\n", "kind"),
    ("ohd-event 1\nkind pre-commit\ntime yesterday\nhead \npaths\n", "time"),
    ("ohd-event 1\nkind pre-commit\ntime 1\nhead HEAD\npaths\n", "head"),
    ("ohd-event 1\nkind pre-commit\ntime 1\nhead \npaths\n../etc/passwd\n", "inside the repository"),
    ("ohd-event 1\nkind pre-commit\ntime 1\nhead \npaths\n/etc/passwd\n", "inside the repository"),
    ("ohd-event 1\nkind pre-commit\ntime 1\nhead \npaths\n.git/config\n", "inside the repository"),
    ("ohd-event 1\nkind pre-commit\ntime 1\nhead \npaths\n\"open\n", "unterminated"),
    ("ohd-event 1\nkind pre-commit\ntime 1\nhead \npaths\n\"bad\\q\"\n", "bad escape"),
    ("ohd-event 1\n!!! what\npaths\n", "line 2"),
])
def test_parse_event_rejects_garbage_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(EventError, match=message):
        parse_event(text)


def test_unquote_follows_git_quoting() -> None:
    assert unquote('"a\\tb\\\\c\\"d"') == 'a\tb\\c"d'


# -- the spool reader and watcher -------------------------------------------------------


def test_events_left_while_no_daemon_runs_are_processed_by_a_later_scan(repo: Path) -> None:
    install_hooks(repo)
    commit(repo, {"one.py": ""})
    commit(repo, {"two.py": ""})
    assert len(events(repo)) == 4
    recorder = Recorder()
    assert SpoolReader(recorder).scan(repo) == 4
    assert sorted((paths, origin.split()[0]) for _repo, paths, origin in recorder.calls) == [
        (["one.py"], "post-commit"), (["one.py"], "pre-commit"),
        (["two.py"], "post-commit"), (["two.py"], "pre-commit")]
    assert {repo_seen for repo_seen, _p, _o in recorder.calls} == {repo}
    assert list(spool_dir(repo).iterdir()) == []
    assert SpoolReader(recorder).scan(repo) == 0   # exactly once


def test_a_garbage_spool_file_is_rejected_with_an_error_file(repo: Path) -> None:
    spool = spool_dir(repo)
    spool.mkdir(parents=True)
    (spool / "1-2-post-commit.event").write_bytes(b"\xff\xfe not an event")
    (spool / ".half-written.tmp").write_text("ohd-event 1\n")
    recorder = Recorder()
    reader = SpoolReader(recorder)
    assert reader.scan(repo) == 0
    assert recorder.calls == []
    rejected = spool / "rejected"
    assert (rejected / "1-2-post-commit.event").exists()
    assert "not an ohd event" in (rejected / "1-2-post-commit.event.error.txt").read_text()
    assert reader.scan(repo) == 0                  # no loop: it is not read again
    assert (spool / ".half-written.tmp").exists()  # a temp file is not an event


def test_a_scan_removes_temp_files_that_killed_hooks_left(repo: Path) -> None:
    spool = spool_dir(repo)
    spool.mkdir(parents=True)
    old, fresh = spool / ".pre-commit-11.tmp", spool / ".pre-commit-12.tmp"
    old.write_text("ohd-event 1\n")
    fresh.write_text("ohd-event 1\n")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    assert SpoolReader(Recorder()).scan(repo, now=datetime.now(UTC)) == 0
    assert not old.exists() and fresh.exists()


def test_a_failing_callback_leaves_the_event_for_the_next_scan(repo: Path) -> None:
    install_hooks(repo)
    commit(repo, {"a.py": ""})
    assert SpoolReader(Recorder(fail=True)).scan(repo) == 0
    assert len(events(repo)) == 2
    recorder = Recorder()
    assert SpoolReader(recorder).scan(repo) == 2


def test_a_repo_without_git_has_no_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    plain = tmp_path / "plain"
    plain.mkdir()
    assert SpoolReader(Recorder()).scan(plain) == 0


def test_the_spool_watcher_sees_a_hook_event_and_the_reader_hands_it_on(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "watched")
    install_hooks(repo)
    recorder = Recorder()
    reader = SpoolReader(recorder)
    watcher = SpoolWatcher(reader.process)
    watcher.watch(repo, spool_dir(repo))
    watcher.start()
    try:
        commit(repo, {"a.py": "", "b.py": ""})
        wait_for(lambda: len(recorder.calls) == 2, timeout=10, what="two hook events")
    finally:
        watcher.stop()
    assert {tuple(paths) for _r, paths, _o in recorder.calls} == {("a.py", "b.py")}
    assert list(spool_dir(repo).glob("*.event")) == []


def test_a_commit_in_a_linked_worktree_lands_in_the_shared_spool(repo: Path, tmp_path: Path) -> None:
    install_hooks(repo)
    tree = tmp_path / "tree"
    git(repo, "worktree", "add", "-q", "-b", "feature", str(tree))
    commit(tree, {"wt.py": ""})
    assert spool_dir(tree) == spool_dir(repo)
    post = events(repo, "post-commit")
    assert [e.paths for e in post] == [("wt.py",)]
    assert post[0].head == git(tree, "rev-parse", "HEAD").strip()
    assert [e.paths for e in events(repo, "pre-commit")] == [("wt.py",)]


def test_a_post_commit_event_for_an_unknown_commit_is_rejected(repo: Path) -> None:
    spool = spool_dir(repo)
    spool.mkdir(parents=True)
    (spool / "post-commit-1.event").write_text(f"ohd-event 1\nkind post-commit\nhead {SHA}\n")
    recorder = Recorder()
    assert SpoolReader(recorder).scan(repo) == 0
    assert recorder.calls == []
    assert "cannot list the paths of commit" in (spool / "rejected" / "post-commit-1.event.error.txt").read_text()


def test_a_post_commit_event_needs_its_commit_unless_it_lists_paths() -> None:
    with pytest.raises(EventError, match="needs a head line"):
        parse_event("ohd-event 1\nkind post-commit\n")
    event = parse_event(f"ohd-event 1\nkind post-commit\nhead {SHA}\npaths\nx.py\n")
    assert event.paths == ("x.py",) and event.time is None


def test_the_pre_commit_framework_manifest_points_at_the_hooks() -> None:
    manifest = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    assert {h["id"]: h["stages"] for h in manifest} == {"ohd-record": ["pre-commit"],
                                                        "ohd-record-post-commit": ["post-commit"]}
    for hook in manifest:
        assert os.access(ROOT / hook["entry"], os.X_OK)
        assert hook["language"] == "script" and hook["pass_filenames"] is False and hook["always_run"]


# -- with the standing rules and the daemon -----------------------------------------------

DOCS_RULE = "type: docstring\ntarget: shop/pricing.py\non_change: ['shop/**/*.py']\n"


def test_a_commit_of_two_matching_files_queues_two_tasks_through_the_rules(repo: Path, tmp_path: Path,
                                                                         clock: FakeClock) -> None:
    store = Store(open_database(f"sqlite:///{tmp_path}/ohd.db"))
    store.migrate()
    book = RuleBook(store, clock)
    (repo / "tasks.d" / "docs.yaml").write_text(DOCS_RULE)
    book.register(repo, "tasks.d/docs.yaml", parse(DOCS_RULE))
    install_hooks(repo)
    commit(repo, {"shop/a.py": "A = 1\n", "shop/b.py": "B = 2\n", "notes.md": "no rule\n"})
    assert SpoolReader(book.changed).scan(repo) == 2          # pre-commit and post-commit
    tasks = store.list_tasks()
    assert sorted(t.target for t in tasks) == ["shop/a.py", "shop/b.py"]   # deduped: one each
    assert {t.type for t in tasks} == {"docstring"}
    store.close()


def test_commits_made_while_the_daemon_is_down_are_handled_after_it_starts(repo: Path, tmp_path: Path) -> None:
    (repo / "tasks.d" / "docs.yaml").write_text(DOCS_RULE)
    install_hooks(repo)
    commit(repo, {"shop/a.py": "A = 1\n", "shop/b.py": "B = 2\n", "notes.md": "no rule\n"})
    runtime = Path(os.environ["OHD_RUNTIME_DIR"])
    daemon = DaemonProcess(daemon_env(tmp_path, runtime), repo, tmp_path / "daemon.log").start()
    try:
        tasks = wait_for(lambda: [t for t in daemon.json("tasks")["tasks"] if t["target"] != "shop/pricing.py"]
                         if not list(spool_dir(repo).glob("*.event")) else None,
                         timeout=60, what="the spool to be handled")
        commit(repo, {"shop/c.py": "C = 3\n"})                  # and a commit while it runs
        wait_for(lambda: any(t["target"] == "shop/c.py" for t in daemon.json("tasks")["tasks"])
                 and not list(spool_dir(repo).glob("*.event")), timeout=60,
                 what="the events of a commit made while the daemon runs to be handled")
    finally:
        assert daemon.stop() == 0
    assert sorted(t["target"] for t in tasks) == ["shop/a.py", "shop/b.py"]
    assert not (spool_dir(repo) / "rejected").exists()


# -- sealed events: the hooks write in place, no temp file, no mv (issue 17) ----------------


def only_git_on_path(tmp_path: Path) -> str:
    """A PATH holding git and nothing else: no mv, no rm, no mkdir."""
    folder = tmp_path / "only-git"
    folder.mkdir()
    (folder / "git").symlink_to(shutil.which("git") or "git")
    return str(folder)


@pytest.mark.parametrize("shell", SHELLS)
def test_the_hooks_record_with_nothing_but_git_on_the_path(repo: Path, tmp_path: Path, shell: str) -> None:
    """git runs the hooks with GIT_INDEX_FILE set: post-commit then forks nothing, pre-commit only git."""
    spool_dir(repo).mkdir(parents=True)
    (repo / "a.py").write_text("")
    git(repo, "add", "a.py")
    git(repo, "commit", "-q", "-m", "a")
    shell_path = shutil.which(shell) or shell
    env = {"PATH": only_git_on_path(tmp_path), "GIT_INDEX_FILE": ".git/index"}
    (repo / "b.py").write_text("")
    git(repo, "add", "b.py")
    for name in ("pre-commit", "post-commit"):
        done = run_hook(shell_path, name, repo, env)
        assert (done.returncode, done.stderr) == (0, "")
    pre, post = events(repo, "pre-commit"), events(repo, "post-commit")
    assert [e.paths for e in pre] == [("b.py",)]
    assert [e.head for e in post] == [git(repo, "rev-parse", "HEAD").strip()]
    assert not [p for p in spool_dir(repo).iterdir() if p.name.startswith(".")], "temp file left"


def test_a_sealed_event_parses_without_its_seal_and_is_unfinished_without_it() -> None:
    event = parse_event("ohd-event 1\nsealed 1\nkind pre-commit\npaths\na.py\nb.py\n.\n")
    assert event.paths == ("a.py", "b.py")
    event = parse_event(f"ohd-event 1\nsealed 1\nkind post-commit\nhead {SHA}\n.\n")
    assert event.head == SHA and event.paths is None
    for text in ("ohd-event 1\nsealed 1\n", "ohd-event 1\nsealed 1\nkind pre-commit\npaths\na.py\n",
                 f"ohd-event 1\nsealed 1\nkind post-commit\nhead {SHA}\n"):
        with pytest.raises(Unfinished):
            parse_event(text)


def test_an_unfinished_event_waits_for_its_seal_and_is_rejected_once_stale(repo: Path) -> None:
    spool = spool_dir(repo)
    spool.mkdir(parents=True)
    empty, half = spool / "pre-commit-1.event", spool / "pre-commit-2.event"
    empty.write_text("")
    half.write_text("ohd-event 1\nsealed 1\nkind pre-commit\npaths\na.py\n")
    recorder = Recorder()
    reader = SpoolReader(recorder)
    assert reader.scan(repo, now=datetime.now(UTC)) == 0
    assert empty.exists() and half.exists() and not (spool / "rejected").exists()
    with half.open("a") as handle:                # the hook writes its last line
        handle.write("b.py\n.\n")
    assert reader.process(repo, half) and not half.exists()
    assert [paths for _r, paths, _o in recorder.calls] == [["a.py", "b.py"]]
    two_hours_ago = time.time() - 7200
    os.utime(empty, (two_hours_ago, two_hours_ago))
    assert reader.scan(repo, now=datetime.now(UTC)) == 0
    assert not empty.exists()
    assert "unfinished" in (spool / "rejected" / "pre-commit-1.event.error.txt").read_text()
