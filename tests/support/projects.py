"""Small packages in the shapes of real PyPI projects (tests/projects/<shape>/), copied into a
tmp git repo, and the check that a changed file differs from its original only in docstrings.

The shapes are the ones bench/realworld.py runs ohd on for real (its PROJECTS name which):
- `src_layout`: `src/inipkg/` with `pythonpath = ["src"]` for pytest (iniconfig, tomli, packaging);
- `relative_imports`: a flat package whose modules import each other with `from .x import y` (boltons);
- `tests_in_package`: the tests live in `tinytoolz/tests/`, there is no top-level tests/ (toolz);
- `reexport_clash`: `slug/__init__.py` does `from .slug import *` and module `slug` defines `slug`,
  plus `from .__version__ import __version__` (python-slugify: `import slug.slug as m` binds the function);
- `version_reexport`: `from .package_data import __version__`, tests use `import verpkg as v` (idna);
- `large_module`: `bigmod/more.py` grown to 5,600 lines, re-exported by `from .more import *` (more-itertools).
Each carries its own tests, which pass on the code as it is: a test ohd quarantines there is a false alarm.
"""

from __future__ import annotations

import ast
import io
import shutil
import tokenize
from pathlib import Path

from tests.support.gitrepo import git

PROJECTS = Path(__file__).resolve().parent.parent / "projects"
SHAPES = ("src_layout", "relative_imports", "tests_in_package", "reexport_clash", "version_reexport",
          "large_module")
LARGE_MODULE_LINES = 5600

# shape -> the modules ohd is run on, their package's import name, and the repo's own test files
MODULES = {
    "src_layout": ("src/inipkg/parse.py",),
    "relative_imports": ("flatpkg/strutils.py", "flatpkg/typeutils.py"),
    "tests_in_package": ("tinytoolz/itertoolz.py",),
    "reexport_clash": ("slug/slug.py", "slug/__version__.py"),
    "version_reexport": ("verpkg/core.py", "verpkg/package_data.py"),
    "large_module": ("bigmod/more.py",),
}


def copy_project(shape: str, root: Path) -> Path:
    """`tests/projects/<shape>` as a git repo at `root` (one commit; `tasks.d/` untracked)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r} (one of: {', '.join(SHAPES)})")
    shutil.copytree(PROJECTS / shape, root, ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))
    if shape == "large_module":
        _grow(root / "bigmod" / "more.py", LARGE_MODULE_LINES)
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "test@example.com")
    git(root, "config", "user.name", "Test")
    (root / ".git" / "info" / "exclude").write_text("__pycache__/\n.pytest_cache/\n.coverage*\n")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", f"the {shape} shape")
    (root / "tasks.d").mkdir()
    return root


def _grow(path: Path, lines: int) -> None:
    """Append distinct functions of 20 lines each until the module has `lines` lines (a few
    hundred functions, as in more-itertools' `more.py`, not one per four lines: every
    function costs the offline provider a test and a docstring, and the suite its time)."""
    text = path.read_text(encoding="utf-8")
    parts, count, n = [text.rstrip("\n")], text.count("\n"), 0
    body = "".join("\n    y = y + 1" for _ in range(16))
    while count < lines:
        parts.append(f"\n\ndef offset_{n}(x):\n    y = x{body}\n    return y - 16 + {n}")
        count, n = count + 21, n + 1
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")


def outside_docstrings(source: str) -> list[tuple[str, str, int]]:
    """The source's tokens (type name, text, column) without its docstrings; two texts with
    equal results differ only in docstrings.

    Comments, line breaks and every other token's text and column count (blank lines do not), so
    reformatted or re-indented code or a changed comment is a difference: stricter than
    comparing ASTs on purpose."""
    docstrings = _docstring_starts(source)
    kept: list[tuple[str, str, int]] = []
    after_docstring = False
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.STRING and tok.start in docstrings:
            after_docstring = True      # its NEWLINE goes with it
            continue
        if tok.type == tokenize.NEWLINE and after_docstring:
            after_docstring = False
            continue
        if tok.type in (tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            continue    # blank lines may change around a docstring; the columns say the indentation
        after_docstring = False
        kept.append((tokenize.tok_name[tok.type], tok.string, tok.start[1]))
    return kept


def only_docstrings_differ(before: str, after: str) -> bool:
    """Whether `after` is `before` with docstrings added, changed or removed, and nothing else."""
    try:
        return outside_docstrings(before) == outside_docstrings(after)
    except (SyntaxError, tokenize.TokenError):
        return False


def _docstring_starts(source: str) -> set[tuple[int, int]]:
    """(line, column) where each module, class and function docstring begins."""
    starts = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                starts.add((first.value.lineno, first.value.col_offset))
    return starts
