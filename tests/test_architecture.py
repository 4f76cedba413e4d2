"""The architecture is checked, not remembered: import-linter contracts, mypy --strict, ruff, and
the tests' folders, which follow the package's."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "daemon" / "ohd"
TESTS = ROOT / "tests"
# the folders of tests that cross the package's: real daemons (e2e, reliability), fixtures, fakes
CROSS_CUTTING = {"e2e", "reliability", "projects", "support"}
# at tests/ beside the top-level modules' tests: the checks of the whole repo
WHOLE_REPO = {"test_architecture.py", "test_docs.py", "test_projects.py"}


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


def test_each_unit_test_sits_in_the_folder_of_its_package() -> None:
    """tests/<folder>/ holds the tests of daemon/ohd/<folder>/ (one named for a module, `test_<module>.py`,
    in that module's folder); tests/ itself only those of the top-level modules and WHOLE_REPO. Each
    folder is a package, so two of them may hold files of the same name."""
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    home = {f"test_{p.stem}.py": "." for p in PACKAGE.glob("*.py") if not p.name.startswith("_")}
    for folder in folders:
        home[f"test_{folder}.py"] = folder
        for module in (PACKAGE / folder).iterdir():
            if not module.name.startswith("_") and (module.suffix == ".py" or (module / "__init__.py").is_file()):
                home[f"test_{module.stem}.py"] = folder
    wrong = [f"tests/{p.name}: not a top-level module's test nor a whole-repo check: it belongs in tests/"
             + (f"{home[p.name]}/" if p.name in home else "<the folder of its subject>/")
             for p in sorted(TESTS.glob("test_*.py")) if home.get(p.name) != "." and p.name not in WHOLE_REPO]
    for sub in sorted(p for p in TESTS.iterdir() if p.is_dir() and p.name not in CROSS_CUTTING | {"__pycache__"}):
        if sub.name not in folders:
            wrong.append(f"tests/{sub.name}/: no package daemon/ohd/{sub.name}/")
        elif not (sub / "__init__.py").is_file():
            wrong.append(f"tests/{sub.name}/: no __init__.py")
        wrong += [f"tests/{sub.name}/{p.name}: its module is in {home[p.name]}/, the test belongs in tests/"
                  + ("" if home[p.name] == "." else f"{home[p.name]}/")
                  for p in sorted(sub.glob("test_*.py")) if home.get(p.name, sub.name) != sub.name]
    assert wrong == []
