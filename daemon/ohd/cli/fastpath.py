"""The read-only commands' settings, remembered: where the socket and the database are, without
building the settings model (importing pydantic and validating was most of `ohd status`).

`ohd status`, `ohd tasks` and `ohd show` need two values of the settings: the socket and the
database. The first time under given inputs they build the full settings (`ohd.config.load`)
and `remember` what they need, with the warnings it gave, under a digest of everything the
settings are a function of: the config file's path and bytes, every `OHD_*` variable, the
platformdirs defaults (state and runtime dir, computed here as `ohd.config` computes them), and
the code that validates (ohd's version, the size and mtime of `config.py` and its helpers). The
next run computes the digest again and `recall`s them if it matches: the same inputs give the
same settings, so the answers, warnings and exit codes are the full path's. Any difference,
a file that cannot be read, or a configuration that does not validate (never remembered) goes
the full path, which says what is wrong as always.

The entry is one small JSON file per config path in `<user cache dir>/ohd/cli/` (0600, written
whole: temp file, rename); a database URL holding a password is not written down (those
commands then take the full path). Losing the folder costs one slow run, nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from ohd import __version__, userdirs

FORMAT = 1
_PACKAGE = Path(__file__).resolve().parent.parent
# the code the settings are a function of: when it changes, every entry is stale
_CODE = ("config.py", "userdirs.py", "core/layout.py", "cli/fastpath.py")


# Plain classes: a dataclass imports `inspect`, a NamedTuple `typing`, each more than this module costs.
class Inputs:
    """What the settings of one run are a function of, as a digest; `slot` is where its entry lives."""

    __slots__ = ("slot", "digest")

    def __init__(self, slot: Path, digest: str) -> None:
        self.slot = slot
        self.digest = digest

    def same(self, other: Inputs | None) -> bool:
        return other is not None and (other.slot, other.digest) == (self.slot, self.digest)


class Known:
    """The remembered values: the socket, the database (None: not written down), the warnings."""

    __slots__ = ("socket_path", "database", "store_lock_wait_s", "warnings")

    def __init__(self, socket_path: Path, database: str | None, store_lock_wait_s: float,
                 warnings: tuple[str, ...]) -> None:
        self.socket_path = socket_path
        self.database = database
        self.store_lock_wait_s = store_lock_wait_s
        self.warnings = warnings


def inputs(config: Path | None, env: Mapping[str, str]) -> Inputs | None:
    """The digest of this run's inputs; None when the config file cannot be read (full path)."""
    path = config or userdirs.config_path(env)
    try:
        data, state = path.read_bytes(), "file"
    except FileNotFoundError:
        data, state = b"", "required-missing" if config is not None else "absent"
    except OSError:
        return None
    digest = hashlib.sha256()
    for part in (f"ohd-cli-settings {FORMAT} {__version__}", *_code_stamps(), str(path), state,
                 str(userdirs.state_dir()), str(userdirs.runtime_dir()),
                 json.dumps(sorted((k, v) for k, v in env.items() if k.startswith("OHD_")))):
        digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
    digest.update(data)
    name = hashlib.sha256(os.fsencode(str(path))).hexdigest()[:32]
    return Inputs(slot=userdirs.cache_dir() / "cli" / f"{name}.json", digest=digest.hexdigest())


def _code_stamps() -> list[str]:
    stamps = []
    for name in _CODE:
        try:
            info = (_PACKAGE / name).stat()
        except OSError:
            stamps.append(f"{name} -")
            continue
        stamps.append(f"{name} {info.st_size} {info.st_mtime_ns}")
    return stamps


def recall(found: Inputs | None) -> Known | None:
    """The values remembered under these inputs, or None (not remembered, stale, unreadable)."""
    if found is None:
        return None
    try:
        entry = json.loads(found.slot.read_bytes())
        if entry.get("digest") != found.digest:
            return None
        database = entry["database"]
        return Known(socket_path=Path(entry["socket"]), database=database if isinstance(database, str) else None,
                     store_lock_wait_s=float(entry["store_lock_wait_s"]),
                     warnings=tuple(str(w) for w in entry["warnings"]))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def remember(found: Inputs | None, after: Inputs | None, known: Known) -> None:
    """Write `known` down under `found` if the inputs did not change while the settings were built
    (`after`, computed again then). Best effort: a folder that cannot be written is no error."""
    if found is None or not found.same(after):
        return
    database = known.database
    if database is not None and _has_password(database):
        database = None
    entry = {"digest": found.digest, "socket": str(known.socket_path), "database": database,
             "store_lock_wait_s": known.store_lock_wait_s, "warnings": list(known.warnings)}
    temp = found.slot.with_name(f".{found.slot.name}.{os.getpid()}.tmp")
    try:
        found.slot.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(entry, handle)
        os.replace(temp, found.slot)
    except OSError:
        temp.unlink(missing_ok=True)


def _has_password(url: str) -> bool:
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).password is not None
    except ValueError:
        return True
