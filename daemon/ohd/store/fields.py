"""How the store's values are kept in its columns: instants one way (UTC), JSON as text.

Column types of `schema`'s models. Datetimes: aware UTC in, naive UTC in the database (SQLite:
fixed-width text, so text order is time order), aware UTC out; text older versions wrote in ISO
form (with an offset, or without a zero fraction) reads back as the same instant.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

import peewee

_SQLITE_FORMAT = "%Y-%m-%d %H:%M:%S.%f"   # fixed width, so text order is time order

if TYPE_CHECKING:
    _DateTimeField = peewee.DateTimeField[datetime | None]
    _TextField = peewee.TextField[Any]
else:
    _DateTimeField = peewee.DateTimeField   # the stubs' generics are not subscriptable at run time
    _TextField = peewee.TextField


class UtcDateTimeField(_DateTimeField):
    """Aware datetimes in, naive UTC in the database, aware UTC out (the store's only datetimes)."""

    def db_value(self, value: Any) -> Any:
        if not isinstance(value, datetime):
            return value
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}; ohd stores timezone-aware UTC only")
        naive = value.astimezone(UTC).replace(tzinfo=None)
        if isinstance(self.model._meta.database, peewee.SqliteDatabase):
            return naive.strftime(_SQLITE_FORMAT)
        return naive

    def python_value(self, value: Any) -> Any:
        value = cast(Any, super()).python_value(value)
        if isinstance(value, datetime):
            return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value


def hour_of(field: peewee.Field) -> peewee.Node:
    """The clock hour (UTC) a `UtcDateTimeField`'s value falls in, as the database computes it (to
    GROUP BY; `read_hour` makes it an instant): SQLite's fixed-width text cut after the hour,
    PostgreSQL's date_trunc."""
    if isinstance(field.model._meta.database, peewee.SqliteDatabase):
        return peewee.fn.substr(field, 1, 13)
    return peewee.fn.date_trunc("hour", field)


def read_hour(value: Any) -> datetime:
    """What `hour_of` gave, as the aware UTC instant the hour begins."""
    if isinstance(value, str):
        return datetime.strptime(value[:13].replace("T", " "), "%Y-%m-%d %H").replace(tzinfo=UTC)
    hour = cast(datetime, value)
    return hour.replace(tzinfo=UTC) if hour.tzinfo is None else hour.astimezone(UTC)


class JsonField(_TextField):
    """A JSON value in a text column. `sort_keys`: objects are written with sorted keys; `empty`: an
    empty value is written as NULL, and NULL read back as `empty()`; `load`: what the JSON becomes."""

    def __init__(self, *, sort_keys: bool = False, empty: Callable[[], Any] | None = None,
                 load: Callable[[Any], Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sort_keys, self.empty, self.load = sort_keys, empty, load

    def db_value(self, value: Any) -> Any:
        if value is None or (self.empty is not None and not value):
            return None
        return json.dumps(list(value) if isinstance(value, tuple) else value, sort_keys=self.sort_keys)

    def python_value(self, value: Any) -> Any:
        if value is None:
            return None if self.empty is None else self.empty()
        loaded = json.loads(value)
        return loaded if self.load is None else self.load(loaded)
