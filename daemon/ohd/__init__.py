"""ohd: a local daemon that does development chores with LLMs in the background.

For scripts: `from ohd import Client` (see `ohd.cli.api`); the import is lazy, so `ohd status`
and the hooks do not pay for it.
"""

from __future__ import annotations

TYPE_CHECKING = False   # not `typing`'s: importing typing costs `ohd status` more than this module (issue 17)

if TYPE_CHECKING:
    from typing import Any

    from ohd.cli.api import Client

__version__ = "0.1.0"
__all__ = ["Client", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from ohd.cli.api import Client

        return Client
    raise AttributeError(f"module 'ohd' has no attribute {name!r}")
