"""Guard clauses: `if <condition on one parameter>: raise ValueError(...)` as a function's first step.

Pure. Such a guard can be tested without guessing: a value of the parameter that makes
the condition true is found by evaluating the condition here, with Python's own
operators, over a few candidates (None, 0, ±1 and the condition's constants, nudged).
Invariant: a `Guard` is returned only when calling the function with that value (and
None for every other required argument) must raise the exception before anything else
runs — otherwise None.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ohd.models.offline.source import params, without_docstring

EXCEPTIONS = frozenset({"ValueError", "TypeError", "KeyError", "IndexError", "LookupError",
                        "RuntimeError", "ArithmeticError", "ZeroDivisionError", "OverflowError"})
_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b, ast.Is: operator.is_, ast.IsNot: operator.is_not}


class _Unsupported:
    """The evaluator met a node kind (or an identity test) it does not model."""


_UNSUPPORTED = _Unsupported()


@dataclass(frozen=True, slots=True)
class Guard:
    """How to trip a function's guard: the exception, the call's argument source, the condition."""

    exception: str
    arguments: str
    condition: str


def find_guard(func: ast.FunctionDef, is_method: bool, module_names: set[str]) -> Guard | None:
    """The guard at the top of `func`, if it provably raises; `module_names` may shadow builtins."""
    body = without_docstring(func.body)
    if not body or not isinstance(body[0], ast.If) or not isinstance(body[0].body[0], ast.Raise):
        return None
    if any(isinstance(n, (ast.Yield, ast.YieldFrom, ast.Await)) for n in ast.walk(func)):
        return None  # a generator runs nothing when called
    condition, names = body[0].test, params(func)[1 if is_method else 0:]
    used = {n.id for n in ast.walk(condition) if isinstance(n, ast.Name)}
    if len(used) != 1 or not used <= set(names):
        return None
    [param] = used
    exception = _raised_name(body[0].body[0], param)
    if exception is None or exception in module_names:
        return None
    witness = _witness(condition, param)
    if witness is _UNSUPPORTED:
        return None
    arguments = _call_arguments(func, param, witness, is_method)
    if arguments is None:
        return None
    return Guard(exception, arguments, ast.unparse(condition))


def _raised_name(node: ast.Raise, param: str) -> str | None:
    """The builtin exception raised, if building it cannot fail (plain message arguments)."""
    exc = node.exc
    if node.cause is not None or exc is None:
        return None
    if isinstance(exc, ast.Call):
        if exc.keywords or not all(_plain_message(arg, param) for arg in exc.args):
            return None
        exc = exc.func
    return exc.id if isinstance(exc, ast.Name) and exc.id in EXCEPTIONS else None


def _plain_message(node: ast.expr, param: str) -> bool:
    """A constant, or an f-string that formats only the guarded parameter without a spec."""
    if isinstance(node, ast.Constant):
        return True
    return isinstance(node, ast.JoinedStr) and all(
        isinstance(v, ast.Constant) or (isinstance(v, ast.FormattedValue) and v.format_spec is None
                                        and isinstance(v.value, ast.Name) and v.value.id == param)
        for v in node.values)


def _witness(condition: ast.expr, param: str) -> object:
    """A value of `param` that makes `condition` true, checked by evaluating it, or _UNSUPPORTED."""
    candidates: list[object] = [None, 0, 1, -1]
    for node in ast.walk(condition):
        if isinstance(node, ast.Constant):
            c = node.value
            candidates.append(c)
            if isinstance(c, (int, float)) and not isinstance(c, bool):
                candidates += [c - 1, c + 1, c - 0.5, c + 0.5]
    for candidate in candidates:
        try:
            value = evaluate(condition, param, candidate)
        except TypeError:  # the real call would raise this, not the guard's exception
            continue
        if value is not _UNSUPPORTED and bool(value):
            return candidate
    return _UNSUPPORTED


def evaluate(node: ast.expr, param: str, value: object) -> object:
    """Python's own semantics for the few node kinds a guard condition uses."""
    if isinstance(node, ast.Name):
        return value if node.id == param else _UNSUPPORTED
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        items = [evaluate(e, param, value) for e in node.elts if isinstance(e, ast.Constant)]
        return tuple(items) if len(items) == len(node.elts) else _UNSUPPORTED
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        inner: Any = evaluate(node.operand, param, value)
        if inner is _UNSUPPORTED:
            return inner
        return (not inner) if isinstance(node.op, ast.Not) else -inner
    if isinstance(node, ast.BoolOp):
        return _evaluate_boolop(node, param, value)
    if isinstance(node, ast.Compare):
        return _evaluate_compare(node, param, value)
    return _UNSUPPORTED


def _evaluate_boolop(node: ast.BoolOp, param: str, value: object) -> object:
    """`and` returns the first falsy operand, `or` the first truthy one, else the last."""
    result: object = _UNSUPPORTED
    for operand in node.values:
        result = evaluate(operand, param, value)
        if result is _UNSUPPORTED or bool(result) == isinstance(node.op, ast.Or):
            return result
    return result


def _evaluate_compare(node: ast.Compare, param: str, value: object) -> object:
    """A (chained) comparison, short-circuiting like Python."""
    left = evaluate(node.left, param, value)
    for op, right_node in zip(node.ops, node.comparators, strict=True):
        right = evaluate(right_node, param, value)
        if left is _UNSUPPORTED or right is _UNSUPPORTED or type(op) not in _COMPARE:
            return _UNSUPPORTED
        if isinstance(op, (ast.Is, ast.IsNot)) and left is not None and right is not None:
            return _UNSUPPORTED  # identity of anything but None is an implementation detail
        if not _COMPARE[type(op)](left, right):
            return False
        left = right
    return True


def _call_arguments(func: ast.FunctionDef, param: str, witness: object, is_method: bool) -> str | None:
    """Source of the call's arguments: the witness for `param`, None for every other required one."""
    a = func.args
    if any(p.arg == param for p in (a.vararg, a.kwarg) if p is not None):
        return None
    skip = 1 if is_method else 0
    if is_method and not (a.posonlyargs or a.args):
        return None
    first_default = len(a.posonlyargs) + len(a.args) - len(a.defaults)
    parts: list[str] = []
    for index, p in enumerate(a.posonlyargs):
        if index >= skip:
            # positional-only: every one up to the guarded one, None where not needed
            parts.append(repr(witness if p.arg == param else None))
    for index, p in enumerate(a.args, start=len(a.posonlyargs)):
        if index >= skip and (p.arg == param or index < first_default):
            parts.append(f"{p.arg}={witness if p.arg == param else None!r}")
    for p, default in zip(a.kwonlyargs, a.kw_defaults, strict=True):
        if p.arg == param or default is None:
            parts.append(f"{p.arg}={witness if p.arg == param else None!r}")
    return ", ".join(parts)
