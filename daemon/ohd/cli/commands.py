"""The `ohd` command: parse arguments, call one library function or the socket client, print.

Exit codes: 0 ok, 1 error, 2 usage (and bad configuration), 3 daemon not running, 141 when
stdout's reader went away (`| head`).
Errors become messages and exit codes in `main()` only. Heavy rooms are imported
inside the commands that need them, so `ohd status` loads little more than `client`; the
read-only commands take their socket and database from `fastpath` when the same inputs
built the full settings before (`known`), without importing the settings model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

from ohd import __version__
from ohd.core import layout
from ohd.errors import ConfigError, DaemonNotRunning, OhdError, TaskFileError

TYPE_CHECKING = False   # not `typing`'s: importing typing costs `ohd status` more than this module (issue 17)
if TYPE_CHECKING:     # for the annotations only: the commands import what they use when they run
    from typing import Any

    from ohd.cli.client import Client
    from ohd.cli.fastpath import Known
    from ohd.config import Settings
    from ohd.store.store import Store

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3
EXIT_BROKEN_PIPE = 128 + 13   # as a process ended by SIGPIPE: `ohd tasks | head`
SOCKET_READ_S = 2.0   # `ohd tasks`/`show` ask a running daemon this long, then read the store themselves
PRIORITIES = ("critical", "high", "normal", "low")
TYPES = ("unit_test", "docstring", "review", "custom", "change")
RUNNERS = ("llm", "openhands", "aider", "command")
DELIVERIES = ("patch", "branch", "apply")
STATUSES = ("pending", "queued", "running", "completed", "failed", "cancelled")


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=fast_command(arguments))
    args = parser.parse_args(arguments)
    _WARNED.clear()
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        result: int = args.func(args)
        sys.stdout.flush()   # here, not at exit: a reader gone by then is the BrokenPipe case below
        return result
    except ConfigError as exc:
        print(f"ohd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DaemonNotRunning as exc:
        print(f"ohd: {exc}\n  start it with: ohd daemon --repo PATH", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except OhdError as exc:
        print(f"ohd: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:   # the reader left (`| head`): stop quietly, as cat or ls do
        _silence_stdout()
        return EXIT_BROKEN_PIPE


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's flush at exit cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


FAST_COMMANDS = frozenset({"status", "tasks", "show"})


def fast_command(arguments: Sequence[str]) -> str | None:
    """The read-only command `arguments` run, if that is all they can mean (only `--config` before
    it): then `main` builds that subcommand's parser alone, the same parser as in the full one,
    so its usage, help and errors are the same; anything else (`-h`, `--version`) gets them all."""
    index = 0
    while index < len(arguments):
        token = arguments[index]
        if token == "--config":
            index += 2
        elif token.startswith("--config="):
            index += 1
        else:
            return token if token in FAST_COMMANDS else None
    return None


class _Unbuilt(argparse.ArgumentParser):
    """A subcommand `build_parser(only=...)` leaves out: what is added to it is dropped."""

    def __init__(self) -> None:     # no parser, no formatter: that is the time saved
        pass

    def add_argument(self, *args: Any, **kwargs: Any) -> Any:
        return None

    def add_mutually_exclusive_group(self, **kwargs: Any) -> Any:
        return self


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand's parser; with `only`, that one alone (`fast_command`: building all 23
    was about a tenth of `ohd status`)."""
    parser = argparse.ArgumentParser(prog="ohd", description="Development chores done by LLMs in the background.")
    parser.add_argument("--version", action="version", version=f"ohd {__version__}")
    parser.add_argument("--config", type=Path, help="TOML config file (default: $OHD_CONFIG, then the user config dir)")
    sub = parser.add_subparsers(metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str,
                json_flag: bool = True) -> argparse.ArgumentParser:
        if only is not None and name != only:
            return _Unbuilt()
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        if json_flag:
            p.add_argument("--json", action="store_true", help="print JSON")
        return p

    p = command("daemon", cmd_daemon, "run the daemon in the foreground", json_flag=False)
    p.add_argument("--repo", action="append", type=Path, help="a repo to serve (repeatable; default: the current dir)")
    p.add_argument("--workers", type=int, help="number of concurrent tasks")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING")
    p.add_argument("--log-format", default=None, choices=("text", "json"), help="text (default) or JSON lines")
    p = command("logs", cmd_logs, "the daemon's recent log (the log file's tail, else the journalctl command)",
                json_flag=False)
    p.add_argument("-n", "--lines", type=int, default=50, help="how many lines (default 50)")
    p = command("status", cmd_status, "what the daemon is doing (over its socket)")
    p.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 2) until Ctrl-C")
    p = command("submit", cmd_submit, "queue a task through the daemon; prints its id")
    p.add_argument("--type", required=True, choices=TYPES)
    p.add_argument("--target", required=True, help="the source file, relative to the repo")
    p.add_argument("--repo", type=Path, help="the repo (default: the current dir)")
    p.add_argument("--priority", choices=PRIORITIES, default="normal")
    p.add_argument("--description", default="")
    p.add_argument("--output", help="where the result goes (default per type)")
    p.add_argument("--model", action="append", dest="models", help="a model id (repeatable; default: auto)")
    p.add_argument("--prompt", help="the prompt (type custom)")
    p.add_argument("--runner", choices=RUNNERS, help="who does it: one model call (llm, the default) or an agent")
    p.add_argument("--check-command", help="an agent runner's check, run in its worktree (must exit 0)")
    p.add_argument("--deliver", choices=DELIVERIES, help="where an agent's diff goes (default patch)")
    p.add_argument("--no-cache", dest="cache", action="store_false",
                   help="always ask a model: replay no earlier accepted answer to the same request")
    p = command("tasks", cmd_tasks, "list tasks (reads the store; works while the daemon is down)")
    p.add_argument("--status", choices=STATUSES)
    p.add_argument("--limit", type=int, default=50)
    p = command("show", cmd_show, "one task with its model calls (reads the store)")
    p.add_argument("id", type=int)
    p.add_argument("--calls", action="store_true", help="also print each call's prompt and response")
    p.add_argument("--diff", action="store_true", help="print an agent runner's diff (the accepted one, else the last)")
    p = command("apply", cmd_apply, "apply an agent task's stored diff to the working copy (its files must be clean)",
                json_flag=False)
    p.add_argument("id", type=int)
    for name, func, text in (("cancel", cmd_cancel, "cancel a queued or running task"),
                             ("retry", cmd_retry, "queue a failed or cancelled task again")):
        command(name, func, text).add_argument("id", type=int)
    command("models", cmd_models, "the models, their state and measured stats (over the socket)")
    p = command("select-model", cmd_select_model,
                "how `auto` ranks the models for a task type, with each score component (reads the store)")
    p.add_argument("--type", required=True, choices=TYPES)
    p = command("metrics", cmd_metrics, "metrics: Prometheus text, or JSON (over the socket), or a textfile",
                json_flag=False)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="the JSON snapshot")
    fmt.add_argument("--prometheus", action="store_true", help="Prometheus text (the default)")
    fmt.add_argument("--textfile", type=Path, metavar="DIR",
                     help=f"write DIR/{layout.TEXTFILE_NAME} atomically from the store, no daemon needed "
                          "(node_exporter's textfile collector)")
    p = command("dashboard", cmd_dashboard, "print the web listener's URL with its token (http_listen)")
    p.add_argument("--open", action="store_true", help="also open it in a browser")
    p = command("init", cmd_init, f"prepare a repo: {layout.TASKS_DIR}/, examples, {layout.GIT_DIR}/info/exclude",
                json_flag=False)
    p.add_argument("--repo", type=Path, default=Path("."))
    p = command("hooks", cmd_hooks, "install or remove ohd's git hooks (pre-commit, post-commit)",
                json_flag=False)
    p.add_argument("action", choices=("install", "uninstall"))
    p.add_argument("--repo", type=Path, default=Path("."))
    p = command("service", cmd_service, "install or remove the systemd user unit (ohd.service)", json_flag=False)
    p.add_argument("action", choices=("install", "uninstall"))
    p.add_argument("--repo", action="append", type=Path, help="a repo the service serves (repeatable)")
    p = command("webhooks", cmd_webhooks, "send a sample webhook event now and print the answer (no daemon needed)")
    p.add_argument("action", choices=("test",))
    p.add_argument("url", help="the receiver (http:// or https://)")
    p.add_argument("--secret-env", help="the variable holding the secret that signs it (X-Ohd-Signature)")
    p.add_argument("--format", choices=("json", "slack", "discord"), default="json")
    p.add_argument("--event", default="task.completed", help="the sample's event (default task.completed)")
    p = command("validate", cmd_validate, "check task files without submitting them")
    p.add_argument("files", nargs="+", type=Path)
    p = command("schema", cmd_schema, "print the task-file JSON Schema", json_flag=False)
    p.add_argument("--markdown", action="store_true", help="the task-file reference table (as in the README)")
    p = command("rules", cmd_rules, "standing rules with their next firing and last task (reads the store)")
    p.add_argument("--repo", action="append", type=Path, help="a repo (repeatable; default: the configured ones)")
    p = command("db", cmd_db, "the database: migrate (create or upgrade the schema), copy every table to another "
                "database (e.g. PostgreSQL), check its integrity (exit 1 on a problem)")
    p.add_argument("action", choices=("migrate", "copy", "check"))
    p.add_argument("--url", help="migrate, check: the database (default: the configured one)")
    p.add_argument("--to", metavar="URL", help="copy: the target (postgresql://... or sqlite:///...)")
    p.add_argument("--from", dest="source", metavar="URL", help="copy: the source (default: the configured one)")
    p.add_argument("--replace", action="store_true", help="copy: delete the target's rows first")
    p = command("demo", cmd_demo, "run ohd on a small temp repo and show what happened", json_flag=False)
    p.add_argument("--keep", action="store_true", help="keep the temp repo")
    return parser


_WARNED: set[str] = set()


def settings(args: argparse.Namespace, env_warnings: bool = True, **overrides: Any) -> Settings:
    """The settings; the `OHD_*` variables ohd ignores are warned about on stderr (the daemon
    passes `env_warnings=False` and logs them, see `warn_unknown_variables`)."""
    from ohd import config

    conf = config.load(args.config, **overrides)
    if env_warnings:
        for problem in config.unknown_variables(os.environ, conf.api_key_env, conf.hook_secret_envs):
            if problem not in _WARNED:          # once per command, which may load the settings twice
                _WARNED.add(problem)
                print(f"ohd: warning: {problem}", file=sys.stderr)
    return conf


def known(args: argparse.Namespace) -> Known:
    """The socket and database of the settings, as `settings(args)` gives them, with its warnings:
    remembered by `fastpath` under a digest of the inputs, else built (and remembered)."""
    from ohd.cli import fastpath

    found = fastpath.inputs(args.config, os.environ)
    recalled = fastpath.recall(found)
    if recalled is not None:
        for problem in recalled.warnings:
            if problem not in _WARNED:
                _WARNED.add(problem)
                print(f"ohd: warning: {problem}", file=sys.stderr)
        return recalled
    conf = settings(args)
    from ohd import config

    problems = config.unknown_variables(os.environ, conf.api_key_env, conf.hook_secret_envs)
    recalled = fastpath.Known(socket_path=conf.socket_path, database=conf.database,
                              store_lock_wait_s=conf.store_lock_wait_s, warnings=tuple(problems))
    fastpath.remember(found, fastpath.inputs(args.config, os.environ), recalled)
    return recalled


def warn_unknown_variables(conf: Settings) -> None:
    """Log the `OHD_*` variables ohd ignores (the daemon, once its log is set up)."""
    import logging

    from ohd import config

    for problem in config.unknown_variables(os.environ, conf.api_key_env, conf.hook_secret_envs):
        logging.getLogger("ohd.config").warning(problem)


def client(args: argparse.Namespace) -> Client:
    from ohd.cli.client import Client

    return Client(settings(args).socket_path)


def emit(data: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    """`data` as JSON (a listing is an object keyed by what it lists, as the socket API answers
    it: `{"tasks": [...]}`, so that it can grow keys) or as `text`."""
    print(json.dumps(data, indent=2, default=str) if as_json else text(data))


# -- commands -----------------------------------------------------------------


def cmd_daemon(args: argparse.Namespace) -> int:
    from ohd.service import daemon

    repos = [p.resolve() for p in args.repo] if args.repo else None
    conf = settings(args, env_warnings=False, repos=repos, workers=args.workers, log_level=args.log_level,
                    log_format=args.log_format)
    from ohd import logfmt

    logfmt.setup(conf.log_level, conf.log_format, [conf.api_key.get_secret_value()] if conf.api_key else [],
                 conf.log_file)
    warn_unknown_variables(conf)
    daemon.serve(conf, reload=lambda: settings(args, env_warnings=False, repos=repos, workers=args.workers,
                                               log_level=args.log_level, log_format=args.log_format,
                                               api_key=conf.api_key))   # flags win; serve took the key variable away
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    from ohd import logfmt

    conf = settings(args)
    if conf.log_file is None:
        print("no log_file is configured; the daemon logs to stderr. Under systemd run:\n"
              "    journalctl --user -u ohd -f")
        return EXIT_OK
    if not conf.log_file.exists():
        print(f"{conf.log_file} does not exist yet (the daemon creates it when it starts)")
        return EXIT_OK
    for line in logfmt.tail(conf.log_file, args.lines):
        print(line)
    return EXIT_OK


def cmd_service(args: argparse.Namespace) -> int:
    from ohd.service import systemd as service

    directory = service.unit_dir(os.environ)
    if args.action == "uninstall":
        lines = service.uninstall(directory, service.find_systemctl())
    else:
        import shutil

        program = service.executable(sys.argv[0], shutil.which("ohd"), sys.executable)
        start = service.exec_start(program, args.repo or (), args.config)
        lines = service.install(directory, start, service.find_systemctl())
    for line in lines:
        print(line)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from ohd.cli.client import Client
    from ohd.core import views

    if args.watch is None:
        emit(Client(known(args).socket_path).get("/status"), args.json, views.status_text)
        return EXIT_OK
    import time

    try:
        while True:
            status = client(args).get("/status")
            print("\033[H\033[2J", end="")     # clear the screen, cursor home
            emit(status, args.json, views.status_text)
            sys.stdout.flush()
            time.sleep(max(0.2, args.watch))
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    body = {"type": args.type, "target": args.target, "repo": str((args.repo or Path.cwd()).resolve()),
            "priority": args.priority, "description": args.description}
    for key in ("output", "models", "prompt", "runner", "check_command", "deliver"):
        if getattr(args, key):
            body[key] = getattr(args, key)
    if not args.cache:
        body["cache"] = False
    answer = client(args).post("/tasks", body)
    emit(answer, args.json, lambda a: str(a["id"]))
    return EXIT_OK


def open_store(args: argparse.Namespace) -> Store:
    from ohd.cli.fastpath import Known
    from ohd.store.store import Store, open_database

    remembered = known(args)
    if remembered.database is None:                   # not written down (a password in it)
        conf = settings(args)
        remembered = Known(remembered.socket_path, conf.database, conf.store_lock_wait_s, remembered.warnings)
    assert remembered.database is not None
    store = Store(open_database(remembered.database), lock_wait_s=remembered.store_lock_wait_s)
    store.migrate()
    return store


def from_daemon(args: argparse.Namespace, path: str) -> Any:
    """The running daemon's answer to GET `path` when it reads the very database this command
    would (X-Ohd-Store), else None: no daemon, another database, an error answer, or no answer
    within SOCKET_READ_S. The store then answers, as it always did; the socket is only faster."""
    from ohd.cli.client import Client

    remembered = known(args)
    if remembered.database is None:
        return None
    try:
        return Client(remembered.socket_path, timeout=SOCKET_READ_S).get_from_store(path, remembered.database)
    except OhdError:          # DaemonNotRunning, ApiError (a 404 too: the store says it as it always did)
        return None


def cmd_tasks(args: argparse.Namespace) -> int:
    from urllib.parse import urlencode

    from ohd.core import views

    query = urlencode({"limit": args.limit, **({"status": args.status} if args.status else {})})
    answer = from_daemon(args, f"/tasks?{query}")
    if answer is None:
        answer = {"tasks": [t.as_dict() for t in open_store(args).list_tasks(args.status, args.limit)]}
    emit(answer, args.json, lambda d: views.tasks_text(d["tasks"]))   # the shape of GET /tasks
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    from ohd.core import views

    if not (args.diff or args.calls):
        answer = from_daemon(args, f"/tasks/{args.id}")
        if answer is not None:
            emit(answer, args.json, views.task_text)
            return EXIT_OK
    store = open_store(args)
    data = store.get_task(args.id).as_dict()
    data["executions"] = [e.as_dict() for e in store.executions(args.id)]
    if args.diff:
        sys.stdout.write(stored_diff(store, args.id))
        return EXIT_OK
    if args.calls:
        from ohd.store.calls import CallHistory, calls_text

        data["calls"] = CallHistory(store.db).for_task(args.id)
        emit(data, args.json, lambda d: views.task_text(d) + "\n\n" + calls_text(d["calls"]))
        return EXIT_OK
    emit(data, args.json, views.task_text)
    return EXIT_OK


def stored_diff(store: Store, task_id: int) -> str:
    """The diff of an agent task's accepted run, else of its last run that has one; OhdError if none."""
    from ohd.store.agentruns import AgentRuns

    task = store.get_task(task_id)
    runs = AgentRuns(store.db).for_task(task_id)
    with_diff = [run for run in runs if run.diff]
    accepted = [run for run in with_diff if run.outcome == "accepted"]
    if not (accepted or with_diff):
        why = "it is not run by an agent (runner llm)" if not task.agent else (
            "no run of its agent left one" if runs else "its agent has not run yet")
        raise OhdError(f"task {task_id} has no diff: {why}")
    return (accepted or with_diff)[-1].diff or ""


def cmd_apply(args: argparse.Namespace) -> int:
    from ohd.repo import worktrees

    store = open_store(args)
    task = store.get_task(args.id)
    if not task.agent:
        raise OhdError(f"task {args.id} is not run by an agent (runner llm); it has no diff to apply")
    from ohd.store.agentruns import AgentRuns

    diff = AgentRuns(store.db).accepted_diff(args.id)
    if diff is None:
        raise OhdError(f"task {args.id} has no accepted diff (status {task.status}); `ohd show {args.id} --diff` "
                       "prints the last one")
    repo = Path(task.repo)
    dirty = worktrees.touched_dirty(repo, worktrees.patch_paths(repo, diff))
    if dirty:
        raise OhdError(f"not applied: {', '.join(dirty)} changed in the working copy of {repo}; commit or stash "
                       f"them, then run `ohd apply {args.id}` again")
    worktrees.apply_to_working_copy(repo, diff)
    print(f"applied task {args.id}'s diff to {repo}")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    from ohd.core import views

    emit(client(args).post(f"/tasks/{args.id}/cancel"), args.json, views.task_text)
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    from ohd.core import views

    emit(client(args).post(f"/tasks/{args.id}/retry"), args.json, views.task_text)
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    from ohd.core import views

    emit(client(args).get("/models"), args.json, lambda d: views.models_text(d["models"]))   # GET /models
    return EXIT_OK


def cmd_select_model(args: argparse.Namespace) -> int:
    from ohd.clock import SystemClock
    from ohd.core import selection
    from ohd.service.assemble import selection_report

    data = selection_report(settings(args), open_store(args), args.type, SystemClock().now())
    emit(data, args.json, lambda d: selection.ranking_text(d["task_type"], d["ranking"]))
    return EXIT_OK


def cmd_metrics(args: argparse.Namespace) -> int:
    if args.textfile is not None:
        write_textfile(open_store(args), args.textfile / layout.TEXTFILE_NAME)
        return EXIT_OK
    if args.json:
        emit(client(args).get("/metrics.json"), True, str)
    else:
        print(client(args).get_text("/metrics"), end="")
    return EXIT_OK


def cmd_dashboard(args: argparse.Namespace) -> int:
    from ohd.service import statedir
    from ohd.service.web.guard import base_url

    conf = settings(args)
    if conf.http_address is None:
        raise OhdError('the web listener is off: set http_listen = "127.0.0.1:8767" in the config file '
                       "(or OHD_HTTP_LISTEN=127.0.0.1:8767) and restart the daemon")
    path = layout.web_token_path(conf.state_dir)
    if not path.exists():
        raise OhdError(f"no token in {path} yet: the daemon makes it when it starts with http_listen set; "
                       "start (or restart) it")
    url = f"{base_url(*conf.http_address)}/?token={statedir.read_web_token(path)}"
    emit({"url": url}, args.json, lambda d: d["url"])
    if args.open:
        import webbrowser

        if not webbrowser.open(url, new=2):
            print("ohd: no browser could be started here; open the URL above yourself", file=sys.stderr)
    return EXIT_OK


def write_textfile(store: Store, path: Path) -> None:
    """The metrics read from the store (no uptime: no daemon is asked), written whole: a temp file
    renamed over `path`, so node_exporter never reads half of one."""
    from ohd.clock import SystemClock
    from ohd.repo.outputs import atomic_write
    from ohd.service.assemble import history_of
    from ohd.service.metrics import collect, prometheus

    if not path.parent.is_dir():
        raise OhdError(f"{path.parent} is not a directory (give the textfile collector's directory)")
    atomic_write(path, prometheus(collect(history_of(store), SystemClock().now(), None)))


def cmd_init(args: argparse.Namespace) -> int:
    from ohd.repo import gitrepo

    for line in gitrepo.init_repo(args.repo.resolve()):
        print(line)
    return EXIT_OK


def cmd_hooks(args: argparse.Namespace) -> int:
    from ohd.repo import gitrepo

    act = gitrepo.install_hooks if args.action == "install" else gitrepo.uninstall_hooks
    for line in act(args.repo.resolve()):
        print(line)
    return EXIT_OK


def cmd_webhooks(args: argparse.Namespace) -> int:
    import asyncio

    from ohd import config
    from ohd.clock import SystemClock
    from ohd.core import events
    from ohd.webhooks import sender

    if args.event not in events.EVENTS:
        raise ConfigError(f"unknown webhook event {args.event!r} (known: {', '.join(events.EVENTS)})")
    hook = config.webhook(args.url, args.secret_env, args.format)
    target = sender.Target(hook.url, hook.format, hook.secret)
    answer = asyncio.run(sender.send_sample(target, args.event, SystemClock()))
    emit({"url": target.label, "event": args.event, "status": answer.status, "delivered": answer.error is None,
          "error": answer.error}, args.json,
         lambda a: f"{a['url']}: {a['event']} " + ("delivered" if a["delivered"] else "not delivered")
         + (f", HTTP {a['status']}" if a["status"] is not None else "") + (f" ({a['error']})" if a["error"] else ""))
    return EXIT_OK if answer.error is None else EXIT_ERROR


def cmd_validate(args: argparse.Namespace) -> int:
    from ohd.core.taskfile import parse_bytes
    from ohd.intake.ingest import check_rule_names
    from ohd.repo.outputs import read_task_file

    results = []
    for path in args.files:
        try:
            spec = parse_bytes(read_task_file(path, str(path)), str(path))
            check_rule_names(spec, str(path))
            results.append({"file": str(path), "ok": True, "type": spec.type.value, "target": spec.target})
        except TaskFileError as exc:
            results.append({"file": str(path), "ok": False, "error": str(exc)})
        except OSError as exc:
            results.append({"file": str(path), "ok": False, "error": f"{path}: {exc.strerror}"})
    emit(results, args.json, lambda rs: "\n".join(
        f"ok    {r['file']} ({r['type']} {r['target']})" if r["ok"] else f"error {r['error']}" for r in rs))
    return EXIT_OK if all(r["ok"] for r in results) else EXIT_ERROR


def cmd_rules(args: argparse.Namespace) -> int:
    from ohd.clock import SystemClock
    from ohd.intake.rules import listing_text
    from ohd.service.assemble import repos_of, rulebook_for

    conf = settings(args)
    clock = SystemClock()
    book = rulebook_for(conf, open_store(args), clock)
    for repo in [p.resolve() for p in args.repo] if args.repo else repos_of(conf):
        book.load(repo, on_error=lambda exc: print(f"ohd: {exc}", file=sys.stderr))
    emit({"rules": book.listing(clock.now())}, args.json, lambda d: listing_text(d["rules"]))
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from ohd.core import taskfile

    if args.markdown:
        print(taskfile.reference_markdown(), end="")
        return EXIT_OK
    print(json.dumps(taskfile.json_schema(), indent=2))
    return EXIT_OK


def cmd_db(args: argparse.Namespace) -> int:
    if args.action == "copy" and not args.to:
        raise ConfigError("ohd db copy needs --to URL (the target database)")
    if args.action != "copy" and (args.to or args.source or args.replace):
        raise ConfigError("--to, --from and --replace are flags of ohd db copy")
    return {"migrate": cmd_db_migrate, "copy": cmd_db_copy, "check": cmd_db_check}[args.action](args)


def _database(args: argparse.Namespace, url: str | None) -> Any:
    """The peewee database of `url`, or of the configured one (not migrated)."""
    from ohd.store.store import open_database

    conf = settings(args)
    return open_database(url or conf.database)


def cmd_db_migrate(args: argparse.Namespace) -> int:
    from ohd.store import schema

    db = _database(args, args.url)
    done = schema.migrate(db)
    version = schema.applied(db)[-1]
    emit({"applied": done, "version": version}, args.json,
         lambda d: "\n".join([f"applied {name}" for name in d["applied"]]
                             + [f"the schema is up to date ({d['version']})"]))
    return EXIT_OK


def cmd_db_copy(args: argparse.Namespace) -> int:
    from ohd.clock import SystemClock
    from ohd.store import admin, schema
    from ohd.store.fleet import ALIVE, Fleet

    conf = settings(args)
    source, target = _database(args, args.source), _database(args, args.to)
    if schema.applied(source):
        alive = [info.id for info in Fleet(source).daemons(SystemClock().now(), timedelta(seconds=conf.daemon_lost_s))
                 if info.state == ALIVE]
        if alive:
            raise OhdError(f"daemon(s) {', '.join(alive)} run on the source: stop them first (what they "
                           "write during the copy would not be copied)")
    try:
        copied = admin.copy(source, target, replace=args.replace)
    except admin.TargetNotEmpty as exc:
        raise OhdError(f"{target.where} is not empty ({exc}); give --replace to delete its rows first") from None
    where = getattr(target, "where", args.to)
    emit({"target": where, "source_counts": copied.source, "target_counts": copied.target,
          "verified": copied.verified}, args.json,
         lambda d: "\n".join([f"{name:16} {count:>8}" + ("" if d["target_counts"][name] == count
                                                          else f"  target has {d['target_counts'][name]}")
                              for name, count in d["source_counts"].items()]
                             + [f"copied {copied.rows} row(s) to {where}: "
                                + ("every table's count matches" if d["verified"] else "COUNTS DIFFER")]
                             + ([f"to use it: database_url = \"{args.to}\" in the config file (or "
                                 "OHD_DATABASE_URL), then start the daemons"] if d["verified"] else [])))
    return EXIT_OK if copied.verified else EXIT_ERROR


def cmd_db_check(args: argparse.Namespace) -> int:
    from ohd.clock import SystemClock
    from ohd.store import admin

    conf = settings(args)
    checked = admin.check(_database(args, args.url), SystemClock().now(), timedelta(seconds=conf.daemon_lost_s))
    emit(checked.as_dict(), args.json, lambda d: "\n".join(
        [f"schema: {d['version'] or 'none'}" + (f" ({len(d['missing'])} migration(s) missing)" if d["missing"]
                                                 else "")]
        + [f"{name:16} {count:>8}" for name, count in d["counts"].items()]
        + [f"problem: {problem}" for problem in d["problems"]]
        + ["ok" if d["ok"] else f"{len(d['problems'])} problem(s)"]))
    return EXIT_OK if checked.ok else EXIT_ERROR


def cmd_demo(args: argparse.Namespace) -> int:
    from ohd.cli import demo
    from ohd.cli.client import Client

    return demo.run(lambda socket: Client(socket).get("/status"), keep=args.keep, out=print)
