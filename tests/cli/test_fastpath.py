"""The read-only commands' fast path (cli/fastpath.py): the same answers, warnings and exit codes
as the full settings, under config files and variables that move the socket or the database.

Real `python -m ohd` processes (each builds its settings from scratch, as a user's shell does),
the isolated directories of tests/conftest.py; the first run of given inputs takes the full
path and remembers, the next takes the fast one: the test compares the two, and asks the
process itself whether it imported pydantic (the settings model) to know which path it took.
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
# runs the command line in-process and says on stderr's last line whether pydantic was imported
PROBE = ("import sys\nfrom ohd.cli.commands import main\ncode = main(sys.argv[1:])\n"
         "print('pydantic' in sys.modules, file=sys.stderr)\nraise SystemExit(code)\n")


def ohd(*args: str, env: dict[str, str] | None = None, unset: tuple[str, ...] = ()) -> tuple[int, str, str, bool]:
    """(exit code, stdout, stderr without the probe's line, whether the settings model was built)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    for name in unset:
        full_env.pop(name, None)
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120,
                          env=full_env)
    *err, probe = done.stderr.splitlines()
    return done.returncode, done.stdout, "\n".join(err), probe == "True"


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
