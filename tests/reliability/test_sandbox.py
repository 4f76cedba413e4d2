"""The sandbox of generated tests, one property at a time (issue 11, point 7).

The daemon's key: a real daemon with a recognisable key; a child process without capabilities
(what any other process of a normal user is) cannot read `/proc/<daemon pid>/environ` or `mem`.
The jail (`ohd.ladder.jail`) at each level this machine has: the environment, HOME and TMPDIR, the
limits, every process killed at the end and at the time limit (setsid'ed ones too), and in
`namespace` no network, ohd's dirs and HOME hidden, writes only in the scratch dir. `detect`
falls back when user namespaces are disabled (`max_user_namespaces = 0` in a user namespace).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ohd.ladder import jail, sandbox, testrun
from tests.e2e.helpers import DaemonProcess, daemon_env
from tests.support.gitrepo import make_repo
from tests.support.waiting import wait_for

pytestmark = pytest.mark.reliability

SECRET = "sk-or-v1-" + os.urandom(32).hex()
# what this machine offers, asked of util-linux's unshare and the kernel, not of ohd (a jail that stops
# working here must fail these tests, not drop out of them)
NAMESPACES = shutil.which("unshare") is not None and subprocess.run(
    ["unshare", "--user", "--map-root-user", "--mount", "--pid", "--fork", "--net", "true"],
    capture_output=True, timeout=30).returncode == 0
LEVELS = [level for level in sandbox.Level if level is sandbox.Level.PROCESS
          or level is sandbox.Level.NAMESPACE and NAMESPACES or level is sandbox.Level.LANDLOCK and jail.landlock_abi()]
# a reader with no capabilities: what another process of a normal (not root) user is
NO_CAPS_READ = ("import sys\nsys.path.insert(0, sys.argv[2])\nimport jail\njail.drop_capabilities()\n"
                "try:\n    data = open(sys.argv[1], 'rb').read(1 << 20)\nexcept OSError as exc:\n"
                "    print(type(exc).__name__)\nelse:\n    print('READ', len(data), data.count(sys.argv[3].encode()))\n")


def _read_without_caps(path: str, needle: str) -> str:
    done = subprocess.run([sys.executable, "-I", "-c", NO_CAPS_READ, path, str(Path(jail.__file__).parent), needle],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


class CaplessDaemon(DaemonProcess):
    """`ohd daemon` started without capabilities: as a normal user's daemon is (here we are root, and a
    root daemon's capabilities alone would keep a capability-less reader out, dumpable or not)."""

    def start(self) -> DaemonProcess:
        boot = ("import os, sys\nsys.path.insert(0, sys.argv[1])\nimport jail\njail.drop_capabilities()\n"
                "os.execv(sys.executable, [sys.executable, '-m', 'ohd', 'daemon', '--repo', sys.argv[2]])\n")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", boot, str(Path(jail.__file__).parent), str(self.repo)],
                                         env=self.env, stdout=log, stderr=log)
        wait_for(lambda: self.ohd("status", "--json").returncode == 0 or self.proc.poll() is not None,  # type: ignore[union-attr]
                 timeout=30, what="the daemon to answer on its socket")
        assert self.proc.poll() is None, self.log.read_text()
        return self


def test_the_daemons_environment_and_memory_are_unreadable_to_other_processes(tmp_path: Path) -> None:
    runtime = Path(tempfile.mkdtemp(prefix="ohd-rt-"))
    env = daemon_env(tmp_path, runtime, OPENROUTER_API_KEY=SECRET, OHD_OFFLINE="true")
    daemon = CaplessDaemon(env, make_repo(tmp_path / "repo"), tmp_path / "daemon.log").start()
    try:
        assert daemon.proc is not None
        pid = daemon.proc.pid
        assert _read_without_caps(f"/proc/{pid}/environ", SECRET) == "PermissionError"
        assert _read_without_caps(f"/proc/{pid}/mem", SECRET) == "PermissionError"
        assert daemon.json("status")["pid"] == pid        # it still serves
    finally:
        assert daemon.stop() == 0
        shutil.rmtree(runtime, ignore_errors=True)


def test_seal_removes_the_key_variables_and_keeps_the_settings() -> None:
    environ = {"OPENROUTER_API_KEY": "k", "MY_KEY": "k2", "GITHUB_TOKEN": "t", "DB_PASSWORD": "p",
               "OHD_STATE_DIR": "/s", "PATH": "/bin", "HOME": "/h"}
    removed = sandbox.seal(environ, {"MY_KEY"})
    assert removed == ["DB_PASSWORD", "GITHUB_TOKEN", "MY_KEY", "OPENROUTER_API_KEY"]
    assert environ == {"OHD_STATE_DIR": "/s", "PATH": "/bin", "HOME": "/h"}
    assert not sandbox.dumpable()


def test_the_test_environment_holds_no_secret_and_a_private_home(tmp_path: Path) -> None:
    environ = {"PATH": "/bin", "HOME": "/home/u", "AWS_SECRET_ACCESS_KEY": "x", "GH_TOKEN": "x",
               "SSH_AUTH_SOCK": "/tmp/ssh-x/agent.1", "XDG_RUNTIME_DIR": "/run/user/1", "OHD_RUNTIME_DIR": "/r",
               "DBUS_SESSION_BUS_ADDRESS": "unix:path=/run/user/1/bus", "PGPASSWORD": "x", "LANG": "C.UTF-8"}
    env = testrun.private_env(testrun.clean_env(environ, (), ["/repo"]), tmp_path)
    assert set(env) == {"PATH", "LANG", "HOME", "TMPDIR", "TMP", "TEMP", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE",
                        "PYTHONUSERBASE"}
    assert env["HOME"] == str(tmp_path / "home") and env["TMPDIR"] == str(tmp_path / "tmp")
    assert env["PYTHONUSERBASE"] == "/home/u/.local"     # pip install --user packages stay importable


SCRIPT = """
import os, resource, socket, subprocess, sys, time
out = {}
out["env"] = sorted(k for k in os.environ if "KEY" in k)
out["home"] = os.environ["HOME"]
subprocess.Popen(["setsid", "sleep", sys.argv[1]])
if os.fork() == 0:
    os.setsid()
    time.sleep(300)
    os._exit(0)
try:
    with open(os.path.join(os.environ["TMPDIR"], "big"), "wb") as f:
        f.write(b"x" * (3 << 20))
    out["fsize"] = "written"
except OSError as exc:
    out["fsize"] = type(exc).__name__
for name, path in (("repo", "inside.txt"), ("outside", sys.argv[2]), ("scratch", os.path.join(os.environ["TMPDIR"], "ok"))):
    try:
        open(path, "w").write("x")
        out[name] = "written"
    except OSError as exc:
        out[name] = type(exc).__name__
out["hidden"] = os.path.exists(sys.argv[3])
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[4])), timeout=3).close()
    out["tcp"] = "connected"
except OSError as exc:
    out["tcp"] = type(exc).__name__
out["caps"] = [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")][0]
print("RESULT", __import__("json").dumps(out))
sys.stdout.flush()
if sys.argv[5] == "hang":
    time.sleep(300)
"""


def _sleepers(mark: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if mark.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def _jailed(level: sandbox.Level, tmp_path: Path, mode: str, timeout_s: float = 30) -> tuple[int, dict[str, object], str]:
    repo = make_repo(tmp_path / "repo")
    state = tmp_path / "state"
    state.mkdir()
    (state / "ohd.db").write_text("the store")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    listener = socket.create_server(("127.0.0.1", 0))
    mark = f"{os.getpid() % 1000}{time.monotonic_ns() % 100000}.25"
    script = scratch / "script.py"
    script.write_text(SCRIPT)
    jail_ = sandbox.Jail(level, sandbox.hidden_paths([state]), file_mb=1)
    argv = sandbox.command(jail_, [sys.executable, str(script), mark, str(tmp_path / "outside.txt"),
                                   str(state / "ohd.db"), str(listener.getsockname()[1]), mode],
                           cwd=repo, scratch=scratch, keep=sandbox.python_paths(), timeout_s=timeout_s)
    env = testrun.private_env(testrun.clean_env({**os.environ, "OPENROUTER_API_KEY": SECRET}, (), []), scratch)
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, start_new_session=True)
        listener.settimeout(0.5)
        try:
            listener.accept()[0].close()
            accepted = True
        except OSError:
            accepted = False
    finally:
        listener.close()
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), "RESULT {}")
    result = json.loads(line[7:])
    result["accepted"] = accepted
    wait_for(lambda: not _sleepers(mark), timeout=10, what="the sleepers to be gone")
    return done.returncode, result, done.stderr


@pytest.mark.parametrize("level", LEVELS, ids=lambda level: level.value)
def test_each_level_scrubs_limits_and_leaves_no_process(level: sandbox.Level, tmp_path: Path) -> None:
    code, out, stderr = _jailed(level, tmp_path, "end")
    assert code == 0, stderr
    assert out["env"] == [] and out["home"] == str(tmp_path / "scratch" / "home")
    assert out["fsize"] == "OSError" and out["scratch"] == "written"      # RLIMIT_FSIZE (1 MB here)
    assert out["caps"] == "0000000000000000"
    confined = level is not sandbox.Level.PROCESS
    assert (out["repo"] != "written", out["outside"] != "written") == (confined, confined)
    assert (out["tcp"] != "connected", out["accepted"]) == (confined, not confined)
    assert out["hidden"] is (level is not sandbox.Level.NAMESPACE)     # the store is there but for namespace
    # _jailed waited for every `sleep` (one setsid'ed, one a forked setsid'ed Python) to be gone


@pytest.mark.parametrize("level", LEVELS, ids=lambda level: level.value)
def test_the_time_limit_ends_every_process(level: sandbox.Level, tmp_path: Path) -> None:
    code, out, stderr = _jailed(level, tmp_path, "hang", timeout_s=3)
    assert code == sandbox.TIMEOUT_EXIT and f"{sandbox.PREFIX}time limit" in stderr
    assert out["home"]       # it ran up to the hang


@pytest.mark.skipif(not NAMESPACES, reason="no user namespaces here")
def test_the_namespace_jail_cannot_be_undone_from_inside(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    code = ("import ctypes, json, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "print(json.dumps([[libc.umount2(p, 2) for p in (b'/tmp', b'/proc', b'/root')],\n"
            "                  libc.mount(None, b'/', None, 32 | 4096, None),\n"
            "                  sorted(p for p in os.listdir('/proc') if p.isdigit())]))\n")
    argv = sandbox.command(sandbox.Jail(sandbox.Level.NAMESPACE, sandbox.hidden_paths()),
                           [sys.executable, "-c", code], cwd=scratch, scratch=scratch, keep=sandbox.python_paths(), timeout_s=30)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    umounts, remount, pids = json.loads(done.stdout)
    assert umounts == [-1, -1, -1]          # no umount reveals what is hidden
    assert remount == -1                    # no remount makes / writable again
    assert pids == ["1", "2"]               # the jail's pid 1 and this process: no other process is visible


@pytest.mark.skipif(not NAMESPACES, reason="no user namespaces here")
def test_detect_falls_back_when_user_namespaces_are_disabled() -> None:
    probe = ("import sys\nfrom ohd.ladder import sandbox\nj = sandbox.detect(sandbox.hidden_paths())\n"
             "print(j.level.value)\nprint(j.detail)\n")
    done = subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c",
                           f"echo 0 > /proc/sys/user/max_user_namespaces && exec {sys.executable} -c '{probe}'"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    level, detail = done.stdout.splitlines()
    assert level == ("landlock" if jail.landlock_abi() else "process")
    assert detail.startswith("namespace: unshare")


@pytest.mark.timeout(90)
def test_a_run_whose_escaped_process_holds_the_output_still_returns(tmp_path: Path) -> None:
    """The backstop: a jail that is killed (or a run without one) may leave a setsid'ed process holding
    the output pipe; the worker must not wait for that pipe's end forever."""
    code = ("import subprocess, time\nsubprocess.Popen(['setsid', 'sleep', '86.25'])\nprint('started', flush=True)\n"
            "time.sleep(300)\n")
    started = time.monotonic()
    try:
        result, out = testrun._run([sys.executable, "-c", code], tmp_path, dict(os.environ), 1.0)
    finally:
        for pid in _sleepers("86.25"):
            os.kill(pid, 9)
    assert result is None and "the output was cut" in out
    assert time.monotonic() - started < 60      # a hang bound: forever before


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# a daemon stand-in: builds the jailed command as testrun does (the spawner writes its pid into it),
# starts it, prints the launcher's pid and waits to be killed -9
PARENT = ("import subprocess, sys, json, time\nfrom ohd.ladder import sandbox\n"
          "level, hidden, cwd, scratch, mark = sys.argv[1:]\n"
          "jail = sandbox.Jail(sandbox.Level(level), tuple(json.loads(hidden)))\n"
          "argv = sandbox.command(jail, [sys.executable, '-c', 'import time; time.sleep(300)', mark], cwd=cwd,\n"
          "                       scratch=scratch, keep=sandbox.python_paths(), timeout_s=300)\n"
          "child = subprocess.Popen(argv)\nprint(child.pid, flush=True)\ntime.sleep(600)\n")


def _jailed_test(mark: str) -> list[int]:
    """The jailed test's processes (not the launcher, whose argv holds the mark too)."""
    return [pid for pid in _sleepers(mark) if b"jail.py" not in Path(f"/proc/{pid}/cmdline").read_bytes()]


@pytest.mark.parametrize("when", ["while_it_starts", "while_the_test_runs"])
@pytest.mark.parametrize("level", LEVELS, ids=lambda level: level.value)
def test_the_launcher_and_its_test_die_with_a_daemon_killed_9(level: sandbox.Level, when: str, tmp_path: Path) -> None:
    """The launcher dies with the process that started it (PR_SET_PDEATHSIG), also when that one
    is killed -9 before the launcher's interpreter got to set it: then a launcher and its test ran
    on to their time limit (seen at the `namespace` level after a daemon's kill -9)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    mark = f"{os.getpid() % 1000}{time.monotonic_ns() % 100000}.75"
    hidden = json.dumps(sandbox.hidden_paths([tmp_path / "state"]))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, level.value, hidden, str(tmp_path), str(scratch), mark],
                              stdout=subprocess.PIPE, text=True, start_new_session=True,
                              env={**os.environ, "PYTHONPATH": str(Path(sandbox.__file__).parents[1])})
    try:
        assert parent.stdout is not None
        launcher = int(parent.stdout.readline())
        if when == "while_the_test_runs":
            wait_for(lambda: _jailed_test(mark), what="the jailed test to start")
    finally:
        parent.kill()
        parent.wait()
    try:
        wait_for(lambda: not _sleepers(mark) and not _alive(launcher), timeout=20,
                 what="the launcher and the jailed test to die with their parent")
    finally:
        for pid in [launcher, *_sleepers(mark)]:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
