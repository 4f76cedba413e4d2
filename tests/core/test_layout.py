"""A repo's on-disk layout has one owner, `ohd.core.layout` (issue 12): no other module spells it.

The names are those of the layout module's public constants (strings, and the strings in its
tuples and sets). Checked with `ast` over every module of the package but the layout module:
no module-level constant holds one (`TASKS_DIR = "tasks.d"`, a set of skipped folders, a
pattern of candidate names), and no string literal anywhere is one or has one as a `/`-part
(`"tasks.d"`, `f"{name}.error.txt"`, `".ohd/"`, `"is inside .git/"`). Docstrings are prose and not checked; so are
words ("rejected", "examples", "inbox"): they name folders ohd uses but also outcomes and the
package's own data folder, and finding them would find nothing but those.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import ohd
from ohd.core import layout

PACKAGE = Path(ohd.__file__).resolve().parent
LAYOUT = Path(layout.__file__).resolve()
# literals that are not about where ohd keeps things, each with its reason
ALLOWED = {
    ("core/tasktypes.py", ".yaml"): "a file's language by its suffix, not where ohd looks for tasks",
    ("core/tasktypes.py", ".yml"): "a file's language by its suffix, not where ohd looks for tasks",
}


def layout_names() -> set[str]:
    names: set[str] = set()
    for key, value in vars(layout).items():
        if key.isupper() and not key.startswith("_"):
            values = value if isinstance(value, tuple | frozenset) else (value,)
            names |= {v for v in values if isinstance(v, str)}
    return {name for name in names if not re.fullmatch(r"[a-z]+", name)}


NAMES = layout_names()


def modules() -> list[tuple[str, str]]:
    """`(path in the package, source)` of each module but the layout module."""
    return [(p.relative_to(PACKAGE).as_posix(), p.read_text(encoding="utf-8"))
            for p in sorted(PACKAGE.rglob("*.py")) if p.resolve() != LAYOUT]


def docstrings(tree: ast.Module) -> frozenset[int]:
    """The ids of the docstring nodes of the module, its classes and functions."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return frozenset(found)


def strings(node: ast.AST, skip: frozenset[int] = frozenset()) -> Iterator[ast.Constant]:
    for child in ast.walk(node):
        if isinstance(child, ast.Constant) and isinstance(child.value, str) and id(child) not in skip:
            yield child


def spelled(text: str) -> set[str]:
    """The layout names `text` is or has as a word or a `/`-separated part (messages too: "is
    inside tasks.d/", "`*.ohd-new`")."""
    words = {word.lstrip("`'\"(*").rstrip("`'\"),:;.") for word in re.split(r"[\s/]+", text)}
    return {name for name in NAMES if text == name or name in words}


def module_constants(tree: ast.Module) -> Iterator[tuple[str, ast.AST]]:
    """`(name, value)` of each module-level assignment, `if` and `try` bodies included."""
    body = list(tree.body)
    while body:
        node = body.pop(0)
        if isinstance(node, ast.If | ast.Try):
            body += node.body + node.orelse + getattr(node, "finalbody", [])
        elif isinstance(node, ast.Assign) and node.value is not None:
            for target in node.targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        yield name.id, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None and isinstance(node.target, ast.Name):
            yield node.target.id, node.value


def constants_with_names(rel: str, source: str) -> list[str]:
    found = []
    for name, value in module_constants(ast.parse(source)):
        held = {n for s in strings(value) for n in NAMES if n in s.value}
        if held:
            found.append(f"{rel}: {name} holds {sorted(held)}")
    return found


def literals_with_names(rel: str, source: str) -> list[str]:
    tree = ast.parse(source)
    found = []
    for node in sorted(strings(tree, docstrings(tree)), key=lambda n: (n.lineno, n.col_offset)):
        names = {n for n in spelled(node.value) if (rel, n) not in ALLOWED}
        if names:
            found.append(f"{rel}:{node.lineno}: {node.value!r} spells {sorted(names)}")
    return found


def test_the_layout_has_the_names_it_is_checked_for() -> None:
    """The check is only as good as its list: the names of issue 12 are all in it."""
    assert {"tasks.d", ".done", ".rejected", ".yaml", ".yml", ".error.txt", ".ohd", ".ohd-new", ".git",
            ".event", ".ohd-chained", ".venv", "__pycache__", "node_modules", "test_ohd_candidate_",
            "ohd.db", "ohd.sock", "ohd.lock"} <= NAMES
    assert len(modules()) > 50 and "intake/ingest.py" in dict(modules())


def test_no_module_but_the_layout_defines_a_constant_for_an_on_disk_name() -> None:
    found = [line for rel, source in modules() for line in constants_with_names(rel, source)]
    assert found == [], "on-disk names belong in ohd/core/layout.py:\n" + "\n".join(found)


def test_no_module_but_the_layout_spells_an_on_disk_name() -> None:
    found = [line for rel, source in modules() for line in literals_with_names(rel, source)]
    assert found == [], "use the names of ohd/core/layout.py:\n" + "\n".join(found)


def test_the_check_finds_what_it_is_for() -> None:
    """The scan itself, on a module written to break the rule in each way it knows."""
    source = ('"""tasks.d in a docstring is prose."""\n'
              'TASKS_DIR = "tasks.d"\n'
              'SKIPPED: frozenset[str] = frozenset({".venv", "x"})\n'
              'NAME = re.compile(r"test_ohd_candidate_[0-9a-f]{10}")\n'
              'def f(name):\n'
              '    """So is .ohd-new here."""\n'
              '    return (f"{name}.error.txt",\n'
              '            "x/.ohd/y", "rejected", "*.yaml", "is in tasks.d/")\n')
    assert constants_with_names("probe.py", source) == [
        "probe.py: TASKS_DIR holds ['tasks.d']", "probe.py: SKIPPED holds ['.venv']",
        "probe.py: NAME holds ['test_ohd_candidate_']"]
    assert literals_with_names("probe.py", source) == [
        "probe.py:2: 'tasks.d' spells ['tasks.d']", "probe.py:3: '.venv' spells ['.venv']",
        "probe.py:7: '.error.txt' spells ['.error.txt']", "probe.py:8: 'x/.ohd/y' spells ['.ohd']",
        "probe.py:8: '*.yaml' spells ['.yaml']", "probe.py:8: 'is in tasks.d/' spells ['tasks.d']"]


def test_the_hook_scripts_spell_the_layout_s_spool_and_chained_names() -> None:
    """The git hooks are shell and cannot import the layout: they must agree with it."""
    spool = "/".join(layout.SPOOL_PARTS)
    for name in ("pre-commit", "post-commit"):
        script = (PACKAGE / "githooks" / name).read_text(encoding="utf-8")
        assert f"spool=$common/{spool}\n" in script, name
        assert f"name=$spool/{name}-$${layout.EVENT_SUFFIX}\n" in script, name
        assert f'"$0{layout.CHAINED_SUFFIX}"' in script, name
