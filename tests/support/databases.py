"""Database URLs for tests: a SQLite file in tmp_path, and PostgreSQL when configured.

Set `OHD_TEST_POSTGRES_URL` (e.g. `postgresql://postgres@127.0.0.1:5432/test`) to run
the store tests against PostgreSQL too; each test gets a fresh schema, dropped after.
The variable is read at import (collection) time because the autouse fixture in
conftest clears `OHD_*` variables before each test runs.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from ohd.store.store import Store, open_database

POSTGRES_URL = os.environ.get("OHD_TEST_POSTGRES_URL", "")
BACKENDS = ("sqlite", "postgresql") if POSTGRES_URL else ("sqlite",)


@contextmanager
def database_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A URL for an empty database of `backend`, removed afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'state' / 'ohd.db'}"
        return
    with postgres_schema(POSTGRES_URL) as url:
        yield url


@contextmanager
def postgres_schema(server_url: str, prefix: str = "ohd_test") -> Iterator[str]:
    """A URL of `server_url` whose search_path is a fresh schema (its name begins with `prefix`),
    dropped with everything in it afterwards."""
    import psycopg2

    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(server_url)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE SCHEMA "{schema}"')
        sep = "&" if "?" in server_url else "?"
        yield f"{server_url}{sep}options={quote(f'-c search_path={schema}')}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.close()


@contextmanager
def store_on(backend: str, tmp_path: Path) -> Iterator[Store]:
    """A migrated store on an empty database of `backend` (one of BACKENDS), closed afterwards."""
    with database_url(backend, tmp_path) as url:
        store = Store(open_database(url))
        store.migrate()
        try:
            yield store
        finally:
            store.close()


def open_store(path: Path) -> Store:
    """A migrated store on the SQLite file `path` (created with its folder if missing)."""
    store = Store(open_database(f"sqlite:///{path}"))
    store.migrate()
    return store
