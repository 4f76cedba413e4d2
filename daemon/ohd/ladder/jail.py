"""The jail: the launcher every generated test runs under, `python -I -S jail.py SPEC -- ARGV...`.

Standard library only and no ohd import (it is started by path with `-S`), so it costs one
small Python start. SPEC is JSON (`ohd.ladder.sandbox` writes it): the level, the working directory,
the time limit, the resource limits, the paths to hide, the paths to keep visible inside the
hidden ones, and the writable scratch directories.

Every level: the launcher dies with its parent (PR_SET_PDEATHSIG), the test process gets
the resource limits, no capabilities (an empty bounding set: a root user's tests cannot
read the non-dumpable daemon's /proc either) and `no_new_privs`; at the time limit and at
the end of the run every process the test started is killed, also one that called setsid:
in `process` and `landlock` the launcher is their child subreaper and kills what is
reparented to it, in `namespace` it is pid 1 of a pid namespace (its exit ends them all).
`landlock`: writes only in the scratch directories, no TCP, no abstract Unix sockets, no
signals or ptrace out of the domain (Linux Landlock, as far as the kernel's ABI goes).
`namespace`: a user, mount, pid, network and IPC namespace; only loopback (up, private);
the hidden paths (ohd's state and runtime dirs, HOME, /tmp, ...) are empty tmpfs with the
kept paths (the repo, the interpreter) bound back; the whole file system read-only except
the scratch directories; a fresh /proc that shows only the jail's processes.
Exit codes: the command's, TIMEOUT_EXIT at the time limit, SETUP_EXIT when the jail could
not be built (the reason is the last stderr line, prefixed `ohd-jail:`).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import resource
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

TIMEOUT_EXIT = 124
SETUP_EXIT = 125
PREFIX = "ohd-jail: "

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = (0x00020000, 0x08000000, 0x10000000,
                                                                      0x20000000, 0x40000000)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP = 1, 4, 24
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 36, 38, 47, 4
SYS_CAPSET = {"x86_64": 126, "aarch64": 91}
SYS_MOUNT_SETATTR, SYS_LANDLOCK_CREATE, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT = 442, 444, 445, 446
AT_RECURSIVE, MOUNT_ATTR_RDONLY = 0x8000, 0x1
_ST_TO_MS = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
             (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME))

_libc = ctypes.CDLL(None, use_errno=True)


class JailError(Exception):
    """The jail could not be built; the message says which step failed."""


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise JailError(f"{what}: {os.strerror(code)} (errno {code})")
    return result


def prctl(option: int, arg: int = 0, what: str = "prctl") -> int:
    return _check(_libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                              ctypes.c_ulong(0)), what)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def enc(text: str | None) -> bytes | None:
        return text.encode() if text is not None else None

    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {source or ''} on {target}")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _set_readonly(path: str, readonly: bool) -> None:
    """`path` and every mount below it read-only (or writable again), keeping their other flags."""
    attr = _MountAttr(MOUNT_ATTR_RDONLY if readonly else 0, 0 if readonly else MOUNT_ATTR_RDONLY, 0, 0)
    done = _libc.syscall(SYS_MOUNT_SETATTR, -100, path.encode(), AT_RECURSIVE, ctypes.byref(attr),
                         ctypes.sizeof(attr))
    if done == 0:
        return
    if ctypes.get_errno() != errno.ENOSYS:
        _check(done, f"mount_setattr {path}")
    for point in _mount_points(path):        # a kernel before 5.12: one remount per mount
        try:
            kept = os.statvfs(point).f_flag
        except OSError:
            continue                       # under a hidden path now
        flags = MS_REMOUNT | MS_BIND | (MS_RDONLY if readonly else 0)
        mount(None, point, None, flags | sum(ms for st, ms in _ST_TO_MS if kept & st))


def _mount_points(under: str) -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        points = [line.split()[4].encode().decode("unicode_escape") for line in info]
    return [p for p in points if p == under or p.startswith(under.rstrip("/") + "/")]


# -- capabilities, limits -------------------------------------------------------------


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_capabilities() -> None:
    """No capability now nor after exec (empty bounding set; a root user's process too), no new privileges."""
    try:
        with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as f:
            last = int(f.read())
    except (OSError, ValueError):
        last = 63
    for cap in range(last + 1):
        if _libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) < 0 and ctypes.get_errno() not in (
                errno.EINVAL, errno.EPERM):
            _check(-1, "dropping the capability bounding set")
    _libc.prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), 0, 0, 0)
    number = SYS_CAPSET.get(os.uname().machine)
    if number is not None:
        data = (_CapData * 2)()
        _check(_libc.syscall(number, ctypes.byref(_CapHeader(0x20080522, 0)), data), "capset")
    prctl(PR_SET_NO_NEW_PRIVS, 1, "no_new_privs")


def set_limits(limits: dict[str, int]) -> None:
    """The resource limits (only lowered, never above the current hard limit); no core files."""
    table = {"cpu_s": resource.RLIMIT_CPU, "data_bytes": resource.RLIMIT_DATA,
             "fsize_bytes": resource.RLIMIT_FSIZE, "nproc": resource.RLIMIT_NPROC, "core": resource.RLIMIT_CORE}
    for name, value in {"core": 0, **limits}.items():
        which = table[name]
        _, hard = resource.getrlimit(which)
        soft = value if hard == resource.RLIM_INFINITY else min(value, hard)
        new_hard = soft + 5 if name == "cpu_s" and (hard == resource.RLIM_INFINITY or soft + 5 <= hard) else soft
        resource.setrlimit(which, (soft, new_hard))


# -- Landlock -------------------------------------------------------------------------


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when Landlock is not available."""
    version = _libc.syscall(SYS_LANDLOCK_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(0, int(version))


def landlock(writable: Sequence[str]) -> int:
    """Writes only below `writable` (and to devices such as /dev/null), no TCP bind/connect (ABI 4),
    no abstract Unix sockets or signals out of the domain (ABI 6). Returns the ABI used."""
    abi = landlock_abi()
    if abi < 1:
        raise JailError("Landlock is not available")
    write = 2 | 16 | 32 | 64 | 128 | 256 | 512 | 1024 | 2048 | 4096     # write, remove, make_*
    write |= (8192 if abi >= 2 else 0) | (16384 if abi >= 3 else 0)     # refer, truncate
    attr = _RulesetAttr(write, 1 | 2 if abi >= 4 else 0, 1 | 2 if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _check(_libc.syscall(SYS_LANDLOCK_CREATE, ctypes.byref(attr), ctypes.c_size_t(size), 0),
                     "landlock_create_ruleset")
    try:
        for path, access in [*((p, write) for p in writable), ("/dev", 2 | (16384 if abi >= 3 else 0))]:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = _PathBeneath(access, fd)
                _check(_libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, 1, ctypes.byref(rule), 0),
                       f"landlock_add_rule {path}")
            finally:
                os.close(fd)
        prctl(PR_SET_NO_NEW_PRIVS, 1, "no_new_privs")
        _check(_libc.syscall(SYS_LANDLOCK_RESTRICT, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return abi


# -- namespaces -------------------------------------------------------------------------


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(text)


def enter_namespaces() -> None:
    """A new user (the same uid and gid inside), mount, pid, network and IPC namespace."""
    uid, gid = os.getuid(), os.getgid()
    _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC),
           "unshare (user namespaces disabled?)")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
    _write("/proc/self/gid_map", f"{gid} {gid} 1\n")


def build_mounts(hide: Sequence[str], keep: Sequence[str], writable: Sequence[str]) -> None:
    """Inside the new namespaces (as pid 1): private mounts, a fresh /proc, the hidden paths
    emptied (kept paths bound back), everything read-only but `writable`."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for path in sorted(hide, key=lambda p: p.count("/")):
        _hide(path, [k for k in keep if _under(k, path)])
    _set_readonly("/", True)
    for path in writable:
        mount(path, path, None, MS_BIND | MS_REC)
        _set_readonly(path, False)
    _loopback_up()


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _hide(path: str, keep: Sequence[str]) -> None:
    if not os.path.lexists(path) or os.path.islink(path):
        return
    if not os.path.isdir(path):
        mount("/dev/null", path, None, MS_BIND)
        return
    outer = [k for k in keep if not any(o != k and _under(k, o) for o in keep) and os.path.exists(k)]
    held = [(k, os.open(k, os.O_PATH | os.O_CLOEXEC)) for k in outer]
    mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=16m")
    for kept, fd in held:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.makedirs(kept, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(kept), exist_ok=True)
            open(kept, "a").close()
        mount(f"/proc/self/fd/{fd}", kept, None, MS_BIND | MS_REC)
        os.close(fd)


def _loopback_up() -> None:
    """127.0.0.1 inside the jail works (a test's own local server); it is not the host's."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, 0x8913, request))[1]        # SIOCGIFFLAGS
        fcntl.ioctl(s, 0x8914, struct.pack("16sH14x", b"lo", flags | 1))          # SIOCSIFFLAGS, IFF_UP


# -- running and ending ------------------------------------------------------------------


def _children() -> list[int]:
    me, found = os.getpid(), []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat.rsplit(b")", 1)[1].split()[1]) == me:
            found.append(int(name))
    return found


def kill_descendants(in_pid_namespace: bool) -> None:
    """Every process below this one, also those that left the process group or session."""
    if in_pid_namespace:
        try:
            os.kill(-1, signal.SIGKILL)       # pid 1: everything else in the namespace
        except ProcessLookupError:
            pass
    for _ in range(10_000):
        children = _children()
        if not children:
            return
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def _wait(pid: int, deadline: float) -> int | None:
    """The child's wait status, None when it is still running at `deadline`."""
    pidfd = os.pidfd_open(pid)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([pidfd], [], [], left)[0]:
                return None
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
    finally:
        os.close(pidfd)


def supervise(spec: dict[str, Any], argv: Sequence[str], in_pid_namespace: bool) -> int:
    """Run `argv` limited and confined; kill everything it left; its exit code (TIMEOUT_EXIT at the limit)."""
    child = os.fork()
    if child == 0:
        step = "setting up the test process"
        try:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            set_limits(spec.get("limits", {}))
            if spec["level"] == "landlock":
                landlock(spec.get("writable", []))
            drop_capabilities()
            os.chdir(spec["cwd"])
            step = f"cannot run {argv[0]}"
            os.execvp(argv[0], list(argv))
        except OSError as exc:
            os.write(2, f"\n{PREFIX}{step}: {exc}\n".encode())
        except JailError as exc:
            os.write(2, f"\n{PREFIX}{exc}\n".encode())
        os._exit(SETUP_EXIT)
    status = _wait(child, time.monotonic() + float(spec["timeout_s"]))
    kill_descendants(in_pid_namespace)
    if status is None:
        try:
            os.waitpid(child, 0)
        except ChildProcessError:
            pass
        os.write(2, f"\n{PREFIX}time limit\n".encode())
        return TIMEOUT_EXIT
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def run(spec: dict[str, Any], argv: Sequence[str]) -> int:
    # the parent may have died before the death signal was set (while this interpreter started):
    # then we were reparented already, and the pid the spawner wrote into the spec says so
    parent = int(spec.get("parent") or os.getppid())
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        return SETUP_EXIT
    if spec["level"] != "namespace":
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        return supervise(spec, argv, in_pid_namespace=False)
    enter_namespaces()
    init = os.fork()
    if init == 0:
        try:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            build_mounts(spec.get("hide", []), spec.get("keep", []), spec.get("writable", []))
            code = supervise(spec, argv, in_pid_namespace=True)
        except (OSError, JailError) as exc:
            os.write(2, f"\n{PREFIX}{exc}\n".encode())
            code = SETUP_EXIT
        os._exit(code)
    _, status = os.waitpid(init, 0)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def main(args: Sequence[str]) -> int:
    if len(args) < 3 or args[1] != "--":
        os.write(2, f"{PREFIX}usage: jail.py SPEC -- ARGV...\n".encode())
        return SETUP_EXIT
    try:
        return run(json.loads(args[0]), args[2:])
    except (OSError, JailError, ValueError, KeyError) as exc:
        os.write(2, f"\n{PREFIX}{exc}\n".encode())
        return SETUP_EXIT


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
