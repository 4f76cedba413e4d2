"""Webhook events as values: their names, a hook's key and label, the body a receiver gets, its
signature, and when a failed delivery is tried again.

Pure: the store writes events (`store/outbox.py`) in the transaction of the state change that
causes them, `webhooks/sender.py` sends them; both ask this room what an event looks like on the
wire. No I/O, no clock, no randomness of its own (the jitter's random number is passed in).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

TASK_COMPLETED = "task.completed"
TASK_FAILED = "task.failed"
TASK_QUARANTINED = "task.quarantined"   # completed without an output: its tests fail against the code
MODEL_COOLDOWN = "model.cooldown"
QUOTA_EXHAUSTED = "quota.exhausted"
EVENTS = (TASK_COMPLETED, TASK_FAILED, TASK_QUARANTINED, MODEL_COOLDOWN, QUOTA_EXHAUSTED)
FORMATS = ("json", "slack", "discord")


@dataclass(frozen=True, slots=True)
class Hook:
    """A configured hook as the store sees it: its key (the outbox rows name it) and the events it takes."""

    key: str
    events: frozenset[str]


def hook_key(url: str) -> str:
    """A hook's stable name in the outbox: a digest of its URL (Slack's and Discord's URLs hold a token
    in their path, so the URL itself is neither stored nor shown)."""
    return hashlib.sha256(url.encode()).hexdigest()[:12]


def hook_label(url: str) -> str:
    """The URL as `ohd status` shows it: scheme and host only, then the key."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}/... ({hook_key(url)})"


def envelope(delivery: int, event: str, created_at: str, data: dict[str, Any]) -> dict[str, Any]:
    """The JSON body of the `json` format: the delivery id (also `X-Ohd-Delivery`), the event, when it
    happened and what it is about."""
    return {"id": str(delivery), "event": event, "created_at": created_at, "data": data}


def body(delivery: int, event: str, created_at: str, data: dict[str, Any], fmt: str = "json") -> bytes:
    """The raw bytes sent (and signed): the envelope, or Slack's `{"text"}` / Discord's `{"content"}`."""
    payload: dict[str, Any]
    if fmt == "slack":
        payload = {"text": summary(event, data)}
    elif fmt == "discord":
        payload = {"content": summary(event, data)}
    else:
        payload = envelope(delivery, event, created_at, data)
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def summary(event: str, data: dict[str, Any]) -> str:
    """One line a person reads in a chat channel."""
    if event.startswith("task."):
        what = f"ohd: task {data.get('id')} ({data.get('type')} {data.get('target')}) {event.split('.', 1)[1]}"
        detail = data.get("output_path") if event == TASK_COMPLETED else data.get("error")
        return f"{what}: {detail}" if detail else what
    if event == MODEL_COOLDOWN:
        return f"ohd: model {data.get('model')} cools down until {data.get('until')}"
    return f"ohd: {data.get('quota')} of {data.get('model')} used up; resets at {data.get('resets_at')}"


def signature(raw: bytes, secret: str) -> str:
    """`X-Ohd-Signature`: `sha256=` and the hex HMAC-SHA256 of the raw body with the hook's secret."""
    return "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()


def backoff_s(attempts: int, initial_s: float, max_s: float, jitter: float) -> float:
    """Seconds before try `attempts + 1`, after `attempts` failed ones: exponential (initial_s, doubled
    per failure, at most max_s) with "equal jitter": half of it fixed, half scaled by `jitter` (a
    random number in [0, 1) the caller draws), so receivers that failed together are not retried in step."""
    delay = min(max_s, initial_s * 2.0 ** max(0, attempts - 1))
    return delay / 2 + delay / 2 * jitter


def sample(event: str, at: str) -> dict[str, Any]:
    """The data of `ohd webhooks test`'s event (`"sample": true`; task id 0, which no task has)."""
    if event.startswith("task."):
        return {"sample": True, "id": 0, "repo": "/path/to/repo", "type": "unit_test", "target": "src/app/example.py",
                "runner": "llm", "status": "failed" if event == TASK_FAILED else "completed",
                "quarantined": event == TASK_QUARANTINED, "attempts": 1,
                "error": None if event == TASK_COMPLETED else "a sample error", "created_at": at, "finished_at": at,
                "output_path": "tests/test_example.py" if event == TASK_COMPLETED else None, "report_path": None}
    if event == MODEL_COOLDOWN:
        return {"sample": True, "model": "example/model:free", "until": at, "rpm_limit": 20}
    return {"sample": True, "model": "example/model:free", "quota": "daily requests", "resets_at": at}
