"""The systemd unit (one source, verified by systemd-analyze), `ohd service`, and sd_notify."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ohd.service import systemd as service
from ohd.service.notify import Notifier, one_line, watchdog_interval

ROOT = Path(__file__).resolve().parents[2]


# -- the unit ---------------------------------------------------------------------


def test_the_repo_unit_is_what_install_writes() -> None:
    assert (ROOT / "systemd" / "ohd.service").read_text() == service.unit_text()


def test_every_setting_of_the_unit_says_why() -> None:
    lines = service.unit_text().splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith("#"):
            assert lines[i - 1].startswith("#"), f"no comment above {line!r}"
    text = service.unit_text()
    for needed in ("Type=notify", "NotifyAccess=main", "ExecReload=/bin/kill -HUP $MAINPID",
                   "Restart=on-failure", "TimeoutStopSec=45", "WatchdogSec=60", "ProtectSystem=full",
                   "NoNewPrivileges=yes", "WantedBy=default.target"):
        assert f"\n{needed}\n" in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze missing (.ci/run installs Debian's systemd)")
@pytest.mark.parametrize("mode", [[], ["--user"]])
def test_systemd_analyze_verify_passes(tmp_path: Path, mode: list[str]) -> None:
    ohd = Path(sys.executable).parent / "ohd"      # the real executable, as install writes it
    unit = tmp_path / "ohd.service"
    unit.write_text(service.unit_text(f"{ohd} daemon"))
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    done = subprocess.run(["systemd-analyze", *mode, "verify", str(unit)], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0 and "ohd.service" not in done.stderr, done.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze missing (.ci/run installs Debian's systemd)")
@pytest.mark.parametrize("mode", [[], ["--user"]])
def test_systemd_analyze_verify_passes_on_the_repos_own_unit_file(tmp_path: Path, mode: list[str]) -> None:
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    done = subprocess.run(["systemd-analyze", *mode, "verify", str(ROOT / "systemd" / "ohd.service")],
                          capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert done.returncode == 0 and "ohd.service" not in done.stderr, done.stderr


# -- ExecStart ----------------------------------------------------------------------


def test_exec_start_quotes_what_systemd_would_split_or_expand(tmp_path: Path) -> None:
    assert service.quote("/usr/bin/ohd") == "/usr/bin/ohd"
    assert service.quote("/home/a b/ohd") == '"/home/a b/ohd"'
    assert service.quote("/srv/100%/$HOME") == "/srv/100%%/$$HOME"
    assert service.quote('say "hi"') == '"say \\"hi\\""'
    repo = tmp_path / "my repo"
    start = service.exec_start(["/opt/ohd"], [repo], tmp_path / "c.toml")
    assert start == f'/opt/ohd --config {tmp_path}/c.toml daemon --repo "{repo}"'


def test_the_executable_is_the_running_script_then_path_then_python(tmp_path: Path) -> None:
    script = tmp_path / "bin" / "ohd"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    assert service.executable(str(script), "/usr/bin/ohd", "/py") == [str(script)]
    assert service.executable("/x/ohd/__main__.py", "/usr/bin/ohd", "/py") == ["/usr/bin/ohd"]
    assert service.executable("/x/ohd/__main__.py", None, "/py") == ["/py", "-m", "ohd"]


# -- install / uninstall ------------------------------------------------------------


def test_install_without_a_user_manager_says_what_to_run(tmp_path: Path) -> None:
    directory = service.unit_dir({"XDG_CONFIG_HOME": str(tmp_path / "cfg")})
    assert directory == tmp_path / "cfg" / "systemd" / "user"
    lines = service.install(directory, "/opt/ohd daemon", systemctl=None)
    assert (directory / "ohd.service").read_text() == service.unit_text("/opt/ohd daemon")
    assert "  systemctl --user daemon-reload" in lines
    assert "  systemctl --user enable --now ohd.service" in lines
    assert any(str(tmp_path / "cfg" / "ohd" / "env") in line for line in lines)
    lines = service.uninstall(directory, systemctl=None)
    assert not (directory / "ohd.service").exists()
    assert "  systemctl --user disable --now ohd.service" in lines
    assert service.uninstall(directory, systemctl=None)[0].endswith("nothing to remove")


@pytest.fixture
def systemctl(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real executable that answers like a user manager and records its arguments."""
    calls = tmp_path / "calls.txt"
    script = tmp_path / "systemctl"
    script.write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\nexit 0\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    yield str(script), calls


def test_install_and_uninstall_run_systemctl_where_it_works(tmp_path: Path,
                                                            systemctl: tuple[str, Path]) -> None:
    program, calls = systemctl
    directory = tmp_path / "units"
    lines = service.install(directory, "/opt/ohd daemon", program)
    assert "ran: systemctl --user enable --now ohd.service" in lines
    service.uninstall(directory, program)
    assert calls.read_text().splitlines() == [
        "--user show-environment", "--user daemon-reload", "--user enable --now ohd.service",
        "--user show-environment", "--user disable --now ohd.service",
        "--user daemon-reload"]


# -- sd_notify ----------------------------------------------------------------------


def test_notify_reaches_a_path_socket_and_an_abstract_one(tmp_path: Path) -> None:
    abstract = f"@ohd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as by_path, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as by_name:
        path = Path(os.environ["OHD_RUNTIME_DIR"]) / "n.sock"
        by_path.bind(str(path))
        by_name.bind("\0" + abstract[1:])
        for sock in (by_path, by_name):
            sock.settimeout(5)
        assert Notifier(str(path)).ready("2 queued\nsecond line")
        assert by_path.recv(1024) == b"READY=1\nSTATUS=2 queued second line"
        notifier = Notifier(abstract)
        assert notifier.stopping() and notifier.watchdog() and notifier.status("x")
        assert [by_name.recv(1024) for _ in range(3)] == [b"STOPPING=1", b"WATCHDOG=1", b"STATUS=x"]
        path.unlink()


def test_notify_without_a_socket_is_a_no_op_and_never_raises(tmp_path: Path) -> None:
    assert not Notifier(None).enabled and not Notifier(None).ready()
    gone = Notifier(str(tmp_path / "nobody-listens.sock"))
    assert gone.enabled and not gone.ready() and not gone.status("still fine")


def test_watchdog_interval_is_half_the_timeout_and_only_for_us() -> None:
    assert watchdog_interval("60000000", None, 42) == 30.0
    assert watchdog_interval("60000000", "42", 42) == 30.0
    assert watchdog_interval("60000000", "43", 42) is None
    for bad in (None, "", "0", "-5", "soon"):
        assert watchdog_interval(bad, None, 42) is None
    assert one_line("a\nb\tc") == "a b c" and len(one_line("x" * 500)) == 200


# -- what a SIGHUP may change -------------------------------------------------------


def test_a_reload_installs_the_log_handlers_again_and_keeps_a_file_it_cannot_open(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import logging

    from ohd.config import Settings
    from ohd.service.supervision import apply_logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        (tmp_path / "a-file").write_text("")
        live = {"log_format": "json", "log_file": tmp_path / "a-file" / "ohd.log", "workers": 2}
        apply_logging(Settings(), live)
        assert "reload: cannot open log_file" in caplog.text     # logged while the old handlers stand
        assert live == {"log_format": "json", "workers": 2}        # the running file (none) is kept
        logging.getLogger("ohd.worker").info("task %d running", 4)
        assert json.loads(capsys.readouterr().err.splitlines()[-1])["task_id"] == 4
        live = {"log_format": "text", "log_file": tmp_path / "logs" / "ohd.log"}
        apply_logging(Settings(), live)
        logging.getLogger("ohd.worker").info("task %d running", 5)
        assert (tmp_path / "logs" / "ohd.log").read_text().endswith("INFO ohd.worker: task 5 running [task_id=5]\n")
        assert live == {"log_format": "text", "log_file": tmp_path / "logs" / "ohd.log"}
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)


def test_a_reload_takes_the_live_keys_and_names_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    from ohd.config import Settings
    from ohd.service.status import summary
    from ohd.service.supervision import live_changes

    old = Settings()
    new = old.model_copy(update={"workers": 2, "models": ["a/b"], "free_rpm": 5, "log_level": "LOUD",
                                 "database_url": "sqlite:////elsewhere.db", "grace_s": 1.0})
    with caplog.at_level("WARNING"):
        assert live_changes(old, new) == {"workers": 2, "models": ["a/b"], "free_rpm": 5}
    assert "database_url, grace_s changed but only take(s) effect after a restart" in caplog.text
    assert "unknown log_level 'LOUD'" in caplog.text
    assert live_changes(old, old) == {}
    assert summary({"queued": 3, "running": 1}, {"size": 4, "busy": 1}) == (
        "3 queued, 1 running, 0 pending, 0 completed, 0 failed; workers 1/4 busy")


def test_a_reload_applies_the_budget_and_selection_keys_to_the_running_pool() -> None:
    from ohd import config
    from ohd.service import daemon
    from ohd.service.assemble import policy_of, rank_of
    from ohd.service.live import Live
    from ohd.work.worker import Pool
    from tests.support.clock import FakeClock

    settings = config.load(env={**os.environ, "OPENROUTER_API_KEY": "sk-test"})   # not offline: strict mode on
    running = daemon.Daemon(settings)
    running.store.migrate()         # a reload of the limits decides pending tasks again (reads the store)
    pool = Pool(running.store, call=None, clock=FakeClock(), models=["m"],  # type: ignore[arg-type]
                policy=policy_of(settings), rank=rank_of(settings, running.store))
    try:
        assert pool.rank is not None and not pool.governor.policy.allow_paid
        running.reloader.apply(settings.model_copy(update={"allow_paid": True, "daily_request_cap": 40,
                                                           "model_selection": False}), Live(pool))
        assert pool.governor.policy.allow_paid and pool.governor.policy.request_cap == 40
        assert pool.rank is None                                 # configured order from now on
        running.reloader.apply(running.settings.model_copy(update={"model_selection": True}), Live(pool))
        assert pool.rank is not None
    finally:
        running.store.close()


def test_a_reload_gives_the_agent_runs_that_start_from_then_on_the_new_agents_settings(tmp_path: Path) -> None:
    from ohd import config
    from ohd.service import daemon
    from ohd.service.assemble import agents_of
    from ohd.service.live import Live
    from ohd.work.worker import Pool
    from tests.support.clock import FakeClock

    settings = config.load(env=dict(os.environ))
    running = daemon.Daemon(settings)
    pool = Pool(running.store, call=None, clock=FakeClock(), models=["m"],  # type: ignore[arg-type]
                agents=agents_of(settings))
    try:
        assert pool.agents is not None and pool.agents.config.command == ()
        running.reloader.apply(settings.model_copy(update={"agents": config.AgentSettings(
            command=["my-agent", "{prompt_file}"], aider=["~/bin/aider"])}), Live(pool))
        assert pool.agents.config.command == ("my-agent", "{prompt_file}")
        assert pool.agents.config.aider == (str(Path.home() / "bin" / "aider"),)
    finally:
        running.store.close()


def test_a_reload_that_changes_the_limits_decides_the_pending_tasks_again_at_once() -> None:
    from datetime import timedelta

    from ohd import config
    from ohd.core.taskfile import TaskSpec
    from ohd.service import daemon
    from ohd.service.assemble import policy_of
    from ohd.service.live import Live
    from ohd.work.worker import Pool
    from tests.support.clock import FakeClock

    clock = FakeClock()
    settings = config.load(env={**os.environ, "OPENROUTER_API_KEY": "sk-test"})
    running = daemon.Daemon(settings, clock)
    running.store.migrate()
    pool = Pool(running.store, call=None, clock=clock, models=["m:free"],  # type: ignore[arg-type]
                policy=policy_of(settings))
    try:
        task_id = running.store.enqueue("/repo", TaskSpec.model_validate(
            {"type": "unit_test", "target": "a.py"}), clock.now())
        assert running.store.claim_next("w", clock.now(), timedelta(seconds=60)) is not None
        running.store.defer(task_id, "w", clock.now() + timedelta(hours=12), clock.now(), "free_rpd spent")
        running.reloader.apply(settings.model_copy(update={"free_rpd": 1000}), Live(pool))
        assert running.store.get_task(task_id).status == "queued"       # not at UTC midnight
    finally:
        running.store.close()


def test_a_notify_socket_nobody_reads_never_blocks_the_daemon(tmp_path: Path) -> None:
    """sd_notify must not wait: a listener that stops reading fills its queue, and a blocking send
    then held the daemon's stop for ever (CI: 'did not stop within 60 s', stack in Notifier.send)."""
    import socket as sockets
    import threading

    from ohd.service.notify import Notifier

    path = tmp_path / "notify.sock"
    with sockets.socket(sockets.AF_UNIX, sockets.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        notifier = Notifier(str(path))
        done = threading.Event()

        def flood() -> None:
            for _ in range(10_000):       # far beyond a datagram queue's room
                notifier.status("x" * 200)
            done.set()

        threading.Thread(target=flood, daemon=True).start()
        assert done.wait(30), "a send blocked on a full notify socket"


def test_a_reload_applies_the_webhooks_with_the_secrets_read_at_the_start(
        caplog: pytest.LogCaptureFixture) -> None:
    import json

    from ohd import config
    from ohd.service import daemon
    from ohd.service.live import Live
    from ohd.work.worker import Pool
    from tests.support.clock import FakeClock

    signed = {"url": "https://ci.example.com/ohd", "secret_env": "TEST_HOOK_SECRET"}
    start = config.load(env={**os.environ, "OHD_WEBHOOKS": json.dumps([signed]), "TEST_HOOK_SECRET": "s3"})
    running = daemon.Daemon(start)
    pool = Pool(running.store, call=None, clock=FakeClock(), models=["m"])  # type: ignore[arg-type]
    try:
        [hook] = running.hooks
        assert hook.secret is not None and hook.retry is not None and hook.retry.timeout_s == 10
        # read again after the start took the variable away: the same hook and one more, of its own timeout
        added = {"url": "https://hooks.example.org/x", "events": ["task.failed"], "timeout_s": 2, "retry_s": 1}
        env = {**os.environ, "OHD_WEBHOOKS": json.dumps([signed, added])}
        running.reloader.apply(config.load(env=env), Live(pool))
        assert [t.url for t in running.hooks] == [signed["url"], added["url"]]
        assert running.hooks[0].secret is not None and running.hooks[0].secret.get_secret_value() == "s3"
        assert running.hooks[1].retry is not None and (running.hooks[1].retry.timeout_s,
                                                       running.hooks[1].retry.first_s) == (2, 1)
        assert {h.key for h in running.store.hooks} == {t.key for t in running.hooks}   # rows written for both
        assert [key for key, _label in running.view.webhooks] == [t.key for t in running.hooks]   # ohd status
        # a hook signed with a variable the daemon never read: the running hooks stay
        unknown = {"url": "https://other.example.net/y", "secret_env": "TEST_HOOK_NEVER_SET"}
        with caplog.at_level("ERROR"):
            running.reloader.apply(config.load(env={**os.environ, "OHD_WEBHOOKS": json.dumps([unknown])}),
                                   Live(pool))
        assert "keeping the running webhooks" in caplog.text and "TEST_HOOK_NEVER_SET" in caplog.text
        assert [t.url for t in running.hooks] == [signed["url"], added["url"]]
        assert len(running.reloader.settings.webhooks) == 2
    finally:
        running.store.close()
