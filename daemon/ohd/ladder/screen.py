"""The static screen: what a generated test file does that a unit test should not need.

Pure: syntax trees in, findings out (`validate`'s rule `safe_tests` turns them into a verdict,
before any test runs). A finding names the line and the thing: an import of a module that
starts processes, opens sockets, calls C or reads databases (`RISKY_MODULES`), a call that runs
commands, forks, signals, replaces the process or deletes trees (`RISKY_CALLS`), dynamic code
(`eval`, `exec`, `__import__`), or a literal absolute path into the
system, the home or ohd's places (`/proc/...`, `~/.ssh`, `.git/hooks`). What the module under
test itself imports or calls is allowed to its tests. The screen is a first filter that makes a
prompt-injected answer fail loudly; the boundary is the sandbox (`ohd.ladder.jail`), not this list.
"""

from __future__ import annotations

import ast
import fnmatch
from dataclasses import dataclass

from ohd.core import layout

RISKY_MODULES = ("socket", "ssl", "subprocess", "ctypes", "cffi", "multiprocessing", "pty", "sqlite3",
                 "urllib.request", "http.client", "http.server", "ftplib", "smtplib", "telnetlib", "xmlrpc",
                 "socketserver", "requests", "httpx", "aiohttp", "urllib3", "paramiko", "pexpect", "sh",
                 "plumbum", "psutil", "webbrowser")
RISKY_CALLS = ("os.system", "os.popen", "os.exec*", "os.spawn*", "os.posix_spawn*", "os.fork", "os.forkpty",
               "os.kill", "os.killpg", "os.setsid", "os.setpgid", "os.setuid", "os.chroot", "os.removedirs",
               "os.chown", "os.symlink", "shutil.rmtree", "shutil.move", "shutil.chown", "pty.spawn",
               "asyncio.create_subprocess_*", "eval", "exec", "compile", "__import__",
               "builtins.eval", "builtins.exec", "breakpoint", "sys.settrace")
_SYSTEM_PREFIXES = ("/proc/", "/sys/", "/etc/", "/run/", "/var/run/", "/root/", "/home/", "~/", "/dev/tcp/")
# the user's keys and credentials, git's hooks and config (a hook runs code), ohd's config and
# its own socket and database (their names are the layout's), a process's environment
_SECRET_PARTS = (".ssh/", ".gnupg", f"{layout.GIT_DIR}/hooks", f"{layout.GIT_DIR}/config", ".netrc", ".aws/",
                 ".config/ohd", layout.SOCKET_NAME, layout.DATABASE_NAME, "/environ")


@dataclass(frozen=True, slots=True)
class Finding:
    """One risky thing in a test file: its line and what it is ("imports socket")."""

    line: int
    what: str
    key: str          # the module or call it is about ("" for paths: never allowed by the target)

    def __str__(self) -> str:
        return f"line {self.line} {self.what}"


def screen(tests: ast.Module, target: ast.Module | None = None) -> list[Finding]:
    """The risky imports, calls and paths of `tests`, minus those the `target` module uses itself."""
    own = _used(target) if target is not None else set()
    found = [f for f in _findings(tests) if not f.key or f.key not in own]
    return sorted(set(found), key=lambda f: (f.line, f.what))


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> the dotted name it stands for (`import os as o`: o -> os; `from os import system`)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                names[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.expr, aliases: dict[str, str]) -> str:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _modules(tree: ast.Module) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
    return found


def _calls(tree: ast.Module) -> list[tuple[int, str]]:
    aliases = _aliases(tree)
    return [(node.lineno, name) for node in ast.walk(tree)
            if isinstance(node, ast.Call) and (name := _dotted(node.func, aliases))]


def _risky_module(name: str) -> str:
    return next((m for m in RISKY_MODULES if name == m or name.startswith(f"{m}.")), "")


def _risky_call(name: str) -> str:
    return next((pattern for pattern in RISKY_CALLS if fnmatch.fnmatchcase(name, pattern)), "")


def _used(tree: ast.Module) -> set[str]:
    """The risky modules and calls the target uses itself (so its tests may too)."""
    used = {module for _, name in _modules(tree) if (module := _risky_module(name))}
    used |= {pattern for _, name in _calls(tree) if (pattern := _risky_call(name))}
    return used


def _findings(tree: ast.Module) -> list[Finding]:
    found = [Finding(line, f"imports {name}", module) for line, name in _modules(tree)
             if (module := _risky_module(name))]
    found += [Finding(line, f"calls {name}", pattern) for line, name in _calls(tree)
              if (pattern := _risky_call(name))]
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _secret_place(node.value):
            found.append(Finding(node.lineno, f"names the path {node.value[:60]!r}", ""))
    return found


def _secret_place(text: str) -> bool:
    text = text.strip()
    if len(text) > 300 or "\n" in text:
        return False       # a docstring or a block of data, not a path
    return text.startswith(_SYSTEM_PREFIXES) or any(part in text for part in _SECRET_PARTS)
