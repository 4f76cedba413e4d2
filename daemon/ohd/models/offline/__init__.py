"""The offline room: deterministic answers, as a model would give them, when no API key is set.

Pure: a `Job` in, a reply text out (the caller reports it as model "offline"). Invariant:
it states only what can be read from the source itself — tests assert names, signatures,
guard clauses and the module's own doctests, never an expected value it would have to
guess; docstrings name parameters without describing behaviour; a review lists measured
facts. When it cannot answer honestly (the target does not parse, a free prompt) it says
so in prose without a code block, so that extraction fails with that reason, or — for a
custom task, whose output may be any text — the note itself is the answer.

Rooms inside: `source` (AST facts), `unit_tests` and `guards`, `docstrings`, `review`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ohd.core.taskfile import TaskType
from ohd.core.tasktypes import Job
from ohd.models.offline.docstrings import answer_docstring
from ohd.models.offline.review import answer_review
from ohd.models.offline.source import NOTE
from ohd.models.offline.unit_tests import answer_unit_test

log = logging.getLogger("ohd.offline")

__all__ = ["answer"]


def answer(job: Job) -> str:
    """The reply for `job`: one ```python block for unit_test/docstring, Markdown otherwise."""
    handlers: dict[TaskType, Callable[[Job], str]] = {
        TaskType.UNIT_TEST: answer_unit_test, TaskType.DOCSTRING: answer_docstring,
        TaskType.REVIEW: answer_review, TaskType.CUSTOM: _answer_custom}
    return handlers[job.task_type](job)


def _answer_custom(job: Job) -> str:
    """A note for the task author: a free prompt needs a language model."""
    return "\n".join([
        f"# Not done: `{job.output}`", "",
        (f"This custom task was answered by the {NOTE}. The offline provider cannot answer free "
         "prompts, so the prompt below was not carried out. Configure an API key (or turn off "
         "`offline`) and retry the task."), "",
        f"- Target: `{job.target}`",
        f"- Prompt: {_quoted(job.prompt or '(none)')}", ""])


def _quoted(prompt: str) -> str:
    """The prompt on one line, without backticks that could open a code fence."""
    return " ".join(prompt.replace("`", "'").split())
