"""The task-file room: the schema of a task file and its parser.

Pure: text in, a frozen `TaskSpec` out, or a `TaskFileError` that names the field and
the 1-based line of the offending key. Invariant: every `TaskSpec` that exists holds
repo-relative, normalised POSIX paths that cannot lexically leave the repo or enter
`.git/` (symlinks are resolved later, at the edge, by `outputs.resolve_inside`).
"""

from __future__ import annotations

import json
import logging
import posixpath
import shlex
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Literal

import pydantic
import yaml
from pydantic import Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import InitErrorDetails, PydanticCustomError

from ohd.core import layout
from ohd.errors import TaskFileError

log = logging.getLogger("ohd.taskfile")

# What a task file may put into a prompt, in characters: a description is words for the model
# (a 5 MB one was sent whole, costing a free model's whole context), a custom prompt may quote
# code. The target itself is capped where it is read (tasktypes.MAX_TARGET_BYTES).
MAX_DESCRIPTION_CHARS = 20_000
MAX_PROMPT_CHARS = 200_000


class TaskType(StrEnum):
    """What a task asks a model to produce."""

    UNIT_TEST = "unit_test"
    DOCSTRING = "docstring"
    REVIEW = "review"
    CUSTOM = "custom"
    CHANGE = "change"


class Runner(StrEnum):
    """Who does a task: one chat completion (`llm`) or a coding agent in a worktree of the repo."""

    LLM = "llm"
    OPENHANDS = "openhands"
    AIDER = "aider"
    COMMAND = "command"


class Deliver(StrEnum):
    """Where an agent's diff goes: a patch file, a branch, or applied to a clean working copy."""

    PATCH = "patch"
    BRANCH = "branch"
    APPLY = "apply"


class Priority(StrEnum):
    """Queue priority; higher `rank` runs first, FIFO within one rank."""

    CRITICAL = "critical"
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        """critical 3, high 2, normal 1, low 0."""
        return {"critical": 3, "high": 2, "normal": 1, "low": 0}[self.value]


def check_relpath(value: str) -> str:
    """Return `value` as a normalised repo-relative POSIX path, or raise ValueError.

    Lexical only: rejects empty, absolute, `..` escaping the repo and anything under `.git/`.
    """
    if "\x00" in value:
        raise ValueError("the path contains a NUL byte")
    raw = value.strip()
    if not raw:
        raise ValueError("the path is empty")
    if raw.startswith("/"):
        raise ValueError(f"'{raw}' is absolute; give a path relative to the repo root")
    norm = posixpath.normpath(raw)
    if norm == ".":
        raise ValueError(f"'{raw}' names the repo root, not a file")
    if norm == ".." or norm.startswith("../"):
        raise ValueError(f"'{raw}' leaves the repo")
    if norm.split("/", 1)[0] == layout.GIT_DIR:
        raise ValueError(f"'{raw}' is inside {layout.GIT_DIR}/")
    return norm


def missing_for_type(task_type: TaskType, prompt: str | None, output: str | None) -> list[str]:
    """The fields a task type requires that are absent (type custom needs prompt and output)."""
    if task_type is not TaskType.CUSTOM:
        return []
    return [name for name, value in (("output", output), ("prompt", prompt)) if not value]


def runner_problem(task_type: TaskType, runner: Runner) -> str | None:
    """Why `runner` cannot do `task_type`, or None: a `change` needs an agent, a `custom` task one call."""
    if task_type is TaskType.CHANGE and runner is Runner.LLM:
        return ("type change needs an agent runner: set runner to openhands, aider or command "
                "(llm, the default, makes one model call and cannot edit a repo)")
    if task_type is TaskType.CUSTOM and runner is not Runner.LLM:
        return f"type custom is one model call with its own prompt; runner {runner.value} cannot run it (use change)"
    return None


# the JSON Schema's form of `_type_requirements`' rule on `target`, for editors
TARGET_REQUIRED = {"anyOf": [{"required": ["target"]},
                             {"required": ["on_change"], "not": {"required": ["schedule"]}}]}


class TaskSpec(pydantic.BaseModel, extra="forbid", frozen=True, json_schema_extra=TARGET_REQUIRED):
    """A validated task (one-shot) or standing rule (`schedule` / `on_change`)."""

    # The descriptions are the task-file reference: `ohd schema` carries them and
    # `ohd schema --markdown` renders them as the README's table (a test holds the two equal).
    type: TaskType = Field(description="what the task produces")
    target: str | None = Field(
        default=None, json_schema_extra={"default_text": "(required)"},
        description="the source file, relative to the repo root; must stay inside it (no absolute paths, "
                    f"no `..` out of it, nothing under `{layout.GIT_DIR}/`); an `on_change` rule without "
                    "`schedule` needs none (its tasks target the changed file)")
    description: str = Field(default="", max_length=MAX_DESCRIPTION_CHARS,
                             description="what you want, in words; goes into the prompt")
    priority: Priority = Field(default=Priority.NORMAL,
                               description="the queue's order, FIFO within one priority; highest first")
    output: str | None = Field(
        default=None, json_schema_extra={"default_text": "per type"},
        description="where the result goes, relative to the repo root. Default: `unit_test` "
                    "`test_<module>.py` where the repo's tests live (an existing one beside the source or in "
                    "the nearest `tests/` folder holding tests, walking up from the source; else at that "
                    "folder's top), else `tests/test_<module>.py` when the repo has `tests/`, else beside "
                    "the source; `docstring` the target itself; `review` "
                    f"`{layout.REPORT_DIR}/{layout.REVIEWS_DIR}/<file>.md` beside the source; `custom` has none "
                    "(required there)")
    models: list[str] = Field(default_factory=lambda: ["auto"], min_length=1,
                              description="model ids tried in order; `auto` = the configured list, "
                                          "ranked per task type (see Model selection)")
    min_quality: float = Field(default=0.7, ge=0.0, le=1.0, strict=True,
                               description="the validation score needed to accept a result")
    max_attempts: int = Field(default=3, ge=1, le=10, strict=True,
                              description="answers to validate before giving up (a 429 does not spend one)")
    timeout_s: float = Field(default=120.0, gt=0.0, le=3600.0, strict=True,
                             description="the whole task's time limit, in seconds")
    prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS,
                               description="the prompt, for `type: custom` (required there)")
    cache: bool = Field(default=True, strict=True,
                        description="replay an answer a model gave to the very same request (model, prompt, "
                                    "parameters) and that was accepted, instead of asking again; `false` always "
                                    "asks (see Replay cache)")
    rule_levels: dict[str, Literal["error", "warning", "info", "off"]] = Field(
        default_factory=dict, description="this task's validation rule levels over the configuration's "
                                          "`rule_levels`, e.g. `{lint: error, coverage_delta: off}` "
                                          "(see What happens to a task)")
    schedule: str | None = Field(default=None, description="a standing rule: a 5-field cron expression "
                                                           "or a nickname (`@hourly`, `@daily`, `@weekly`, "
                                                           "`@monthly`, `@yearly`), in `timezone` (see "
                                                           "Standing rules)")
    on_change: list[str] | None = Field(default=None, min_length=1,
                                        description="a standing rule: globs of repo paths whose changes "
                                                    "create a task for the changed file (see Standing rules)")
    runner: Runner = Field(default=Runner.LLM,
                           description="who does the task: one model call (`llm`), or a coding agent run in "
                                       "its own git worktree whose diff is the result (see Agent runners)")
    check_command: list[str] | None = Field(
        default=None, json_schema_extra={"default_text": "-"},
        description="an agent runner's check: a command (a string split like a shell does, or a list) run in "
                    "the agent's worktree after it; it must exit 0 for the diff to be accepted")
    deliver: Deliver = Field(default=Deliver.PATCH,
                             description="where an agent's diff goes: "
                                         f"`{layout.REPORT_DIR}/{layout.AGENT_RUN_PREFIX}<id>{layout.PATCH_SUFFIX}` "
                                         f"with a summary beside it, a branch `{layout.BRANCH_PREFIX}<id>` (never "
                                         "checked out), or applied to the working copy when the touched files are "
                                         "clean there")

    @field_validator("target", "output")
    @classmethod
    def _relative_inside(cls, value: str | None) -> str | None:
        return None if value is None else check_relpath(value)

    @field_validator("rule_levels", mode="before")
    @classmethod
    def _yaml_11_off(cls, value: Any) -> Any:
        """YAML 1.1 reads an unquoted `off` (or `no`) as false: that is the level `off`. Its `on`,
        `yes` and `true` name no level."""
        if not isinstance(value, dict):
            return value
        if any(level is True for level in value.values()):
            raise ValueError("on, yes and true are not levels: a level is error, warning, info or off")
        return {rule: "off" if level is False else level for rule, level in value.items()}

    @field_validator("check_command", mode="before")
    @classmethod
    def _argv(cls, value: Any) -> Any:
        """A string is split as a shell would (no shell runs it); a list is the argv itself."""
        if isinstance(value, str):
            try:
                value = shlex.split(value)
            except ValueError as exc:
                raise ValueError(f"cannot split the command: {exc}") from None
        if isinstance(value, list) and (not value or any(not isinstance(v, str) or not v for v in value)):
            raise ValueError("the command must be a non-empty string or a list of non-empty strings")
        return value

    @field_validator("models")
    @classmethod
    def _model_ids(cls, value: list[str]) -> list[str]:
        if any(not m.strip() for m in value):
            raise ValueError("model ids must be non-empty strings")
        return [m.strip() for m in value]

    @field_validator("on_change")
    @classmethod
    def _globs(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not g.strip() for g in value):
            raise ValueError("glob patterns must be non-empty strings")
        return value

    @field_validator("schedule")
    @classmethod
    def _five_fields(cls, value: str | None) -> str | None:
        # a nickname (`@daily`) is one word; `schedule.compile_cron` knows which ones exist
        if value is not None and not value.strip().startswith("@") and len(value.split()) != 5:
            raise ValueError(f"'{value}' is not a cron expression of 5 space-separated fields")
        return value

    @model_validator(mode="after")
    def _type_requirements(self) -> TaskSpec:
        if self.target is None and (self.on_change is None or self.schedule is not None):
            # raised as the field's own error, so that the message names `target` and its line
            why = PydanticCustomError("target_required", "this field is required (only an on_change rule without a "
                                                 "schedule may leave it out: its tasks target the changed file)")
            raise pydantic.ValidationError.from_exception_data(
                "TaskSpec", [InitErrorDetails(type=why, loc=("target",), input=None)])
        missing = missing_for_type(self.type, self.prompt, self.output)
        if missing:
            raise ValueError(f"type {self.type.value} requires {' and '.join(missing)}")
        if problem := runner_problem(self.type, self.runner):
            why = PydanticCustomError("runner_required", problem)
            raise pydantic.ValidationError.from_exception_data(
                "TaskSpec", [InitErrorDetails(type=why, loc=("runner",), input=self.runner.value)])
        return self

    @property
    def agent(self) -> bool:
        """Run by a coding agent in a worktree (not one model call)."""
        return self.runner is not Runner.LLM

    @property
    def file(self) -> str:
        """The target of a task or a scheduled rule (only an on_change rule may have none)."""
        if self.target is None:
            raise ValueError("an on_change rule's spec has no target; its tasks have one")
        return self.target

    @property
    def is_rule(self) -> bool:
        """A standing rule (stays in tasks.d) rather than a one-shot task."""
        return self.schedule is not None or self.on_change is not None


class _Problem(pydantic.BaseModel, frozen=True):
    message: str
    field: str | None = None
    line: int | None = None

    def describe(self) -> str:
        where = f"line {self.line}" if self.line is not None else ""
        if self.field:
            where = f"{where} field '{self.field}'".strip()
        return f"{where}: {self.message}" if where else self.message


def parse(text: str, source: str = "<task>") -> TaskSpec:
    """Parse a YAML task file; raise TaskFileError naming the first problem (and listing all)."""
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from exc
    if data is None:
        raise TaskFileError(source, "the file is empty")
    if not isinstance(data, dict) or not isinstance(root, yaml.MappingNode):
        kind = type(data).__name__
        raise TaskFileError(source, f"the top level must be a mapping of keys to values, not a {kind}", line=1)
    problems = _key_problems(root) + _type_problems(data, root)
    try:
        spec = TaskSpec.model_validate(data)
    except pydantic.ValidationError as exc:
        found = _pydantic_problems(exc, root)
        problems += [p for p in found if p.field or not problems]
    else:
        if not problems:
            return spec
    raise _as_error(problems, source)


def parse_bytes(data: bytes, source: str = "<task>") -> TaskSpec:
    """`parse` for a file's bytes: text that is not UTF-8, nesting too deep for the YAML parser
    or an integer of 4,300+ digits is a `TaskFileError` too, never another exception."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TaskFileError(source, f"not UTF-8 text (byte {exc.start})") from None
    try:
        return parse(text, source=source)
    except (RecursionError, ValueError) as exc:
        raise TaskFileError(source, f"cannot be read as a task file ({type(exc).__name__}: "
                                    f"{str(exc)[:200]})") from None


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a task file (for `ohd schema` and editors)."""
    return TaskSpec.model_json_schema()


def reference_markdown() -> str:
    """The task-file reference as a Markdown table (key, default, meaning), from the schema's fields.

    The README holds this table between marker comments; `ohd schema --markdown` prints it.
    """
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for name, info in TaskSpec.model_fields.items():
        rows.append(f"| `{name}` | {_default_text(info)} | {_meaning(info).replace('|', chr(92) + '|')} |")
    return "\n".join(rows) + "\n"


def _default_text(info: FieldInfo) -> str:
    extra = info.json_schema_extra
    if isinstance(extra, dict) and isinstance(extra.get("default_text"), str):
        return str(extra["default_text"])
    if info.is_required():
        return "(required)"
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "-"
    if isinstance(value, StrEnum):
        return f"`{value.value}`"
    if isinstance(value, list):
        return f"`[{', '.join(map(str, value))}]`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int | float):
        return f"`{_number(value)}`"
    return f"`{json.dumps(value)}`"


def _meaning(info: FieldInfo) -> str:
    """The description, then the allowed values of an enum and the bounds of a number or list."""
    text = info.description or ""
    kind = info.annotation
    if isinstance(kind, type) and issubclass(kind, StrEnum):
        names = [f"`{member.value}`" for member in kind]
        text += ": " + ", ".join(names[:-1]) + " or " + names[-1]
    bounds = []
    for item in info.metadata:
        for attr, phrase in (("ge", "at least"), ("gt", "more than"), ("le", "at most"), ("lt", "less than")):
            if isinstance(getattr(item, attr, None), int | float):
                bounds.append(f"{phrase} {_number(getattr(item, attr))}")
        if getattr(item, "min_length", None) == 1:
            bounds.append("not empty")
        if isinstance(getattr(item, "max_length", None), int):
            bounds.append(f"at most {item.max_length:,} characters")
    return f"{text}; {', '.join(bounds)}" if bounds else text


def _number(value: float) -> str:
    return f"{value:g}"


def _yaml_error(exc: yaml.YAMLError, source: str) -> TaskFileError:
    mark = getattr(exc, "problem_mark", None)
    line = mark.line + 1 if mark is not None else None
    problem = getattr(exc, "problem", None) or str(exc)
    return TaskFileError(source, f"invalid YAML: {problem}", line=line)


def _key_lines(root: yaml.MappingNode) -> dict[str, int]:
    """First line of each top-level key (1-based)."""
    lines: dict[str, int] = {}
    for key_node, _ in root.value:
        lines.setdefault(str(key_node.value), key_node.start_mark.line + 1)
    return lines


def _key_problems(root: yaml.MappingNode) -> list[_Problem]:
    """Duplicate top-level keys (yaml.safe_load silently keeps the last one)."""
    seen: set[str] = set()
    problems: list[_Problem] = []
    for key_node, _ in root.value:
        key = str(key_node.value)
        if key in seen:
            problems.append(_Problem(message="duplicate key", field=key, line=key_node.start_mark.line + 1))
        seen.add(key)
    return problems


def _type_problems(data: Mapping[Any, Any], root: yaml.MappingNode) -> list[_Problem]:
    """What a task type requires beyond the schema, reported on the field (with a line)."""
    lines = _key_lines(root)
    problems: list[_Problem] = []
    try:
        task_type = TaskType(str(data.get("type")))
    except ValueError:
        return problems
    prompt, output = data.get("prompt"), data.get("output")
    for name in missing_for_type(task_type, prompt if isinstance(prompt, str) else None,
                                 output if isinstance(output, str) else None):
        problems.append(_Problem(message=f"type {task_type.value} requires '{name}'", field=name,
                                 line=lines.get(name, lines.get("type"))))
    return problems


def _pydantic_problems(exc: pydantic.ValidationError, root: yaml.MappingNode) -> list[_Problem]:
    problems = []
    for err in exc.errors():
        loc = err["loc"]
        field = ".".join(str(part) for part in loc) if loc else None
        problems.append(_Problem(message=_message(err), field=field, line=_line_of(root, loc)))
    return problems


def _message(err: Mapping[str, Any]) -> str:
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(TaskSpec.model_fields)
        return f"unknown field (allowed: {allowed})"
    if err["type"] == "missing":
        return "this field is required"
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")


def _line_of(root: yaml.MappingNode, loc: tuple[int | str, ...]) -> int | None:
    """The line of the node at `loc`: the list item for `models.1`, else the top-level key."""
    if not loc:
        return None
    for key_node, value_node in root.value:
        if str(key_node.value) != str(loc[0]):
            continue
        if len(loc) > 1 and isinstance(value_node, yaml.SequenceNode) and isinstance(loc[1], int):
            items = value_node.value
            if 0 <= loc[1] < len(items):
                return int(items[loc[1]].start_mark.line) + 1
        return int(key_node.start_mark.line) + 1
    return None


def _as_error(problems: list[_Problem], source: str) -> TaskFileError:
    first = problems[0]
    message = first.message
    if len(problems) > 1:
        message += "; also " + "; ".join(p.describe() for p in problems[1:])
    return TaskFileError(source, message, field=first.field, line=first.line)
