"""The offline provider's doctest test runs a module's examples as projects write them: found
by bench/realworld.py on boltons, whose doctests rely on the `doctest_optionflags` of its
pytest.ini (trailing spaces after an expected value, `...` in an expected traceback); run with
doctest's defaults they failed, and correct code was reported as a possible bug."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ohd.core.taskfile import TaskType
from ohd.core.tasktypes import Job, extract
from ohd.models import offline

# as boltons.iterutils.pairwise_iter and boltons.dictutils.OneToOne.unique write them
MODULE = '''
def pairs(items):
    """Neighbouring pairs.

    >>> pairs([0, 1, 2])
    [(0, 1), (1, 2)]    
    """
    items = list(items)
    return list(zip(items, items[1:]))


def unique(mapping):
    """Refuses repeated values.

    >>> unique({'a': 1, 'b': 1})
    Traceback (most recent call last):
    ...
    ValueError: repeated values: ...
    """
    seen = {}
    for key, value in mapping.items():
        seen.setdefault(value, []).append(key)
    repeated = {v: k for v, k in seen.items() if len(k) > 1}
    if repeated:
        raise ValueError(f"repeated values: {repeated}")
    return dict(mapping)
'''


def test_doctests_that_rely_on_common_doctest_flags_pass(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\ndoctest_optionflags = NORMALIZE_WHITESPACE ELLIPSIS\n")
    (tmp_path / "mod.py").write_text(MODULE)
    own = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--doctest-modules",
                          "mod.py"], cwd=tmp_path, check=False, capture_output=True, text=True, timeout=120)
    assert own.returncode == 0, own.stdout       # the project's own doctest run passes
    job = Job(task_type=TaskType.UNIT_TEST, target="mod.py", source=MODULE, module="mod", output="test_mod.py")
    tests = extract(TaskType.UNIT_TEST, offline.answer(job))
    assert "test_doctest_examples" in tests
    (tmp_path / "test_mod.py").write_text(tests)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_mod.py"],
                          cwd=tmp_path, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout
