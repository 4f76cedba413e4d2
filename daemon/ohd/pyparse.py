"""Parse Python source safely from many threads at once.

CPython 3.11 keeps the AST constructor's recursion depth in state shared by every thread;
two `ast.parse` calls that interleave (a garbage collection can switch threads in the
middle of one) fail with "SystemError: AST constructor recursion depth mismatch"
(python/cpython#106905). The daemon parses on worker threads, so every parse in ohd
goes through `parse`, which lets one thread at a time build an AST. Parsing a module
takes about a millisecond, so the lock costs nothing that matters.
"""

from __future__ import annotations

import ast
import threading

_ONE_AT_A_TIME = threading.Lock()


def parse(source: str) -> ast.Module:
    """`ast.parse(source)`, one thread at a time; raises what it raises (SyntaxError, ValueError)."""
    with _ONE_AT_A_TIME:
        return ast.parse(source)
