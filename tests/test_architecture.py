"""The architecture is checked, not remembered: import-linter contracts, mypy --strict and ruff."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"{name} is not installed; run pip install -e '.[test]'"
    return found


def test_import_rules_hold() -> None:
    """The layers and forbidden imports of pyproject.toml (STYLE.md section 6.3)."""
    done = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_package_is_strictly_typed() -> None:
    done = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_package_passes_ruff() -> None:
    """ohd's own code under the rules it is held to (`[tool.ruff]` in pyproject.toml)."""
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "daemon/ohd"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
