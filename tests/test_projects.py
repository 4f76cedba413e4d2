"""The shape packages of tests/projects/ (real-project shapes for the realworld checks) and the
docstring-only comparison that the bench and the shape tests judge tracked files with."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.gitrepo import git
from tests.support.projects import (
    LARGE_MODULE_LINES,
    MODULES,
    SHAPES,
    copy_project,
    only_docstrings_differ,
)


@pytest.mark.parametrize("shape", SHAPES)
def test_each_shape_is_a_clean_repo_whose_own_suite_passes(shape: str, tmp_path: Path) -> None:
    repo = copy_project(shape, tmp_path / shape)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=repo,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed" in done.stdout and "failed" not in done.stdout
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == ""
    assert all((repo / module).is_file() for module in MODULES[shape])


def test_the_large_module_has_the_size_of_the_issue(tmp_path: Path) -> None:
    repo = copy_project("large_module", tmp_path / "big")
    assert (repo / "bigmod" / "more.py").read_text().count("\n") >= LARGE_MODULE_LINES


def test_the_name_clash_shape_binds_the_function_not_the_module(tmp_path: Path) -> None:
    """The defect 3 shape: `import slug.slug as m` gives the re-exported function."""
    repo = copy_project("reexport_clash", tmp_path / "clash")
    probe = "import importlib, slug.slug as m; print(callable(m), importlib.import_module('slug.slug').__name__)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=repo, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["True", "slug.slug"], done.stderr


def test_an_unknown_shape_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown shape 'flat'"):
        copy_project("flat", tmp_path / "x")


ORIGINAL = 'import os\n\n\ndef f(x):\n    return x + 1  # one more\n\n\nclass A:\n    def g(self):\n        pass\n'


def test_added_and_changed_docstrings_are_the_only_difference() -> None:
    documented = ('"""The module."""\n\nimport os\n\n\ndef f(x):\n    """Add one.\n\n    x: a number.\n    """\n'
                  '    return x + 1  # one more\n\n\nclass A:\n    """A class."""\n\n    def g(self):\n'
                  '        """Nothing."""\n        pass\n')
    assert only_docstrings_differ(ORIGINAL, documented)
    assert only_docstrings_differ(documented, documented.replace("Add one.", "Add 1."))
    assert only_docstrings_differ(documented, ORIGINAL)


@pytest.mark.parametrize("changed", [
    ORIGINAL.replace("x + 1", "x + 2"),                       # code
    ORIGINAL.replace("# one more", "# plus one"),            # a comment
    ORIGINAL.replace("x + 1  #", "(x + 1)  #"),              # formatting that keeps the AST
    ORIGINAL.replace("        pass", "          pass"),      # indentation
    ORIGINAL.replace("import os\n", "import os\nx = 'not a docstring'\n"),   # a string that is not one
    "def broken(:\n",                                         # does not parse
])
def test_anything_else_is_a_difference(changed: str) -> None:
    assert not only_docstrings_differ(ORIGINAL, changed)
