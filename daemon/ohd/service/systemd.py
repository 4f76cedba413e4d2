"""`ohd service install|uninstall`: the systemd user unit, written and removed.

The unit text lives here, once: the repo's `systemd/ohd.service` is `unit_text()` with
the default `ExecStart`, and a test holds the two equal. Install writes it to
`<XDG_CONFIG_HOME>/systemd/user/ohd.service` with `ExecStart` pointing at the real
`ohd` executable, then runs `systemctl --user daemon-reload` and `enable --now` when a
user manager answers; otherwise it returns the exact commands to run. Functions return
the lines to show; the CLI prints them.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger("ohd.service")

UNIT_NAME = "ohd.service"
# The repo's copy of the unit: `ohd` on the user manager's PATH, through a path that exists
# everywhere (a placeholder such as `%h/.local/bin/ohd` fails `systemd-analyze verify` where it
# is absent); `ohd service install` writes the real executable instead.
DEFAULT_EXEC_START = "/usr/bin/env ohd daemon"
_EXEC_START = "@EXEC_START@"
UNIT_TEMPLATE = """\
# ohd as a systemd user service. Written by `ohd service install` (which sets ExecStart to the
# real executable); `ohd service uninstall` removes it. Every line says why it is here.

[Unit]
# What `systemctl --user status ohd` and the journal call it.
Description=ohd: development chores done by LLMs in the background
# Where to read what it does and how to configure it.
Documentation=https://github.com/ohd-dev/ohd#running-as-a-service

[Service]
# ohd sends READY=1 itself once its socket listens, so `systemctl --user start` returns when
# `ohd status` can connect, and STATUS= lines show the queue in `systemctl --user status`.
Type=notify
# Only the daemon's own process may notify; git and pytest runs it starts may not.
NotifyAccess=main
# The daemon in the foreground; install puts the real path (and any --repo/--config) here
# (a hand-copied file runs the ohd on the PATH of `systemctl --user show-environment`).
ExecStart=@EXEC_START@
# SIGHUP re-reads config.toml and the rule files without dropping a task (workers resize live).
ExecReload=/bin/kill -HUP $MAINPID
# The API key (a line OPENROUTER_API_KEY=...) stays out of the unit; "-": the file is optional.
EnvironmentFile=-%E/ohd/env
# A crash or a missed watchdog ping restarts ohd; a clean stop (exit 0) does not.
Restart=on-failure
# ...after a pause, so a broken configuration does not spin.
RestartSec=5
# SIGTERM to the daemon only: it lets running tasks finish for grace_s, then kills the pytest runs
# of the rest and puts them back in the queue (SIGKILL to anything left comes after the timeout).
KillMode=mixed
# The daemon's grace period (grace_s = 30 s) and 10 s more, so tasks are released, not killed.
TimeoutStopSec=45
# ohd pings every WatchdogSec/2 from its event loop; a hung loop is restarted.
WatchdogSec=60
# Hardening that keeps $HOME writable (ohd writes tests, docstrings and reports into your repos,
# its state into ~/.local/state/ohd). Nothing ohd runs (git hooks, pytest) can gain privileges:
NoNewPrivileges=yes
# /usr, /boot and /etc are read-only; "strict" would make $HOME read-only too and break writes.
# (In a user manager this needs unprivileged user namespaces, as Debian and Fedora allow.)
ProtectSystem=full
# No setuid/setgid files can be made (nothing ohd does needs them).
RestrictSUIDSGID=yes
# No realtime scheduling: a runaway test must not starve the desktop.
RestrictRealtime=yes
# No execution-domain (personality) changes, an old exploit path nothing here needs.
LockPersonality=yes
# Not PrivateTmp: the tests ohd validates may share /tmp with your shell on purpose, and the
# socket falls back to /tmp/runtime-UID when XDG_RUNTIME_DIR is unset.

[Install]
# Start with the user's session (`loginctl enable-linger` makes that: at boot).
WantedBy=default.target
"""


def unit_text(exec_start: str = DEFAULT_EXEC_START) -> str:
    """The unit file with this `ExecStart` command line (already quoted for systemd)."""
    return UNIT_TEMPLATE.replace(_EXEC_START, exec_start)


def quote(arg: str) -> str:
    """One ExecStart argument: `%` and `$` escaped, double-quoted if it has spaces or quotes."""
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if escaped and not any(c.isspace() or c in "\"'\\;" for c in escaped):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def executable(argv0: str, which: str | None, python: str) -> list[str]:
    """How to start `ohd`: the script that is running, else `ohd` on PATH, else `python -m ohd`."""
    if Path(argv0).name == "ohd" and os.access(argv0, os.X_OK) and Path(argv0).is_file():
        return [os.path.abspath(argv0)]
    if which:
        return [os.path.abspath(which)]
    return [os.path.abspath(python), "-m", "ohd"]


def exec_start(program: Sequence[str], repos: Sequence[Path] = (), config: Path | None = None) -> str:
    """`<program> [--config FILE] daemon [--repo PATH]...`, quoted for systemd."""
    args = [*program, *(["--config", str(config.resolve())] if config else []), "daemon"]
    for repo in repos:
        args += ["--repo", str(repo.resolve())]
    return " ".join(quote(a) for a in args)


def unit_dir(env: Mapping[str, str]) -> Path:
    """`$XDG_CONFIG_HOME/systemd/user`, default `~/.config/systemd/user`."""
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "systemd" / "user"


def _systemctl_works(systemctl: str | None) -> bool:
    """True when a user manager answers (`systemctl --user show-environment` exits 0)."""
    if systemctl is None:
        return False
    try:
        done = subprocess.run([systemctl, "--user", "show-environment"], capture_output=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _run(systemctl: str, *args: str) -> str | None:
    """`systemctl --user ARGS`; None on success, else its error text."""
    try:
        done = subprocess.run([systemctl, "--user", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if done.returncode == 0 else (done.stderr.strip() or f"exit {done.returncode}")


def _apply(manager: str | None, steps: Sequence[Sequence[str]]) -> list[str]:
    """Run the `systemctl --user` steps with `manager` (a systemctl that answered); None: say what to run."""
    commands = [" ".join(["systemctl", "--user", *step]) for step in steps]
    if manager is None:
        return ["systemctl --user is not available here (no user manager); run this where it is:",
                *(f"  {c}" for c in commands)]
    lines = []
    for step, command in zip(steps, commands, strict=True):
        error = _run(manager, *step)
        lines.append(f"ran: {command}" if error is None else f"failed: {command}: {error}")
    return lines


def install(directory: Path, start: str, systemctl: str | None) -> list[str]:
    """Write the unit with `ExecStart=start`, then reload and enable it (or say how)."""
    path = directory / UNIT_NAME
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(unit_text(start), encoding="utf-8")
    tmp.replace(path)
    log.info("wrote %s", path)
    lines = [f"wrote {path}", f"  ExecStart={start}"]
    manager = systemctl if _systemctl_works(systemctl) else None
    lines += _apply(manager, [("daemon-reload",), ("enable", "--now", UNIT_NAME)])
    lines += [f"the API key goes in {directory.parent.parent / 'ohd' / 'env'} (a line OPENROUTER_API_KEY=...)",
              "logs: journalctl --user -u ohd -f; reload the configuration: systemctl --user reload ohd"]
    return lines


def uninstall(directory: Path, systemctl: str | None) -> list[str]:
    """Stop and disable the unit where possible (or say how), then remove the file."""
    path = directory / UNIT_NAME
    if not path.exists():
        return [f"{path} does not exist; nothing to remove"]
    if not _systemctl_works(systemctl):
        path.unlink()
        return [f"removed {path}", *_apply(None, [("disable", "--now", UNIT_NAME), ("daemon-reload",)])]
    lines = _apply(systemctl, [("disable", "--now", UNIT_NAME)])
    path.unlink()
    return [*lines, f"removed {path}", *_apply(systemctl, [("daemon-reload",)])]


def find_systemctl() -> str | None:
    return shutil.which("systemctl")
