"""The sandbox's host side: which isolation this machine gives generated tests, and how to ask for it.

Levels, strongest first (`ohd.ladder.jail` builds them; README "Threat model" says what each stops):
`namespace` (user + mount + pid + network + IPC namespaces: no network, ohd's state, runtime and
config dirs, HOME and /tmp hidden, the file system read-only but a scratch dir), `landlock`
(no namespaces, Linux Landlock: writes only in the scratch dir, no TCP, no signals or ptrace out),
`process` (a scrubbed environment, limits, no capabilities, every process killed at the end).
`detect` probes once which one works (running the jail on `python -c pass`) and falls back to the
next; `command` wraps a command line in the jail. `seal` is for the daemon itself: the API key
variables leave its environment and it turns non-dumpable, so no process of the same user
without CAP_SYS_PTRACE reads its `/proc/<pid>/environ` or `/proc/<pid>/mem`.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from ohd.ladder import jail

log = logging.getLogger("ohd.sandbox")

LAUNCHER = str(Path(jail.__file__).resolve())
TIMEOUT_EXIT, SETUP_EXIT, PREFIX = jail.TIMEOUT_EXIT, jail.SETUP_EXIT, jail.PREFIX
# what no test needs: keys, tokens, passwords, agents, ohd's own paths, the user's bus and runtime dir
_SECRET = re.compile(r"(_KEY|_TOKEN|_SECRET|PASSWORD|PASSWD|CREDENTIALS?)$|^(SSH_AUTH_SOCK|SSH_AGENT_PID|"
                     r"GPG_AGENT_INFO|DBUS_SESSION_BUS_ADDRESS|XDG_RUNTIME_DIR|NOTIFY_SOCKET|WATCHDOG_\w+|"
                     r"LISTEN_\w+|KRB5CCNAME|OHD_\w*|XDG_(CONFIG|DATA|STATE|CACHE)_HOME)$", re.IGNORECASE)
_KEYLIKE = re.compile(r"(_KEY|_TOKEN|_SECRET|PASSWORD|PASSWD)$", re.IGNORECASE)   # what the daemon drops
# hidden in `namespace` besides ohd's own dirs: homes, temp dirs, the user's runtime dir, agents, docker
_ALWAYS_HIDDEN = ("/home", "/root", "/tmp", "/var/tmp", "/dev/shm", "/run/user", "/run/docker.sock",
                  "/var/run/docker.sock")
_PROBE = (sys.executable, "-I", "-S", "-c", "pass")


class Level(StrEnum):
    NAMESPACE = "namespace"
    LANDLOCK = "landlock"
    PROCESS = "process"


DESCRIPTIONS = {
    Level.NAMESPACE: "user+pid+net+mount namespaces: no network, ohd's files, HOME and /tmp hidden, "
                     "read-only but a scratch dir",
    Level.LANDLOCK: "Landlock: writes only in a scratch dir, no TCP, no signals out; ohd's files still readable",
    Level.PROCESS: "scrubbed environment, limits and no capabilities only: the tests can read and write "
                   "what you can and reach the network",
}


@dataclass(frozen=True, slots=True)
class Jail:
    """Where generated tests run: the level, what is hidden (`namespace`), the limits, why this level."""

    level: Level = Level.PROCESS
    hide: tuple[str, ...] = ()
    memory_mb: int = 4096           # RLIMIT_DATA
    file_mb: int = 256              # RLIMIT_FSIZE: the largest file a test writes
    processes: int = 256            # RLIMIT_NPROC (`namespace` only: elsewhere it counts all of the user's)
    detail: str = field(default="", compare=False)

    def describe(self) -> str:
        return f"{self.level.value} ({DESCRIPTIONS[self.level]}){f'; {self.detail}' if self.detail else ''}"

    def as_dict(self) -> dict[str, str]:
        return {"level": self.level.value, "description": DESCRIPTIONS[self.level], "detail": self.detail}


def is_secret(name: str) -> bool:
    """A variable no generated test may see (keys, tokens, agents, ohd's own paths)."""
    return bool(_SECRET.search(name))


def hidden_paths(own: Iterable[Path | str] = (), environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """`own` (ohd's state, runtime and config dirs, its database and log) and the usual places of
    other secrets, resolved (a hidden symlink would hide nothing)."""
    environ = os.environ if environ is None else environ
    extra = [environ.get("HOME", ""), environ.get("XDG_RUNTIME_DIR", ""),
             os.path.dirname(environ.get("SSH_AUTH_SOCK", "")), tempfile.gettempdir()]
    paths = {os.path.realpath(p) for p in [*map(str, own), *_ALWAYS_HIDDEN, *extra] if p and p != "/"}
    return tuple(sorted(paths))


def command(jail_: Jail, argv: Sequence[str], *, cwd: Path, scratch: Path, keep: Iterable[str] = (),
            timeout_s: float) -> list[str]:
    """`argv` run in `jail_` with cwd `cwd`, writable `scratch`, `keep` (and cwd, scratch) visible
    in `namespace`, ended after `timeout_s` (exit TIMEOUT_EXIT). The calling process must be the
    one that starts it: the launcher dies with it, also when it dies before the launcher is up."""
    spec = {"level": jail_.level.value, "cwd": str(cwd), "timeout_s": timeout_s, "parent": os.getpid(),
            "limits": {"cpu_s": int(timeout_s * 2) + 10, "data_bytes": jail_.memory_mb << 20,
                       "fsize_bytes": jail_.file_mb << 20,
                       **({"nproc": jail_.processes} if jail_.level is Level.NAMESPACE else {})},
            "writable": [os.path.realpath(scratch)]}
    if jail_.level is Level.NAMESPACE:
        spec["hide"] = list(jail_.hide)
        spec["keep"] = sorted({os.path.realpath(p) for p in [str(cwd), str(scratch), *keep, *_links(argv[0])] if p})
    return [sys.executable, "-I", "-S", LAUNCHER, json.dumps(spec), "--", *argv]


def _links(program: str) -> list[str]:
    """The folders of every hop from `program` to the file it is (a venv's python -> python3 -> the real one)."""
    hops, path = [], os.path.abspath(program)
    for _ in range(40):
        hops.append(os.path.dirname(os.path.realpath(os.path.dirname(path)) + "/" + os.path.basename(path)))
        if not os.path.islink(path):
            break
        path = os.path.join(os.path.dirname(path), os.readlink(path))
    return hops


def detect(hide: Sequence[str] = (), want: str = "auto", *, memory_mb: int = 4096) -> Jail:
    """The strongest level that works here (or `want`, falling back below it), probed by running the jail."""
    order = list(Level)
    if want != "auto":
        order = order[order.index(Level(want)):]
    failures: list[str] = []
    for level in order:
        candidate = Jail(level, tuple(hide), memory_mb=memory_mb)
        if level is Level.PROCESS:
            break
        if level is Level.LANDLOCK and jail.landlock_abi() < 1:
            failures.append("landlock: not in this kernel")
            continue
        why = _probe(candidate)
        if not why:
            break
        failures.append(f"{level.value}: {why}")
    return Jail(candidate.level, candidate.hide, memory_mb=memory_mb,
                detail="; ".join(failures) + (f" (Landlock ABI {jail.landlock_abi()})"
                                             if candidate.level is Level.LANDLOCK else ""))


def _probe(candidate: Jail) -> str:
    """Why the jail of `candidate` does not work here ("" when it does)."""
    with tempfile.TemporaryDirectory(prefix="ohd-probe-") as scratch:
        argv = command(candidate, _PROBE, cwd=Path(scratch), scratch=Path(scratch),
                       keep=python_paths(), timeout_s=30)
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                                  env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        except (OSError, subprocess.SubprocessError) as exc:
            return str(exc)
    if done.returncode == 0:
        return ""
    said = [line for line in done.stderr.splitlines() if line.startswith(PREFIX)]
    return said[-1][len(PREFIX):] if said else f"exit code {done.returncode}"


@functools.lru_cache(maxsize=1)
def default() -> Jail:
    """The strongest level here, hiding the usual places (no ohd dirs: the daemon passes its own), probed once."""
    return detect(hidden_paths())


def python_paths() -> list[str]:
    """This interpreter's prefixes and sys.path (what a jail must keep visible to run it)."""
    return [sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path]


def seal(environ: MutableMapping[str, str], names: Iterable[str]) -> list[str]:
    """For the daemon, once its settings are read: the key variables (`names`, and every variable
    that looks like a secret) leave `environ`, and the process becomes non-dumpable on Linux.
    Returns the names removed. The initial environment block stays in memory (/proc/<pid>/environ
    shows it): only PR_SET_DUMPABLE = 0 makes it unreadable to other processes of the same user."""
    removed = sorted(n for n in environ if n in set(names) or _KEYLIKE.search(n) and not n.startswith("OHD_"))
    for name in removed:
        del environ[name]
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(jail.PR_SET_DUMPABLE, 0, 0, 0, 0)
    return removed


def dumpable() -> bool:
    """Whether this process may be read by others of its user (False once `seal` ran)."""
    return bool(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)) if sys.platform == "linux" else True   # PR_GET_DUMPABLE
