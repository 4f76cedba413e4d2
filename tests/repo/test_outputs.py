"""outputs: confinement, source reading, the never-clobber plan and atomic writes, on real files."""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

import pytest

from ohd.errors import TargetError
from ohd.repo.outputs import (
    apply,
    atomic_write,
    check_output,
    current_sha,
    is_report_path,
    plan,
    read_source,
    report_paths,
    resolve_inside,
    sha256_text,
)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    (root / "src" / "app").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]\n")
    (root / "src" / "app" / "auth.py").write_text("def login():\n    return True\n")
    return root


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# -- resolve_inside ---------------------------------------------------------------------------

def test_resolve_inside_returns_the_resolved_path(tree: Path) -> None:
    assert resolve_inside(tree, "src/app/auth.py") == (tree / "src/app/auth.py").resolve()
    assert resolve_inside(tree, "./src/../src/app/auth.py") == (tree / "src/app/auth.py").resolve()
    assert resolve_inside(tree, "new/file.py") == (tree / "new/file.py").resolve()  # need not exist


@pytest.mark.parametrize(
    ("rel", "reason"),
    [("../outside.py", "outside the repo"), ("/etc/passwd", "absolute"), (".git/config", ".git/"),
     ("src/../.git/HEAD", ".git/"), ("", "empty"), (".", "repo root")],
)
def test_resolve_inside_refuses(tree: Path, rel: str, reason: str) -> None:
    with pytest.raises(TargetError) as info:
        resolve_inside(tree, rel)
    assert reason in info.value.reason
    assert info.value.path == rel


def test_symlink_pointing_outside_is_refused(tree: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.py"
    secret.write_text("KEY = 1\n")
    (tree / "src" / "leak.py").symlink_to(secret)
    (tree / "linkdir").symlink_to(tmp_path)
    for rel in ("src/leak.py", "linkdir/secret.py"):
        with pytest.raises(TargetError, match="outside the repo"):
            resolve_inside(tree, rel)
    with pytest.raises(TargetError):
        read_source(tree, "src/leak.py")


def test_symlink_into_git_is_refused(tree: Path) -> None:
    (tree / "cfg").symlink_to(tree / ".git" / "config")
    with pytest.raises(TargetError, match=".git/"):
        resolve_inside(tree, "cfg")


def test_symlink_inside_the_repo_is_followed(tree: Path) -> None:
    (tree / "alias.py").symlink_to(tree / "src" / "app" / "auth.py")
    assert resolve_inside(tree, "alias.py") == (tree / "src/app/auth.py").resolve()
    assert "def login" in read_source(tree, "alias.py")


def test_repo_given_through_a_symlink(tree: Path, tmp_path: Path) -> None:
    link = tmp_path / "proj-link"
    link.symlink_to(tree)
    assert resolve_inside(link, "src/app/auth.py") == (tree / "src/app/auth.py").resolve()


# -- read_source ------------------------------------------------------------------------------

def test_read_source_reads_utf8(tree: Path) -> None:
    (tree / "u.py").write_text("name = 'Zoë'\n", encoding="utf-8")
    assert read_source(tree, "u.py") == "name = 'Zoë'\n"


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"abc\x00def", "binary"), (b"\xff\xfe\x00", "binary"), (b"caf\xe9\n", "not UTF-8"),
     (b"", "empty"), (b"  \n\n", "empty")],
)
def test_read_source_refuses_unusable_content(tree: Path, content: bytes, reason: str) -> None:
    (tree / "f.py").write_bytes(content)
    with pytest.raises(TargetError, match=reason):
        read_source(tree, "f.py")


def test_read_source_refuses_missing_directory_and_large(tree: Path) -> None:
    with pytest.raises(TargetError, match="does not exist"):
        read_source(tree, "nope.py")
    with pytest.raises(TargetError, match="directory"):
        read_source(tree, "src/app")
    (tree / "big.py").write_text("x = 1\n" * 100)
    with pytest.raises(TargetError, match="larger than"):
        read_source(tree, "big.py", max_bytes=599)
    assert read_source(tree, "big.py", max_bytes=600).count("\n") == 100


def test_read_source_refuses_a_fifo(tree: Path) -> None:
    os.mkfifo(tree / "pipe")
    with pytest.raises(TargetError, match="not a regular file"):
        read_source(tree, "pipe")


# -- plan (pure) ------------------------------------------------------------------------------

def test_plan_absent_file_is_written(tmp_path: Path) -> None:
    target = tmp_path / "t.py"
    p = plan(target, "new\n", current_sha=None, written_sha=None)
    assert (p.path, p.intended, p.conflict, p.unchanged) == (target, target, False, False)
    assert p.sha256 == sha256_text("new\n")


def test_plan_overwrites_ohds_own_file(tmp_path: Path) -> None:
    target = tmp_path / "t.py"
    p = plan(target, "v2\n", current_sha=sha256_text("v1\n"), written_sha=sha256_text("v1\n"))
    assert p.path == target and not p.conflict and not p.unchanged


def test_plan_same_content_is_unchanged(tmp_path: Path) -> None:
    target = tmp_path / "t.py"
    p = plan(target, "v1\n", current_sha=sha256_text("v1\n"), written_sha=None)
    assert p.unchanged and not p.conflict and p.path == target


def test_plan_overwrites_what_an_interrupted_write_of_ohd_was_replacing(tmp_path: Path) -> None:
    """A kill between recording v2 and its rename leaves v1 (ohd's) with v2 recorded: not an edit."""
    target = tmp_path / "t.py"
    p = plan(target, "v2\n", current_sha=sha256_text("v1\n"), written_sha=sha256_text("v2\n"),
             previous_sha=sha256_text("v1\n"))
    assert p.path == target and not p.conflict and not p.unchanged
    edited = plan(target, "v2\n", current_sha=sha256_text("edit\n"), written_sha=sha256_text("v2\n"),
                  previous_sha=sha256_text("v1\n"))
    assert edited.conflict and edited.conflict_reason == "edited_since_ohd_wrote"


@pytest.mark.parametrize("written", [None, sha256_text("v1\n")])
def test_plan_user_file_or_edit_is_a_conflict(tmp_path: Path, written: str | None) -> None:
    target = tmp_path / "t.py"
    p = plan(target, "v2\n", current_sha=sha256_text("user edit\n"), written_sha=written)
    assert p.conflict and not p.unchanged
    assert p.path == tmp_path / "t.py.ohd-new"
    assert p.intended == target


# -- apply / atomic_write ---------------------------------------------------------------------

def test_apply_creates_parents_and_is_idempotent(tmp_path: Path) -> None:
    target = tmp_path / "tests" / "deep" / "test_x.py"
    p = plan(target, "def test_a():\n    assert 1\n", current_sha(target), None)
    apply(p)
    assert target.read_text() == p.content
    assert current_sha(target) == p.sha256
    apply(p)  # a restart re-applies the same plan: same bytes, nothing else
    assert target.read_text() == p.content
    assert sorted(x.name for x in target.parent.iterdir()) == ["test_x.py"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_apply_unchanged_does_not_touch_the_file(tmp_path: Path) -> None:
    target = tmp_path / "t.py"
    target.write_text("same\n")
    os.utime(target, (1_000_000, 1_000_000))
    apply(plan(target, "same\n", current_sha(target), None))
    assert target.stat().st_mtime == 1_000_000


def test_conflict_leaves_the_users_file_alone(tmp_path: Path) -> None:
    target = tmp_path / "test_auth.py"
    atomic_write(target, "ohd v1\n")
    written = current_sha(target)
    target.write_text("user edited\n")
    p = plan(target, "ohd v2\n", current_sha(target), written)
    apply(p)
    assert target.read_text() == "user edited\n"
    assert (tmp_path / "test_auth.py.ohd-new").read_text() == "ohd v2\n"


def test_atomic_write_keeps_existing_mode_and_exact_bytes(tmp_path: Path) -> None:
    target = tmp_path / "run.sh"
    target.write_text("old")
    target.chmod(0o750)
    atomic_write(target, "a\r\nb\nZoë")
    assert target.read_bytes() == "a\r\nb\nZoë".encode()
    assert stat.S_IMODE(target.stat().st_mode) == 0o750


def test_failed_replace_keeps_old_content_and_leaves_no_temp(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "t.py"
    target.write_text("old content\n")

    def disk_full(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(TargetError, match="No space left"):
        atomic_write(target, "new content\n")
    assert target.read_text() == "old content\n"
    assert leftovers(tmp_path) == []


def test_target_that_is_a_directory_fails_cleanly(tmp_path: Path) -> None:
    target = tmp_path / "out.py"
    target.mkdir()
    (target / "keep.txt").write_text("precious\n")
    with pytest.raises(TargetError, match="cannot write"):
        atomic_write(target, "x = 1\n")
    assert (target / "keep.txt").read_text() == "precious\n"
    assert leftovers(tmp_path) == []


def test_parent_that_is_a_file_fails_cleanly(tmp_path: Path) -> None:
    (tmp_path / "tests").write_text("not a dir\n")
    with pytest.raises(TargetError, match="cannot write"):
        atomic_write(tmp_path / "tests" / "test_x.py", "x\n")
    assert (tmp_path / "tests").read_text() == "not a dir\n"


def test_current_sha(tmp_path: Path) -> None:
    assert current_sha(tmp_path / "absent") is None
    (tmp_path / "f").write_text("hello")
    assert current_sha(tmp_path / "f") == sha256_text("hello")
    with pytest.raises(TargetError):
        current_sha(tmp_path)


# -- report_paths -----------------------------------------------------------------------------

def test_report_paths_sit_beside_the_source(tmp_path: Path) -> None:
    json_path, md_path = report_paths(tmp_path, "src/app/auth.py", "unit_test")
    assert json_path == tmp_path / "src/app/.ohd/auth.py.unit_test.json"
    assert md_path == tmp_path / "src/app/.ohd/auth.py.unit_test.md"
    assert report_paths(tmp_path, "./main.py", "review")[0] == tmp_path / ".ohd/main.py.review.json"
    assert report_paths(tmp_path, "src/app/auth.py", "review", 7) == (
        tmp_path / "src/app/.ohd/auth.py.review.7.json", tmp_path / "src/app/.ohd/auth.py.review.7.md")


def test_report_paths_refuse_escaping_targets(tmp_path: Path) -> None:
    with pytest.raises(TargetError):
        report_paths(tmp_path, "../x.py", "review")


@pytest.mark.parametrize(("rel", "is_report"), [
    ("src/app/.ohd/auth.py.unit_test.json", True),
    ("src/app/.ohd/auth.py.review.md", True),
    ("src/app/.ohd/auth.py.custom.12.md", True),
    ("src/app/.ohd/reviews/auth.py.md", False),
    ("src/app/.ohd/notes.md", False),
    ("src/app/auth.py.review.md", False),
    ("tests/test_auth.py", False),
])
def test_is_report_path(rel: str, is_report: bool) -> None:
    assert is_report_path(PurePosixPath(rel)) is is_report


def test_check_output_refuses_a_report_path_also_through_a_symlink(tree: Path) -> None:
    (tree / ".ohd").mkdir()
    (tree / "link.md").symlink_to(tree / ".ohd" / "a.py.review.md")
    for rel in (".ohd/a.py.review.md", "link.md"):
        with pytest.raises(TargetError, match="reports"):
            check_output(tree, rel)
    assert check_output(tree, ".ohd/reviews/a.py.md") == tree.resolve() / ".ohd/reviews/a.py.md"
