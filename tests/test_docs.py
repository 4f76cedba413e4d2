"""The README's references are checked against the code, so they cannot drift unnoticed.

The task-file table is generated (`ohd schema --markdown`) and must equal the README's
block; the CLI reference must name every subcommand and flag the parser defines; the
configuration table must name every `Settings` key.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ohd.cli.commands import build_parser, main
from ohd.config import Settings
from ohd.core.taskfile import reference_markdown

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- task-file-reference:start -->\n", "<!-- task-file-reference:end -->"


def section(text: str, title: str) -> str:
    """The text of `## title` up to the next `## ` heading."""
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def task_file_block(text: str) -> str:
    assert START in text and END in text, f"README.md has lost its {START.strip()} / {END} markers"
    return text.split(START, 1)[1].split(END, 1)[0]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_the_readme_task_file_table_is_the_one_the_schema_renders() -> None:
    assert task_file_block(README.read_text(encoding="utf-8")) == reference_markdown(), (
        "README.md's task-file table differs from the schema in daemon/ohd/core/taskfile.py; regenerate it: "
        "replace the lines between the task-file-reference markers with the output of `ohd schema --markdown`")


def test_ohd_schema_markdown_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out == reference_markdown()
    assert out.startswith("| key | default | meaning |\n")
    assert "| `type` | (required) | what the task produces: `unit_test`, `docstring`, `review`, `custom` or `change` |" in out
    assert "| `max_attempts` | `3` |" in out and "at least 1, at most 10" in out


def test_every_task_file_key_has_a_description_in_the_json_schema() -> None:
    from ohd.core.taskfile import json_schema

    undescribed = [name for name, prop in json_schema()["properties"].items() if not prop.get("description")]
    assert undescribed == []


def test_the_cli_reference_names_every_subcommand_and_its_flags() -> None:
    cli = section(README.read_text(encoding="utf-8"), "Command line")
    rows = [line for line in cli.splitlines() if line.startswith("| `ohd ")]
    missing = []
    for name, parser in subcommands().items():
        mine = [row for row in rows if re.search(rf"`ohd {re.escape(name)}(?=[ `])", row)]
        if not mine:
            missing.append(f"ohd {name}")
            continue
        for action in parser._actions:
            flags = [flag for flag in action.option_strings if flag not in ("-h", "--help", "--json")]
            if flags and not any(re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", mine[0]) for flag in flags):
                missing.append(f"ohd {name} {flags[-1]}")
    assert missing == [], f"the README's '## Command line' table does not mention: {', '.join(missing)}"


def test_the_cli_reference_names_the_global_flags() -> None:
    cli = section(README.read_text(encoding="utf-8"), "Command line")
    flags = [flag for action in build_parser()._actions for flag in action.option_strings
             if flag.startswith("--") and flag != "--help"]
    assert [flag for flag in flags if f"`{flag}" not in cli] == []


def test_the_configuration_table_names_every_setting() -> None:
    conf = section(README.read_text(encoding="utf-8"), "Configuration")
    keys = [name for name, info in Settings.model_fields.items() if not info.exclude]   # api_key: env only
    rows = [line for line in conf.splitlines() if line.startswith("| `")]
    missing = [key for key in keys if not any(f"`{key}`" in row.split(" | ")[0] for row in rows)]
    assert missing == [], f"the README's '## Configuration' table has no row for: {', '.join(missing)}"


def table_rows(section_text: str) -> list[list[str]]:
    """The cells of each table row (`\\|` inside a cell does not split it)."""
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
            for line in section_text.splitlines() if line.startswith("| `")]


def rendered_default(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return f"{value:g}"
    if value == [] or value == {}:
        return "[]" if value == [] else "{}"
    return str(value)


def test_the_configuration_table_gives_the_real_defaults() -> None:
    """Where a row gives one literal default per key (`workers` | `4`), it is the Settings default
    (paths depend on the machine and prose defaults such as "local time" are not checked)."""
    wrong = []
    for cells in table_rows(section(README.read_text(encoding="utf-8"), "Configuration")):
        keys, defaults = re.findall(r"`([a-z_]+)`", cells[0]), re.findall(r"`([^`]*)`", cells[1])
        if len(keys) != len(defaults):
            continue
        for key, shown in zip(keys, defaults):
            value = Settings.model_fields[key].get_default(call_default_factory=True)
            if not isinstance(value, Path) and rendered_default(value) != shown:
                wrong.append(f"{key}: README says {shown!r}, the code {rendered_default(value)!r}")
    assert wrong == [], "the README's '## Configuration' defaults differ from config.py: " + "; ".join(wrong)

def shown_commands(text: str) -> list[str]:
    """Every `ohd ...` the README shows: inline code, and lines of code blocks (fenced or indented)."""
    shown = re.findall(r"`(ohd [^`]*)`", text)
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        code = line.strip() if fenced or line.startswith("    ") else ""
        code = code.removeprefix("$ ").split("#", 1)[0].strip()
        if code.startswith("ohd "):
            shown.append(code)
    return shown


def test_every_command_the_readme_shows_exists_with_those_flags() -> None:
    """Troubleshooting, Providers and the rest cite commands a user will type: each subcommand
    and flag must be one the parser knows (so a renamed flag cannot leave the README wrong)."""
    parser, commands = build_parser(), subcommands()
    top = {flag for action in parser._actions for flag in action.option_strings}
    wrong = []
    for shown in shown_commands(README.read_text(encoding="utf-8")):
        words = [w for w in shown.split()[1:] if w != "\\|"]
        while words and words[0] in top:
            words = words[2:] if words[0] == "--config" else words[1:]
        if not words:
            continue
        if words[0] not in commands:
            if not re.fullmatch(r"[a-z][a-z-]*", words[0]):
                continue                                   # prose after `ohd` (e.g. "ohd 0.1.0  pid ...")
            wrong.append(f"{shown!r}: no subcommand {words[0]!r}")
            continue
        known = {flag for action in commands[words[0]]._actions for flag in action.option_strings}
        for flag in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", " ".join(words[1:])):
            if flag not in known:
                wrong.append(f"{shown!r}: ohd {words[0]} has no flag {flag}")
    assert wrong == [], "the README shows commands the parser does not know:\n" + "\n".join(wrong)


def yaml_examples(text: str) -> list[str]:
    """Every fenced ```yaml block of the README (inside a list item too), dedented."""
    return [textwrap.dedent(body) for _indent, body in
            re.findall(r"^( *)```yaml\n(.*?)^\1```$", text, flags=re.DOTALL | re.MULTILINE)]


def inline_task_examples(text: str) -> list[str]:
    """Task-file snippets shown inline in the task-file table, e.g. `{lint: error, coverage_delta: off}`."""
    found = []
    for cells in table_rows(task_file_block(text)):
        key = cells[0].strip("` ")
        found += [f"{key}: {m}" for m in re.findall(r"e\.g\. `(\{[^`]*\})`", cells[2])]
    return found


def test_every_yaml_example_of_the_readme_is_a_valid_task_file() -> None:
    """Each example goes through the loader ohd itself uses on tasks.d/ files."""
    from ohd.core.taskfile import parse

    text = README.read_text(encoding="utf-8")
    blocks = yaml_examples(text)
    assert len(blocks) >= 3 and any("rule_levels" in block for block in blocks)
    for block in blocks:
        parse(block, "README.md")
    inline = inline_task_examples(text)
    assert "rule_levels: {lint: error, coverage_delta: off}" in inline
    for snippet in inline:
        parse("type: unit_test\ntarget: shop/pricing.py\n" + snippet + "\n", "README.md")


@pytest.mark.parametrize(("script", "flags"), [
    ("bench/fleet.py", ("--tasks", "--quick", "--daemons", "--workers", "--postgres-url", "--no-floor")),
    ("bench/ratelimit.py", ("--tasks", "--quick", "--workers")),
])
def test_a_bench_the_readme_cites_answers_help_with_its_options(script: str, flags: tuple[str, ...]) -> None:
    """(argparse answers before any server, daemon or database is started)"""
    assert f"python {script}" in README.read_text()
    done = subprocess.run([sys.executable, str(README.parent / script), "--help"], capture_output=True, text=True,
                          timeout=120, cwd=README.parent)
    assert done.returncode == 0, done.stderr
    for flag in flags:
        assert flag in done.stdout, flag
