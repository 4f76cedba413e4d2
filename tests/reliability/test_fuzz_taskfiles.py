"""Task files that used to stay in tasks.d/ for ever (retried every 60 s with a traceback) are rejected once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ohd.intake.ingest import Ingestor
from ohd.store.store import Store
from tests.support.clock import FakeClock

pytestmark = pytest.mark.reliability

NEVER_REJECTED = {
    "deep.yaml": b"type: unit_test\ntarget: shop/pricing.py\ndescription: " + b"[" * 5000 + b"]" * 5000 + b"\n",
    "bigint.yaml": b"type: unit_test\ntarget: shop/pricing.py\nmax_attempts: " + b"9" * 5000 + b"\n",
    "longtarget.yaml": b"type: unit_test\ntarget: " + b"a" * 5000 + b".py\n",
    "x" * 250 + ".yaml": b"type: unit_test\ntarget: nope.py\n",
}


@pytest.mark.parametrize("name", sorted(NEVER_REJECTED), ids=lambda n: n[:12])
def test_a_file_that_broke_ingest_is_rejected_once_with_a_short_error_file(
        store: Store, clock: FakeClock, repo: Path, name: str) -> None:
    path = repo / "tasks.d" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(NEVER_REJECTED[name])
    assert Ingestor(store, clock).ingest_file(repo.resolve(), path) is None
    assert not path.exists()
    rejected = repo / "tasks.d" / ".rejected"
    notes = [p for p in rejected.iterdir() if p.name.endswith(".error.txt")]
    [note] = notes
    assert len(note.name.encode()) <= 255
    assert 0 < note.stat().st_size < 2000
    assert len([p for p in rejected.iterdir() if not p.name.endswith(".error.txt")]) == 1
    assert store.list_tasks() == []


def test_a_file_whose_name_is_not_utf8_is_rejected_once_saying_so(store: Store, clock: FakeClock, repo: Path) -> None:
    path = repo / "tasks.d" / os.fsdecode(b"caf\xe9.yaml")         # Latin-1 bytes, as an old tool writes
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"type: review\ntarget: shop/pricing.py\n")
    assert Ingestor(store, clock).ingest_file(repo.resolve(), path) is None
    rejected = repo / "tasks.d" / ".rejected"
    assert sorted(os.listdir(os.fsencode(rejected))) == [b"caf\xe9.yaml", b"caf\xe9.yaml.error.txt"]
    note = (rejected / os.fsdecode(b"caf\xe9.yaml.error.txt")).read_text(encoding="utf-8")
    assert note == "tasks.d/caf\\xe9.yaml: has a file name that is not UTF-8 text; rename it\n"
    assert store.list_tasks() == []


@pytest.mark.parametrize("name", ["deep.yaml", "bigint.yaml"])
def test_ohd_validate_reports_the_file_that_crashed_it(tmp_path: Path, name: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from ohd.cli.commands import main

    path = tmp_path / name
    path.write_bytes(NEVER_REJECTED[name])
    assert main(["validate", str(path)]) == 1
    assert "cannot be read as a task file" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["dev_zero_link", "fifo", "huge"])
def test_a_hostile_file_is_rejected_without_reading_it_whole_or_blocking(
        store: Store, clock: FakeClock, repo: Path, kind: str) -> None:
    import os
    path = repo / "tasks.d" / "x.yaml"
    path.parent.mkdir(exist_ok=True)
    if kind == "dev_zero_link":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes(b"type: unit_test\ntarget: shop/pricing.py\ndescription: " + b"x" * 5_000_000 + b"\n")
    assert Ingestor(store, clock).ingest_file(repo.resolve(), path) is None
    assert not os.path.lexists(path)
    assert store.list_tasks() == []
    assert (repo / "tasks.d" / ".rejected" / "x.yaml.error.txt").exists()


FUZZED = 0
_KEYS = ["type", "target", "output", "description", "prompt", "max_attempts", "models", "rule_levels", "type"]
_VALUES = st.one_of(st.text(max_size=40), st.integers(), st.floats(), st.booleans(), st.none(),
                    st.sampled_from(["unit_test", "custom", "../x.py", "/etc/passwd", ".git/hooks/pre-commit",
                                     "shop/pricing.py", "sub/.git/config", "tasks.d/y.yaml",
                                     "!!python/object/apply:os.system ['touch pwned']", "*a", "&a [1]"]))
_YAML = st.lists(st.tuples(st.sampled_from(_KEYS), _VALUES), max_size=8).map(
    lambda items: "".join(f"{k}: {v}\n" for k, v in items).encode("utf-8", "surrogatepass"))
_BOMB = st.just(b"a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
                b"d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: [*d,*d,*d,*d,*d,*d,*d,*d,*d]\ntype: unit_test\n")


# file names as the file system has them: bytes, 1-250 of them before `.yaml` (so up to NAME_MAX),
# odd unicode, bytes that are not UTF-8 at all, and names within a few bytes of the limit
_NAME_BYTES = st.one_of(
    st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)), min_size=1, max_size=250)
    .map(lambda text: text.encode("utf-8")[:250]),
    st.binary(min_size=1, max_size=250),
    st.tuples(st.integers(235, 250), st.binary(max_size=4)).map(lambda nb: (b"n" * nb[0] + nb[1])[:250]))


@pytest.mark.timeout(900)   # a bound for a hang: 200 examples, each a git repo and a store (180 s ran out at load 20+)
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.one_of(st.binary(max_size=300), _YAML, _BOMB), name=_NAME_BYTES)
def test_every_fuzzed_file_ends_in_done_or_rejected_once(tmp_path_factory: pytest.TempPathFactory,
                                                          data: bytes, name: bytes) -> None:
    global FUZZED
    FUZZED += 1
    from tests.support.databases import open_store
    from tests.support.gitrepo import make_repo

    base = tmp_path_factory.mktemp("fuzz")
    repo = make_repo(base / "repo")
    store = open_store(base / "db.sqlite")
    try:
        raw = name.replace(b"/", b"_").replace(b"\x00", b"_").lstrip(b".") or b"x"
        path = repo / "tasks.d" / os.fsdecode(raw[:250] + b".yaml")
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        before = _files_outside(base, repo)
        Ingestor(store, FakeClock()).ingest_file(repo.resolve(), path)
        tasks = repo / "tasks.d"
        ended = [p for d in (".done", ".rejected") if (tasks / d).exists()
                 for p in (tasks / d).iterdir() if not p.name.endswith(".error.txt")]
        assert not path.exists() and len(ended) == 1
        assert not (base / "pwned").exists() and not (repo / "pwned").exists()
        assert _files_outside(base, repo) == before      # nothing written beside the repo
    finally:
        store.close()


def _files_outside(base: Path, repo: Path) -> set[Path]:
    """Files under the test's base folder outside the repo, but the store's own (db, WAL, SHM)."""
    return {p for p in base.rglob("*") if repo not in p.parents and not p.name.startswith("db.sqlite")}


def test_a_running_daemon_rejects_hostile_files_keeps_answering_and_stops_on_sigterm(tmp_path: Path) -> None:
    """The unit tests above call the ingestor; here a real daemon (offline provider) meets them in
    tasks.d/ at once, beside a good file: a FIFO, a symlink to /dev/zero, a 5 MB file and the
    files that broke ingest. Each is rejected once, the good one runs, `ohd status` answers all
    along, the daemon's memory stays small, and SIGTERM stops it (a FIFO used to block ingest,
    and so the stop, for ever)."""
    import os
    import signal
    import tempfile

    from tests.e2e.helpers import DaemonProcess, daemon_env
    from tests.support.gitrepo import make_repo
    from tests.support.waiting import wait_for

    repo = make_repo(tmp_path / "repo")
    runtime = Path(tempfile.mkdtemp(prefix="ohd-hf-"))
    tasks = repo / "tasks.d"
    # some are there before the start (a cloned repo can carry them): the start-up's own reading
    # of tasks.d/ for standing rules blocked on the FIFO and died of the deep nesting
    os.mkfifo(tasks / "fifo.yaml")
    (tasks / "zero.yaml").symlink_to("/dev/zero")
    (tasks / "deep.yaml").write_bytes(NEVER_REJECTED["deep.yaml"])
    daemon = DaemonProcess(daemon_env(tmp_path, runtime), repo, tmp_path / "daemon.log").start()
    try:
        (tasks / "huge.yaml").write_bytes(b"type: review\ntarget: shop/pricing.py\ndescription: " + b"x" * 5_000_000)
        for name, data in NEVER_REJECTED.items():
            if name != "deep.yaml":
                (tasks / name).write_bytes(data)
        (tasks / "good.yaml").write_text("type: review\ntarget: shop/pricing.py\n")
        hostile = {"fifo.yaml", "zero.yaml", "huge.yaml", *NEVER_REJECTED}

        def settled() -> bool:
            assert daemon.ohd("status", "--json").returncode == 0      # answers while it ingests
            rejected = {p.name for p in (tasks / ".rejected").glob("*") if not p.name.endswith(".error.txt")}
            # the file whose name leaves no room for its .error.txt is moved under a shortened name
            short = {name for name in hostile if len(name) < 100}
            return (len(rejected) == len(hostile) and short <= rejected
                    and (tasks / ".done" / "good.yaml").exists())

        wait_for(settled, timeout=60, what="every hostile file in .rejected/ and the good one in .done/")
        assert sorted(p.name for p in tasks.iterdir() if not p.name.startswith(".")) == []
        [task] = daemon.json("tasks")["tasks"]
        wait_for(lambda: daemon.json("show", str(task["id"]))["status"] == "completed", timeout=60,
                 what="the good file's task to complete")
        assert daemon.proc is not None
        peak_kib = int(next(line.split()[1] for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines()
                            if line.startswith("VmHWM:")))
        assert peak_kib < 512 * 1024, f"the daemon's memory peaked at {peak_kib} KiB"
    finally:
        code = daemon.stop(signal.SIGTERM)
        for child in runtime.glob("*"):
            child.unlink()
        runtime.rmdir()
    assert code == 0
