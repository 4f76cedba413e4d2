"""Issue 11, point 5: nothing ohd writes leaves the repo, enters a `.git` or `tasks.d/`; its state
is private to its user; its socket serves its user only; a stale socket is replaced, a live one kept.

Paths are checked against real symlinks, nested repositories and `tasks.d/`, at submit and ingest
and again at the write (the tree swapped between the two). Modes, the peer check and the socket's
take-over are checked on real daemon processes; another user is a real forked process that
dropped to uid 65534 (the machine runs the suite as root; as another user those tests skip).
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ohd.core.taskfile import TaskSpec, TaskType
from ohd.core.tasktypes import Job
from ohd.errors import DaemonAlreadyRunning, TargetError
from ohd.intake.ingest import Ingestor
from ohd.repo import outputs
from ohd.service import server
from ohd.store.store import Store
from ohd.work import delivery
from tests.e2e.helpers import DaemonProcess, daemon_env
from tests.support.clock import FakeClock
from tests.support.gitrepo import git, make_repo
from tests.support.waiting import wait_for

pytestmark = pytest.mark.reliability

NOBODY = 65534
as_root_only = pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# -- paths: refused when the task is accepted ----------------------------------------------------

@pytest.fixture
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


@pytest.fixture
def hostile(repo: Path, outside: Path) -> Path:
    """The repo with what a cloned repo can carry: a report folder that is a symlink out, a nested
    repository, a submodule-style `.git` file, links into a `.git` and into `tasks.d/`."""
    (repo / "shop" / "lib").mkdir()
    (repo / "shop" / "lib" / "util.py").write_text("def f():\n    return 1\n")
    (repo / "shop" / "lib" / ".ohd").symlink_to(outside)
    git(repo, "init", "-q", str(repo / "sub"))
    (repo / "mod").mkdir()
    (repo / "mod" / ".git").write_text("gitdir: ../.git/modules/mod\n")
    (repo / "hooks-link").symlink_to(repo / "sub" / ".git" / "hooks")
    (repo / "inbox").symlink_to(repo / "tasks.d")
    (repo / "out-link").symlink_to(outside)
    (repo / "tasks.d" / "helper.py").write_text("X = 1\n")
    return repo


BAD_OUTPUTS = {
    "sub/.git/hooks/post-checkout": ".git",
    "sub/.git/config": ".git",
    "mod/.git": ".git",
    "hooks-link/post-commit": ".git",
    "tasks.d/x.yaml": "tasks.d/",
    "tasks.d/.done/x.yaml": "tasks.d/",
    "tasks.d/.rejected/x.yaml": "tasks.d/",
    "inbox/x.yaml": "tasks.d/",
    "out-link/x.py": "outside the repo",
}
BAD_TARGETS = {"shop/lib/util.py": "shop/lib/.ohd", "tasks.d/helper.py": "tasks.d/"}


@pytest.mark.parametrize(("output", "why"), sorted(BAD_OUTPUTS.items()))
def test_an_output_outside_the_repo_in_a_git_or_in_tasks_d_is_refused_at_submit(hostile: Path, output: str,
                                                                               why: str) -> None:
    spec = TaskSpec.model_validate({"type": "custom", "target": "shop/pricing.py", "output": output,
                                    "prompt": "p"})
    with pytest.raises(TargetError, match=why.replace(".", r"\.")):
        server.check_paths(hostile, spec)


@pytest.mark.parametrize(("target", "why"), sorted(BAD_TARGETS.items()))
def test_a_target_whose_reports_would_leave_the_repo_or_land_in_tasks_d_is_refused(hostile: Path, target: str,
                                                                                  why: str) -> None:
    with pytest.raises(TargetError, match="its reports would be written to") as info:
        server.check_paths(hostile, TaskSpec.model_validate({"type": "review", "target": target}))
    assert why in str(info.value)


def test_ingest_rejects_each_such_task_file_with_a_clear_error(hostile: Path, store: Store, outside: Path) -> None:
    ingestor = Ingestor(store, FakeClock())
    files = {f"out{n}.yaml": f"type: custom\ntarget: shop/pricing.py\noutput: {output}\nprompt: p\n"
             for n, output in enumerate(BAD_OUTPUTS)}
    files |= {f"target{n}.yaml": f"type: review\ntarget: {target}\n" for n, target in enumerate(BAD_TARGETS)}
    for name, text in files.items():
        (hostile / "tasks.d" / name).write_text(text)
        assert ingestor.ingest_file(hostile, hostile / "tasks.d" / name) is None
    for n, why in enumerate(BAD_OUTPUTS.values()):
        error = (hostile / "tasks.d" / ".rejected" / f"out{n}.yaml.error.txt").read_text()
        assert "field 'output'" in error and why in error, error
    for n, why in enumerate(BAD_TARGETS.values()):
        error = (hostile / "tasks.d" / ".rejected" / f"target{n}.yaml.error.txt").read_text()
        assert "field 'target'" in error and "its reports would be written to" in error and why in error, error
    assert store.counts().get("queued", 0) == 0
    assert list(outside.iterdir()) == []


def test_a_symlink_inside_the_repo_still_works_for_outputs_and_reports(repo: Path, store: Store) -> None:
    (repo / "alias").symlink_to(repo / "shop")
    spec = TaskSpec.model_validate({"type": "review", "target": "alias/pricing.py", "output": "alias/notes.md"})
    server.check_paths(repo, spec)
    run = a_run(store, repo, spec)
    outputs.atomic_write(repo / "alias" / "notes.md", "notes\n", root=repo)
    delivery.write_report(store, run, "written", "alias/notes.md")
    assert (repo / "shop" / "notes.md").read_text() == "notes\n"
    assert (repo / "shop" / ".ohd" / "pricing.py.review.json").is_file()


# -- paths: checked again at the write ----------------------------------------------------------

def a_run(store: Store, repo: Path, spec: TaskSpec) -> delivery.Run:
    task = store.get_task(store.enqueue(str(repo), spec, FakeClock().now(), source="api"))
    job = Job(task_type=TaskType(task.type), target=task.target, source="x\n", module="m",
              output=task.output or "out.md")
    return delivery.Run(task=task, repo=repo, job=job, attempts=1)


def swap_for_link(folder: Path, to: Path) -> None:
    """What a hostile process (or a checkout) can do between the check and the write."""
    folder.rename(folder.with_name(folder.name + ".moved"))
    folder.symlink_to(to)


@pytest.mark.parametrize("to", ["outside", "git", "tasks.d"])
def test_an_output_folder_swapped_for_a_symlink_after_the_check_is_not_followed(repo: Path, outside: Path,
                                                                               to: str) -> None:
    git(repo, "init", "-q", str(repo / "sub"))
    destination = {"outside": outside, "git": repo / "sub" / ".git" / "hooks", "tasks.d": repo / "tasks.d"}[to]
    before = sorted(destination.iterdir())
    (repo / "gen").mkdir()
    intended = outputs.check_output(repo, "gen/post-checkout.yaml")       # the check passes ...
    plan = outputs.plan(intended, "echo owned\n", None, None)
    swap_for_link(repo / "gen", destination)                            # ... then the tree changes
    with pytest.raises(TargetError):
        outputs.apply(plan, root=repo)
    assert sorted(destination.iterdir()) == before


def test_a_report_folder_swapped_for_a_symlink_after_the_check_gets_no_report(repo: Path, store: Store,
                                                                              outside: Path) -> None:
    spec = TaskSpec.model_validate({"type": "review", "target": "shop/pricing.py"})
    (repo / "shop" / ".ohd").mkdir()
    server.check_paths(repo, spec)                                      # accepted ...
    run = a_run(store, repo, spec)
    swap_for_link(repo / "shop" / ".ohd", outside)                     # ... then the folder is a link out
    with pytest.raises(TargetError, match="shop/.ohd"):
        delivery.write_report(store, run, "written", None)
    assert list(outside.iterdir()) == []


def try_(action: Callable[[], object]) -> bool:
    try:
        action()
    except OSError:
        return False
    return True


def test_writes_racing_a_folder_flipped_to_a_symlink_never_land_outside(repo: Path, outside: Path) -> None:
    """A thread flips `gen/` between a real folder and a symlink out while ohd writes into it: each
    write lands in the real folder or is refused (resolve-and-compare alone loses this race)."""
    real, parked = repo / "gen", repo / "gen.real"
    real.mkdir()
    stop = threading.Event()

    made = [0]

    def set_aside() -> None:          # a write made gen/ anew in a gap: park that one aside
        made[0] += 1
        real.rename(repo / f"gen.made{made[0]}")

    def flip() -> None:
        while not stop.is_set():
            real.rename(parked)
            while not try_(lambda: real.symlink_to(outside)):
                set_aside()
            real.unlink()
            while not try_(lambda: parked.rename(real)):
                set_aside()

    flipper_alive_to_the_end = [False]

    def flip_and_say() -> None:
        flip()
        flipper_alive_to_the_end[0] = True

    flipper = threading.Thread(target=flip_and_say)
    flipper.start()
    written = refused = 0
    try:
        for n in range(400):
            try:
                outputs.atomic_write(repo / "gen" / f"f{n}.py", "x = 1\n", root=repo)
                written += 1
            except TargetError:
                refused += 1
    finally:
        stop.set()
        flipper.join()
    assert list(outside.iterdir()) == []
    assert flipper_alive_to_the_end[0] and written + refused == 400
    assert written == sum(1 for folder in repo.glob("gen*") for _ in folder.iterdir())


def test_outputs_keep_their_folders_mode_under_the_daemons_private_umask(repo: Path) -> None:
    (repo / "shared").mkdir()
    (repo / "shared").chmod(0o775)
    (repo / "mine.py").write_text("x = 1\n")
    (repo / "mine.py").chmod(0o600)
    old = os.umask(0o077)
    try:
        outputs.atomic_write(repo / "tests" / "deep" / "test_new.py", "x = 1\n", root=repo)
        outputs.atomic_write(repo / "shared" / "new.py", "x = 1\n", root=repo)
        outputs.atomic_write(repo / "mine.py", "x = 2\n", root=repo)
    finally:
        os.umask(old)
    assert mode(repo / "tests") == 0o755
    assert mode(repo / "tests" / "deep") == 0o755                       # its parent's, not 0700
    assert mode(repo / "tests" / "deep" / "test_new.py") == 0o644
    assert mode(repo / "shared" / "new.py") == 0o664
    assert mode(repo / "mine.py") == 0o600                              # an existing file keeps its mode


# -- the socket: a live one is never taken, even with a full backlog -------------------------------

def test_a_live_socket_with_a_full_backlog_is_not_taken_for_stale(tmp_path: Path) -> None:
    path = Path(tempfile.mkdtemp(prefix="ohd-bl-")) / "s.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    waiting = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)]
    waiting[0].connect(str(path))            # the one the backlog holds: the next connect gets EAGAIN
    try:
        inode = path.stat().st_ino
        with pytest.raises(DaemonAlreadyRunning):
            server.remove_stale_socket(path)
        assert path.stat().st_ino == inode
    finally:
        for sock in [*waiting, listener]:
            sock.close()
        path.unlink()
        path.parent.rmdir()


# -- real daemons: modes, the peer check, take-over ---------------------------------------------

def raw_request(path: Path, uid: int | None = None) -> str:
    """GET /status over the socket from this process, or from a forked child running as `uid`:
    'answer:<the HTTP reply>' or 'error:<errno name>'."""
    request = b"GET /status HTTP/1.1\r\nHost: ohd\r\nConnection: close\r\n\r\n"
    if uid is None:
        return _request(path, request)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                                  # the child: another user, then one request
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.write(write, _request(path, request).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        text = pipe.read().decode()
    os.waitpid(pid, 0)
    return text


def _request(path: Path, request: bytes) -> str:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    try:
        sock.connect(str(path))
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return "answer:" + data.decode()
    except OSError as exc:
        return f"error:{type(exc).__name__}"
    finally:
        sock.close()


class Running:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.repo = make_repo(tmp / "repo")
        self.runtime = Path(tempfile.mkdtemp(prefix="ohd-pm-"))
        os.rmdir(self.runtime)                    # the daemon creates it
        self.state = tmp / "state"
        self.log = self.state / "ohd.log"
        self.key_file = tmp / "xdg-config" / "ohd" / "env"      # the service's API key file
        self.env = daemon_env(tmp, self.runtime, OHD_LOG_FILE=str(self.log), XDG_CONFIG_HOME=str(tmp / "xdg-config"))
        self.daemon = DaemonProcess(self.env, self.repo, tmp / "stderr.log")

    @property
    def socket(self) -> Path:
        return self.runtime / "ohd.sock"

    def close(self) -> None:
        if self.daemon.proc is not None:
            self.daemon.stop()
        for child in self.runtime.glob("*"):
            child.unlink()
        if self.runtime.exists():
            self.runtime.rmdir()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """One daemon (offline provider) that has run one review task to completion."""
    run = Running(tmp_path_factory.mktemp("perms"))
    try:
        run.daemon.start()
        (run.repo / "tasks.d" / "review.yaml").write_text("type: review\ntarget: shop/pricing.py\n")
        wait_for(lambda: (run.repo / "shop" / ".ohd" / "pricing.py.review.json").is_file(),
                 what="the review task's report")
        yield run
    finally:
        run.close()


def test_the_state_is_private_to_the_daemons_user(running: Running) -> None:
    state = running.state
    assert mode(state) == 0o700
    for name in ("ohd.db", "ohd.db-wal", "ohd.db-shm", "ohd.lock", "ohd.log"):
        assert (state / name).exists(), name
        assert mode(state / name) == 0o600, name
    assert mode(running.runtime) == 0o700
    assert stat.S_ISSOCK(running.socket.lstat().st_mode) and mode(running.socket) == 0o600


def test_what_the_daemon_writes_into_the_repo_keeps_the_repos_modes(running: Running) -> None:
    repo = running.repo
    assert mode(repo / "shop") == 0o755
    for folder in (repo / "shop" / ".ohd", repo / "shop" / ".ohd" / "reviews"):
        assert mode(folder) == 0o755, folder
    for path in (repo / "shop" / ".ohd" / "reviews" / "pricing.py.md", repo / "shop" / ".ohd" / "pricing.py.review.json"):
        assert mode(path) == 0o644, path


@as_root_only
def test_a_peer_of_another_uid_is_refused_even_when_the_socket_is_opened_to_all(running: Running) -> None:
    assert raw_request(running.socket, NOBODY) == "error:PermissionError"     # 0600 in 0700: no way in
    running.runtime.chmod(0o777)
    running.socket.chmod(0o777)
    try:
        refused = raw_request(running.socket, NOBODY)
        mine = raw_request(running.socket)
    finally:
        running.runtime.chmod(0o700)
        running.socket.chmod(0o600)
    assert refused.startswith("answer:HTTP/1.1 403 "), refused
    assert '"kind": "PeerRefused"' in refused and f"uid {NOBODY} may not use it" in refused
    assert '"queue"' not in refused
    assert mine.startswith("answer:HTTP/1.1 200 ") and '"queue"' in mine
    wait_for(lambda: f"refused a connection from uid {NOBODY}" in running.log.read_text(), what="the log line")


def test_a_second_daemon_never_takes_a_live_socket(running: Running, tmp_path: Path) -> None:
    """Another state dir (so its own lock is free), the same runtime dir: it must stop, not steal."""
    inode = running.socket.stat().st_ino
    env = {**running.env, "OHD_STATE_DIR": str(tmp_path / "other-state")}
    second = subprocess.run([sys.executable, "-m", "ohd", "daemon", "--repo", str(running.repo)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode != 0
    assert "already" in second.stderr, second.stderr
    assert running.socket.stat().st_ino == inode
    assert raw_request(running.socket).startswith("answer:HTTP/1.1 200 ")


def test_a_killed_daemons_socket_is_replaced_and_old_loose_modes_are_tightened(tmp_path: Path) -> None:
    run = Running(tmp_path)
    try:
        run.daemon.start()
        run.daemon.stop(signal.SIGKILL)
        assert stat.S_ISSOCK(run.socket.lstat().st_mode)                 # left behind
        assert raw_request(run.socket) == "error:ConnectionRefusedError"
        loosened: dict[Path, int] = {run.state: 0o755, run.runtime: 0o755}
        run.key_file.parent.mkdir(parents=True)
        run.key_file.write_text("OPENROUTER_API_KEY=sk-or-written-by-hand\n")
        loosened |= {path: 0o644 for path in [*run.state.iterdir(), run.key_file] if path.is_file()}
        for path, loose in loosened.items():                             # as an older ohd left them
            path.chmod(loose)
        run.daemon.start()
        assert raw_request(run.socket).startswith("answer:HTTP/1.1 200 ")
        for path in loosened:
            assert mode(path) == (0o700 if path.is_dir() else 0o600), path
        text = run.log.read_text()
        assert "removing stale socket" in text
        assert "made private what others could read" in text and f"{run.state / 'ohd.db'} 0644 -> 0600" in text
    finally:
        run.close()


def test_a_state_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a folder to another uid needs root")
    run = Running(tmp_path)
    run.state.mkdir()
    os.chown(run.state, NOBODY, NOBODY)
    try:
        done = subprocess.run([sys.executable, "-m", "ohd", "daemon", "--repo", str(run.repo)], env=run.env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode != 0
        assert f"belongs to uid {NOBODY}" in done.stderr, done.stderr
        assert not run.socket.exists()
    finally:
        run.close()


def test_only_the_daemons_own_user_and_root_are_served() -> None:
    assert server.peer_allowed(1000, own_uid=1000) and server.peer_allowed(0, own_uid=1000)
    assert not server.peer_allowed(1001, own_uid=1000)
    assert not server.peer_allowed(None, own_uid=1000)           # no credentials: refused


def test_a_store_the_cli_creates_is_private_too(tmp_path: Path) -> None:
    """`ohd tasks` before any daemon ran creates the state dir and the database: 0700 and 0600,
    under the shell's umask 022."""
    env = daemon_env(tmp_path, tmp_path / "rt")
    done = subprocess.run([sys.executable, "-m", "ohd", "tasks"], env=env, capture_output=True, text=True,
                          timeout=120, preexec_fn=lambda: os.umask(0o022))
    assert done.returncode == 0, done.stderr
    assert mode(tmp_path / "state") == 0o700
    for name in ("ohd.db", "ohd.db-wal", "ohd.db-shm"):
        path = tmp_path / "state" / name
        assert not path.exists() or mode(path) == 0o600, name
    assert mode(tmp_path / "state" / "ohd.db") == 0o600


@as_root_only
def test_the_cli_sends_nothing_to_a_socket_another_user_serves(tmp_path: Path) -> None:
    """Another user put a socket where ohd's belongs (a loosened runtime dir): the client refuses
    to talk to it, and the impostor receives not one byte."""
    from ohd.cli.client import Client
    from ohd.errors import OhdError

    folder = Path(tempfile.mkdtemp(prefix="ohd-imp-"))
    folder.chmod(0o777)
    path = folder / "ohd.sock"
    ready_r, ready_w = os.pipe()
    got_r, got_w = os.pipe()
    pid = os.fork()
    if pid == 0:                                  # the impostor, as uid 65534
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(path))
            listener.listen(1)
            os.write(ready_w, b"1")
            listener.settimeout(60)
            conn, _ = listener.accept()
            conn.settimeout(60)
            received = b""
            while chunk := conn.recv(65536):
                received += chunk
            os.write(got_w, str(len(received)).encode())
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"1"
        with pytest.raises(OhdError, match=f"served by a process of uid {NOBODY}"):
            Client(path).post("/tasks", {"type": "review", "target": "secret.py"})
        assert os.read(got_r, 32) == b"0"
    finally:
        os.waitpid(pid, 0)
        path.unlink(missing_ok=True)
        folder.rmdir()


def test_done_and_rejected_keep_the_mode_of_tasks_d_under_the_private_umask(repo: Path, store: Store) -> None:
    ingestor = Ingestor(store, FakeClock())
    tasks = repo / "tasks.d"
    (tasks / "good.yaml").write_text("type: review\ntarget: shop/pricing.py\n")
    (tasks / "bad.yaml").write_text("type: review\ntarget: nowhere.py\n")
    old = os.umask(0o077)
    try:
        assert ingestor.ingest_file(repo, tasks / "good.yaml") is not None
        assert ingestor.ingest_file(repo, tasks / "bad.yaml") is None
    finally:
        os.umask(old)
    assert mode(tasks) == 0o755
    assert mode(tasks / ".done") == 0o755 and mode(tasks / ".rejected") == 0o755
    assert mode(tasks / ".rejected" / "bad.yaml.error.txt") == 0o644
