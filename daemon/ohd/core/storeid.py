"""The store's identity on the socket API: which database a daemon's answers come from.

The daemon sends `X-Ohd-Store: <store_id(its database URL)>` with every answer on its socket;
`ohd tasks` and `ohd show` use the daemon's answer only when it names the database they would
read themselves (the URL is not sent: a digest of it). A SQLite URL with a relative path is
no identity (the daemon's working dir may not be the command's): its id is empty, and empty
matches nothing. Pure and a leaf.
"""

from __future__ import annotations

import hashlib

HEADER = "X-Ohd-Store"
_SQLITE = "sqlite:///"


def store_id(database_url: str) -> str:
    """A digest naming the database of `database_url`; "" when the URL names no one database."""
    if not database_url or (database_url.startswith(_SQLITE) and not database_url[len(_SQLITE):].startswith("/")):
        return ""
    return hashlib.sha256(database_url.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def same_store(answered: str | None, database_url: str) -> bool:
    """The answer (its header's value) came from the database at `database_url`."""
    mine = store_id(database_url)
    return bool(mine) and answered == mine
