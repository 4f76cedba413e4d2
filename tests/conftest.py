"""Fixtures shared by every test. No test can touch the real user's state or the network."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `tests.support` importable

from ohd.store.store import Store  # noqa: E402
from tests.support.clock import FakeClock  # noqa: E402
from tests.support.databases import open_store  # noqa: E402
from tests.support.gitrepo import make_repo  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """Point every ohd directory at tmp dirs and clear OHD_* and API-key variables."""
    for name in list(os.environ):
        if name.startswith("OHD_") or name in ("OPENROUTER_API_KEY", "NOTIFY_SOCKET"):
            monkeypatch.delenv(name, raising=False)
    # Unix socket paths are limited to ~107 bytes, so the runtime dir is short.
    runtime = Path(tempfile.mkdtemp(prefix="ohd-rt-"))
    monkeypatch.setenv("OHD_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("OHD_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("OHD_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))   # the CLI's fast path (cli/fastpath.py)
    yield runtime
    for child in sorted(runtime.glob("**/*"), reverse=True):
        if child.is_dir():
            child.rmdir()
        else:
            child.unlink()
    runtime.rmdir()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "repo")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """The daemon's default database file under the isolated state dir."""
    return tmp_path / "state" / "ohd.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    """A real, migrated SQLite store (store, quota and metrics tests parametrize their own over backends)."""
    st = open_store(db_path)
    yield st
    st.close()
