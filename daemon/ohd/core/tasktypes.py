"""The task-type room: per type, where the output goes, what to ask, what to keep of the reply.

Pure: a `Job` (the task, the target's text and related files) in, chat messages out;
a model's reply in, the candidate file content out, or `MalformedAnswer`. Invariant:
`extract` never guesses between candidates — a reply with several code blocks, an
unclosed block or no usable content is rejected with a reason the model can act on.
Nothing here reads files, calls a model or validates the candidate (that is `validate`).
"""

from __future__ import annotations

import ast
import logging
import posixpath
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from ohd.core import layout, pyparse
from ohd.core.taskfile import TaskType
from ohd.errors import MalformedAnswer, TargetError, TaskFileError

log = logging.getLogger("ohd.tasktypes")

PYTHON_FENCE_LANGS = frozenset({"", "python", "py", "python3", "py3"})
MARKDOWN_FENCE_LANGS = frozenset({"markdown", "md"})
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*?)[ \t]*$")
_UNKNOWN_MODEL = "?"  # the worker fills in the model that answered
# The largest target a task reads: about 128k tokens at ~4 bytes a token, the context of
# the largest common models, so a bigger file could not fit in any prompt anyway.
MAX_TARGET_BYTES = 512_000


@dataclass(frozen=True, slots=True)
class Job:
    """Everything a model (or the offline provider) needs to do one task once."""

    task_type: TaskType
    target: str                                   # repo-relative path of the source
    source: str                                   # the target's text
    module: str                                   # dotted import name of the target
    output: str                                   # repo-relative path of the file to produce
    description: str = ""
    prompt: str | None = None                     # the free prompt of a custom task
    context: tuple[tuple[str, str], ...] = ()     # (repo-relative path, text), e.g. existing tests
    feedback: tuple[str, ...] = ()                # validator messages from the previous attempt


@dataclass(frozen=True, slots=True)
class Block:
    """One fenced code block of a reply: its info-string language (lower case) and body."""

    lang: str
    body: str


# --- what a type can work on ----------------------------------------------------------------


def check_target(task_type: TaskType, target: str, source: str) -> None:
    """Before any model is asked: TargetError for a target this type cannot work on.

    unit_test and docstring need a `.py` file that parses (the error names the line);
    review and custom take any text (binary, empty and oversized files are refused when
    the target is read, `outputs.read_source` with `MAX_TARGET_BYTES`).
    """
    if task_type not in (TaskType.UNIT_TEST, TaskType.DOCSTRING):
        return
    if posixpath.splitext(target)[1] != ".py":
        raise TargetError(target, f"is not a Python module (.py), and a {task_type} task needs one; "
                                  "a review or custom task takes other files")
    try:
        pyparse.parse(source)
    except SyntaxError as exc:
        raise TargetError(target, f"does not parse as Python ({exc.msg} at line {exc.lineno}); "
                                  "fix it and retry the task") from None
    except ValueError as exc:   # a NUL byte past the start that read_source sniffs
        raise TargetError(target, f"does not parse as Python ({exc})") from None


# --- paths ---------------------------------------------------------------------------------


def default_output(task_type: TaskType, target: str, has_tests_dir: bool, test_files: Sequence[str] = ()) -> str:
    """The repo-relative output path a task gets when its file names none.

    unit_test: where the repo's tests (`test_files`, repo-relative) live: an existing
    `test_<stem>.py` beside the source, else the nearest `tests/` (or `test/`) folder
    holding test files found walking up from the source (an existing `test_<stem>.py`
    in it, else `test_<stem>.py` at its top), else `tests/test_<stem>.py` when the repo
    has `tests/`, else beside the source; docstring: the target itself; review:
    `<dir>/.ohd/reviews/<name>.md` (not `.ohd/<name>.review.md`: that is the task's
    report); custom has no default (`TaskFileError` on field 'output').
    """
    directory, name = posixpath.split(target)
    stem = posixpath.splitext(name)[0]
    if task_type is TaskType.UNIT_TEST:
        return _unit_test_output(directory, f"test_{stem}.py", has_tests_dir, test_files)
    if task_type is TaskType.DOCSTRING:
        return target
    if task_type is TaskType.REVIEW:
        return layout.review_output(directory, name)
    raise TaskFileError("<task>", "a custom task needs an explicit output path", field="output")


def _unit_test_output(directory: str, name: str, has_tests_dir: bool, test_files: Sequence[str]) -> str:
    beside = posixpath.join(directory, name)
    if beside in test_files:
        return beside
    folders = {posixpath.dirname(f) for f in test_files}
    ancestor: str | None = directory
    while ancestor is not None:
        for tests in (posixpath.join(ancestor, "tests"), posixpath.join(ancestor, "test")):
            if any(f == tests or f.startswith(tests + "/") for f in folders):
                same = sorted((f for f in test_files if posixpath.basename(f) == name and f.startswith(tests + "/")),
                              key=lambda f: (f.count("/"), f))
                return same[0] if same else posixpath.join(tests, name)
        ancestor = posixpath.dirname(ancestor) if ancestor else None
    return posixpath.join("tests" if has_tests_dir else directory, name)


def module_name(target: str, is_package_dir: Callable[[str], bool]) -> str:
    """Dotted import name: walk up while the directory is a package (holds `__init__.py`).

    `src/app/auth.py` with `src/app/__init__.py` → `app.auth` (import root `src`);
    `src/app/__init__.py` → `app`. "" only for a top-level `__init__.py`.
    """
    return ".".join(_import_parts(target, is_package_dir)[1])


def import_root(target: str, is_package_dir: Callable[[str], bool]) -> str:
    """The directory that must be on `sys.path` to import the target: `src`, or "" for the root."""
    return _import_parts(target, is_package_dir)[0]


def _import_parts(target: str, is_package_dir: Callable[[str], bool]) -> tuple[str, list[str]]:
    directory, name = posixpath.split(target)
    stem = posixpath.splitext(name)[0]
    parts = [] if stem == "__init__" else [stem]
    while directory and is_package_dir(directory):
        directory, package = posixpath.split(directory)
        parts.insert(0, package)
    return directory, parts


# --- prompts -------------------------------------------------------------------------------

_SYSTEM = {
    TaskType.UNIT_TEST: "You are a careful Python engineer who writes pytest tests that check real "
                        "behaviour. You never invent behaviour the code does not have.",
    TaskType.DOCSTRING: "You are a careful Python engineer who documents code precisely. You never "
                        "change what the code does.",
    TaskType.REVIEW: "You are a senior Python reviewer. You point at concrete lines and explain why "
                     "they matter; you do not pad the review.",
    TaskType.CUSTOM: "You are a careful software engineer. You do exactly what the task asks.",
}


def with_feedback(job: Job, feedback: Sequence[str]) -> Job:
    """The same job, with the validator's (or extraction's) messages for the next attempt."""
    return replace(job, feedback=tuple(feedback))


def messages(job: Job) -> list[dict[str, str]]:
    """The chat messages for one attempt: a system message and one user message."""
    parts = [_instructions(job)]
    if job.description:
        parts.append(f"What the task author wants:\n{job.description}")
    parts.append(f"The source of `{job.target}`:\n\n{fence(job.source, _lang_of(job.target))}")
    parts.extend(_context_parts(job))
    if job.feedback:
        listed = "\n".join(f"- {message}" for message in job.feedback)
        parts.append(f"Your previous answer was rejected for these reasons; fix all of them:\n{listed}")
    parts.append(_answer_format(job))
    return [{"role": "system", "content": _SYSTEM[job.task_type]},
            {"role": "user", "content": "\n\n".join(parts)}]


def _instructions(job: Job) -> str:
    if job.task_type is TaskType.UNIT_TEST:
        return (f"Write a complete pytest module that will be saved as `{job.output}` and run with "
                f"pytest from the repository root. Import the code under test as `import {job.module}` "
                f"or `from {job.module} import ...`. Name every test function `test_*`. Each test must "
                "make real assertions about behaviour that the source below actually has (return "
                "values, raised exceptions, state changes); do not guess values you cannot derive from "
                "the code. Use only the standard library and pytest; no network access, no sleeping, "
                "temporary files only under pytest's `tmp_path`.")
    if job.task_type is TaskType.DOCSTRING:
        return (f"Add or improve docstrings in `{job.target}`: the module, every public class, "
                "function and method. Describe parameters, return values and raised exceptions the "
                "code really has. Change nothing else: the code, comments and formatting stay exactly "
                "as they are. Return the whole module.")
    if job.task_type is TaskType.REVIEW:
        return (f"Review `{job.target}` and write the review in Markdown: correctness bugs first, then "
                "error handling, security, readability and missing tests. Cite line numbers, say why "
                "each point matters and suggest a fix. Say plainly when the code is fine.")
    return (f"{job.prompt or 'No prompt was given.'}\n\n"
            f"The result will be saved as `{job.output}`; the target is `{job.target}`.")


def _context_parts(job: Job) -> list[str]:
    return [f"The file `{path}` already exists; your answer replaces it, so keep what is still "
            f"right in it:\n\n{fence(text, _lang_of(path))}" for path, text in job.context]


def _answer_format(job: Job) -> str:
    if job.task_type is TaskType.REVIEW:
        return "Answer with the Markdown review only, without a surrounding code fence."
    if job.task_type is TaskType.CUSTOM:
        return f"Answer with the complete content of `{job.output}` in exactly one fenced code block."
    return ("Answer with exactly one ```python fenced block holding the complete file, and nothing "
            "else inside code fences.")


def agent_prompt(task_type: TaskType, target: str, description: str, output: str | None,
                 feedback: Sequence[str] = ()) -> str:
    """What a coding agent is asked (the prompt file of an agent runner): the task in words, the file
    it is about, and why earlier attempts were refused. The agent edits its worktree; its diff is the
    result, so it is told to leave everything else (and git) alone."""
    what = {
        TaskType.CHANGE: f"Make this change to the repository (the file it is about: `{target}`).",
        TaskType.UNIT_TEST: f"Write pytest tests for `{target}` in `{output or 'a test file beside it'}`: real "
                            "assertions about behaviour the code has; do not change the code under test.",
        TaskType.DOCSTRING: f"Add or improve the docstrings of `{target}`; change nothing but docstrings.",
        TaskType.REVIEW: f"Review `{target}` and write the review in Markdown to `{output or target}`; "
                         "change no code.",
    }.get(task_type, f"Work on `{target}` as described.")
    parts = [what]
    if description:
        parts.append(f"What the task author wants:\n{description}")
    parts.append("Edit the files in the current directory (a git worktree of the repository). Do not commit, "
                 "do not touch anything outside this directory, and leave the git configuration alone: the "
                 "changes you leave in the files are the result.")
    if feedback:
        listed = "\n".join(f"- {message}" for message in feedback)
        parts.append(f"Earlier attempts were refused for these reasons; avoid them:\n{listed}")
    return "\n\n".join(parts) + "\n"


def fence(text: str, lang: str = "") -> str:
    """`text` in a fenced block whose fence is longer than any backtick run inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    marks = "`" * max(3, longest + 1)
    return f"{marks}{lang}\n{text.rstrip(chr(10))}\n{marks}"


def _lang_of(path: str) -> str:
    suffix = posixpath.splitext(path)[1]
    return {".py": "python", ".pyi": "python", ".md": "markdown", ".yaml": "yaml",
            ".yml": "yaml", ".toml": "toml", ".json": "json"}.get(suffix, "")


# --- extraction ----------------------------------------------------------------------------


def extract(task_type: TaskType, reply: str) -> str:
    """The candidate content in a model's reply, or `MalformedAnswer(model="?", reason)`.

    Code types: the body of the one ```python/```py/bare fenced block, or an unfenced reply
    that is a Python module. review: the Markdown text (unwrapped if it is one ```markdown
    block). custom: the one fenced block of any language, else the text itself.
    """
    text = reply.strip()
    if not text:
        raise MalformedAnswer(_UNKNOWN_MODEL, "the answer is empty")
    if task_type is TaskType.REVIEW:
        return _extract_review(text)
    blocks = fenced_blocks(reply)
    if task_type is TaskType.CUSTOM:
        return _extract_custom(text, blocks)
    return _extract_python(text, blocks)


def fenced_blocks(reply: str) -> list[Block]:
    """Every fenced code block (``` or ~~~, CommonMark-style closing), in order.

    An opening fence that is never closed raises `MalformedAnswer`: the answer was
    probably cut off at the token limit.
    """
    blocks: list[Block] = []
    opening: re.Match[str] | None = None
    body: list[str] = []
    for line in (raw.removesuffix("\r") for raw in reply.split("\n")):  # not splitlines: \f, \x1c ...
        match = _FENCE.match(line)
        if opening is None:
            if match:
                opening, body = match, []
            continue
        if match and _closes(opening, match):
            lang = opening["info"].split()[0].lower() if opening["info"].strip() else ""
            blocks.append(Block(lang, "\n".join(body)))
            opening = None
        else:
            body.append(_unindent(line, len(opening["indent"])))
    if opening is not None:
        raise MalformedAnswer(_UNKNOWN_MODEL, "a code block is opened but never closed "
                                              "(the answer may have been cut off)")
    return blocks


def _unindent(line: str, width: int) -> str:
    """A body line without the indentation its (indented, e.g. in a list item) fence had."""
    leading = len(line) - len(line.lstrip(" \t"))
    return line[min(leading, width):]


def _closes(opening: re.Match[str], match: re.Match[str]) -> bool:
    fence_open, fence_close = opening["fence"], match["fence"]
    return (not match["info"] and fence_close[0] == fence_open[0]
            and len(fence_close) >= len(fence_open))


def _extract_python(text: str, blocks: list[Block]) -> str:
    python = [b for b in blocks if b.lang in PYTHON_FENCE_LANGS]
    if len(python) > 1:
        raise MalformedAnswer(_UNKNOWN_MODEL, f"the answer holds {len(python)} Python code blocks; "
                                              "answer with exactly one block holding the whole file")
    if python:
        return _as_file(python[0].body, "the code block is empty")
    if blocks:
        langs = ", ".join(sorted({b.lang for b in blocks}))
        raise MalformedAnswer(_UNKNOWN_MODEL, f"the answer has no Python code block (only: {langs}); "
                                              "answer with exactly one ```python block")
    if _is_python_module(text):
        return text + "\n"
    raise MalformedAnswer(_UNKNOWN_MODEL, "the answer holds no code block and is not a Python "
                                          "module; answer with exactly one ```python block")


def _is_python_module(text: str) -> bool:
    """Parses, and is more than bare expressions (a prose word like `Sure` parses too)."""
    try:
        tree = pyparse.parse(text)
    except (SyntaxError, ValueError):
        return False
    return any(not isinstance(node, ast.Expr) for node in tree.body)


def _extract_review(text: str) -> str:
    """The Markdown itself; a review wrapped whole in one ```markdown block is unwrapped."""
    try:
        blocks = fenced_blocks(text)
    except MalformedAnswer:
        return text + "\n"   # a stray fence in prose is still a readable review
    if len(blocks) == 1 and blocks[0].lang in MARKDOWN_FENCE_LANGS and _only_block(text):
        return _as_file(blocks[0].body, "the Markdown block is empty")
    return text + "\n"


def _only_block(text: str) -> bool:
    lines = text.splitlines()
    return bool(_FENCE.match(lines[0])) and bool(_FENCE.match(lines[-1])) and len(lines) >= 2


def _extract_custom(text: str, blocks: list[Block]) -> str:
    if len(blocks) > 1:
        raise MalformedAnswer(_UNKNOWN_MODEL, f"the answer holds {len(blocks)} code blocks; "
                                              "answer with exactly one block holding the whole file")
    if blocks:
        return _as_file(blocks[0].body, "the code block is empty")
    return text + "\n"


def _as_file(body: str, empty_reason: str) -> str:
    """A block body as file content: ends with one newline; an all-blank body is malformed."""
    if not body.strip():
        raise MalformedAnswer(_UNKNOWN_MODEL, empty_reason)
    return body.rstrip("\n") + "\n"
