"""The test-run room: run pytest on a candidate test file inside the user's repo.

Edge: the candidate is written as `test_ohd_candidate_<hash>.py` next to the intended
output (so the repo's imports, package and conftest files apply exactly as for the output;
`ohd.intake.watch` ignores that name, so no rule ever sees a candidate), `python -m pytest` runs it N
times in a subprocess with cwd = the repo, and the result comes back as a plain
`validate.PytestRun`. Invariants: the candidate file (and any directory made for it) is
gone when `run_candidate` returns, also after a timeout or an error; the subprocess never
sees the API key (`OPENROUTER_API_KEY`, the configured variable, every `OHD_*`
variable), and what it prints comes back with `Options.redact` applied (a test that reads
the key elsewhere and prints it leaks it into no report, prompt or store row); a run that
outlives its timeout is killed with its whole process group, and so is every run in flight when
the daemon stops (`Processes.stop`, at the end of the grace period; none starts after it).
`interpreter` picks the Python: the repo's own virtualenv when it has pytest, else ohd's.
`measure_coverage` runs the repo's whole test suite under coverage.py (once per content of
the target and the test files) and the candidate, for the `coverage_delta` rule. `runs_green`
reads pytest's own report (`--junitxml`), never only its exit code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import os
import posixpath
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ohd.core import layout, pyparse
from ohd.errors import ShutdownRequested, TargetError, repo_unwritable
from ohd.ladder import sandbox, validate
from ohd.ladder.validate import CoverageRun, PytestRun, RunStatus

log = logging.getLogger("ohd.testrun")

OUTPUT_CHARS = 8000          # pytest output kept per result (the report)
_FAILED_LINE = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)
_STOPPERS = (RunStatus.ERROR, RunStatus.TIMEOUT)   # no point in running again
_PYTEST_ARGS = ("-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--color=no")  # over a repo's addopts
_PROBE = ("import importlib.util as u, json, sys; print(json.dumps([u.find_spec('pytest') is not None, "
          "u.find_spec('coverage') is not None, [sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path]]))")
_TEST_NAME = re.compile(r"(?:^test_.*|.*_test)\.py$")


def verbatim(text: str) -> str:
    return text


class Processes:
    """The test processes alive now, so that a stopping daemon can end them: `stop()` kills each
    one's process group; a run it killed, and every later start, raises `ShutdownRequested` in its
    thread (no verdict is made of a run cut short: its task is back in the queue).
    Without it a run of a task cut off at the grace deadline went on in its thread, and the daemon's
    exit waited for it (up to `test_timeout_s`, past systemd's stop timeout)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: set[subprocess.Popen[str]] = set()
        self.stopped = False

    @contextmanager
    def started(self, start: Callable[[], subprocess.Popen[str]]) -> Iterator[subprocess.Popen[str]]:
        """The process `start` makes, known here while the block runs (none once stopped)."""
        with self._lock:        # a stop between the check and the start would miss the process
            if self.stopped:
                raise ShutdownRequested("the daemon is stopping: no test run starts")
            proc = start()
            self._live.add(proc)
        try:
            yield proc
        finally:
            with self._lock:
                self._live.discard(proc)

    @property
    def running(self) -> int:
        """How many test processes are alive now."""
        with self._lock:
            return len(self._live)

    def stop(self) -> int:
        """Kill every live test process with its group, and start none from now on; how many."""
        with self._lock:
            self.stopped = True
            live = list(self._live)
        for proc in live:
            _kill(proc)
        return len(live)


@dataclass(frozen=True, slots=True)
class Options:
    """How candidates are run: `runs` times (flaky tests differ), each within `timeout_s`."""

    runs: int = 2
    timeout_s: float = 60.0
    secret_env: tuple[str, ...] = ()   # more variables to drop (the configured api_key_env)
    python: str = "auto"               # the interpreter: "auto" (the repo's venv, else ohd's) or a path
    slots: threading.Semaphore | None = None   # test processes at once (None: no limit); a wait is not run time
    redact: Callable[[str], str] = verbatim   # masks the secrets in what a run prints (the daemon's Redactor)
    jail: sandbox.Jail | None = None   # where the tests run (None: the strongest level here, `sandbox.default()`)
    processes: Processes | None = None   # where the runs are registered, to be ended at a stop (the daemon's)

    def sandbox(self) -> sandbox.Jail:
        return self.jail or sandbox.default()


@dataclass(frozen=True, slots=True)
class Interpreter:
    """The Python that runs a repo's tests, and what it can import."""

    path: str
    pytest: bool
    coverage: bool
    paths: tuple[str, ...] = dataclasses.field(default=(), compare=False)   # its prefixes and sys.path (kept visible)


def interpreter(repo: Path, setting: str = "auto") -> Interpreter:
    """`setting` as a path (relative to the repo, or absolute); with "auto", the repo's own
    `.venv` or `venv` when its Python has pytest, else the interpreter ohd runs in."""
    if setting != "auto":
        path = Path(setting).expanduser()
        return probe(str(path if path.is_absolute() else repo / path))
    for venv in layout.VENV_DIRS:
        python = repo / venv / "bin" / "python"
        if python.is_file() and (found := probe(str(python))).pytest:
            return found
    return Interpreter(sys.executable, pytest=True, coverage=coverage_available())


def probe(path: str) -> Interpreter:
    """What the Python at `path` can import (cached while the file is unchanged)."""
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError:
        return Interpreter(path, pytest=False, coverage=False)
    return _probe(path, stamp)


@functools.lru_cache(maxsize=64)
def _probe(path: str, stamp: int) -> Interpreter:
    env = clean_env(os.environ, (), [])
    try:
        out = subprocess.run([path, "-c", _PROBE], capture_output=True, text=True, timeout=60, env=env).stdout
        has_pytest, has_coverage, paths = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        return Interpreter(path, pytest=False, coverage=False)
    found = [str(p) for p in paths if p]
    return Interpreter(path, pytest=bool(has_pytest), coverage=bool(has_coverage),
                       paths=(*found, *_linked(found)))


def _linked(paths: Sequence[str]) -> list[str]:
    """Where the symlinked entries of the import folders lead (a site-packages whose packages are
    links into another environment): a jail keeping only the folders would hide the packages."""
    targets: list[str] = []
    for folder in paths:
        try:
            with os.scandir(folder) as entries:
                targets += [os.path.realpath(e.path) for e in entries if e.is_symlink()]
        except OSError:      # a zip, a file, a folder that is gone
            continue
    return targets


def run_candidate(repo: Path, output: str, content: str, *, import_root: str = "",
                  options: Options = Options(), environ: Mapping[str, str] | None = None,
                  python: str = sys.executable) -> PytestRun:
    """Write the candidate beside `output`, run pytest (with `python`) on it `options.runs` times, remove it.

    A run passes only when pytest's own report (`--junitxml`) lists at least as many passed
    tests as the file defines and none failed, errored or was skipped; the exit code alone
    proves nothing (a process that ends itself at import exits 0 having run no test)."""
    env = _env(repo, import_root, options, environ)
    expected = defined_tests(content)
    keep = _keep(python, env)
    runs: list[tuple[RunStatus, str]] = []
    reasons: list[str] = []
    with candidate_file(repo, output, content) as rel, tempfile.TemporaryDirectory(prefix="ohd-pytest-") as scratch:
        jailed = private_env(env, Path(scratch))     # HOME and TMPDIR: the same for the runs of one candidate
        for n in range(max(1, options.runs)):
            status, out, reason = _once(python, repo.resolve(), rel, jailed, options, expected, Path(scratch),
                                        n, keep)
            runs.append((status, out))
            reasons.append(reason)
            if status in _STOPPERS:
                break
    result = summarize(runs, rel, output, options.timeout_s)
    reason = next((r for (o, _), r in zip(runs, reasons, strict=True) if o is result.status and r), "")
    return dataclasses.replace(result, python=python, reason=reason, sandbox=options.sandbox().level.value)


def _keep(python: str, env: Mapping[str, str]) -> tuple[str, ...]:
    """What the tests must see inside a `namespace` jail besides the repo: the interpreter's
    prefixes and sys.path, PYTHONPATH's folders."""
    return (*probe(python).paths, *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p))


def defined_tests(content: str) -> int:
    """How many tests the file defines by name (a parametrized test counts once: pytest runs at least this many)."""
    try:
        return len(validate.collected_tests(pyparse.parse(content)))
    except (SyntaxError, ValueError):
        return 0


@dataclass(frozen=True, slots=True)
class Tally:
    """The test cases of one pytest report (`--junitxml`), by how they ended."""

    passed: int = 0
    failed: int = 0      # failures and errors (in setup, call or teardown, or collecting the file)
    skipped: int = 0     # skipped and xfailed

    @property
    def total(self) -> int:
        return self.passed + self.failed + self.skipped


def read_junit(path: Path) -> Tally | None:
    """The tally of a JUnit XML report pytest wrote, None when there is none or it is unreadable."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    if root.tag not in ("testsuites", "testsuite"):
        return None
    passed = failed = skipped = 0
    for case in root.iter("testcase"):
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            failed += 1
        elif "skipped" in kinds:
            skipped += 1
        else:
            passed += 1
    return Tally(passed, failed, skipped)


def judge_run(code: int, tally: Tally | None, expected: int) -> tuple[RunStatus, str]:
    """A run's status from pytest's exit code and its own report, and why when it is not what the code says."""
    if code == 1 and tally is not None and tally.failed:
        return RunStatus.FAILED, ""
    if code not in (0, 1):
        return RunStatus.ERROR, f"pytest exit code {code}"
    if tally is None:
        return RunStatus.ERROR, (f"pytest exited with code {code} but wrote no report: the run ended early "
                                 "(os._exit or sys.exit while importing?), so no test is known to have run")
    if tally.passed < max(expected, 1) or tally.skipped:
        skipped = f", {tally.skipped} skipped" if tally.skipped else ""
        return RunStatus.ERROR, (f"pytest ran {tally.passed} passing test(s) of the {expected} the file defines"
                                 f"{skipped}: every test must be collected and run")
    return RunStatus.PASSED, ""


@contextmanager
def candidate_file(repo: Path, output: str, content: str) -> Iterator[str]:
    """`content` written as `test_ohd_candidate_<hash>.py` beside `output`; yields its
    repo-relative path; the file and any directory made for it are gone afterwards."""
    root = repo.resolve()
    intended = (root / output).resolve()
    if not intended.is_relative_to(root) or layout.GIT_DIR in intended.relative_to(root).parts:
        raise TargetError(output, "the output leaves the repository")
    digest = hashlib.sha256(f"{output}\0{content}".encode()).hexdigest()[:10]
    name = f"{layout.CANDIDATE_PREFIX}{digest}_{secrets.token_hex(3)}.py"   # concurrent tasks never share one
    path = intended.parent / name
    made: list[Path] = []
    try:
        try:
            made = _make_dirs(intended.parent, root)
            path.write_text(content, encoding="utf-8")
        except OSError as exc:     # a full or read-only repo: said so, not an internal error
            unwritable = repo_unwritable(repo, exc)
            if unwritable is None:
                raise
            raise unwritable from exc
        yield path.relative_to(root).as_posix()
    finally:
        if path.exists() or path.is_symlink():    # unlink of a missing name fails on a read-only repo
            path.unlink()
        for directory in reversed(made):
            _rmdir(directory)


def _env(repo: Path, import_root: str, options: Options, environ: Mapping[str, str] | None) -> dict[str, str]:
    root = repo.resolve()
    return clean_env(os.environ if environ is None else environ, options.secret_env,
                     [str(root / import_root) if import_root else str(root)])


def clean_env(environ: Mapping[str, str], secret_env: Sequence[str], paths: Sequence[str]) -> dict[str, str]:
    """The environment minus API keys, tokens, passwords, the SSH agent, the user's runtime dir and
    bus and every OHD_* variable (`sandbox.is_secret`); `paths` first on PYTHONPATH; no .pyc files."""
    drop = {"OPENROUTER_API_KEY", *secret_env}
    env = {k: v for k, v in environ.items() if k not in drop and not sandbox.is_secret(k)}
    env["PYTHONPATH"] = os.pathsep.join([*paths, *([environ["PYTHONPATH"]] if environ.get("PYTHONPATH") else [])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"     # nothing left in the user's __pycache__
    return env


def private_env(env: Mapping[str, str], scratch: Path) -> dict[str, str]:
    """`env` with HOME and the temp dirs in `scratch` (made here); the user's own site-packages stay found."""
    home, tmp = scratch / "home", scratch / "tmp"
    home.mkdir(exist_ok=True)
    tmp.mkdir(exist_ok=True)
    user_base = env.get("PYTHONUSERBASE") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".local")
    return {**env, "HOME": str(home), "TMPDIR": str(tmp), "TMP": str(tmp), "TEMP": str(tmp),
            "PYTHONUSERBASE": user_base}


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


def _once(python: str, repo: Path, rel: str, env: dict[str, str], options: Options, expected: int,
          scratch: Path, n: int = 0, keep: Sequence[str] = ()) -> tuple[RunStatus, str, str]:
    """One pytest run in the sandbox (writable: `scratch`): its status, its output and (when it is
    not what the exit code says) why."""
    timeout_s = options.timeout_s
    report = scratch / f"report-{n}.xml"
    code, out = _run([python, *_PYTEST_ARGS, f"--rootdir={repo}", f"--junitxml={report}", rel],
                     repo, env, timeout_s, options.slots, options.redact, jail=(options.sandbox(), scratch, keep),
                     processes=options.processes)
    tally = read_junit(report)
    out = "\n".join(line for line in out.splitlines() if str(report) not in line)   # "generated xml file"
    if code is None:
        return RunStatus.TIMEOUT, f"{out}\n[killed after {timeout_s:g}s]", ""
    if code == sandbox.SETUP_EXIT and sandbox.PREFIX in out:
        why = out.rsplit(sandbox.PREFIX, 1)[1].strip()
        return RunStatus.ERROR, out, f"the test sandbox ({options.sandbox().level.value}) could not be set up: {why}"
    status, reason = judge_run(code, tally, expected)
    return status, f"{out}\n[{reason}]" if reason else out, reason


Confinement = tuple[sandbox.Jail, Path, Sequence[str]]   # the jail, its writable scratch dir, paths kept visible
_BACKSTOP_S = 30.0     # the jail ends its run at the time limit; past this much more the whole group is killed


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout_s: float,
         slots: threading.Semaphore | None = None, redact: Callable[[str], str] = verbatim,
         jail: Confinement | None = None, processes: Processes | None = None) -> tuple[int | None, str]:
    """Exit code (None: killed at the timeout, with everything it started) and combined output,
    `redact`ed; with `jail`, run in that sandbox (`ohd.ladder.jail` kills what the run left, even a
    setsid'ed process); with `slots`, the process starts once a slot is free (the timeout counts from then);
    with `processes`, it is registered there while it runs (a stop kills it; none starts after one)."""
    limit = timeout_s
    if jail is not None:
        command = sandbox.command(jail[0], command, cwd=cwd, scratch=jail[1], keep=jail[2], timeout_s=timeout_s)
        limit = timeout_s + _BACKSTOP_S

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)

    with slots or contextlib.nullcontext(), (processes or Processes()).started(start) as proc:
        try:
            out, _ = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            _kill(proc)
            return None, redact(_drain(proc))
        except BaseException:
            _kill(proc)
            _drain(proc)
            raise
        _kill(proc)        # anything of its process group still there
        if processes is not None and processes.stopped:   # killed by the stop: its task is back in the queue
            raise ShutdownRequested("the daemon is stopping: the test run was killed")
        if jail is not None and proc.returncode == sandbox.TIMEOUT_EXIT and f"{sandbox.PREFIX}time limit" in out:
            return None, redact(out.replace(f"{sandbox.PREFIX}time limit", "").rstrip())
        return proc.returncode, redact(out)


# -- coverage_delta ---------------------------------------------------------------------


def coverage_available() -> bool:
    """Whether coverage.py is importable by the interpreter that runs the candidates."""
    return importlib.util.find_spec("coverage") is not None


class _NotMeasured(Exception):
    """Coverage could not be measured; the message says why (it goes into the report)."""


def measure_coverage(repo: Path, output: str, content: str, *, target: str, import_root: str = "",
                     options: Options = Options(), environ: Mapping[str, str] | None = None,
                     python: str = sys.executable, replaces_output: bool = False) -> CoverageRun:
    """Lines of `target` run by the repo's whole test suite (pytest's own selection, as
    `coverage run -m pytest` would run it), against the same with the candidate added.

    The suite is measured once per content (of the target, the test files, conftest and
    pytest configuration files) and Python; an existing `output` is the user's file and
    stays in both figures, unless `replaces_output` (ohd's own earlier output that the
    candidate replaces): then it counts before and not after. What the tests execute
    decides, not how they spell the import (`import pkg` counts as much as `import pkg.mod`)."""
    root = repo.resolve()
    env = _env(repo, import_root, options, environ)
    keep = _keep(python, env)
    target_path = (root / target).resolve()
    current = (root / output).is_file() and _TEST_NAME.match(posixpath.basename(output)) is not None
    try:
        with tempfile.TemporaryDirectory(prefix="ohd-coverage-") as scratch:
            jailed = private_env(env, Path(scratch))

            def covered(rels: Sequence[str], *extra: str) -> Measured:
                return _covered(python, root, rels, jailed, target_path, Path(scratch), options, extra, keep)

            base = _suite(root, output, target, python, lambda: covered(
                [], f"--ignore={output}", f"--ignore-glob=*/{layout.CANDIDATE_PREFIX}*",
                "--continue-on-collection-errors"))
            old = covered([output]) if current else Measured()
            with candidate_file(repo, output, content) as rel:
                new = covered([rel])
    except _NotMeasured as exc:
        return CoverageRun(target=target, statements=0, before=0, after=0, error=str(exc))
    statements = next((m.statements for m in (new, base, old) if m.statements is not None), None)
    if statements is None:
        return CoverageRun(target=target, statements=0, before=0, after=0,
                           error=f"the tests did not run {target} under coverage (imported from another path?)")
    suite = f"the repo's test suite ({base.tests} test(s){f', without {output}' if current else ''})"
    shown = (suite, *([output] if current else []))
    after = base.lines | new.lines | (frozenset() if replaces_output else old.lines)
    return CoverageRun(target=target, statements=statements, before=len(base.lines | old.lines), after=len(after),
                       baseline=shown, suite=len(base.lines), replaces=current and replaces_output)


@dataclass(frozen=True, slots=True)
class Measured:
    """What one pytest run under coverage executed of the target; `statements` None: never imported."""

    lines: frozenset[int] = frozenset()
    statements: int | None = None
    tests: int = 0                       # test cases in pytest's report


_SUITES: dict[str, Measured | str] = {}   # content hash -> the suite's figure, or why it has none (this process)
_SUITES_LOCK = threading.Lock()
_SUITES_KEPT = 64
_SUITE_FILES = frozenset({"conftest.py", "pytest.ini", "pyproject.toml", "setup.cfg", "tox.ini", ".coveragerc"})


def _suite(root: Path, output: str, target: str, python: str, measure: Callable[[], Measured]) -> Measured:
    """The suite's figure for `target`, from the cache while nothing it depends on changed (a
    suite that timed out or could not run is not run again either: _NotMeasured says why)."""
    key = suite_key(root, output, target, python)
    with _SUITES_LOCK:
        found = _SUITES.get(key)
    if found is None:
        try:
            found = measure()
        except _NotMeasured as exc:
            found = str(exc)
        with _SUITES_LOCK:
            while len(_SUITES) >= _SUITES_KEPT:
                del _SUITES[next(iter(_SUITES))]
            _SUITES[key] = found
    if isinstance(found, str):
        raise _NotMeasured(found)
    return found


def suite_key(root: Path, output: str, target: str, python: str) -> str:
    """A hash of what the suite's coverage of `target` depends on: the target, every test file,
    conftest and pytest configuration file (tracked or not ignored), the output's name and the Python."""
    digest = hashlib.sha256(f"{python}\0{output}\0{target}\0".encode())
    for rel in [target, *repo_files(root, lambda name: bool(_TEST_NAME.match(name)) or name in _SUITE_FILES)]:
        try:
            digest.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
        except OSError:
            digest.update(rel.encode() + b"\0-\0")
    return digest.hexdigest()


def repo_files(root: Path, wanted: Callable[[str], bool]) -> list[str]:
    """The repo's files (tracked or not ignored) whose base name is `wanted`, never a candidate."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=root, capture_output=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({n for n in listed.decode(errors="replace").split("\0") if n and wanted(posixpath.basename(n))
                   and not posixpath.basename(n).startswith(layout.CANDIDATE_PREFIX)})


def _covered(python: str, root: Path, rels: Sequence[str], env: dict[str, str], target: Path, scratch: Path,
             options: Options, extra: Sequence[str] = (), keep: Sequence[str] = ()) -> Measured:
    """What of the target pytest runs of `rels` (none: pytest's own selection) execute under
    coverage; the user's coverage settings are not read (an empty rcfile)."""
    rcfile, data, report, junit = (scratch / name for name in ("coveragerc", "coverage.data", "coverage.json",
                                                                 "report.xml"))
    rcfile.write_text("", encoding="utf-8")
    for leftover in (data, report, junit):
        leftover.unlink(missing_ok=True)
    coverage, timeout_s = [python, "-m", "coverage"], options.timeout_s
    code, out = _run([*coverage, "run", f"--rcfile={rcfile}", f"--data-file={data}", f"--include={target}",
                      *_PYTEST_ARGS, f"--rootdir={root}", f"--junitxml={junit}", *extra, *rels],
                     root, env, timeout_s, options.slots, options.redact, jail=(options.sandbox(), scratch, keep),
                     processes=options.processes)
    what = ", ".join(rels) or "the repo's test suite"
    if code is None:
        raise _NotMeasured(f"pytest under coverage did not finish within {timeout_s:g}s ({what}; "
                           "test_timeout_s bounds it)")
    if code not in (0, 1, 5):     # 5: no tests collected (a repo without tests)
        last = _last_line(out)
        detail = f": {last}" if last else ""
        raise _NotMeasured(f"pytest under coverage could not run {what} (exit code {code}){detail}")
    tests = (read_junit(junit) or Tally()).total
    code, out = _run([*coverage, "json", f"--rcfile={rcfile}", f"--data-file={data}", "-o", str(report)],
                     root, env, timeout_s, options.slots, options.redact, jail=(options.sandbox(), scratch, keep),
                     processes=options.processes)
    if code != 0 or not report.is_file():
        if "No data" in out:
            return Measured(tests=tests)
        raise _NotMeasured(f"coverage json failed: {out.strip()[-300:]}")
    try:
        entry = next(iter(json.loads(report.read_text(encoding="utf-8"))["files"].values()), None)
        if entry is None:      # --include names one file: at most one entry
            return Measured(tests=tests)
        executed = frozenset(int(n) for n in entry["executed_lines"])
        return Measured(executed, len(executed | frozenset(int(n) for n in entry["missing_lines"])), tests)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _NotMeasured(f"unreadable coverage report ({exc})") from None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][-300:] if lines else ""


def _drain(proc: subprocess.Popen[str], wait_s: float = 5.0) -> str:
    """What a killed run printed; a process that escaped the kill (setsid'ed, outside a jail that was
    itself killed) may hold the pipe open for hours: after `wait_s` the pipe is let go."""
    try:
        return proc.communicate(timeout=wait_s)[0]
    except subprocess.TimeoutExpired:
        if proc.stdout is not None:
            proc.stdout.close()
        proc.wait()
        return "[the output was cut: a process the run started outlived it and kept the output open]"


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
