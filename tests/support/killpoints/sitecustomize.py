"""Aimed kills for tests/reliability/test_crash.py.

A Python process started with this folder first on its PYTHONPATH and `CRASH_KILL_AT=<point>:<n>`
in its environment SIGKILLs itself at the n-th file call of that point. Python imports
`sitecustomize` at start-up; an audit hook (PEP 578) sees each call before it is made, and the kill
is the real signal, so the daemon's code runs unchanged up to the instant it dies. Points:

- `output-open`, `report-open`: creating the temp file of an atomic write (`.<name>.<8 hex>.tmp`)
  of an output (for an output: the moment after ohd recorded its hash) or of a report (`.ohd/`);
- `output-replace`, `report-replace`: renaming that temp file over the file;
- `task-replace`: ingest moving a task file to `tasks.d/.done/` (its task is committed);
- any point with `-after` (e.g. `task-replace-after`): the hook makes that rename itself, then the
  kill comes, before the daemon's next step.

Nothing of ohd imports this; a process without `CRASH_KILL_AT` only gets nothing installed.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from typing import Any

_TEMP = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{8}\.tmp")   # outputs._replace_in's temp files
_EVENTS = {"open": "open", "replace": "os.rename"}         # os.replace raises the os.rename event


def _matches(what: str, args: tuple[Any, ...]) -> bool:
    try:
        path = os.fspath(args[0])
    except TypeError:
        return False
    if not isinstance(path, str):
        return False
    if what == "task":
        return len(args) > 1 and os.path.basename(os.path.dirname(os.fspath(args[1]))) == ".done"
    temp = _TEMP.fullmatch(os.path.basename(path))
    return temp is not None and (what == "report") == temp["name"].endswith((".json", ".md"))


def _install(spec: str) -> None:
    point, _, count = spec.partition(":")
    what, call, *after = point.split("-")
    event, left, lock, busy = _EVENTS[call], [int(count)], threading.Lock(), threading.local()

    def hook(name: str, args: tuple[Any, ...]) -> None:
        if name != event or getattr(busy, "on", False) or not _matches(what, args):
            return
        with lock:
            left[0] -= 1
            if left[0] != 0:
                return
            if after:      # the rename happens, the daemon does not see it return
                busy.on = True
                src_fd, dst_fd = (None if fd == -1 else fd for fd in args[2:4])
                os.rename(args[0], args[1], src_dir_fd=src_fd, dst_dir_fd=dst_fd)
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)


if os.environ.get("CRASH_KILL_AT"):
    _install(os.environ["CRASH_KILL_AT"])
