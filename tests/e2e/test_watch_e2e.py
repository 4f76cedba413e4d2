"""A real daemon's watchdog observers on a repo with a virtualenv and many folders: stderr
carries ohd's log lines only, from the spool's creation to a clean stop."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from tests.e2e.helpers import DaemonProcess, daemon_env
from tests.support.waiting import wait_for

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d (DEBUG|INFO|WARNING) [\w.]+: ")


def _folders(root: Path, count: int) -> None:
    for i in range(count):
        (root / f"p{i // 50}" / f"d{i % 50}").mkdir(parents=True, exist_ok=True)


IN_ACCESS, IN_CLOSE_NOWRITE, IN_OPEN = 0x1, 0x10, 0x20


def inotify_watches(pid: int) -> dict[int, int]:
    """The process's inotify watches as the kernel lists them: inode → event mask."""
    watches: dict[int, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        for fields in (dict(f.split(":", 1) for f in line.split()[1:] if ":" in f)
                       for line in info.splitlines() if line.startswith("inotify ")):
            watches[int(fields["ino"], 16)] = int(fields["mask"], 16)
    return watches


def _read_everything(repo: Path) -> int:
    """What `git status`, pytest or an editor does to a tree: open and list every folder."""
    seen = 0
    for root, _dirs, files in os.walk(repo):
        seen += 1
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                handle.read(1)
    return seen


def test_creating_the_spool_and_a_clean_stop_print_nothing_but_ohd_log_lines(
        repo: Path, tmp_path: Path) -> None:
    venv = repo / ".venv"
    _folders(venv / "lib" / "site-packages", 2000)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    _folders(repo / "data", 1500)                          # the user's own folders are watched
    assert not (repo / ".git" / "ohd").exists()             # the daemon creates the hook spool
    log = tmp_path / "daemon.log"
    daemon = DaemonProcess(daemon_env(tmp_path, tmp_path / "run"), repo, log).start()
    try:
        wait_for(lambda: "ready:" in log.read_text() or " ready" in log.read_text(), timeout=60,
                 what="the daemon to be ready")
        assert (repo / ".git" / "ohd" / "inbox").is_dir()
        assert daemon.proc is not None
        watches = inotify_watches(daemon.proc.pid)
        assert (repo / "data" / "p0" / "d0").stat().st_ino in watches
        assert (repo / ".git" / "ohd" / "inbox").stat().st_ino in watches     # by the spool's watch
        for unwatched in (repo / ".git", repo / ".git" / "objects", venv / "lib" / "site-packages" / "p0"):
            assert unwatched.stat().st_ino not in watches, unwatched
        assert [hex(m) for m in watches.values() if m & (IN_ACCESS | IN_OPEN | IN_CLOSE_NOWRITE)][:3] == []
        assert _read_everything(repo) > 3500
    finally:
        done = threading.Event()                           # reads go on while the daemon stops
        reader = threading.Thread(target=lambda: [_read_everything(repo) for _ in iter(done.is_set, True)])
        reader.start()
        try:
            assert daemon.stop() == 0, log.read_text()[-3000:]
        finally:
            done.set()
            reader.join()
    lines = log.read_text(errors="replace").splitlines()
    assert not [line for line in lines if "already exists" in line][:1]
    assert not [line for line in lines if "ERROR" in line][:3]
    assert [line[:200] for line in lines if not LOG_LINE.match(line)][:5] == []
    assert "INFO ohd.daemon: stopped" in lines[-1]
