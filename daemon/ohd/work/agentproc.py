"""A coding agent as a process: its argv from the runner's template, a scrubbed environment, its own
process group, a time limit, and the whole group killed at the limit or on cancel.

The agent starts in its own session (`start_new_session=True`, so its process group is its pid),
in its worktree, with stdin `/dev/null` and stdout/stderr going to files beside the worktree (read
back into `agent_run` when it ends). Its environment is `pass_env` alone plus what its runner needs:
the run's proxy token in `OHD_AGENT_KEY` (and `OPENAI_API_KEY` for aider), never the real API key,
which is neither in the environment nor in the argv nor in the worktree. At the time limit, on a
cancel, or when the pool stops, the group gets SIGTERM, then SIGKILL after `KILL_GRACE_S`; when the
agent exits by itself, anything it left running in its group (a backgrounded grandchild) is killed
too, so nothing of a run outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ohd.errors import OhdError

log = logging.getLogger("ohd.agents")

API_KEY_ENV = "OHD_AGENT_KEY"      # the variable holding the run's proxy token ({api_key_env} names it)
KILL_GRACE_S = 3.0                 # SIGTERM to SIGKILL
PLACEHOLDERS = ("prompt_file", "model", "base_url", "api_key_env", "worktree", "target")
OPENHANDS_ENTRY = Path(__file__).resolve().parent / "openhands_main.py"   # run by `openhands_python`


class AgentSetupError(OhdError):
    """The agent cannot be started as configured (a missing binary or package, a bad template)."""


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """`[agents]` of the settings, as plain values."""

    aider: tuple[str, ...] = ("aider",)
    openhands_python: str = "python3"
    command: tuple[str, ...] = ()
    pass_env: tuple[str, ...] = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")


@dataclass(frozen=True, slots=True)
class Invocation:
    """How one agent run is started: its argv (no secret in it) and its whole environment."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(repr=False)


# what each runner leaves in its worktree that is not its change (never part of the diff)
LEFTOVERS: Mapping[str, tuple[str, ...]] = {"aider": (".aider*",), "openhands": (".openhands*",)}


@dataclass(frozen=True, slots=True)
class Exit:
    """How the agent's process ended."""

    code: int | None           # None: killed by ohd (time limit)
    timed_out: bool
    stdout: str
    stderr: str
    seconds: float


def invocation(runner: str, config: AgentConfig, *, prompt_file: Path, model: str, base_url: str, token: str,
               worktree: Path, target: str, environ: Mapping[str, str] | None = None) -> Invocation:
    """The argv and environment of `runner` for one run; AgentSetupError naming what is missing."""
    environ = os.environ if environ is None else environ
    values = {"prompt_file": str(prompt_file), "model": model, "base_url": base_url, "api_key_env": API_KEY_ENV,
              "worktree": str(worktree), "target": target}
    env = {name: environ[name] for name in config.pass_env if name in environ}
    env[API_KEY_ENV] = token
    if runner == "command":
        if not config.command:
            raise AgentSetupError("runner command needs its argv template: set [agents] command = [...] in the "
                                  f"config (placeholders: {', '.join('{' + p + '}' for p in PLACEHOLDERS)})")
        argv = [fill(part, values) for part in config.command]
        setting = "[agents] command"
    elif runner == "aider":
        argv = [*config.aider, "--message-file", str(prompt_file), "--yes", "--no-auto-commits", "--no-stream",
                "--no-check-update", "--no-show-model-warnings", "--analytics-disable", "--no-gitignore",
                "--model", f"openai/{model}", "--openai-api-base", base_url, target]
        # its chat and input histories beside the worktree, not in the diff
        argv[len(config.aider):len(config.aider)] = [
            "--input-history-file", str(prompt_file.with_suffix(".aider-input")),
            "--chat-history-file", str(prompt_file.with_suffix(".aider-chat"))]
        env["OPENAI_API_KEY"] = token      # aider's documented variable for an OpenAI-compatible server
        setting = "[agents] aider"
    elif runner == "openhands":
        argv = [config.openhands_python, str(OPENHANDS_ENTRY), "--prompt-file", str(prompt_file), "--model",
                model, "--base-url", base_url, "--api-key-env", API_KEY_ENV, "--workspace", str(worktree)]
        setting = "[agents] openhands_python"
    else:
        raise AgentSetupError(f"unknown runner {runner!r}")
    if shutil.which(argv[0], path=env.get("PATH")) is None:
        raise AgentSetupError(f"runner {runner}: {argv[0]!r} is not installed or not on the agent's PATH; "
                              f"install it or set {setting} in the config")
    return Invocation(argv=tuple(argv), env=env)


def fill(part: str, values: Mapping[str, str]) -> str:
    """One argv part with its `{placeholder}`s replaced (`{{`/`}}` for braces); AgentSetupError for an
    unknown one."""
    try:
        return part.format_map(values)
    except (KeyError, IndexError, ValueError) as exc:
        raise AgentSetupError(f"[agents] command: {part!r} has an unknown placeholder or a stray brace ({exc}); "
                              f"the placeholders are {', '.join('{' + p + '}' for p in PLACEHOLDERS)}") from None


async def run(invoked: Invocation, cwd: Path, stdout: Path, stderr: Path, limit_s: float,
              on_start: Callable[[int], Awaitable[None]] | None = None) -> Exit:
    """Run the agent to its end or its time limit (then its group is killed: `code` None); a cancel
    kills the group too, then propagates. `on_start(pid)`: told the process (group) id once started."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        try:
            proc = await asyncio.create_subprocess_exec(
                *invoked.argv, cwd=cwd, env=dict(invoked.env), stdin=asyncio.subprocess.DEVNULL, stdout=out,
                stderr=err, start_new_session=True)
        except OSError as exc:
            raise AgentSetupError(f"cannot start {invoked.argv[0]!r}: {exc.strerror or exc}") from None
    timed_out = False
    try:
        if on_start is not None:
            await on_start(proc.pid)
        try:
            await asyncio.wait_for(proc.wait(), timeout=limit_s)
        except TimeoutError:
            timed_out = True
            log.info("agent (pid %d) ran out of its %gs; killing its process group", proc.pid, limit_s)
            await stop_group(proc)
    except asyncio.CancelledError:
        await asyncio.shield(stop_group(proc))
        raise
    finally:
        kill_group(proc.pid, signal.SIGKILL)     # what it left behind in its group
    return Exit(code=None if timed_out else proc.returncode, timed_out=timed_out,
                stdout=_read(stdout), stderr=_read(stderr), seconds=loop.time() - started)


async def stop_group(proc: asyncio.subprocess.Process, grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM to the agent's group, SIGKILL after `grace_s` if the agent is still there."""
    kill_group(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), timeout=grace_s)
    except TimeoutError:
        pass
    kill_group(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        await proc.wait()


def kill_orphan(pgid: int, worktree: Path) -> bool:
    """SIGKILL to the group of an agent a crashed daemon left running, if `pgid` still leads a process
    working in `worktree` (a reused pid is never killed); whether it did."""
    try:
        cwd = os.readlink(f"/proc/{pgid}/cwd").removesuffix(" (deleted)")
    except OSError:
        return False
    if os.getpgid(pgid) != pgid or not Path(cwd).is_relative_to(worktree):
        return False
    kill_group(pgid, signal.SIGKILL)
    return True


def kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return ""
