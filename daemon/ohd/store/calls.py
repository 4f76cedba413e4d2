"""The local history of model calls: each call's prompt and response, size-capped.

An edge room beside `store`, on the same database (table `model_call` of `schema`, migration
`0005_model_call`). The worker records a call right after the model answered; `ohd show
ID --calls` reads them back (the daemon may be down). The prompt is the messages sent;
the API key travels in a header, never in a message, so it is never stored here.

Invariant: a call's `pending` (JSON: its usage and the hash of the source it was asked about,
migration `0008_crash_recovery`) is set while its answer has no verdict yet, and cleared in the
transaction that records that verdict (`Store.record_execution(counts=True)`) or ends the task;
so a pending call after a crash is an answer received and never judged, which the worker judges
instead of asking again. A response cut by the size cap is never pending (it cannot be judged).

The replay cache reads the same rows: a call stored whole keeps its `request_key`
(`request_key(model, messages, params)`), and `replay(key)` gives back the answer of the newest
call with that key that got a verdict, if that verdict was `accepted` (a rejected, malformed or
unjudged answer is never replayed: the next request with that key asks the model anew). A replayed
answer is a call row of its own (`replay_of` names the call it replays), so `ohd show --calls` marks
it and its own verdict is the key's newest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import peewee

from ohd.store import schema
from ohd.store.transactions import atomic_write, connect

DEFAULT_MAX_BYTES = 200_000
MARKER = "\n[... truncated by ohd: {omitted} more bytes]"


def cap(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` UTF-8 bytes, with a marker saying how much was cut."""
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    return raw[:max_bytes].decode("utf-8", "ignore") + MARKER.format(omitted=len(raw) - max_bytes)


def render(messages: Sequence[dict[str, str]]) -> str:
    """The chat messages as text: `[role]` then the content, a blank line between them."""
    return "\n\n".join(f"[{m.get('role', '?')}]\n{m.get('content', '')}" for m in messages)


def request_key(model: str, messages: Sequence[Mapping[str, str]], params: Mapping[str, Any]) -> str:
    """The replay cache's key of a request: the SHA-256 of the model asked, the messages (every
    role and text, so the target's text, the feedback and the context are in it) and the request's
    other parameters (`params`: the server, max_tokens, temperature), as canonical JSON."""
    body = {"model": model, "messages": [{"role": m.get("role", ""), "content": m.get("content", "")}
                                         for m in messages], "params": dict(params)}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Replay:
    """An accepted answer the replay cache gives back: its call's id, who answered, the response."""

    call_id: int
    model: str
    response: str


class CallHistory:
    """Writes and reads `model_call` rows; `enabled=False` records nothing."""

    def __init__(self, db: peewee.Database, max_bytes: int = DEFAULT_MAX_BYTES, enabled: bool = True) -> None:
        self.db = db
        self.max_bytes = max_bytes
        self.enabled = enabled
        self.row = schema.bind(db).model_call

    def record(self, task_id: int, model: str, started: datetime, messages: Sequence[dict[str, str]],
               response: str, pending: Mapping[str, Any] | None = None, *, key: str | None = None,
               replay_of: int | None = None) -> None:
        """One call; `pending`: what rebuilds the answer for a verdict after a crash, and `key`: its
        replay cache key (both kept only when the response is stored whole); `replay_of`: the call
        whose answer this one replays (no request was sent)."""
        if not self.enabled:
            return
        stored = cap(response, self.max_bytes)
        whole = stored == response
        # one attempt, within SQLite's busy timeout: the call history is given the database alone,
        # not the store's wait for another writer (`Store.lock_wait_s`)
        with atomic_write(self.db, wait_s=0):
            self.row.insert(task_id=task_id, model=model, started_at=started,
                            prompt=cap(render(messages), self.max_bytes), response=stored,
                            pending=pending if whole else None, request_key=key if whole else None,
                            replay_of=replay_of).execute()

    def replay(self, key: str) -> Replay | None:
        """The answer to replay for a request of `key`: that of the newest call with this key that got
        a verdict, if it was accepted; None otherwise (never answered, or rejected: ask anew) and
        when the call history is off."""
        if not self.enabled:
            return None
        connect(self.db)
        c, e = self.row, schema.bind(self.db).execution
        row = (c.select(c.id, c.model, c.response, e.outcome).join(e, on=(c.execution_id == e.id))
               .where(c.request_key == key).order_by(c.id.desc()).tuples().first())
        if row is None or row[3] != "accepted":
            return None
        return Replay(call_id=int(row[0]), model=str(row[1]), response=str(row[2]))

    def pending_answer(self, task_id: int) -> tuple[str, dict[str, Any]] | None:
        """The task's latest answer that has no verdict yet (response, pending), or None (none, or
        the call history is off)."""
        if not self.enabled:
            return None
        connect(self.db)
        r = self.row
        row = r.select().where((r.task_id == task_id) & r.pending.is_null(False)).order_by(r.id.desc()).first()
        return None if row is None else (row.response, row.pending)

    def for_task(self, task_id: int) -> list[dict[str, Any]]:
        """The task's calls, oldest first."""
        connect(self.db)
        r = self.row
        rows = r.select().where(r.task_id == task_id).order_by(r.started_at, r.id)
        return [{"id": row.id, "model": row.model, "started_at": str(row.started_at), "prompt": row.prompt,
                 "response": row.response, "replay_of": row.replay_of} for row in rows]


def calls_text(calls: Sequence[dict[str, Any]]) -> str:
    if not calls:
        return "no recorded calls (call_history off, or the task made none)"
    parts = []
    for n, call in enumerate(calls, 1):
        replayed = (f" (replayed from the call history, call id {call['replay_of']}: no request sent)"
                    if call.get("replay_of") is not None else "")
        parts.append(f"=== call {n}: {call['model']} at {call['started_at']}{replayed} ===\n"
                     f"--- prompt ---\n{call['prompt']}\n"
                     f"--- response ---\n{call['response']}")
    return "\n\n".join(parts)
