"""The lint room: run ruff on a candidate Python output, as the user's repo would.

Edge: ruff reads the candidate on stdin (`--stdin-filename` = the intended output, so
the repo's own ruff configuration and per-file ignores apply) with cwd = the repo; it
never writes a file (`--no-cache`). Ruff is optional: `find_ruff` looks next to the
running interpreter, then on PATH, and `lint` is only called when it found one.
Invariant: a ruff that cannot run or answers garbage gives a `LintRun` with `error`
set (the rule is then left out of the verdict, and the report says why), never an
exception, and its environment holds no API key.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sysconfig
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from ohd.ladder.validate import LintRun

log = logging.getLogger("ohd.lintrun")

TIMEOUT_S = 30.0
_VERSIONS: dict[str, str] = {}   # ruff executable -> "ruff x.y.z"


def find_ruff(environ: Mapping[str, str] | None = None) -> str | None:
    """The ruff executable: the one installed beside this Python (the venv), else PATH's."""
    environ = os.environ if environ is None else environ
    scripts = sysconfig.get_path("scripts")
    return shutil.which("ruff", path=os.pathsep.join(p for p in (scripts, environ.get("PATH", "")) if p))


def lint(ruff: str, repo: Path, output: str, content: str, env: Mapping[str, str]) -> LintRun:
    """Ruff's findings on `content` as if it were `output` in `repo` (findings as `line:col CODE msg`)."""
    command = [ruff, "check", "--no-cache", "--no-fix", "--output-format", "json",
               "--stdin-filename", output, "-"]
    try:
        proc = subprocess.run(command, cwd=repo, env=dict(env), input=content, capture_output=True,
                              text=True, errors="replace", timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return LintRun(tool="ruff", findings=(), error=f"ruff did not run: {exc}")
    version = _version(ruff, env)
    if proc.returncode not in (0, 1):
        return LintRun(tool=version, findings=(), error=_last_line(proc.stderr) or f"exit code {proc.returncode}")
    try:
        return LintRun(tool=version, findings=tuple(_findings(json.loads(proc.stdout or "[]"))))
    except (ValueError, TypeError, KeyError) as exc:
        return LintRun(tool=version, findings=(), error=f"unreadable ruff output ({exc})")


def introduced(after: LintRun, before: LintRun) -> LintRun:
    """`after` with only the findings `before` did not have (by code and message: line numbers
    move when docstrings are added); the others are counted in `preexisting`."""
    if after.error or before.error:
        return after
    left = Counter(_kind(f) for f in before.findings)
    kept: list[str] = []
    for finding in after.findings:
        if left[_kind(finding)] > 0:
            left[_kind(finding)] -= 1
        else:
            kept.append(finding)
    return replace(after, findings=tuple(kept), preexisting=len(after.findings) - len(kept))


def _kind(finding: str) -> str:
    return finding.split(" ", 1)[-1]     # "line:col CODE message" -> "CODE message"


def _findings(items: Sequence[Mapping[str, object]]) -> list[str]:
    found = []
    for item in items:
        where = item.get("location") or {}
        if not isinstance(where, Mapping):
            raise TypeError(f"location is {where!r}")
        found.append(f"{where.get('row')}:{where.get('column')} {item.get('code') or 'syntax'} {item['message']}")
    return found


def _version(ruff: str, env: Mapping[str, str]) -> str:
    """`ruff --version`, asked once per executable and daemon (one process less per lint)."""
    if ruff not in _VERSIONS:
        _VERSIONS[ruff] = _ask_version(ruff, env)
    return _VERSIONS[ruff]


def _ask_version(ruff: str, env: Mapping[str, str]) -> str:
    try:
        out = subprocess.run([ruff, "--version"], env=dict(env), capture_output=True, text=True,
                             timeout=TIMEOUT_S).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "ruff"
    return out.strip() or "ruff"


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
