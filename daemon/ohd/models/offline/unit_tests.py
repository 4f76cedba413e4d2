"""The offline unit_test answer: a pytest module built from the target's AST.

Pure. Invariant: every generated test asserts something the source itself guarantees —
the module imports; each trusted public function/class exists with its declared
parameters; a guard clause raises for a value computed in `guards`; a class whose
`__init__` only stores plain values can be built and holds them; the module's own
doctests pass. No expected value is invented, and no function with unknown effects is called.
"""

from __future__ import annotations

import ast
import keyword
from dataclasses import dataclass, field

from ohd.core.tasktypes import Job, fence
from ohd.models.offline.guards import find_guard
from ohd.models.offline.source import (
    NOTE,
    bound_in,
    cannot,
    params,
    parse,
    public_defs,
    rebound_names,
    repeated,
    without_docstring,
)

_EMPTY_BUILTINS = frozenset({"list", "dict", "set", "tuple", "frozenset", "str", "int", "float", "bool"})
_ANNOTATION_NAMES = frozenset({*_EMPTY_BUILTINS, "bytes", "object", "type", "None"})
_RISKY_DUNDERS = frozenset({"__new__", "__del__", "__setattr__", "__getattribute__", "__slots__"})


@dataclass(frozen=True, slots=True)
class _Facts:
    """What the module binds: `rebound` names are not trusted; `bound` may shadow builtins."""

    rebound: set[str]
    bound: set[str]
    lazy_annotations: bool  # `from __future__ import annotations`


@dataclass
class _Tests:
    """The test functions being written, with unique names, and the imports they need."""

    functions: list[str] = field(default_factory=list)
    names: set[str] = field(default_factory=set)
    imports: set[str] = field(default_factory=set)

    def add(self, name: str, lines: list[str], comment: str = "", needs: tuple[str, ...] = ()) -> None:
        unique, n = name, 2
        while unique in self.names:
            unique, n = f"{name}_{n}", n + 1
        self.names.add(unique)
        self.imports.update(needs)
        head = [f"# {comment}"] if comment else []
        self.functions.append("\n".join([*head, f"def {unique}() -> None:", *(f"    {x}" for x in lines)]))


def answer_unit_test(job: Job) -> str:
    """One ```python block with the tests, or prose saying why there are none."""
    tree = parse(job.source)
    if isinstance(tree, str):
        return cannot(job, f"the target does not parse ({tree}); fix it and retry the task")
    if not all(part.isidentifier() and not keyword.iskeyword(part) for part in job.module.split(".")):
        return cannot(job, f"`{job.module}` is not an importable module name")
    code = render(job.module, build_tests(tree))
    return (f"Tests for `{job.module}` by the {NOTE}. They check only what the source itself "
            f"shows; replace them with behavioural tests.\n\n{fence(code, 'python')}\n")


def build_tests(tree: ast.Module) -> _Tests:
    """Every honest test for the module, in source order, after `test_module_imports`."""
    facts = _facts(tree)
    tests = _Tests()
    tests.add("test_module_imports", ["assert inspect.ismodule(target)"], needs=("inspect",))
    for node in public_defs(tree.body, facts.rebound):
        if isinstance(node, ast.ClassDef):
            _class_tests(tests, node, facts)
        else:
            _function_tests(tests, node, "target", facts)
    _doctest_test(tests, tree, facts)
    return tests


def render(module: str, tests: _Tests) -> str:
    """The test module's source."""
    doc = (f'"""Structural tests for {module}, written by ohd\'s offline provider.\n\n'
           "No language model was asked (no API key is configured). Each test asserts only what\n"
           "can be read from the source itself; extend them with real cases.\n"
           '"""')
    stdlib = "\n".join(f"import {name}" for name in sorted((tests.imports | {"importlib"}) - {"pytest"}))
    imports = stdlib + ("\n\nimport pytest" if "pytest" in tests.imports else "")
    # the module object itself: `import pkg.mod as target` binds `pkg.mod` the attribute, which
    # a package's `from .mod import *` (mod defining `mod`) or `from .v import v` replaces
    header = "\n\n".join([doc, imports, f"target = importlib.import_module({module!r})"])
    return "\n\n\n".join([header, *tests.functions]) + "\n"


def _facts(tree: ast.Module) -> _Facts:
    lazy = any(isinstance(n, ast.ImportFrom) and n.module == "__future__"
               and any(a.name == "annotations" for a in n.names) for n in tree.body)
    rebound = rebound_names(tree)
    return _Facts(rebound=rebound, bound=set(bound_in(tree.body)) | rebound, lazy_annotations=lazy)


def _function_tests(tests: _Tests, func: ast.FunctionDef | ast.AsyncFunctionDef, owner: str,
                    facts: _Facts, instance: str | None = None) -> None:
    """Existence and signature; a guard test when the function (or an instance) can be called."""
    ref = f"{owner}.{func.name}"
    label = ref.removeprefix("target.").replace(".", "_")
    if func.decorator_list:
        tests.add(f"test_{label}_exists", [f"assert hasattr({owner}, {func.name!r})"],
                  "decorated: the decorator decides what the name holds")
        return
    lines = [f"assert callable({ref})",
             f"assert list(inspect.signature({ref}).parameters) == {params(func)!r}"]
    if isinstance(func, ast.AsyncFunctionDef):
        lines.append(f"assert inspect.iscoroutinefunction({ref})")
    tests.add(f"test_{label}_signature", lines, needs=("inspect",))
    callee = f"{instance}.{func.name}" if instance else (ref if owner == "target" else None)
    if not isinstance(func, ast.FunctionDef) or callee is None:
        return
    guard = find_guard(func, instance is not None, facts.bound)
    if guard is not None:
        tests.add(f"test_{label}_guard_raises_{guard.exception.lower()}",
                  [f"with pytest.raises({guard.exception}):", f"    {callee}({guard.arguments})"],
                  f"{func.name}() starts with `if {guard.condition}: raise {guard.exception}`",
                  needs=("pytest",))


def _class_tests(tests: _Tests, cls: ast.ClassDef, facts: _Facts) -> None:
    """A class is a class; built without arguments when that runs no code; its methods' tests."""
    ref = f"target.{cls.name}"
    if cls.decorator_list:
        tests.add(f"test_{cls.name}_exists", [f"assert hasattr(target, {cls.name!r})"],
                  "decorated: the decorator decides what the name holds")
        return
    tests.add(f"test_{cls.name}_is_a_class", [f"assert inspect.isclass({ref})"], needs=("inspect",))
    attributes = _plain_instance(cls, facts)
    if attributes is not None:
        lines = [f"obj = {ref}()", f"assert isinstance(obj, {ref})"]
        lines += [f"assert obj.{name} == {value}" for name, value in attributes]
        tests.add(f"test_{cls.name}_instantiates_without_arguments", lines,
                  "no base class, and any __init__ needs no arguments and only stores plain values")
    instance = f"{ref}()" if attributes is not None else None
    for method in public_defs(cls.body, repeated(bound_in(cls.body))):
        if not isinstance(method, ast.ClassDef):
            _function_tests(tests, method, ref, facts, instance)


def _plain_instance(cls: ast.ClassDef, facts: _Facts) -> list[tuple[str, str]] | None:
    """(attribute, literal source) pairs if `cls()` provably runs nothing but stores, else None."""
    names = list(bound_in(cls.body))
    if cls.bases or cls.keywords or _RISKY_DUNDERS & set(names) or names.count("__init__") > 1:
        return None
    inits = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"]
    if not inits:
        return None if "__init__" in names else []
    if inits[0].decorator_list:
        return None
    return _init_attributes(inits[0], set(names), facts)


def _init_attributes(init: ast.FunctionDef, class_names: set[str], facts: _Facts) -> list[tuple[str, str]] | None:
    """Only `self.<attr> = <literal or parameter>` statements (and `pass`) may run."""
    a = init.args
    positional = [p.arg for p in (*a.posonlyargs, *a.args)]
    required = len(positional) - len(a.defaults)
    if required != 1 or any(d is None for d in a.kw_defaults):
        return None
    defaults = dict(zip(positional[required:], a.defaults, strict=True))
    defaults.update({p.arg: d for p, d in zip(a.kwonlyargs, a.kw_defaults, strict=True) if d is not None})
    own = set(params(init))
    values: dict[str, ast.expr | None] = {}
    for stmt in without_docstring(init.body):
        if isinstance(stmt, ast.Pass):
            continue
        stored = _stored_attribute(stmt, positional[0], facts)
        if stored is None or stored[0] in class_names:
            return None  # a class attribute may be a property or descriptor with a setter
        name, value = stored
        if isinstance(value, ast.Name) and value.id in own:
            value = defaults.get(value.id, value)
        elif not _is_literal(value, facts):
            return None
        shown = value if _is_literal(value, facts) else None
        values[name] = None if name in values else shown
    return [(name, ast.unparse(v)) for name, v in values.items() if v is not None]


def _stored_attribute(stmt: ast.stmt, self_name: str, facts: _Facts) -> tuple[str, ast.expr] | None:
    """(attr, value) for `self.attr = value` or `self.attr: <builtin type> = value`, else None."""
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
        target, value = stmt.targets[0], stmt.value
    elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None and (
            facts.lazy_annotations or _builtin_annotation(stmt.annotation, facts)):
        target, value = stmt.target, stmt.value   # (an attribute's annotation is evaluated)
    else:
        return None
    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == self_name:
        return target.attr, value
    return None


def _builtin_annotation(node: ast.expr, facts: _Facts) -> bool:
    """An annotation made of builtin type names only (`list[float]`, `int | None`)."""
    allowed = (ast.Name, ast.Subscript, ast.Tuple, ast.Constant, ast.BinOp, ast.BitOr, ast.Load)
    return all(isinstance(n, allowed) for n in ast.walk(node)) and all(
        n.id in _ANNOTATION_NAMES and n.id not in facts.bound for n in ast.walk(node) if isinstance(n, ast.Name))


def _is_literal(node: ast.expr, facts: _Facts) -> bool:
    """Constants, containers of them, signed numbers and `list()`-style empty builtins."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return all(_is_literal(e, facts) for e in node.elts)
    if isinstance(node, ast.Dict):
        return all(k is not None and _is_literal(k, facts) for k in node.keys) and all(
            _is_literal(v, facts) for v in node.values)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return isinstance(node.operand, ast.Constant) and type(node.operand.value) in (int, float)
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args
            and not node.keywords and node.func.id in _EMPTY_BUILTINS and node.func.id not in facts.bound)


def _doctest_test(tests: _Tests, tree: ast.Module, facts: _Facts) -> None:
    """The module's own doctest examples, run by doctest itself, when there are any.

    With ELLIPSIS, NORMALIZE_WHITESPACE and IGNORE_EXCEPTION_DETAIL: projects set them in
    their pytest `doctest_optionflags` and write examples that need them (boltons: `...` in an
    expected error, trailing spaces after a value); under doctest's defaults their correct code
    failed and was reported as a possible bug. The flags loosen only how output is compared."""
    documented = [tree, *(n for n in public_defs(tree.body, facts.rebound) if not n.decorator_list)]
    examples = [line for node in documented for line in (ast.get_docstring(node) or "").splitlines()
                if line.strip().startswith(">>>") and "+SKIP" not in line]
    if examples:
        tests.add("test_doctest_examples", ["flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE"
                                            " | doctest.IGNORE_EXCEPTION_DETAIL",
                                            "results = doctest.testmod(target, optionflags=flags)",
                                            "assert results.failed == 0", "assert results.attempted > 0"],
                  "the examples written in the module's docstrings", needs=("doctest",))
