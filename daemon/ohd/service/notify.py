"""sd_notify: tell systemd (or anything listening on `NOTIFY_SOCKET`) how the daemon is.

The protocol is one datagram per message on an AF_UNIX socket, newline-separated
`KEY=value` fields (READY=1, STOPPING=1, RELOADING=1, STATUS=..., WATCHDOG=1). A name
starting with `@` is an abstract socket. Without an address every call is a no-op, so
the daemon runs the same with or without systemd. Sending never raises: a supervisor
that went away must not take the daemon with it (the failure is logged once).

This module reads no environment: the daemon passes `NOTIFY_SOCKET`, `WATCHDOG_USEC`
and `WATCHDOG_PID` in as values.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from ohd.clock import Clock, first

log = logging.getLogger("ohd.notify")


def watchdog_interval(usec: str | None, pid: str | None, own_pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of `WATCHDOG_USEC`), or None for no watchdog.

    None when the timeout is unset, not a positive integer, or meant for another process
    (`WATCHDOG_PID` set and not ours).
    """
    if not usec:
        return None
    if pid and (not pid.strip().isdigit() or int(pid) != own_pid):
        return None
    try:
        micros = int(usec)
    except ValueError:
        return None
    return micros / 2_000_000 if micros > 0 else None


def one_line(text: str, limit: int = 200) -> str:
    """A STATUS value: no newlines (they would start a new field), at most `limit` chars."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class Notifier:
    """Sends sd_notify messages to `address` (a path, or `@name` for an abstract socket)."""

    def __init__(self, address: str | None) -> None:
        self.address = _sockaddr(address) if address else None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """One datagram with these `KEY=value` fields; False when disabled or not delivered."""
        if self.address is None or not fields:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # never wait (as systemd's own sd_notify): a listener that stopped reading must
                # not hold the event loop; a full queue drops this message like any failure
                sock.sendto("\n".join(fields).encode(), socket.MSG_DONTWAIT, self.address)
        except OSError as exc:
            if not self._failed:
                log.warning("sd_notify to %r failed: %s (further failures are not logged)",
                            self.address, exc.strerror or exc)
            self._failed = True
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={one_line(status)}"] if status else []))

    def reloading(self, monotonic_usec: int) -> bool:
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")

    def stopping(self, status: str = "") -> bool:
        return self.send("STOPPING=1", *([f"STATUS={one_line(status)}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={one_line(text)}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    async def keep_alive(self, stop: asyncio.Event, interval: float, clock: Clock) -> None:
        """WATCHDOG=1 every `interval` seconds until `stop`; runs on the event loop, so a
        stalled loop stops the pings and systemd restarts the daemon."""
        while not stop.is_set():
            self.watchdog()
            await first(clock, stop, timeout=interval)


def _sockaddr(address: str) -> str:
    """`@name` → the abstract name (leading NUL); anything else is a filesystem path."""
    return "\0" + address[1:] if address.startswith("@") else address
