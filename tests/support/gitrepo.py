"""A real git repository in a temp dir, with a small real module to work on."""

from __future__ import annotations

import subprocess
from importlib import resources
from pathlib import Path

# The same small real module that `ohd demo` uses, shipped inside the package.
PRICING = resources.files("ohd").joinpath("examples", "pricing.py").read_text(encoding="utf-8")


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True)
    return out.stdout


def make_repo(root: Path) -> Path:
    """A git repo with `shop/pricing.py` (a package), an empty `tests/` and one commit."""
    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "test@example.com")
    git(root, "config", "user.name", "Test")
    (root / "shop").mkdir()
    (root / "shop" / "__init__.py").write_text("")
    (root / "shop" / "pricing.py").write_text(PRICING)
    (root / "tests").mkdir()
    (root / "tests" / "__init__.py").write_text("")
    (root / "tasks.d").mkdir()
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "initial")
    return root
