"""AST facts behind the validation rules: what a test checks, and a module's code without docstrings.

Pure: trees in, facts out; `validate` turns them into rule results. Invariant: a test
counts as checking the target only when one of its checks (an `assert`, `pytest.raises`
or `pytest.warns`, a `self.assert*` call, a call to a module helper that asserts) uses
a name that comes from the target module: imported from it, or derived from such a name
(a local assigned from it, a module-level helper or fixture built on it). Unknown
fixtures (from a conftest this room cannot see) are given the benefit of the doubt.
"""

from __future__ import annotations

import ast
import copy
import io
import logging
import tokenize
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ohd.core import pyparse

log = logging.getLogger("ohd.astrules")

Func = ast.FunctionDef | ast.AsyncFunctionDef
# pytest's own fixtures: a parameter with one of these names says nothing about the target
BUILTIN_FIXTURES = frozenset({
    "tmp_path", "tmp_path_factory", "tmpdir", "tmpdir_factory", "monkeypatch", "capsys", "capsysbinary",
    "capfd", "capfdbinary", "caplog", "recwarn", "request", "pytestconfig", "record_property",
    "record_testsuite_property", "record_xml_attribute", "cache", "doctest_namespace", "self", "cls"})


@dataclass(frozen=True, slots=True)
class TestCheck:
    """One test function: its name, whether it checks anything, whether a check uses the target."""

    __test__ = False   # not a pytest class

    name: str
    checks: int
    uses_target: bool
    calls_target: bool = False   # it calls something from the target (not only checks that it exists)


def names_in(node: ast.AST | None) -> set[str]:
    """Every name read in `node` (the first part of `a.b.c` included)."""
    if node is None:
        return set()
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def imported_names(tree: ast.Module, module: str) -> set[str]:
    """Names that import statements bind to `module` or to something inside it."""
    parent, _, leaf = module.rpartition(".")
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == module or alias.name.startswith(module + "."):
                    bound.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            inside = node.module == module or node.module.startswith(module + ".")
            for alias in node.names:
                if inside or (node.module == parent and alias.name == leaf):
                    bound.add(alias.asname or alias.name)
    bound |= {name for name, imported in dynamic_imports(tree)
              if imported == module or imported.startswith(module + ".")}
    return bound


def dynamic_imports(tree: ast.Module) -> list[tuple[str, str]]:
    """(name, module) for each top-level `name = importlib.import_module("dotted.name")`: the
    module object itself, which `import pkg.mod as name` is not when `pkg` rebinds `mod`."""
    found: list[tuple[str, str]] = []
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and isinstance(call := node.value, ast.Call) and len(call.args) == 1 and not call.keywords
                and isinstance(arg := call.args[0], ast.Constant) and isinstance(arg.value, str)):
            continue
        func = call.func
        if (isinstance(func, ast.Attribute) and func.attr == "import_module" and isinstance(func.value, ast.Name)
                and func.value.id == "importlib") or (isinstance(func, ast.Name) and func.id == "import_module"):
            found.append((node.targets[0].id, arg.value))
    return found


def target_names(tree: ast.Module, module: str) -> set[str]:
    """Imported names plus module-level helpers, fixtures and constants built on them."""
    names = imported_names(tree, module)
    while True:
        grown = set(names)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if not node.name.startswith(("test_", "Test")) and names_in(node) & names:
                    grown.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)) and names_in(node.value) & names:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                grown |= set().union(*(names_in(t) for t in targets))
        if grown == names:
            return names
        names = grown


def test_checks(tree: ast.Module, module: str) -> list[TestCheck]:
    """What each collected test function checks (top-level `test_*`, `test_*` in `Test*` classes)."""
    known = target_names(tree, module)
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    asserting = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and not n.name.startswith("test_") and _has_assert(n)}
    found: list[TestCheck] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
            found.append(_check_test(node, node.name, known, defined, asserting))
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            helpers = [m for m in node.body if not (isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))
                                                    and m.name.startswith("test_"))]
            own = known | ({"self"} if any(names_in(m) & known for m in helpers) else set())
            found.extend(_check_test(m, f"{node.name}.{m.name}", own, defined, asserting) for m in node.body
                         if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and m.name.startswith("test_"))
    return found


def trivial_asserts(tree: ast.Module) -> list[int]:
    """Lines of `assert <truthy constant>` (`assert True`, `assert 1`): checks that cannot fail."""
    return [n.lineno for n in ast.walk(tree)
            if isinstance(n, ast.Assert) and isinstance(n.test, ast.Constant) and bool(n.test.value)]


def _has_assert(func: Func) -> bool:
    return any(isinstance(n, ast.Assert) or _is_check_call(n) for n in ast.walk(func))


def _check_test(func: Func, name: str, known: set[str], defined: set[str], asserting: set[str]) -> TestCheck:
    tainted = known | _params(func, known, defined)
    for _ in range(2):   # twice, so that an assignment later in the text still counts
        for node in ast.walk(func):
            tainted |= _assigned_from(node, tainted)
    checks, uses = 0, False
    for node in ast.walk(func):
        used = _check_uses(node, tainted, asserting)
        if used is not None:
            checks += 1
            uses = uses or used
    calls = any(isinstance(n, ast.Call) and names_in(n.func) & tainted for n in ast.walk(func))
    return TestCheck(name, checks, uses, calls)


def _params(func: Func, known: set[str], defined: set[str]) -> set[str]:
    """Parameters that may hold target values: fixtures built on the target, or unknown ones."""
    args = func.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    parametrized: dict[str, bool] = {}
    for deco in func.decorator_list:
        if isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute) and deco.func.attr == "parametrize":
            first = deco.args[0] if deco.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                uses = bool(names_in(deco) & known)
                parametrized.update({p.strip(): uses for p in first.value.split(",")})
    out: set[str] = set()
    for param in names:
        if param in parametrized:
            if parametrized[param]:
                out.add(param)
        elif param in known or (param not in defined and param not in BUILTIN_FIXTURES):
            out.add(param)
    return out


def _assigned_from(node: ast.AST, tainted: set[str]) -> set[str]:
    """Names bound by `node` from a value that uses a tainted name."""
    if isinstance(node, ast.Assign) and names_in(node.value) & tainted:
        return set().union(*(_bound(t) for t in node.targets))
    if isinstance(node, (ast.AnnAssign, ast.AugAssign, ast.NamedExpr)) and names_in(node.value) & tainted:
        return _bound(node.target)
    if isinstance(node, (ast.For, ast.AsyncFor)) and names_in(node.iter) & tainted:
        return _bound(node.target)
    if isinstance(node, (ast.With, ast.AsyncWith)):
        return set().union(set(), *(_bound(i.optional_vars) for i in node.items
                                    if i.optional_vars is not None and names_in(i.context_expr) & tainted))
    return set()


def _bound(target: ast.AST) -> set[str]:
    """`x`, `a, b`, `obj.attr` (taints `obj`), `d[k]` (taints `d`)."""
    return names_in(target)


def _check_uses(node: ast.AST, tainted: set[str], asserting: set[str]) -> bool | None:
    """None: `node` is no check; else whether the check uses a tainted name."""
    if isinstance(node, ast.Assert):
        if isinstance(node.test, ast.Constant):
            return None if bool(node.test.value) else False   # `assert True` checks nothing
        return bool(names_in(node.test) & tainted)
    if isinstance(node, (ast.With, ast.AsyncWith)):
        for item in node.items:
            if _is_check_call(item.context_expr):
                return bool((names_in(item.context_expr) | _names_of(node.body)) & tainted)
        return None
    if isinstance(node, ast.Call) and _is_check_call(node) and not _in_with(node):
        return bool(names_in(node) & tainted)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in asserting:
        return bool(names_in(node) & tainted) or node.func.id in tainted
    return None


def _in_with(call: ast.Call) -> bool:
    """`pytest.raises(E)` with only the exception is the context manager form (counted at the with)."""
    return len(call.args) <= 1 and not any(k.arg not in ("match", "expected_exception") for k in call.keywords)


def _is_check_call(node: ast.AST) -> bool:
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        return False
    owner, attr = node.func.value, node.func.attr
    return isinstance(owner, ast.Name) and ((owner.id == "pytest" and attr in ("raises", "warns"))
                                            or (owner.id == "self" and attr.startswith("assert")))


def _names_of(body: Iterable[ast.stmt]) -> set[str]:
    return set().union(set(), *(names_in(stmt) for stmt in body))


def defined_names(tree: ast.Module) -> set[str]:
    """Every function, class and method the module defines, and its top-level assigned names."""
    names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


# --- docstrings --------------------------------------------------------------------------


def code_shape(tree: ast.Module) -> list[tuple[str, str]]:
    """(label, AST dump) per top-level statement, docstrings and `pass`/`...` bodies left out.

    Two modules whose shapes are equal differ only in docstrings, comments and layout.
    """
    stripped = copy.deepcopy(tree)
    for node in ast.walk(stripped):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            node.body = [s for i, s in enumerate(node.body) if not (_is_docstring(s) and i == 0)
                         and not _is_filler(s)]
    return [(_label(s), ast.dump(s, include_attributes=False)) for s in stripped.body]


def first_difference(before: list[tuple[str, str]], after: list[tuple[str, str]]) -> str | None:
    """The label of the first statement that differs (or was added/removed), None if equal."""
    for (label_a, dump_a), (label_b, dump_b) in zip(before, after, strict=False):
        if dump_a != dump_b:
            return label_b if label_a == label_b else f"{label_a} (now {label_b})"
    if len(before) != len(after):
        longer = before if len(before) > len(after) else after
        verb = "removed" if longer is before else "added"
        return f"{longer[min(len(before), len(after))][0]} ({verb})"
    return None


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def _is_filler(stmt: ast.stmt) -> bool:
    """`pass` and a bare `...`: a docstring may take their place in a body."""
    return isinstance(stmt, ast.Pass) or (
        isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and stmt.value.value is Ellipsis)


def docstring_change(before: str, after: str) -> str | None:
    """None when `after` is `before` with docstrings added or changed and nothing else
    (code, comments, layout, line endings); else what differs first. A module that does
    not parse differs."""
    try:
        old, new = pyparse.parse(before), pyparse.parse(after)
    except (SyntaxError, ValueError) as exc:
        return f"a module does not parse ({exc})"
    where = first_difference(code_shape(old), code_shape(new))
    if where:
        return f"the code changed (first at {where})"
    if ("\r\n" in before) != ("\r\n" in after):
        return "the line endings changed"
    return layout_difference(before, after)


def layout_difference(before: str, after: str) -> str | None:
    """Where `after` changes comments or layout outside docstrings, None if it does not.

    Both must parse. Compares the token streams (comments included) with the text
    between tokens on a line, leaving out docstrings, `pass`/`...` bodies a docstring
    may replace, the blank lines next to them, indentation tokens (the indentation is
    compared as the text before a line's first token), trailing whitespace, line endings
    (CRLF or LF: a model answers with LF) and blank lines at the end. So
    `x=1` for `x = 1`, a call split over two lines, a comment added, changed or
    dropped all count; a docstring added, changed or moved onto its own line does not.
    """
    try:
        old, new = _layout(before), _layout(after)
    except (tokenize.TokenError, SyntaxError) as exc:
        return f"the module cannot be tokenized ({exc})"
    i = j = 0
    while i < len(old) or j < len(new):
        a, b = (old[i] if i < len(old) else None), (new[j] if j < len(new) else None)
        if a is _GAP or b is _GAP:          # a docstring's place: the other side's blank lines there
            i, j = i + (a is _GAP), j + (b is _GAP)
            while a is not _GAP and i < len(old) and _blank(old[i]):
                i += 1
            while b is not _GAP and j < len(new) and _blank(new[j]):
                j += 1
        elif a is not None and b is not None and a[0] == b[0]:
            i, j = i + 1, j + 1
        else:
            return _where(a, b)
    return None


_Item = tuple[tuple[int, str, str], int, str]     # ((type, text, text before it), line, the line's text)
_Layout = list[_Item]
_NOT_COMPARED = frozenset({tokenize.INDENT, tokenize.DEDENT, tokenize.NEWLINE, tokenize.ENDMARKER,
                           tokenize.ENCODING})
_GAP = ((-1, "", ""), 0, "")    # where a docstring or a filler was left out


def _layout(source: str) -> _Layout:
    lines = source.splitlines(keepends=True)
    spans = list(_docstring_spans(pyparse.parse(source), lines))
    items: _Layout = []
    prev_end: tuple[int, int] | None = None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING):
            continue
        row, col = tok.start
        text = lines[row - 1] if row <= len(lines) else ""
        gap = text[prev_end[1]:col] if prev_end is not None and prev_end[0] == row else text[:col]
        prev_end = tok.end
        if any(start <= tok.start and tok.end <= end for start, end in spans):
            items.append(_GAP)
            continue
        if tok.type in _NOT_COMPARED:
            continue
        if tok.type == tokenize.NL:
            gap = ""                    # trailing whitespace is not layout
        items.append(((tok.type, tok.string.replace("\r\n", "\n"), gap), row, text.strip()))
    while items and _blank(items[-1]):      # blank lines at the end: an answer's file ends with one newline
        items.pop()
    return _merge_gaps(items)


def _blank(item: _Item) -> bool:
    return item[0][0] == tokenize.NL and not item[2]


def _merge_gaps(items: _Layout) -> _Layout:
    """One gap for each run of docstrings, fillers and the blank lines around them (a
    docstring brings or takes its blank line)."""
    merged: _Layout = []
    for item in items:
        if item is _GAP:
            while merged and (merged[-1] is _GAP or _blank(merged[-1])):
                merged.pop()
            merged.append(_GAP)
        elif not (merged and merged[-1] is _GAP and _blank(item)):
            merged.append(item)
    return merged


def _docstring_spans(tree: ast.Module, lines: list[str]) -> Iterator[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) token positions of every docstring and every `pass`/`...` body filler."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            for i, stmt in enumerate(node.body):
                if (i == 0 and _is_docstring(stmt)) or _is_filler(stmt):
                    yield (_position(lines, stmt.lineno, stmt.col_offset),
                           _position(lines, stmt.end_lineno or stmt.lineno, stmt.end_col_offset or 0))


def _position(lines: list[str], row: int, byte_col: int) -> tuple[int, int]:
    """An AST position (UTF-8 byte column) as a tokenize position (character column)."""
    text = lines[row - 1] if row <= len(lines) else ""
    return row, len(text.encode("utf-8")[:byte_col].decode("utf-8", errors="ignore"))


def _where(before: _Item | None, after: _Item | None) -> str:
    """What the first differing token says: a comment added, removed or changed, or the layout."""
    kind_a = before[0][0] if before else None
    kind_b = after[0][0] if after else None
    if kind_a == tokenize.COMMENT and kind_b != tokenize.COMMENT:
        return f"a comment was removed ({_line(before, ' of the original')})"
    if kind_b == tokenize.COMMENT:
        changed = "changed" if kind_a == tokenize.COMMENT else "was added"
        return f"a comment {changed} ({_line(after, '')})"
    return f"the layout changed ({_line(after, '') if after else _line(before, ' of the original')})"


def _line(item: _Item | None, of: str) -> str:
    if item is None:
        return "at the end"
    _, line, text = item
    shown = text if len(text) <= 80 else text[:77] + "..."
    return f"line {line}{of}: `{shown}`" if shown else f"line {line}{of}, a blank line"


def _label(stmt: ast.stmt) -> str:
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return f"def {stmt.name}"
    if isinstance(stmt, ast.ClassDef):
        return f"class {stmt.name}"
    return f"the statement at line {stmt.lineno}"
