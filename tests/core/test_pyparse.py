"""Parsing sources ohd only reads is quiet: the compiler's warnings about them reach no stderr."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.e2e.helpers import ROOT

# valid Python with an invalid escape in a docstring: the parser warns (a DeprecationWarning on
# 3.11, a SyntaxWarning from 3.12), and under -W error it refuses the source
ANSWER = 'def test_x():\n    """Matches \\d+ digits."""\n    assert int("12") == 12\n'
SCRIPT = f"""
import warnings
from ohd.core import pyparse, tasktypes
from ohd.core.taskfile import TaskType
from ohd.ladder import validate
source = {ANSWER!r}
pyparse.parse(source)
tasktypes.check_target(TaskType.UNIT_TEST, "tests/test_x.py", source)
validate.collected_tests(pyparse.parse(source))
print("parsed")
warnings.warn_explicit("a warning of someone else's", DeprecationWarning, "elsewhere.py", 1)
"""


@pytest.mark.parametrize("flag", ["default", "error"])
def test_a_parse_of_source_the_compiler_warns_about_prints_nothing(flag: str) -> None:
    done = subprocess.run([sys.executable, "-W", flag, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout == "parsed\n", done.stderr
    # only the warning from elsewhere: ohd's filter matches its own parses, nothing else
    assert "invalid escape" not in done.stderr and "SyntaxWarning" not in done.stderr, done.stderr
    assert "a warning of someone else's" in done.stderr
