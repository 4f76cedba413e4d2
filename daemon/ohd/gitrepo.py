"""Git plumbing by subprocess, and `ohd init` (prepare a repo for ohd).

`init_repo` is idempotent: it creates `tasks.d/` with example task files (never
overwriting one that exists), and adds ohd's own paths to `.git/info/exclude` once.
"""

from __future__ import annotations

import re
import subprocess
from importlib import resources
from pathlib import Path

from ohd.errors import OhdError

EXCLUDES = (".ohd/", "tasks.d/.done/", "tasks.d/.rejected/", "*.ohd-new")
EXAMPLES = ("unit-test.yaml", "docstring.yaml", "review.yaml", "custom.yaml")
EXAMPLE_TARGET = "daemon/ohd/clock.py"


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


def init_repo(repo: Path) -> list[str]:
    """Prepare `repo` for ohd; returns one line per thing done."""
    if not repo.is_dir():
        raise OhdError(f"{repo} is not a directory")
    done = [f"repo: {repo}"]
    tasks_dir = repo / "tasks.d"
    (tasks_dir / "examples").mkdir(parents=True, exist_ok=True)
    target = _example_target(repo)
    for name in EXAMPLES:
        path = tasks_dir / "examples" / name
        if path.exists():
            continue
        text = resources.files("ohd").joinpath("examples", name).read_text(encoding="utf-8")
        path.write_text(text.replace(f"target: {EXAMPLE_TARGET}", f"target: {target}"), encoding="utf-8")
        done.append(f"wrote {path.relative_to(repo)}")
    done.extend(_exclude(repo))
    done.append(f"next: cp tasks.d/examples/unit-test.yaml tasks.d/my-task.yaml (target: {target})")
    return done


def _example_target(repo: Path) -> str:
    if (repo / EXAMPLE_TARGET).is_file():
        return EXAMPLE_TARGET
    files = python_files(repo)
    return files[0] if files else "src/app/module.py"


def _exclude(repo: Path) -> list[str]:
    gdir = git_dir(repo)
    if gdir is None:
        return ["not a git repo: skipped .git/info/exclude (add .ohd/ to your ignore rules)"]
    exclude = gdir / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    text = exclude.read_text(encoding="utf-8") if exclude.exists() else ""
    present = set(re.split(r"\r?\n", text))
    missing = [e for e in EXCLUDES if e not in present]
    if not missing:
        return []
    block = ("" if text.endswith("\n") or not text else "\n") + "# ohd\n" + "\n".join(missing) + "\n"
    with open(exclude, "a", encoding="utf-8") as handle:
        handle.write(block)
    return [f"added {', '.join(missing)} to {exclude}"]
