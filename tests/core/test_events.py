"""Webhook events on the wire: bodies, signatures, labels, backoff (pure)."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from ohd.core import events


def test_the_signature_is_the_hmac_sha256_of_the_raw_body() -> None:
    raw = events.body(7, events.TASK_COMPLETED, "2026-01-01T00:00:00+00:00", {"id": 3})
    assert events.signature(raw, "k") == "sha256=" + hmac.new(b"k", raw, hashlib.sha256).hexdigest()
    assert json.loads(raw) == {"id": "7", "event": "task.completed", "created_at": "2026-01-01T00:00:00+00:00",
                               "data": {"id": 3}}


def test_a_label_shows_no_path_nor_credentials() -> None:
    url = "https://user:pw@hooks.slack.com/services/T000/B000/XXXXSECRET"
    label = events.hook_label(url)
    assert label == f"https://hooks.slack.com/... ({events.hook_key(url)})"


@pytest.mark.parametrize("attempts", [1, 2, 3, 8, 30])
def test_backoff_doubles_within_its_jitter_and_its_cap(attempts: int) -> None:
    nominal = min(60.0, 5.0 * 2 ** (attempts - 1))
    low, high = events.backoff_s(attempts, 5.0, 60.0, 0.0), events.backoff_s(attempts, 5.0, 60.0, 0.999999)
    assert low == nominal / 2 and nominal / 2 < high <= nominal


@pytest.mark.parametrize("event", events.EVENTS)
def test_every_event_has_a_chat_line(event: str) -> None:
    data = events.sample(event, "2026-01-01T00:00:00+00:00")
    text = json.loads(events.body(0, event, "t", data, "slack"))["text"]
    assert text.startswith("ohd") and "None" not in text
