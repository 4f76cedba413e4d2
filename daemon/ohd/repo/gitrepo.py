"""Git plumbing by subprocess, and `ohd init` (prepare a repo for ohd).

`init_repo` is idempotent: it creates `tasks.d/` with example task files (never
overwriting one that exists), and adds ohd's own paths to `.git/info/exclude` once.
`install_hooks`/`uninstall_hooks` put ohd's git hooks in the folder git runs hooks
from (`core.hooksPath` respected), chaining a user's hook rather than replacing it, and
put the user's hook back exactly on uninstall.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from ohd.core import layout, pyparse, tasktypes
from ohd.errors import OhdError

EXAMPLE_TARGET = "daemon/ohd/clock.py"
# never an example target: packaging and tool scripts, and folders that hold no importable code
_NOT_EXAMPLES = frozenset({"setup.py", "conftest.py", "noxfile.py", "fabfile.py", "manage.py", "__main__.py"})
_NOT_EXAMPLE_DIRS = frozenset({"tests", "test", "testing", "docs", "doc", "examples", "example", "scripts",
                               "bench", "benchmarks", "build", "dist", "tools", "migrations"})
_GENERATED = re.compile(r"generated|do not edit|don't edit", re.IGNORECASE)


def git(repo: Path, *args: str) -> str:
    """Run git in `repo`; OhdError with git's own message when it fails."""
    try:
        done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise OhdError("git is not installed") from None
    if done.returncode != 0:
        raise OhdError(f"git {' '.join(args)} failed in {repo}: {done.stderr.strip()}")
    return done.stdout.strip()


def git_dir(repo: Path) -> Path | None:
    """The repo's common git dir (worktrees share it), or None outside a git repo."""
    try:
        path = Path(git(repo, "rev-parse", "--git-common-dir"))
    except OhdError:
        return None
    return path if path.is_absolute() else (repo / path).resolve()


def python_files(repo: Path) -> list[str]:
    """Tracked Python files that are not tests, shortest path first."""
    try:
        listed = git(repo, "ls-files", "*.py").splitlines()
    except OhdError:
        return []
    sources = [p for p in listed if not Path(p).name.startswith("test") and Path(p).name != "__init__.py"]
    return sorted(sources, key=lambda p: (p.count("/"), p))


_TEST_FILE = re.compile(r"(?:^test_.*|.*_test)\.py$")


def is_test_file(name: str) -> bool:
    """A test module's file name, as pytest finds them: `test_*.py` or `*_test.py`."""
    return _TEST_FILE.match(name) is not None


def test_files(repo: Path) -> list[str]:
    """The repo's test files (`test_*.py`, `*_test.py`; tracked, or untracked and not
    ignored), repo-relative and sorted; [] outside a git repo."""
    try:
        listed = git(repo, "ls-files", "--cached", "--others", "--exclude-standard", "-z")
    except OhdError:
        return []
    return sorted({p for p in listed.split("\0") if _TEST_FILE.match(Path(p).name)
                   and not Path(p).name.startswith(layout.CANDIDATE_PREFIX)})


def init_repo(repo: Path) -> list[str]:
    """Prepare `repo` for ohd; returns one line per thing done."""
    if not repo.is_dir():
        raise OhdError(f"{repo} is not a directory")
    done = [f"repo: {repo}"]
    examples = layout.tasks_dir(repo) / layout.EXAMPLES_DIR
    examples.mkdir(parents=True, exist_ok=True)
    target = _example_target(repo)
    for name in layout.EXAMPLE_TASKS:
        path = examples / name
        if path.exists():
            continue
        text = resources.files("ohd").joinpath("examples", name).read_text(encoding="utf-8")
        path.write_text(text.replace(f"target: {EXAMPLE_TARGET}", f"target: {target}"), encoding="utf-8")
        done.append(f"wrote {path.relative_to(repo)}")
    done.extend(_exclude(repo))
    first = (examples / layout.EXAMPLE_TASKS[0]).relative_to(repo)
    done.append(f"next: cp {first} {layout.task_relpath('my-task.yaml')} (target: {target})")
    return done


def _example_target(repo: Path) -> str:
    """A tracked module the example tasks can really run on: importable by its dotted name,
    in a package (before top-level modules), not generated, with a public function or class;
    never `setup.py`, a conftest or a tool script. The shallowest such one, by name."""
    if (repo / EXAMPLE_TARGET).is_file():
        return EXAMPLE_TARGET
    is_package = lambda rel: (repo / rel / "__init__.py").is_file()  # noqa: E731
    usable: list[tuple[bool, str]] = []
    for rel in python_files(repo):
        module = tasktypes.module_name(rel, is_package)
        if Path(rel).name in _NOT_EXAMPLES or Path(rel).stem.endswith("_test") or not module or not all(
                part.isidentifier() for part in module.split(".")) or _NOT_EXAMPLE_DIRS & set(Path(rel).parts[:-1]):
            continue
        try:
            source = (repo / rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len(source.encode()) <= tasktypes.MAX_TARGET_BYTES and _has_public_code(source):
            usable.append(("." not in module, rel))   # in a package first
    return sorted(usable, key=lambda u: u[0])[0][1] if usable else "src/app/module.py"   # stable: shallowest first


def _has_public_code(source: str) -> bool:
    """Not generated (no such note in its first lines), parses, defines a public function or class."""
    if _GENERATED.search("\n".join(source.splitlines()[:5])):
        return False
    try:
        tree = pyparse.parse(source)
    except (SyntaxError, ValueError):
        return False
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
               and not node.name.startswith("_") for node in tree.body)


def _exclude(repo: Path) -> list[str]:
    gdir = git_dir(repo)
    if gdir is None:
        return [f"not a git repo: skipped {layout.GIT_DIR}/info/exclude "
                f"(add {layout.REPORT_DIR}/ to your ignore rules)"]
    exclude = gdir / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    text = exclude.read_text(encoding="utf-8") if exclude.exists() else ""
    present = set(re.split(r"\r?\n", text))
    missing = [e for e in layout.GIT_EXCLUDES if e not in present]
    if not missing:
        return []
    block = ("" if text.endswith("\n") or not text else "\n") + "# ohd\n" + "\n".join(missing) + "\n"
    with open(exclude, "a", encoding="utf-8") as handle:
        handle.write(block)
    return [f"added {', '.join(missing)} to {exclude}"]


# -- git hooks (`ohd hooks install|uninstall`) --------------------------------------------

HOOK_NAMES = ("pre-commit", "post-commit")
HOOK_MARKER = b"\n# ohd-hook "       # the second line of ohd's hook scripts


def hook_script(name: str) -> str:
    """The text of ohd's hook `name` (the files of the top-level `hooks/` folder)."""
    return resources.files("ohd").joinpath("githooks", name).read_text(encoding="utf-8")


def hooks_dir(repo: Path) -> Path:
    """Where git runs this repo's hooks from: `core.hooksPath` (relative to the work tree)
    or `<common git dir>/hooks`; OhdError outside a git repo or in a bare one."""
    if git_dir(repo) is None:
        raise OhdError(f"{repo} is not a git repository")
    if git(repo, "rev-parse", "--is-bare-repository") == "true":
        raise OhdError(f"{repo} is a bare repository: nothing is committed there, so no hooks")
    return (repo / git(repo, "rev-parse", "--git-path", "hooks")).resolve()


def is_ohd_hook(path: Path) -> bool:
    """A hook file written by `install_hooks` (it carries the `# ohd-hook` line)."""
    try:
        with open(path, "rb") as handle:
            return HOOK_MARKER in handle.read(200)
    except OSError:
        return False


def install_hooks(repo: Path) -> list[str]:
    """Install ohd's pre-commit and post-commit hooks; one line per thing done.

    Idempotent. A hook that is not ohd's is moved to `<hook>.ohd-chained` (a rename: mode,
    symlink and content kept) and ohd's hook runs it first. Nothing is changed when a hook
    is not ohd's and a `.ohd-chained` file is already there (OhdError says what to move).
    """
    folder = hooks_dir(repo)
    for name in HOOK_NAMES:
        path = folder / name
        chained = layout.chained_hook(path)
        if _present(path) and not is_ohd_hook(path) and _present(chained):
            raise OhdError(f"{path} is not ohd's and {chained.name} exists already; "
                           "move one of them away and run `ohd hooks install` again")
    folder.mkdir(parents=True, exist_ok=True)
    done = [f"hooks folder: {folder}"]
    done.extend(_install_hook(folder / name, hook_script(name)) for name in HOOK_NAMES)
    common = git_dir(repo)
    if common is not None:
        layout.spool_dir(common).mkdir(parents=True, exist_ok=True)
    return done


def uninstall_hooks(repo: Path) -> list[str]:
    """Remove ohd's hooks and rename each chained user hook back, exactly as it was.
    Hooks that are not ohd's are left alone; the spool and its events are kept."""
    folder = hooks_dir(repo)
    done = [f"hooks folder: {folder}"]
    for name in HOOK_NAMES:
        path = folder / name
        chained = layout.chained_hook(path)
        if is_ohd_hook(path):
            path.unlink()
            if _present(chained):
                os.rename(chained, path)
                done.append(f"{name}: removed ohd's hook; your hook is back")
            else:
                done.append(f"{name}: removed")
        elif _present(path):
            done.append(f"{name}: not ohd's; left alone")
        elif _present(chained):
            os.rename(chained, path)
            done.append(f"{name}: your hook is back")
        else:
            done.append(f"{name}: not installed")
    return done


def _present(path: Path) -> bool:
    """The path exists, or is a symlink (even a dangling one)."""
    return path.is_symlink() or path.exists()


def _install_hook(path: Path, script: str) -> str:
    name = path.name
    if is_ohd_hook(path):
        if path.read_text(encoding="utf-8") == script and os.access(path, os.X_OK):
            return f"{name}: already installed"
        _write_executable(path, script)
        return f"{name}: updated"
    if _present(path):
        os.rename(path, layout.chained_hook(path))
        _write_executable(path, script)
        return f"{name}: installed; your hook is now {layout.chained_hook(path).name} and runs first"
    _write_executable(path, script)
    return f"{name}: installed"


def _write_executable(path: Path, text: str) -> None:
    """Write `text` to `path` as an executable script, atomically (temp file, rename)."""
    temp = path.with_name(f".{path.name}.ohd-tmp")
    temp.write_text(text, encoding="utf-8")
    temp.chmod(0o755)
    os.replace(temp, path)


def ignored_paths(repo: Path, relpaths: Sequence[str]) -> set[str]:
    """The paths among `relpaths` that git ignores (one `git check-ignore --stdin` call).

    Nested `.gitignore` files, `.git/info/exclude` and the global excludes all count;
    tracked files are never reported. Outside a repo (or without git) nothing is ignored.
    """
    if not relpaths:
        return set()
    try:
        done = subprocess.run(["git", "check-ignore", "-z", "--stdin"], cwd=repo, capture_output=True,
                              input="".join(f"{p}\0" for p in relpaths).encode(), timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return set()
    if done.returncode not in (0, 1):      # 1: none ignored; 128: not a repo
        return set()
    return {p for p in done.stdout.decode(errors="surrogateescape").split("\0") if p}


def commit_paths(repo: Path, commit: str) -> list[str]:
    """The paths `commit` changed against its first parent (every path of a root commit);
    OhdError when git does not know the commit."""
    args = ["git", "-c", "core.quotePath=false", "diff-tree", "-r", "--root", "--name-only", "-z",
            "--no-commit-id", "--diff-merges=first-parent", commit, "--"]
    try:
        done = subprocess.run(args, cwd=repo, capture_output=True, timeout=60)
        if done.returncode != 0 and b"diff-merges" in done.stderr:   # git before 2.31
            done = subprocess.run([a for a in args if a != "--diff-merges=first-parent"], cwd=repo,
                                  capture_output=True, timeout=60)
    except FileNotFoundError:
        raise OhdError("git is not installed") from None
    if done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip()
        raise OhdError(f"cannot list the paths of commit {commit[:12]} in {repo}: {message}")
    return [p for p in done.stdout.decode("utf-8", "surrogateescape").split("\0") if p]


def repo_identity(repo: Path, name: str | None = None) -> str:
    """What a task of `repo` belongs to, the same for every clone of one repository (README "A fleet of
    clones"): `name:<name>` when the configuration names the repo; else `git:<root commit>@<origin's URL>`
    (the oldest root commit; the URL without a trailing `/` or `.git`); else, with no commit or no
    `origin` remote, the repo's path (a repo nobody cloned is its only copy)."""
    if name:
        return f"name:{name}"
    try:
        roots = git(repo, "rev-list", "--max-parents=0", "HEAD").split()
        url = git(repo, "remote", "get-url", "origin")
    except OhdError:
        return str(repo)
    url = re.sub(r"/*(?:\.git)?/*$", "", url)       # what the URLs of one repository's clones may differ in
    if not roots or not url:
        return str(repo)
    return f"git:{sorted(roots)[0]}@{url}"
