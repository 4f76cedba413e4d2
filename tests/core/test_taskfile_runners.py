"""The agent runners' task-file fields: runner, type change, check_command, deliver."""

from __future__ import annotations

import pytest

from ohd.core.taskfile import Deliver, Runner, TaskType, parse
from ohd.errors import TaskFileError


def test_a_change_task_names_its_agent_and_check() -> None:
    spec = parse("type: change\ntarget: shop/pricing.py\ndescription: round half up\nrunner: command\n"
                 "check_command: python -m pytest -q 'tests/a b.py'\ndeliver: branch\n")
    assert (spec.type, spec.runner, spec.deliver) == (TaskType.CHANGE, Runner.COMMAND, Deliver.BRANCH)
    assert spec.check_command == ["python", "-m", "pytest", "-q", "tests/a b.py"]
    assert spec.agent


def test_the_defaults_are_one_model_call_and_a_patch() -> None:
    spec = parse("type: unit_test\ntarget: shop/pricing.py\n")
    assert (spec.runner, spec.deliver, spec.check_command, spec.agent) == (Runner.LLM, Deliver.PATCH, None, False)


def test_a_check_command_may_be_a_list() -> None:
    spec = parse("type: unit_test\ntarget: a.py\nrunner: aider\ncheck_command: [pytest, -x]\n")
    assert spec.check_command == ["pytest", "-x"]


def test_a_change_without_an_agent_names_the_runner_field_and_its_line() -> None:
    with pytest.raises(TaskFileError) as caught:
        parse("type: change\ntarget: a.py\ndescription: do it\n", "tasks.d/c.yaml")
    assert caught.value.field == "runner" and "needs an agent runner" in str(caught.value)
    with pytest.raises(TaskFileError) as caught:
        parse("type: change\ntarget: a.py\nrunner: llm\n", "tasks.d/c.yaml")
    assert (caught.value.field, caught.value.line) == ("runner", 3)


@pytest.mark.parametrize(("text", "field"), [
    ("type: review\ntarget: a.py\nrunner: codex\n", "runner"),
    ("type: review\ntarget: a.py\nrunner: aider\ncheck_command: ''\n", "check_command"),
    ("type: review\ntarget: a.py\nrunner: aider\ncheck_command: \"pytest 'x\"\n", "check_command"),
    ("type: review\ntarget: a.py\nrunner: aider\ndeliver: push\n", "deliver"),
])
def test_bad_agent_fields_are_named(text: str, field: str) -> None:
    with pytest.raises(TaskFileError) as caught:
        parse(text)
    assert caught.value.field == field
