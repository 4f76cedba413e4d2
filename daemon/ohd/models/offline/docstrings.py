"""The offline docstring answer: the module with a neutral one-line docstring where one is missing.

Pure. Invariant: only lines are inserted, each a docstring as the first statement of a
public function, method or class that had none, so the module's AST with docstrings
removed is unchanged. The text states the name and parameters and nothing it would have
to guess (no "Return the ..."). Bodies written on the `def` line itself are left alone.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator

from ohd.core.tasktypes import Job, fence
from ohd.models.offline.source import NOTE, Def, cannot, parse


def answer_docstring(job: Job) -> str:
    """One ```python block with the whole module, or prose saying why it cannot."""
    tree = parse(job.source)
    if isinstance(tree, str):
        return cannot(job, f"the target does not parse ({tree}); fix it and retry the task")
    insertions = sorted(_insertions(job.source, tree), reverse=True)
    lines = job.source.split("\n")   # the line breaks the AST counts (not str.splitlines')
    end = "\r" if lines[0].endswith("\r") else ""
    for index, indent, text in insertions:
        lines.insert(index, f'{indent}"""{text}"""{end}')
    module = "\n".join(lines)
    return (f"The module with {len(insertions)} one-line docstring(s) added by the {NOTE}; they "
            f"name the parameters only, so describe the behaviour yourself.\n\n"
            f"{fence(module, 'python')}\n")


def _documentable(body: list[ast.stmt]) -> Iterator[Def]:
    """Public functions and classes in `body`, and the public methods of classes, recursively."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if not node.name.startswith("_"):
                yield node
            if isinstance(node, ast.ClassDef):
                yield from _documentable(node.body)


def _insertions(source: str, tree: ast.Module) -> Iterator[tuple[int, str, str]]:
    """(0-based line index, indentation, text) for each docstring to insert."""
    lines = source.split("\n")
    for node in _documentable(tree.body):
        if ast.get_docstring(node, clean=False) is not None:
            continue
        first = node.body[0]
        decorators = getattr(first, "decorator_list", [])
        start = min([first.lineno, *(d.lineno for d in decorators)])
        line = lines[start - 1]
        indent = line[: len(line) - len(line.lstrip())]
        col = min([first.col_offset, *(d.col_offset - 1 for d in decorators)])
        if line.encode()[:col].decode(errors="replace").strip():
            continue  # `def f(): return 1` — the body shares the header's line
        yield start - 1, indent, describe(node)


def describe(node: Def) -> str:
    """`name: parameters a, b.` — what the code states, nothing more."""
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(b for b in map(ast.unparse, node.bases) if re.fullmatch(r"[\w.]+", b))
        return f"{node.name}: class{f' based on {bases}' if bases else ''}."
    a = node.args
    names = [p.arg for p in (*a.posonlyargs, *a.args)]
    if names and names[0] in ("self", "cls"):
        names = names[1:]
    names += [f"*{a.vararg.arg}"] if a.vararg else []
    names += [p.arg for p in a.kwonlyargs] + ([f"**{a.kwarg.arg}"] if a.kwarg else [])
    kind = "coroutine function" if isinstance(node, ast.AsyncFunctionDef) else "function"
    return f"{node.name}: {kind}, parameters {', '.join(names)}." if names else f"{node.name}: {kind}, no parameters."
