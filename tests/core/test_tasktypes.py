"""Task types: default outputs, import names, prompts, and extraction of the candidate from a reply."""

from __future__ import annotations

import re

import pytest

from ohd.core.taskfile import TaskType
from ohd.core.tasktypes import Job, default_output, extract, fence, fenced_blocks, import_root, messages, module_name
from ohd.errors import MalformedAnswer, TaskFileError

SOURCE = "def add(a, b):\n    return a + b\n"


def job(task_type: TaskType = TaskType.UNIT_TEST, **fields: object) -> Job:
    values: dict[str, object] = {"task_type": task_type, "target": "src/app/calc.py", "source": SOURCE,
                                 "module": "app.calc", "output": "tests/test_calc.py", **fields}
    return Job(**values)  # type: ignore[arg-type]


def packages(*dirs: str) -> object:
    return lambda rel: rel in dirs


# --- default_output ------------------------------------------------------------------------


@pytest.mark.parametrize(("task_type", "target", "has_tests", "expected"), [
    (TaskType.UNIT_TEST, "src/app/auth.py", True, "tests/test_auth.py"),
    (TaskType.UNIT_TEST, "src/app/auth.py", False, "src/app/test_auth.py"),
    (TaskType.UNIT_TEST, "auth.py", False, "test_auth.py"),
    (TaskType.DOCSTRING, "src/app/auth.py", True, "src/app/auth.py"),
    (TaskType.REVIEW, "src/app/auth.py", True, "src/app/.ohd/reviews/auth.py.md"),
    (TaskType.REVIEW, "auth.py", False, ".ohd/reviews/auth.py.md"),
])
def test_default_output_per_type(task_type: TaskType, target: str, has_tests: bool, expected: str) -> None:
    assert default_output(task_type, target, has_tests) == expected


def test_custom_task_has_no_default_output() -> None:
    with pytest.raises(TaskFileError) as caught:
        default_output(TaskType.CUSTOM, "src/app/auth.py", True)
    assert caught.value.field == "output"


# --- module_name / import_root -------------------------------------------------------------


@pytest.mark.parametrize(("target", "package_dirs", "module", "root"), [
    ("src/app/auth.py", ("src/app",), "app.auth", "src"),
    ("src/app/sub/auth.py", ("src/app", "src/app/sub"), "app.sub.auth", "src"),
    ("shop/pricing.py", ("shop",), "shop.pricing", ""),
    ("scripts/tool.py", (), "tool", "scripts"),
    ("calc.py", (), "calc", ""),
    ("src/app/__init__.py", ("src/app",), "app", "src"),
])
def test_module_name_and_import_root(target: str, package_dirs: tuple[str, ...], module: str, root: str) -> None:
    is_package = packages(*package_dirs)
    assert module_name(target, is_package) == module  # type: ignore[arg-type]
    assert import_root(target, is_package) == root  # type: ignore[arg-type]


# --- messages ------------------------------------------------------------------------------


def test_unit_test_prompt_names_output_module_and_format() -> None:
    system, user = messages(job(description="Cover the overflow path"))
    assert (system["role"], user["role"]) == ("system", "user")
    text = user["content"]
    for expected in ("`tests/test_calc.py`", "import app.calc", "test_*", "Cover the overflow path",
                     "```python\n" + SOURCE, "exactly one ```python fenced block", "no network"):
        assert expected in text


def test_prompt_carries_context_files_and_feedback_from_the_last_attempt() -> None:
    text = messages(job(context=(("tests/test_calc.py", "def test_old():\n    assert True\n"),),
                        feedback=("no test functions found", "the tests assert nothing")))[1]["content"]
    assert "`tests/test_calc.py` already exists" in text and "def test_old():" in text
    assert "- no test functions found\n- the tests assert nothing" in text
    assert "rejected" in text


def test_source_holding_fences_is_wrapped_in_a_longer_fence() -> None:
    source = 'DOC = """\n```python\nx = 1\n```\n"""\n'
    text = messages(job(source=source))[1]["content"]
    assert "````python\n" + source + "````" in text


@pytest.mark.parametrize(("task_type", "expected"), [
    (TaskType.DOCSTRING, "Change nothing else"),
    (TaskType.REVIEW, "Markdown"),
    (TaskType.CUSTOM, "List every public name"),
])
def test_each_type_asks_for_its_own_thing(task_type: TaskType, expected: str) -> None:
    text = messages(job(task_type, prompt="List every public name", output="docs/names.md"))[1]["content"]
    assert expected in text and SOURCE in text


def test_custom_prompt_asks_for_one_block_for_its_output() -> None:
    text = messages(job(TaskType.CUSTOM, prompt="Write a summary", output="docs/summary.md"))[1]["content"]
    assert "`docs/summary.md` in exactly one fenced code block" in text


def test_fence_is_longer_than_any_backtick_run() -> None:
    assert fence("a ```` b", "py") == "`````py\na ```` b\n`````"
    assert fence("x = 1\n\n") == "```\nx = 1\n```"


# --- extract: code types -------------------------------------------------------------------

CODE = "import app.calc\n\n\ndef test_add() -> None:\n    assert app.calc.add(1, 2) == 3\n"


@pytest.mark.parametrize("opening", ["```python", "```py", "```", "``` Python3", "~~~python", "````python"])
def test_one_fenced_block_gives_its_body(opening: str) -> None:
    closing = re.match(r"[`~]+", opening)[0]  # type: ignore[index]
    reply = f"Here are the tests.\n\n{opening}\n{CODE}{closing}\n\nThey cover add()."
    assert extract(TaskType.UNIT_TEST, reply) == CODE


def test_a_block_of_another_language_beside_the_python_block_is_ignored() -> None:
    reply = f"```python\n{CODE}```\nRun them with:\n```bash\npytest -q\n```\n"
    assert extract(TaskType.UNIT_TEST, reply) == CODE


def test_inner_fences_in_a_longer_fence_stay_in_the_body() -> None:
    body = 'DOC = """\n```python\nx = 1\n```\n"""\n'
    assert extract(TaskType.DOCSTRING, f"````python\n{body}````") == body


def test_indented_fence_in_a_list_item_is_dedented() -> None:
    reply = "1. The file:\n\n   ```python\n   def f():\n       return 1\n   ```\n"
    assert extract(TaskType.DOCSTRING, reply) == "def f():\n    return 1\n"


def test_form_feed_and_crlf_survive_extraction() -> None:
    reply = "```python\r\nx = 1\r\n\x0c\r\ny = 2\r\n```\r\n"
    assert extract(TaskType.DOCSTRING, reply) == "x = 1\n\x0c\ny = 2\n"


def test_unfenced_reply_that_is_a_python_module_is_taken_whole() -> None:
    assert extract(TaskType.UNIT_TEST, "\n" + CODE + "\n\n") == CODE


def _reason(task_type: TaskType, reply: str) -> str:
    with pytest.raises(MalformedAnswer) as caught:
        extract(task_type, reply)
    assert caught.value.model == "?"
    return caught.value.message


@pytest.mark.parametrize(("reply", "reason"), [
    ("", "empty"),
    ("  \n\t\n", "empty"),
    (f"```python\n{CODE}```\nor:\n```python\n{CODE}```", "2 Python code blocks"),
    ("```python\n\n  \n```", "code block is empty"),
    (f"```python\n{CODE}", "never closed"),
    ("```bash\npytest\n```", "no Python code block (only: bash)"),
    ("Sure", "not a Python module"),
    ("I cannot write tests for this: it does not parse.", "not a Python module"),
    ('"""only a docstring"""', "not a Python module"),
])
def test_unusable_replies_are_malformed_with_a_reason(reply: str, reason: str) -> None:
    assert reason in _reason(TaskType.UNIT_TEST, reply)


# --- extract: review and custom ------------------------------------------------------------


def test_review_is_the_markdown_text_itself() -> None:
    review = "# Review\n\n- line 3: `x` is unused\n\n```python\nx = 1\n```\n\n- fine otherwise"
    assert extract(TaskType.REVIEW, f"\n\n{review}\n\n") == review + "\n"


def test_review_wrapped_whole_in_a_markdown_fence_is_unwrapped() -> None:
    assert extract(TaskType.REVIEW, "```markdown\n# Review\n\nAll good.\n```") == "# Review\n\nAll good.\n"


def test_review_with_a_stray_fence_is_kept_as_text() -> None:
    assert extract(TaskType.REVIEW, "# Review\n\n```\nunclosed") == "# Review\n\n```\nunclosed\n"


def test_empty_review_is_malformed() -> None:
    assert "empty" in _reason(TaskType.REVIEW, " \n ")


def test_custom_takes_one_block_of_any_language_or_the_text() -> None:
    assert extract(TaskType.CUSTOM, "Here:\n```yaml\nkey: 1\n```\n") == "key: 1\n"
    assert extract(TaskType.CUSTOM, "# Summary\n\nIt adds.\n") == "# Summary\n\nIt adds.\n"
    assert "2 code blocks" in _reason(TaskType.CUSTOM, "```yaml\na: 1\n```\n```yaml\nb: 2\n```")


def test_fenced_blocks_report_language_and_body_in_order() -> None:
    blocks = fenced_blocks("a\n```Python extra\nx\n```\n~~~\ny\n~~~\n")
    assert [(b.lang, b.body) for b in blocks] == [("python", "x"), ("", "y")]


@pytest.mark.parametrize(("target", "has_tests", "test_files", "expected"), [
    # tests inside the package (no top-level tests/): beside them, not in the package's own folder
    ("pkg/mod.py", False, ["pkg/tests/test_other.py"], "pkg/tests/test_mod.py"),
    ("pkg/sub/mod.py", False, ["pkg/tests/test_other.py"], "pkg/tests/test_mod.py"),
    # the nearest tests folder wins over the top-level one
    ("pkg/mod.py", True, ["tests/test_cli.py", "pkg/tests/test_other.py"], "pkg/tests/test_mod.py"),
    ("other/mod.py", True, ["tests/test_cli.py", "pkg/tests/test_other.py"], "tests/test_mod.py"),
    # the module's existing tests, wherever they are in that folder
    ("src/pkg/mod.py", True, ["tests/pkg/test_mod.py", "tests/test_a.py"], "tests/pkg/test_mod.py"),
    ("mod.py", False, ["test/unit/test_a.py"], "test/test_mod.py"),
    ("pkg/mod.py", False, ["pkg/test_mod.py", "tests/test_a.py"], "pkg/test_mod.py"),
    # no tests anywhere: as before
    ("src/app/auth.py", True, [], "tests/test_auth.py"),
    ("src/app/auth.py", False, [], "src/app/test_auth.py"),
])
def test_a_unit_test_goes_where_the_repos_tests_live(target: str, has_tests: bool, test_files: list[str],
                                                     expected: str) -> None:
    assert default_output(TaskType.UNIT_TEST, target, has_tests, test_files) == expected
