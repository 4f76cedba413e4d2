"""The static screen (`ohd.ladder.screen`, rule `safe_tests`): what a unit test should not need is named
by line, unless the module under test uses it itself; `allow_risky_tests` and `rule_levels` switch it."""

from __future__ import annotations

import ast

from ohd import config
from ohd.ladder import screen, validate
from ohd.service import assemble


def found(tests: str, target: str | None = None) -> list[str]:
    return [str(f) for f in screen.screen(ast.parse(tests), ast.parse(target) if target is not None else None)]


def test_a_plain_unit_test_has_no_finding() -> None:
    assert found("import json\nimport os.path\nfrom pathlib import Path\nfrom urllib.parse import quote\n\n"
                 "def test_x(tmp_path, monkeypatch):\n    monkeypatch.setenv('A', '1')\n"
                 "    (tmp_path / 'f').write_text(json.dumps({'url': '/api/v1/users'}))\n"
                 "    assert os.path.exists(tmp_path / 'f') and quote('a b')\n") == []


def test_processes_sockets_c_and_dynamic_code_are_named_by_line() -> None:
    tests = ("import socket\nimport subprocess as sp\nfrom ctypes import CDLL\nfrom os import system as run\n"
             "import os, shutil\n\ndef test_x():\n    run('id')\n    os.execv('/bin/sh', [])\n"
             "    shutil.rmtree('x')\n    __import__('o' + 's').system('id')\n    os.kill(1, 9)\n")
    assert found(tests) == ["line 1 imports socket", "line 2 imports subprocess", "line 3 imports ctypes",
                            "line 8 calls os.system", "line 9 calls os.execv", "line 10 calls shutil.rmtree",
                            "line 11 calls __import__",
                            "line 12 calls os.kill"]


def test_system_and_secret_paths_are_named() -> None:
    tests = ("import os\n\ndef test_x():\n    open(f'/proc/{os.getppid()}/environ').read()\n"
             "    open('/etc/passwd')\n    open(os.path.expanduser('~/.ssh/id_rsa'))\n"
             "    open('repo/.git/hooks/post-commit', 'w')\n")
    assert found(tests) == ["line 4 names the path '/environ'", "line 4 names the path '/proc/'", "line 5 names the path '/etc/passwd'",
                            "line 6 names the path '~/.ssh/id_rsa'",
                            "line 7 names the path 'repo/.git/hooks/post-commit'"]


def test_what_the_target_uses_itself_its_tests_may_use() -> None:
    target = "import subprocess\nimport os\n\ndef run(cmd):\n    os.kill(0, 0)\n    return subprocess.run(cmd)\n"
    tests = "import subprocess\nimport os\n\ndef test_run():\n    os.kill(0, 0)\n    os.system('x')\n"
    assert found(tests, target) == ["line 6 calls os.system"]
    assert found("import socket\n", "import socket.something\n") == []


def test_the_rule_rejects_before_pytest_and_says_why() -> None:
    verdict = validate.check("unit_test", "tests/test_m.py", "import subprocess\nfrom m import f\n\n"
                             "def test_f():\n    assert f() == 1\n", target_exists=True, module="m", min_quality=0.0,
                             original="def f():\n    return 1\n")
    rule = next(r for r in verdict.rules if r.rule == "safe_tests")
    assert not verdict.accepted and not rule.passed and rule.level is validate.Level.ERROR
    assert rule.message.startswith("refused by the static screen before running: line 1 imports subprocess")
    off = validate.check("unit_test", "tests/test_m.py", "import subprocess\nfrom m import f\n\n"
                         "def test_f():\n    assert f() == 1\n", target_exists=True, module="m", min_quality=0.0,
                         original="def f():\n    return 1\n", levels={"safe_tests": None})
    assert "safe_tests" not in {r.rule for r in off.rules} and off.accepted


def test_allow_risky_tests_switches_the_screen_off_unless_rule_levels_names_it() -> None:
    def level(**env: str) -> object:
        levels = assemble.ladder_of(config.load(env=env)).levels
        return validate.levels_for("unit_test", levels)["safe_tests"]

    assert level() is validate.Level.ERROR
    assert level(OHD_ALLOW_RISKY_TESTS="true") is None
    assert level(OHD_ALLOW_RISKY_TESTS="true", OHD_RULE_LEVELS='{"*": {"safe_tests": "warning"}}') \
        is validate.Level.WARNING
    assert level(OHD_RULE_LEVELS='{"unit_test": {"safe_tests": "off"}}') is None
