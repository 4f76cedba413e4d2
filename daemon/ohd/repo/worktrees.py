"""An agent run's isolated copy of the repo: a detached git worktree under the state dir.

Each run of an agent runner gets `<state dir>/worktrees/task-<id>-<attempt>`, a `git worktree add
--detach` of the task's base commit (the repo's HEAD when the task was created), so the agent never
sees or touches the user's working copy. Its result is the diff of that worktree against the base
commit (`git add -A`, then `git diff --cached --binary`), validated here for what git itself can
tell: paths inside the repo, none under `.git/`, no symlink pointing out, a patch that applies to
the base commit. The worktree is removed after the run (`git worktree remove --force`, then `git
worktree prune`); at the daemon's start `sweep` removes those no running task owns (a crash left
them). `guard_snapshot` notes what a careless agent could change outside its worktree (the user's
uncommitted files, the repo's hooks and config) so a run that changed them is refused.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Collection, Sequence
from pathlib import Path, PurePosixPath

from ohd.core import layout
from ohd.errors import OhdError

log = logging.getLogger("ohd.worktrees")

GIT_TIMEOUT_S = 120
# what of the repo's git dir an agent could change to run code later, or to point the repo elsewhere
_GUARDED_GIT_PARTS = ("config", "hooks", "info")
# what git itself writes there: `info/refs` is `git update-server-info`'s list of refs, which every
# `git gc` and `git repack` rewrites (an agent's commits in its worktree start `git gc --auto`)
_GIT_WRITES = frozenset({"info/refs"})
# what tools regenerate in a working copy, never anyone's work: the guard does not count a change there
# (Python compiling the user's module into its __pycache__ while the agent runs the tests with the user's
# editable install, the user's own pytest or mypy run meanwhile)
CACHE_DIRS = frozenset({layout.PYCACHE_DIR, ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis", ".tox",
                        ".nox", ".cache"})
CACHE_NAME = re.compile(r".*\.py[co]|\.coverage(\..+)?")


class AgentResultError(OhdError):
    """An agent's diff cannot be accepted; the message says why (it is the next attempt's feedback)."""


def _git(cwd: Path, *args: str, check: bool = True, stdin: bytes | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    try:
        done = subprocess.run(["git", "-c", "core.quotePath=false", *args], cwd=cwd, capture_output=True,
                              input=stdin, timeout=GIT_TIMEOUT_S, env=env)
    except FileNotFoundError:
        raise OhdError("git is not installed") from None
    except subprocess.TimeoutExpired:
        raise OhdError(f"git {args[0]} took longer than {GIT_TIMEOUT_S}s in {cwd}") from None
    if check and done.returncode != 0:
        raise OhdError(f"git {' '.join(args)} failed in {cwd}: {done.stderr.decode('utf-8', 'replace').strip()}")
    return done


def _text(done: subprocess.CompletedProcess[bytes]) -> str:
    return done.stdout.decode("utf-8", "replace").strip()


def base_commit(repo: Path) -> str:
    """The repo's HEAD commit (an agent task's worktree starts there); OhdError when it has none."""
    done = _git(repo, "rev-parse", "--verify", "--quiet", "HEAD^{commit}", check=False)
    if done.returncode != 0:
        inside = _git(repo, "rev-parse", "--git-dir", check=False).returncode == 0
        raise OhdError(f"{repo} has no commit yet: an agent runner works in a git worktree of the repo's "
                       "HEAD; commit first" if inside else
                       f"{repo} is not a git repository: an agent runner works in a git worktree of it")
    return _text(done)


def add(repo: Path, worktree: Path, commit: str) -> Path:
    """`git worktree add --detach <worktree> <commit>`; a leftover at that path is removed first."""
    if worktree.exists() or worktree.is_symlink():
        remove(repo, worktree)
    worktree.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _git(repo, "worktree", "add", "--detach", "--quiet", str(worktree), commit)
    return worktree


def remove(repo: Path | None, worktree: Path) -> None:
    """Remove the worktree and forget it in its repo (`repo` None: found from its `.git` file);
    its prompt and output files beside it go too. Never raises for what is already gone."""
    repo_git = _common_dir(worktree) if repo is None else None
    if repo is not None:
        _git(repo, "worktree", "remove", "--force", "--force", str(worktree), check=False)
    elif repo_git is not None:
        _git(worktree.parent, f"--git-dir={repo_git}", "worktree", "remove", "--force", "--force",
             str(worktree), check=False)
    if worktree.is_symlink() or worktree.is_file():
        worktree.unlink(missing_ok=True)
    elif worktree.exists():
        shutil.rmtree(worktree, ignore_errors=True)
    if repo is not None:
        _git(repo, "worktree", "prune", check=False)
    elif repo_git is not None:
        _git(worktree.parent, f"--git-dir={repo_git}", "worktree", "prune", check=False)
    for beside in worktree.parent.glob(f"{worktree.name}.*"):   # its prompt, output and the agent's histories
        if beside.is_file() or beside.is_symlink():
            beside.unlink(missing_ok=True)


def _common_dir(worktree: Path) -> Path | None:
    """The repo's git dir a worktree belongs to, from its `.git` file (`gitdir: <repo>/.git/worktrees/<name>`)."""
    try:
        line = (worktree / layout.GIT_DIR).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    if not line.startswith("gitdir:"):
        return None
    admin = Path(line.removeprefix("gitdir:").strip())
    return admin.parent.parent if admin.parent.name == "worktrees" else None   # git's own folder name


def sweep(state_dir: Path, keep: Collection[str] = ()) -> list[str]:
    """Remove every agent run's worktree (and files) under the state dir whose name is not in `keep`
    (the runs of running tasks), pruning it from its repo; the names removed."""
    folder = layout.worktrees_dir(state_dir)
    try:
        entries = sorted(folder.iterdir())
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        stem = entry.name.split(".", 1)[0]     # a run's name has no dot; its files are `<name>.<what>`
        if not layout.is_run_file(entry.name) or stem in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            remove(None, entry)
            removed.append(entry.name)
        else:
            entry.unlink(missing_ok=True)
    if removed:
        log.info("removed %d worktree(s) of agent runs that no running task owns: %s", len(removed),
                 ", ".join(removed))
    return removed


# -- the result -------------------------------------------------------------------------

def diff(worktree: Path, commit: str, leftovers: Sequence[str] = ()) -> str:
    """Everything the agent changed, staged: `git add -A` (but the `leftovers` globs: an agent's own
    state files), then `git diff --cached --binary <commit>`."""
    # a glob pathspec names paths, not the files under a folder it matches: `<glob>/**` is those
    excluded = [f":(exclude,glob){pattern}" for glob in leftovers for pattern in (glob, f"{glob}/**")]
    _git(worktree, "add", "-A", "--", ".", *excluded)
    raw = _git(worktree, "diff", "--cached", "--binary", "--no-color", "--no-ext-diff", commit).stdout
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AgentResultError(f"the diff is not UTF-8 text (byte {exc.start}); ohd keeps text diffs only "
                               "(binary files are encoded by git and fine)") from None


def diff_stat(worktree: Path, commit: str) -> str:
    """`git diff --cached --stat` of the staged change (after `diff`)."""
    return _text(_git(worktree, "diff", "--cached", "--stat", "--no-color", commit))


def changed_paths(worktree: Path, commit: str) -> list[tuple[str, str]]:
    """(new mode, path) of every staged change against `commit` (mode `000000`: deleted)."""
    raw = _git(worktree, "diff", "--cached", "--raw", "-z", "--no-renames", commit).stdout.decode(
        "utf-8", "surrogateescape")
    parts = [p for p in raw.split("\0") if p]
    changes = []
    for meta, path in zip(parts[0::2], parts[1::2], strict=True):
        fields = meta.lstrip(":").split()
        changes.append((fields[1], path))
    return changes


def check_paths(worktree: Path, commit: str) -> list[str]:
    """The changed paths, each inside the repo and outside `.git/`, no symlink pointing out of the
    worktree; AgentResultError naming the first that is not."""
    root = worktree.resolve()
    paths = []
    for mode, rel in changed_paths(worktree, commit):
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts or layout.GIT_DIR in pure.parts:
            raise AgentResultError(f"the diff touches {rel}, outside the repo or inside {layout.GIT_DIR}/")
        if mode == "120000":
            link = worktree / rel
            target = os.readlink(link)
            resolved = (link.parent / target).resolve()
            if not resolved.is_relative_to(root) or layout.GIT_DIR in resolved.relative_to(root).parts:
                raise AgentResultError(f"the diff adds a symlink {rel} -> {target}, pointing outside the repo")
        paths.append(rel)
    return paths


def check_applies(repo: Path, commit: str, patch: str) -> None:
    """`git apply --check` of the patch against `commit` (in a throwaway index, not the user's)."""
    index = Path(_text(_git(repo, "rev-parse", "--absolute-git-dir"))) / f"ohd-check-{os.getpid()}.index"
    env = {**os.environ, "GIT_INDEX_FILE": str(index)}
    try:
        _git(repo, "read-tree", commit, env=env)
        done = _git(repo, "apply", "--check", "--cached", "--binary", "-", stdin=patch.encode("utf-8"),
                    env=env, check=False)
    finally:
        index.unlink(missing_ok=True)
    if done.returncode != 0:
        raise AgentResultError("the diff does not apply to the task's commit "
                               f"{commit[:12]}: {done.stderr.decode('utf-8', 'replace').strip()}")


def commit_to_branch(worktree: Path, repo: Path, ref: str, message: str) -> str:
    """Commit the staged change in the worktree (author ohd) and point `ref` at it (never checked
    out: the user's HEAD and working copy stay as they are); the commit's id."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "ohd", "GIT_AUTHOR_EMAIL": "ohd@localhost",
           "GIT_COMMITTER_NAME": "ohd", "GIT_COMMITTER_EMAIL": "ohd@localhost"}
    _git(worktree, "-c", "commit.gpgsign=false", "commit", "--quiet", "--no-verify", "-m", message, env=env)
    sha = _text(_git(worktree, "rev-parse", "HEAD"))
    _git(repo, "update-ref", ref, sha)
    return sha


def touched_dirty(repo: Path, paths: Sequence[str]) -> list[str]:
    """Which of `paths` have changes in the user's working copy (`git status --porcelain -- <paths>`)."""
    if not paths:
        return []
    out = _git(repo, "status", "--porcelain", "-z", "--untracked-files=all", "--", *paths).stdout
    entries = [e for e in out.decode("utf-8", "surrogateescape").split("\0") if e]
    return [e[3:] for e in entries if len(e) > 3]


def apply_to_working_copy(repo: Path, patch: str) -> None:
    """`git apply` of the patch into the user's working copy (the caller checked it is clean there)."""
    done = _git(repo, "apply", "--binary", "-", stdin=patch.encode("utf-8"), check=False)
    if done.returncode != 0:
        raise OhdError(f"the patch does not apply to the working copy of {repo}: "
                       f"{done.stderr.decode('utf-8', 'replace').strip()}")


def patch_paths(repo: Path, patch: str) -> list[str]:
    """The paths a patch touches (`git apply --numstat`)."""
    done = _git(repo, "apply", "--numstat", "-z", "-", stdin=patch.encode("utf-8"), check=False)
    if done.returncode != 0:
        raise OhdError(f"not a patch git can read: {done.stderr.decode('utf-8', 'replace').strip()}")
    paths = []
    for entry in (e for e in done.stdout.decode("utf-8", "surrogateescape").split("\0") if e):
        paths.append(entry.split("\t", 2)[-1])
    return paths


# -- what an agent must not change outside its worktree --------------------------------------

def guard_snapshot(repo: Path, skip: Sequence[Path] = (), own: Sequence[str] = ()) -> dict[str, str]:
    """A hash of each file an agent could change outside its worktree to harm the user: the working
    copy's uncommitted and untracked files, and the repo's git config, hooks and info folder. Not
    counted: ohd's own folders in the repo (`tasks.d/`, `.ohd/`), caches (`CACHE_DIRS`, `CACHE_NAME`),
    what git itself rewrites in its folder (`_GIT_WRITES`),
    what is under a folder of `skip` (ohd's state dir, the agent's temp dir, when they are inside the
    repo) and the runner's own state (`own`: globs of a top-level name, e.g. `.aider*`, as in `diff`)."""
    found: dict[str, str] = {}
    root = repo.resolve()
    skipped = [PurePosixPath(folder.resolve().relative_to(root).as_posix()).parts for folder in skip
               if folder.resolve().is_relative_to(root) and folder.resolve() != root]
    status = _git(repo, "status", "--porcelain", "-z", "--untracked-files=all", check=False).stdout
    for entry in (e for e in status.decode("utf-8", "surrogateescape").split("\0") if e):
        rel = entry[3:]
        parts = PurePosixPath(rel).parts
        if not parts or parts[0] == layout.TASKS_DIR or layout.REPORT_DIR in parts:   # ohd's own comings and goings
            continue
        if _regenerated(parts) or any(parts[:len(s)] == s for s in skipped) or any(
                fnmatch.fnmatchcase(parts[0], glob) for glob in own):
            continue
        found[rel] = _hash(repo / rel)
    common = Path(_text(_git(repo, "rev-parse", "--git-common-dir")))
    common = common if common.is_absolute() else (repo / common).resolve()
    for part in _GUARDED_GIT_PARTS:
        base = common / part
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file()) if base.is_dir() else []
        for path in files:
            if (rel := path.relative_to(common).as_posix()) not in _GIT_WRITES:
                found[f"{layout.GIT_DIR}/{rel}"] = _hash(path)
    return found


def _regenerated(parts: Sequence[str]) -> bool:
    """A cache file: under a cache folder, or named as one (bytecode, coverage data)."""
    return any(part in CACHE_DIRS for part in parts[:-1]) or bool(CACHE_NAME.fullmatch(parts[-1]))


def guard_changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """The paths whose hash differs between two snapshots."""
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def _hash(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except IsADirectoryError:
        return "dir"
    except OSError:
        return "gone"
