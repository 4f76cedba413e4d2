"""The test-run room: run pytest on a candidate test file inside the user's repo.

Edge: the candidate is written as `test_ohd_candidate_<hash>.py` next to the intended
output (so the repo's imports and conftest files apply), `python -m pytest` runs it N
times in a subprocess with cwd = the repo, and the result comes back as a plain
`validate.PytestRun`. Invariants: the candidate file (and any directory made for it) is
gone when `run_candidate` returns, also after a timeout or an error; the subprocess never
sees the API key (`OPENROUTER_API_KEY`, the configured variable, every `OHD_*`
variable); a run that outlives its timeout is killed with its whole process group.
`judge` is the worker's one call: the static rules, then the runs when they pass.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ohd import tasktypes, validate
from ohd.errors import TargetError
from ohd.taskfile import TaskType
from ohd.tasktypes import Job
from ohd.validate import PytestRun, RunStatus

log = logging.getLogger(__name__)

OUTPUT_CHARS = 8000          # pytest output kept per result (the report)
_FAILED_LINE = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)
_STOPPERS = (RunStatus.ERROR, RunStatus.TIMEOUT)   # no point in running again


@dataclass(frozen=True, slots=True)
class Options:
    """How candidates are run: `runs` times (flaky tests differ), each within `timeout_s`."""

    runs: int = 2
    timeout_s: float = 60.0
    secret_env: tuple[str, ...] = ()   # more variables to drop (the configured api_key_env)


def judge(repo: Path, job: Job, content: str, min_quality: float, options: Options) -> validate.Verdict:
    """The verdict on one candidate: static rules; for a unit_test that passes them, pytest runs too."""
    verdict = validate.check(job.task_type, job.output, content, target_exists=True, module=job.module,
                             min_quality=min_quality, original=job.source)
    if job.task_type is not TaskType.UNIT_TEST or not verdict.errors_passed() or options.runs < 1:
        return verdict
    root = tasktypes.import_root(job.target, lambda rel: (repo / rel / "__init__.py").is_file())
    result = run_candidate(repo, job.output, content, import_root=root, options=options)
    log.info("candidate for %s: pytest %s (%s)", job.output, result.status.value,
             ", ".join(o.value for o in result.outcomes))
    return validate.check(job.task_type, job.output, content, target_exists=True, module=job.module,
                          min_quality=min_quality, original=job.source, test_run=result)


def run_candidate(repo: Path, output: str, content: str, *, import_root: str = "",
                  options: Options = Options(), environ: Mapping[str, str] | None = None) -> PytestRun:
    """Write the candidate beside `output`, run pytest on it `options.runs` times, remove it."""
    root = repo.resolve()
    intended = (root / output).resolve()
    if not intended.is_relative_to(root) or ".git" in intended.relative_to(root).parts:
        raise TargetError(output, "the output leaves the repository")
    digest = hashlib.sha256(f"{output}\0{content}".encode()).hexdigest()[:10]
    name = f"test_ohd_candidate_{digest}_{secrets.token_hex(3)}.py"   # concurrent tasks never share one
    made = _make_dirs(intended.parent, root)
    path = intended.parent / name
    rel = path.relative_to(root).as_posix()
    env = clean_env(os.environ if environ is None else environ, options.secret_env,
                    [str(root / import_root) if import_root else str(root)])
    runs: list[tuple[RunStatus, str]] = []
    try:
        path.write_text(content, encoding="utf-8")
        for _ in range(max(1, options.runs)):
            runs.append(_once(root, rel, env, options.timeout_s))
            if runs[-1][0] in _STOPPERS:
                break
    finally:
        path.unlink(missing_ok=True)
        for directory in reversed(made):
            _rmdir(directory)
    return summarize(runs, rel, output, options.timeout_s)


def clean_env(environ: Mapping[str, str], secret_env: Sequence[str], paths: Sequence[str]) -> dict[str, str]:
    """The environment minus API keys and OHD_* variables; `paths` first on PYTHONPATH; no .pyc files."""
    drop = {"OPENROUTER_API_KEY", *secret_env}
    env = {k: v for k, v in environ.items() if k not in drop and not k.startswith("OHD_")}
    env["PYTHONPATH"] = os.pathsep.join([*paths, *([environ["PYTHONPATH"]] if environ.get("PYTHONPATH") else [])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"     # nothing left in the user's __pycache__
    return env


def summarize(runs: Sequence[tuple[RunStatus, str]], candidate: str, output: str, timeout_s: float) -> PytestRun:
    """One result from the runs: timeout > error > all passed / all failed / flaky."""
    outcomes = tuple(status for status, _ in runs)
    if RunStatus.TIMEOUT in outcomes:
        status = RunStatus.TIMEOUT
    elif RunStatus.ERROR in outcomes:
        status = RunStatus.ERROR
    elif all(o is RunStatus.PASSED for o in outcomes):
        status = RunStatus.PASSED
    elif all(o is RunStatus.FAILED for o in outcomes):
        status = RunStatus.FAILED
    else:
        status = RunStatus.FLAKY
    telling = next((text for o, text in runs if o is not RunStatus.PASSED), runs[-1][1] if runs else "")
    stems = (Path(candidate).stem, Path(output).stem)
    text = telling.replace(candidate, output).replace(*stems)
    failed = tuple(dict.fromkeys(m for _, t in runs for m in _FAILED_LINE.findall(
        t.replace(candidate, output).replace(*stems))))
    return PytestRun(status=status, outcomes=outcomes, output=validate.cut(text.strip(), OUTPUT_CHARS),
                     failed_tests=failed, timeout_s=timeout_s)


def _once(repo: Path, rel: str, env: dict[str, str], timeout_s: float) -> tuple[RunStatus, str]:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", f"--rootdir={repo}", rel]
    proc = subprocess.Popen(command, cwd=repo, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill(proc)
        out, _ = proc.communicate()
        return RunStatus.TIMEOUT, f"{out}\n[killed after {timeout_s:g}s]"
    except BaseException:
        _kill(proc)
        proc.communicate()
        raise
    code = proc.returncode
    status = RunStatus.PASSED if code == 0 else RunStatus.FAILED if code == 1 else RunStatus.ERROR
    return status, out if status is not RunStatus.ERROR else f"{out}\n[pytest exit code {code}]"


def _kill(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _make_dirs(directory: Path, root: Path) -> list[Path]:
    """Create `directory` (inside `root`) if missing; the ones created, outermost first."""
    missing = [d for d in (directory, *directory.parents) if d.is_relative_to(root) and not d.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def _rmdir(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        log.warning("could not remove %s made for a candidate test", directory)
