"""Log records as readable text or as JSON lines, with secrets redacted (stdlib only).

`setup(level, fmt, secrets, log_file)` installs one handler on stderr (and one on
`log_file` when given) on the root logger, replacing (and closing) the ones it installed
before, so a reload can call it again; httpx's own line per request is silenced. Every
record carries time, level, logger and message, plus the context fields a call passes
with `extra=`: `task_id`, `model`, `status` (on the one line of each task transition:
the status the task went to) and `outcome` (on the one line of each model request: ok,
rate_limited, an error class or cancelled). Without an explicit task_id, a message that
starts `task N` gives N, else the task that `task_context` made current (the pool sets
it while a task runs, so the model client's lines carry the task without being told
it). The filter replaces each configured secret (the API key's value) and any
`Bearer ...` token in the formatted message, its arguments and the exception text with
`***`. `Redactor.redact` is the one redaction of ohd: the model client applies the same
one to everything a server sends back, so the store, the reports, the outputs and the
socket's answers never hold the key either. It masks the obvious forms a server or a
library repeats a key in (as is, URL-encoded, JSON-escaped, with its prefix such as
`sk-or-v1-` cut); a secret shorter than `MIN_SECRET` characters is a placeholder for a
server that wants none ("ollama", "k") and is not masked (it would mangle every word).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

FORMATS = ("text", "json")
CONTEXT = ("task_id", "model", "status", "outcome")
BEARER = re.compile(r"Bearer\s+[^\s\"',;]+")
MASK = "***"
MIN_SECRET = 8      # shorter: a placeholder key, not a secret
MIN_TAIL = 16       # the part of a key after a '-' or '_' that is a secret on its own


def forms(secret: str) -> list[str]:
    """How `secret` may come back: as is, URL-encoded, JSON-escaped, and each tail of it after a
    '-' or '_' of at least `MIN_TAIL` characters (`sk-or-v1-<hex>` -> `<hex>`); longest first, so
    a whole key is masked as one."""
    tails = [secret[i + 1:] for i, char in enumerate(secret) if char in "-_" and len(secret) - i - 1 >= MIN_TAIL]
    found = {form for text in (secret, *tails)
             for form in (text, quote(text, safe=""), quote_plus(text), json.dumps(text)[1:-1])}
    return sorted((form for form in found if len(form) >= MIN_SECRET), key=len, reverse=True)


class Redactor(logging.Filter):
    """Removes the secrets (in every form of `forms`) and `Bearer` tokens from a text or a record."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)
        self.forms = sorted({form for secret in self.secrets for form in forms(secret)}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for form in self.forms:
            text = text.replace(form, MASK)
        return BEARER.sub("Bearer " + MASK, text)

    def holds(self, text: str) -> bool:
        """Whether `text` carries a secret (in any form); a `Bearer` token alone does not count."""
        return any(form in text for form in self.forms)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.redact(record.getMessage())
        record.args = None
        if record.exc_info:
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


TASK_MESSAGE = re.compile(r"^task (\d+)\b")
CURRENT_TASK: ContextVar[int | None] = ContextVar("ohd_current_task", default=None)


@contextmanager
def task_context(task_id: int) -> Iterator[None]:
    """Records logged inside (and in tasks and threads started inside) carry `task_id`."""
    token = CURRENT_TASK.set(task_id)
    try:
        yield
    finally:
        CURRENT_TASK.reset(token)


def _context(record: logging.LogRecord) -> dict[str, Any]:
    """The context fields from `extra=`; task_id from a message `task N ...`, else the current task."""
    context = {key: getattr(record, key) for key in CONTEXT if getattr(record, key, None) is not None}
    if "task_id" not in context:
        if match := TASK_MESSAGE.match(record.getMessage()):
            context["task_id"] = int(match.group(1))
        elif (current := CURRENT_TASK.get()) is not None:   # handlers format in the logging call's context
            context["task_id"] = current
    return {key: context[key] for key in CONTEXT if key in context}


class TextFormatter(logging.Formatter):
    """`2026-11-25T12:00:00.123+00:00 INFO ohd.worker: message [task_id=7 model=m]`."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        context = " ".join(f"{k}={v}" for k, v in _context(record).items())
        line = f"{when} {record.levelname} {record.name}: {record.getMessage()}" + (f" [{context}]" if context else "")
        if record.exc_text:
            line += "\n" + record.exc_text
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, task_id/model when given, exc."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
                                "level": record.levelname, "logger": record.name, "message": record.getMessage(),
                                **_context(record)}
        if record.exc_text:
            data["exc"] = record.exc_text
        return json.dumps(data, default=str)


def formatter(fmt: str) -> logging.Formatter:
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return JsonFormatter() if fmt == "json" else TextFormatter()


def setup(level: str, fmt: str = "text", secrets: Iterable[str] = (), log_file: Path | None = None,
          stream: Any = None) -> list[logging.Handler]:
    """Replace the root logger's handlers with stderr (and `log_file`), formatted and redacted."""
    redactor = Redactor(secrets)
    handlers: list[logging.Handler] = [logging.StreamHandler(stream or sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # private from its first line (the log names files and errors): 0600 whatever the umask
        os.close(os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600))
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if any(isinstance(f, Redactor) for f in old.filters):
            old.close()         # ours (a log file's is closed; stderr stays open)
    for handler in handlers:
        handler.addFilter(redactor)
        handler.setFormatter(formatter(fmt))
        root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)   # its line per request would repeat ohd.llm's
    return handlers


def tail(path: Path, lines: int = 50) -> list[str]:
    """The last `lines` lines of a log file."""
    with path.open("rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - 256 * 1024))
        return f.read().decode("utf-8", "replace").splitlines()[-lines:]
