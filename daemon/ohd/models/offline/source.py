"""What the offline provider reads from a target: its AST, the names it binds, parameters.

Pure and shared by the offline answers. Invariant: every helper errs on the side of
"not sure" — a name bound twice, rebound through `global` or deleted is never trusted.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator

from ohd.core import pyparse
from ohd.core.tasktypes import Job

NOTE = "ohd offline provider (no API key is configured, so no language model was asked)"

Def = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def parse(source: str) -> ast.Module | str:
    """The module, or a description of why it does not parse."""
    try:
        return pyparse.parse(source)
    except SyntaxError as exc:
        return f"{exc.msg} at line {exc.lineno}"
    except ValueError as exc:  # a NUL byte
        return str(exc)


def cannot(job: Job, reason: str) -> str:
    """Prose without a code block: extraction fails and the reason reaches the task's report."""
    return f"The {NOTE} cannot do this `{job.task_type}` task for `{job.target}`: {reason}."


def bound_in(statements: list[ast.stmt]) -> Iterator[str]:
    """Every name a block binds (or deletes); nested blocks too, conservatively."""
    for stmt in statements:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield stmt.name
            continue
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
                yield node.id
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield node.name
            elif isinstance(node, ast.alias):
                yield (node.asname or node.name).split(".")[0]
            elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
                yield node.name


def repeated(names: Iterator[str]) -> set[str]:
    """The names that occur more than once."""
    seen: set[str] = set()
    twice: set[str] = set()
    for name in names:
        (twice if name in seen else seen).add(name)
    return twice


def rebound_names(tree: ast.Module) -> set[str]:
    """Top-level names bound more than once, or rebound through `global`: not trusted."""
    globals_ = {name for node in ast.walk(tree) if isinstance(node, ast.Global) for name in node.names}
    return globals_ | repeated(bound_in(tree.body))


def public_defs(body: list[ast.stmt], rebound: set[str]) -> list[Def]:
    """Public defs and classes directly in `body` whose name nothing else binds."""
    return [node for node in body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and not node.name.startswith("_") and node.name not in rebound]


def params(func: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """Parameter names in `inspect.signature` order (self included)."""
    a = func.args
    names = [p.arg for p in (*a.posonlyargs, *a.args)]
    names += [a.vararg.arg] if a.vararg else []
    names += [p.arg for p in a.kwonlyargs]
    return names + ([a.kwarg.arg] if a.kwarg else [])


def without_docstring(body: list[ast.stmt]) -> list[ast.stmt]:
    """A body's statements after its docstring, if it has one."""
    first = body[0] if body else None
    is_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
        first.value.value, str)
    return body[1:] if is_doc else body
