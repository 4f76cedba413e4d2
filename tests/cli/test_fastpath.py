"""The read-only commands' fast path (cli/fastpath.py): the same answers, warnings and exit codes
as the full settings, under config files and variables that move the socket or the database.

Real `python -m ohd` processes (each builds its settings from scratch, as a user's shell does),
the isolated directories of tests/conftest.py; the first run of given inputs takes the full
path and remembers, the next takes the fast one: the test compares the two, and asks the
process itself whether it imported `ohd.config` (the settings model) to know which path it took.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ohd.cli import fastpath
from ohd.config import load

ROOT = Path(__file__).resolve().parents[2]
# runs the command line in-process and says on stderr's last line whether the settings model was loaded
PROBE = ("import sys\nfrom ohd.cli.commands import main\ncode = main(sys.argv[1:])\n"
         "print('ohd.config' in sys.modules, 'peewee' in sys.modules, file=sys.stderr)\nraise SystemExit(code)\n")


def ohd(*args: str, env: dict[str, str] | None = None,
        unset: tuple[str, ...] = ()) -> tuple[int, str, str, bool, bool]:
    """(exit code, stdout, stderr without the probe's line, whether the settings model was built,
    whether the store's database code was loaded)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    for name in unset:
        full_env.pop(name, None)
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120,
                          env=full_env)
    *err, probe = done.stderr.splitlines()
    config, peewee = probe.split()
    return done.returncode, done.stdout, "\n".join(err), config == "True", peewee == "True"


def full_then_fast(*args: str, env: dict[str, str] | None = None,
                   unset: tuple[str, ...] = ()) -> tuple[tuple[int, str, str], tuple[int, str, str]]:
    first, second = ohd(*args, env=env, unset=unset), ohd(*args, env=env, unset=unset)
    assert first[3], "the first run of these inputs must build the settings"
    assert not second[3], "the second run must take the fast path"
    return first[:3], second[:3]


def test_status_without_a_daemon_names_the_same_socket_and_exits_3_on_both_paths() -> None:
    full, fast = full_then_fast("status", "--json")
    assert full == fast
    assert full[0] == 3 and os.environ["OHD_RUNTIME_DIR"] in full[2]


def test_a_config_file_that_moves_the_runtime_dir_is_followed_and_a_change_is_seen(tmp_path: Path) -> None:
    config = Path(os.environ["OHD_CONFIG"])
    config.write_text(f'runtime_dir = "{tmp_path / "rt-one"}"\n')
    unset = ("OHD_RUNTIME_DIR",)                 # the file's runtime_dir, not the variable's
    full, fast = full_then_fast("status", unset=unset)
    assert full == fast and "rt-one" in fast[2]
    config.write_text(f'runtime_dir = "{tmp_path / "rt-two"}"\n')
    changed = ohd("status", unset=unset)
    assert changed[3] and "rt-two" in changed[2]
    assert ohd("status", unset=unset)[:3] == changed[:3]


def test_a_variable_that_moves_the_socket_is_part_of_the_inputs(tmp_path: Path) -> None:
    full, fast = full_then_fast("status")
    moved = ohd("status", env={"OHD_RUNTIME_DIR": str(tmp_path / "elsewhere")})
    assert moved[3], "a changed OHD_* variable is new inputs: the full path"
    assert "elsewhere" in moved[2] and full == fast and "elsewhere" not in fast[2]


def test_the_warnings_about_unknown_variables_are_given_on_the_fast_path_too() -> None:
    full, fast = full_then_fast("status", env={"OHD_WORKER": "3"})
    assert full == fast
    assert "OHD_WORKER is not a setting ohd knows" in fast[2] and "OHD_WORKERS?" in fast[2]


def test_a_configuration_that_does_not_validate_is_never_remembered() -> None:
    Path(os.environ["OHD_CONFIG"]).write_text("workers = 0\n")
    first, second = ohd("status"), ohd("status")
    assert first[3] and second[3], "an invalid configuration always takes the full path"
    assert first[:3] == second[:3] and first[0] == 2 and "workers" in first[2]


def test_a_missing_config_file_given_with_config_is_an_error_on_every_run(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    first, second = ohd("--config", missing, "status"), ohd("--config", missing, "status")
    assert first[:3] == second[:3] and first[0] == 2 and "config file not found" in first[2]


def test_the_remembered_values_are_the_settings_and_a_password_is_not_written_down(tmp_path: Path) -> None:
    env = {**os.environ, "OHD_DATABASE_URL": "postgresql://me:secret@db.example/ohd"}
    found = fastpath.inputs(None, env)
    assert fastpath.recall(found) is None
    conf = load(env=env)
    fastpath.remember(found, fastpath.inputs(None, env), fastpath.Known(conf.socket_path, conf.database,
                                                                         conf.store_lock_wait_s, ()))
    assert found is not None and "secret" not in found.slot.read_text()
    known = fastpath.recall(found)
    assert known is not None and known.socket_path == conf.socket_path and known.database is None
    assert fastpath.recall(fastpath.inputs(None, {**env, "OHD_STORE_LOCK_WAIT_S": "5"})) is None
    entry = json.loads(found.slot.read_text())
    assert entry["digest"] == found.digest
    shutil.rmtree(found.slot.parent)
    assert fastpath.recall(found) is None          # losing the folder costs one slow run


# -- ohd tasks / ohd show: the daemon's answer when it reads the same database, else the store ----


def store_output(url: str, show: int | None = None, as_json: bool = True) -> str:
    """What `ohd tasks` (or `ohd show ID`) printed before the fast path: read from the store itself."""
    from ohd.core import views
    from ohd.store.store import Store, open_database

    store = Store(open_database(url))
    if show is None:
        data: dict[str, object] = {"tasks": [t.as_dict() for t in store.list_tasks(None, 50)]}
        text = views.tasks_text(data["tasks"])  # type: ignore[arg-type]
    else:
        data = store.get_task(show).as_dict()
        data["executions"] = [e.as_dict() for e in store.executions(show)]
        text = views.task_text(data)
    return (json.dumps(data, indent=2, default=str) if as_json else text) + "\n"


def test_tasks_and_show_answer_as_the_store_with_the_daemon_up_down_and_on_another_database(
        tmp_path: Path) -> None:
    from ohd.store.schema import TERMINAL
    from tests.e2e.helpers import DaemonProcess, daemon_env
    from tests.support.gitrepo import make_repo
    from tests.support.waiting import wait_for

    repo = make_repo(tmp_path / "repo")
    env = daemon_env(tmp_path, Path(os.environ["OHD_RUNTIME_DIR"]))
    url = f"sqlite:///{tmp_path / 'state' / 'ohd.db'}"
    daemon = DaemonProcess(env, repo, tmp_path / "daemon.log").start()
    try:
        for target in ("shop/pricing.py", "shop/__init__.py"):
            done = daemon.ohd("submit", "--type", "docstring", "--target", target, "--repo", str(repo))
            assert done.returncode == 0, done.stderr
        terminal = {s.value for s in TERMINAL}
        wait_for(lambda: all(t["status"] in terminal for t in daemon.json("tasks")["tasks"]), timeout=120,
                 what="both tasks to finish")
        up = {args: ohd(*args, env=env) for args in (("tasks", "--json"), ("tasks",), ("show", "1", "--json"),
                                                     ("show", "2"))}
        up = {args: ohd(*args, env=env) for args in up}          # now all on the fast path
        assert not any(run[3] or run[4] for run in up.values()), "no settings model, no store: the socket"
        assert up[("tasks", "--json")][:2] == (0, store_output(url))
        assert up[("tasks",)][:2] == (0, store_output(url, as_json=False))
        assert up[("show", "1", "--json")][:2] == (0, store_output(url, show=1))
        assert up[("show", "2")][:2] == (0, store_output(url, show=2, as_json=False))
        missing = ohd("show", "99", env=env)
        assert missing[:3] == (1, "", "ohd: no task 99")        # the store's word, as before
        # the same socket, another state dir: the daemon's answers are not this command's
        other = {**env, "OHD_STATE_DIR": str(tmp_path / "other-state")}
        ohd("tasks", "--json", env=other)
        assert ohd("tasks", "--json", env=other)[:2] == (0, '{\n  "tasks": []\n}\n')
    finally:
        daemon.stop()
    first = ohd("tasks", "--json", env=env)    # the other state dir's run took the slot of this config path
    down = ohd("tasks", "--json", env=env)
    assert first[3] and not down[3]
    assert first[:2] == down[:2] == (0, store_output(url))
    assert ohd("show", "2", env=env)[:2] == (0, store_output(url, show=2, as_json=False))
    assert ohd("show", "99", env=env)[:3] == missing[:3]


# -- the parser: a read-only command builds its own subcommand's parser alone -------------------

PARSED = [["status"], ["status", "--json"], ["--config", "x.toml", "status", "--watch"], ["--config=x.toml", "tasks"],
          ["tasks", "--status", "queued", "--limit", "3", "--json"], ["show", "7", "--calls", "--diff"],
          ["status", "-h"], ["tasks", "--help"], ["show", "-h"], ["show"], ["show", "abc"], ["status", "--bogus"],
          ["tasks", "--status", "nonsense"], ["tasks", "--limit"], ["--config", "x.toml", "show", "1", "extra"]]


@pytest.mark.parametrize("argv", PARSED, ids=" ".join)
def test_the_read_only_commands_parse_print_and_fail_as_with_the_full_parser(
        argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from ohd.cli.commands import build_parser, fast_command

    monkeypatch.setenv("COLUMNS", "100")      # the same help width on both sides
    only = fast_command(argv)
    assert only == next(a for a in argv if not a.startswith("-") and a != "x.toml")
    outcomes = []
    for parser in (build_parser(), build_parser(only=only)):
        try:
            parsed = vars(parser.parse_args(argv))
            code = None
        except SystemExit as exc:
            parsed, code = {}, exc.code
        out = capsys.readouterr()
        outcomes.append((parsed, code, out.out, out.err))
    assert outcomes[0] == outcomes[1]


def test_every_other_command_line_gets_the_full_parser() -> None:
    from ohd.cli.commands import fast_command

    for argv in ([], ["-h"], ["--version"], ["--conf", "x", "status"], ["submit", "--type", "docstring"],
                 ["--config"], ["models"], ["--", "status"]):
        assert fast_command(argv) is None, argv
