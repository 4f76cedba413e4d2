"""taskfile: YAML task files → TaskSpec, or TaskFileError naming the field and line."""

from __future__ import annotations

import pydantic
import pytest

from ohd.core.taskfile import Priority, TaskSpec, TaskType, check_relpath, json_schema, parse
from ohd.errors import TaskFileError

FULL = """\
type: unit_test
target: src/app/auth.py
description: Cover the login and lockout paths
priority: high
output: tests/test_auth.py
models: [auto, "meta/llama:free"]
min_quality: 0.8
max_attempts: 4
timeout_s: 90
"""


def error_of(text: str) -> TaskFileError:
    with pytest.raises(TaskFileError) as info:
        parse(text, "tasks.d/t.yaml")
    return info.value


def test_full_file_parses_every_field() -> None:
    spec = parse(FULL, "tasks.d/t.yaml")
    assert spec.type is TaskType.UNIT_TEST
    assert spec.target == "src/app/auth.py"
    assert spec.priority is Priority.HIGH
    assert spec.output == "tests/test_auth.py"
    assert spec.models == ["auto", "meta/llama:free"]
    assert (spec.min_quality, spec.max_attempts, spec.timeout_s) == (0.8, 4, 90.0)
    assert not spec.is_rule


def test_defaults() -> None:
    spec = parse("type: review\ntarget: a.py\n")
    assert spec.priority is Priority.NORMAL
    assert spec.models == ["auto"]
    assert (spec.min_quality, spec.max_attempts, spec.timeout_s) == (0.7, 3, 120.0)
    assert spec.output is None and spec.prompt is None and spec.description == ""


def test_priority_rank_orders_critical_first() -> None:
    ranks = [p.rank for p in (Priority.CRITICAL, Priority.HIGH, Priority.NORMAL, Priority.LOW)]
    assert ranks == [3, 2, 1, 0]


def test_spec_is_frozen() -> None:
    spec = parse("type: review\ntarget: a.py\n")
    with pytest.raises(pydantic.ValidationError):
        spec.target = "b.py"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("./a/b.py", "a/b.py"), ("a//b.py", "a/b.py"), ("a/../b.py", "b.py"), ("src/./x/", "src/x")],
)
def test_paths_are_normalised(raw: str, expected: str) -> None:
    assert parse(f"type: review\ntarget: '{raw}'\n").target == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("/etc/passwd", "absolute"),
        ("../outside.py", "leaves the repo"),
        ("a/../../x.py", "leaves the repo"),
        (".git/config", ".git/"),
        ("./.git/hooks/pre-commit", ".git/"),
        ("", "empty"),
        (".", "repo root"),
    ],
)
def test_bad_target_is_rejected_on_its_line(raw: str, reason: str) -> None:
    err = error_of(f"type: review\n\ntarget: '{raw}'\n")
    assert err.field == "target"
    assert err.line == 3
    assert reason in err.message


def test_bad_output_is_rejected_too() -> None:
    err = error_of("type: unit_test\ntarget: a.py\noutput: ../x.py\n")
    assert (err.field, err.line) == ("output", 3)


def test_git_like_names_that_are_not_git_are_fine() -> None:
    assert check_relpath(".github/workflows/ci.yml") == ".github/workflows/ci.yml"
    assert check_relpath("a/.git/x") == "a/.git/x"  # a nested repo is not ours to guard here


def test_empty_file() -> None:
    for text in ("", "\n\n", "# only a comment\n"):
        assert error_of(text).message == "the file is empty"


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(text: str) -> None:
    assert "top level must be a mapping" in error_of(text).message


def test_yaml_syntax_error_carries_its_line() -> None:
    err = error_of("type: review\ntarget: a.py\nmodels: [a, b\n")
    assert "invalid YAML" in err.message
    assert err.line is not None and err.line >= 3


def test_unknown_key_is_named_with_its_line() -> None:
    err = error_of("type: review\ntarget: a.py\ntargte: b.py\n")
    assert (err.field, err.line) == ("targte", 3)
    assert "unknown field" in err.message
    assert "tasks.d/t.yaml:3: field 'targte'" in str(err)


def test_missing_required_field() -> None:
    err = error_of("target: a.py\n")
    assert err.field == "type"
    assert "required" in err.message


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("priority: urgent", "priority"),
        ("min_quality: 1.5", "min_quality"),
        ("min_quality: -0.1", "min_quality"),
        ("min_quality: 'high'", "min_quality"),
        ("max_attempts: 0", "max_attempts"),
        ("max_attempts: 11", "max_attempts"),
        ("max_attempts: '3'", "max_attempts"),
        ("max_attempts: 2.5", "max_attempts"),
        ("timeout_s: 0", "timeout_s"),
        ("timeout_s: 3601", "timeout_s"),
        ("models: []", "models"),
        ("models: auto", "models"),
        ("description: [a]", "description"),
        ("on_change: []", "on_change"),
        ("on_change: 'src/*.py'", "on_change"),
        ("schedule: '0 3 * *'", "schedule"),
        ("schedule: 5", "schedule"),
    ],
)
def test_wrong_values_name_field_and_line(line: str, field: str) -> None:
    err = error_of(f"type: review\ntarget: a.py\n{line}\n")
    assert err.field == field
    assert err.line == 3


def test_bad_list_item_points_at_the_item_line() -> None:
    err = error_of("type: review\ntarget: a.py\nmodels:\n  - a\n  - 3\n")
    assert (err.field, err.line) == ("models.1", 5)


def test_bounds_are_inclusive_where_the_contract_says() -> None:
    spec = parse("type: review\ntarget: a\nmin_quality: 0\nmax_attempts: 10\ntimeout_s: 3600\n")
    assert (spec.min_quality, spec.max_attempts, spec.timeout_s) == (0.0, 10, 3600.0)
    assert parse("type: review\ntarget: a\nmin_quality: 1\n").min_quality == 1.0


def test_a_description_or_prompt_too_long_for_a_prompt_is_refused_on_its_line() -> None:
    err = error_of("type: review\ntarget: a.py\ndescription: " + "x" * 20_001 + "\n")
    assert (err.field, err.line) == ("description", 3)
    assert "at most 20000 characters" in err.message
    err = error_of("type: custom\ntarget: a.py\noutput: n.md\nprompt: " + "x" * 200_001 + "\n")
    assert (err.field, err.line) == ("prompt", 4)
    assert parse("type: review\ntarget: a.py\ndescription: " + "x" * 20_000 + "\n").description == "x" * 20_000


def test_custom_requires_output_and_prompt() -> None:
    err = error_of("type: custom\ntarget: a.py\nprompt: do it\n")
    assert (err.field, err.line) == ("output", 1)
    err = error_of("type: custom\ntarget: a.py\noutput: notes.md\n")
    assert err.field == "prompt"
    spec = parse("type: custom\ntarget: a.py\noutput: notes.md\nprompt: summarise\n")
    assert spec.prompt == "summarise"


def test_custom_requirement_holds_for_direct_construction() -> None:
    with pytest.raises(pydantic.ValidationError):
        TaskSpec(type=TaskType.CUSTOM, target="a.py")


def test_duplicate_key_is_an_error() -> None:
    err = error_of("type: review\ntarget: a.py\ntarget: b.py\n")
    assert (err.field, err.line) == ("target", 3)


def test_message_lists_every_problem() -> None:
    err = error_of("type: nope\ntarget: 3\nmax_attempts: 99\n")
    assert err.field == "type"
    assert "target" in err.message and "max_attempts" in err.message


def test_standing_rules() -> None:
    sched = parse("type: docstring\ntarget: a.py\nschedule: '0 3 * * *'\n")
    assert sched.is_rule and sched.schedule == "0 3 * * *"
    watch = parse("type: unit_test\ntarget: a.py\non_change: ['src/**/*.py']\n")
    assert watch.is_rule and watch.on_change == ["src/**/*.py"]


def test_target_is_optional_only_for_an_on_change_rule_without_schedule() -> None:
    assert parse("type: unit_test\non_change: ['src/**/*.py']\n").target is None
    for text in ("type: review\n", "type: review\nschedule: '0 3 * * *'\n",
                 "type: review\non_change: ['*.py']\nschedule: '0 3 * * *'\n"):
        err = error_of(text)
        assert err.field == "target" and "required" in err.message and "on_change" in err.message


def test_json_schema_describes_the_fields() -> None:
    schema = json_schema()
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"type"}         # and `target`, unless an on_change rule without schedule:
    assert schema["anyOf"] == [{"required": ["target"]},
                               {"required": ["on_change"], "not": {"required": ["schedule"]}}]
    assert {"type", "target", "priority", "models", "on_change"} <= set(schema["properties"])


@pytest.mark.parametrize("written", ["off", "Off", "OFF", "no", "false", "'off'"])
def test_an_unquoted_off_level_is_off_although_yaml_11_reads_it_as_false(written: str) -> None:
    spec = parse(f"type: unit_test\ntarget: a.py\nrule_levels: {{lint: error, coverage_delta: {written}}}\n")
    assert spec.rule_levels == {"lint": "error", "coverage_delta": "off"}


@pytest.mark.parametrize("written", ["on", "yes", "true"])
def test_on_is_refused_as_a_level_with_the_levels_named(written: str) -> None:
    with pytest.raises(TaskFileError) as caught:
        parse(f"type: unit_test\ntarget: a.py\nrule_levels:\n  lint: {written}\n")
    assert "error, warning, info or off" in str(caught.value) and caught.value.line is not None
