"""The offline review answer: measurable facts about the target, in Markdown.

Pure. Invariant: every line of the review is a count or a location that anyone can
check in the source (line counts, top-level definitions, public definitions without a
docstring, functions longer than 50 lines, bare `except:`, TODO/FIXME lines, a non-Python
file's first line); no judgement is offered.
"""

from __future__ import annotations

import ast
import posixpath
import re

from ohd.core.tasktypes import Job
from ohd.models.offline.source import NOTE, Def, parse

LONG_FUNCTION = 50        # lines, decorators and docstring included
_MARKERS = re.compile(r"\b(TODO|FIXME|XXX|HACK)\b")
_SHOWN = 20               # locations listed per fact; the count is always complete


def answer_review(job: Job) -> str:
    """A Markdown review made of facts, with a note that no model wrote it."""
    lines = job.source.split("\n")
    blank = sum(1 for line in lines if not line.strip())
    facts = [f"- Lines: {len(job.source.splitlines())} ({blank} blank)"]
    if posixpath.splitext(job.target)[1] in (".py", ".pyi"):
        tree = parse(job.source)
        facts += _python_facts(tree) if isinstance(tree, ast.Module) else [
            f"- The file does not parse as Python: {tree}."]
    first = next(((n, line.strip()) for n, line in enumerate(lines, 1) if line.strip()), None)
    if first is not None and posixpath.splitext(job.target)[1] not in (".py", ".pyi"):
        facts.append(f"- First line: line {first[0]}: `{_short(first[1])}`")
    markers = [(n, line.strip()) for n, line in enumerate(lines, 1) if _MARKERS.search(line)]
    facts.append(_listed("TODO/FIXME lines", [f"line {n}: `{_short(text)}`" for n, text in markers]))
    return "\n".join([
        f"# Review of `{job.target}`", "",
        (f"*Written by the {NOTE}: these are measured facts, not a reviewer's judgement. "
         "Configure an API key for a real review.*"), "",
        "## Facts", "", *facts, ""])


def _python_facts(tree: ast.Module) -> list[str]:
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    undocumented = [f"`{name}` (line {node.lineno})" for name, node in _public(tree.body, "")
                    if ast.get_docstring(node, clean=False) is None]
    long = [f"`{n.name}` (line {n.lineno}, {_length(n)} lines)" for n in functions
            if _length(n) > LONG_FUNCTION]
    bare = [f"line {n.lineno}" for n in ast.walk(tree) if isinstance(n, ast.ExceptHandler) and n.type is None]
    defined = [f"`{name}` (line {node.lineno})" for name, node in _top_level(tree)]
    return [f"- Functions and methods: {len(functions)}; classes: {len(classes)}",
            _listed("Defined at the top level", defined),
            _listed("Public functions, classes and methods without a docstring", undocumented),
            _listed(f"Functions longer than {LONG_FUNCTION} lines", long),
            _listed("Bare `except:` clauses", bare)]


def _top_level(tree: ast.Module) -> list[tuple[str, ast.stmt]]:
    """(name, node) of the module's top-level functions, classes and assigned names."""
    found: list[tuple[str, ast.stmt]] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.append((node.name, node))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found += [(t.id, node) for t in targets if isinstance(t, ast.Name)]
    return found


def _public(body: list[ast.stmt], prefix: str) -> list[tuple[str, Def]]:
    """(qualified name, node) of public defs and classes, and of public methods in classes."""
    found: list[tuple[str, Def]] = []
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            found.append((prefix + node.name, node))
            if isinstance(node, ast.ClassDef):
                found += _public(node.body, f"{prefix}{node.name}.")
    return found


def _length(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    return (node.end_lineno or node.lineno) - start + 1


def _listed(title: str, items: list[str]) -> str:
    if not items:
        return f"- {title}: none"
    more = f", and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return f"- {title}: {len(items)} — " + ", ".join(items[:_SHOWN]) + more


def _short(text: str, width: int = 80) -> str:
    text = text.replace("`", "'")
    return text if len(text) <= width else text[: width - 1] + "…"
