"""Parse Python source safely from many threads at once, and quietly.

CPython 3.11 keeps the AST constructor's recursion depth in state shared by every thread;
two `ast.parse` calls that interleave (a garbage collection can switch threads in the
middle of one) fail with "SystemError: AST constructor recursion depth mismatch"
(python/cpython#106905). The daemon parses on worker threads, so every parse in ohd
goes through `parse`, which lets one thread at a time build an AST. Parsing a module
takes about a millisecond, so the lock costs nothing that matters.

The parser warns about what it reads (an invalid escape such as `"\\d"` in a docstring: a
DeprecationWarning on 3.11, a SyntaxWarning from 3.12): on the daemon's stderr, outside its
log, or as a SyntaxError under `-W error`. Those warnings are about code ohd only reads (a
target, a model's answer), so the one filter installed at import ignores them, and only
them: it matches the SyntaxWarning and DeprecationWarning of sources parsed here (by the
filename `parse` gives them), never a warning from anywhere else. One filter, not `warnings.catch_warnings`
around each parse: that swaps the process-wide filter list and is not thread-safe.
"""

from __future__ import annotations

import ast
import re
import threading
import warnings

FILENAME = "<ohd-parsed-source>"    # what SyntaxErrors and the compiler's warnings name as the file
_ONE_AT_A_TIME = threading.Lock()


def quiet() -> None:
    """Ignore the compiler's warnings about sources parsed here (at import; again after a
    `warnings.resetwarnings`). Idempotent: `filterwarnings` does not add a filter twice."""
    for category in (SyntaxWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=re.escape(FILENAME) + r"\Z")


quiet()


def parse(source: str) -> ast.Module:
    """`ast.parse(source)`, one thread at a time; raises what it raises (SyntaxError, ValueError)."""
    with _ONE_AT_A_TIME:
        return ast.parse(source, filename=FILENAME)
