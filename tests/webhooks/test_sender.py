"""The webhook sender against a real HTTP receiver on 127.0.0.1, a real store and a fake clock."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from ohd.clock import SystemClock
from ohd.core import events
from ohd.core.events import Hook
from ohd.core.taskfile import TaskSpec
from ohd.store.outbox import Outbox
from ohd.store.quotas import Governor
from ohd.store.store import Store, TaskStatus
from ohd.webhooks import sender
from ohd.webhooks.sender import Retry, Sender, Target
from pydantic import SecretStr

from tests.support.clock import FakeClock
from tests.support.databases import open_store
from tests.support.receiver import Receiver

LEASE = timedelta(seconds=60)
SECRET = "s3cret-for-tests"
RETRY = Retry(first_s=10, max_s=60, max_age=timedelta(minutes=10), timeout_s=5)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def other() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def with_hooks(store: Store, *targets: Target) -> Store:
    store.hooks = tuple(Hook(t.key, frozenset(events.EVENTS)) for t in targets)
    return store


class Rounds:
    """The sender stepped from a plain test: each `run_once` is one round on its own event loop."""

    def __init__(self, store: Store, clock: FakeClock, targets: list[Target], rng: random.Random | None = None) -> None:
        self.args = (Outbox(store.db), clock, targets, RETRY, rng)

    def run_once(self) -> int:
        async def round_() -> int:
            outbox, clock, targets, retry, rng = self.args
            async with sender.http_client() as http:
                return await Sender(outbox, http, clock, targets, retry, rng).run_once()

        return asyncio.run(round_())


def finish(store: Store, clock: FakeClock, status: TaskStatus = TaskStatus.COMPLETED, **kw: Any) -> int:
    store.enqueue("/repo", TaskSpec.model_validate({"type": "unit_test", "target": "src/a.py"}), clock.now())
    claim = store.claim_next("w1", clock.now(), LEASE)
    assert claim is not None
    assert store.finish(claim.task.id, "w1", status, clock.now(), **kw)
    return claim.task.id


def test_every_event_is_delivered_once_signed(store: Store, clock: FakeClock, receiver: Receiver) -> None:
    target = Target(receiver.url, secret=SecretStr(SECRET))
    with_hooks(store, target)
    done = finish(store, clock, output_path="tests/test_a.py")
    failed = finish(store, clock, TaskStatus.FAILED, error="rejected")
    Governor(store).rate_limited("m:free", clock.now() + timedelta(seconds=30), 20, clock.now())
    s = Rounds(store, clock, [target])
    assert s.run_once() == 3
    assert s.run_once() == 0
    got = receiver.delivered()
    assert sorted(r.event for r in got) == sorted([events.TASK_COMPLETED, events.TASK_FAILED, events.MODEL_COOLDOWN])
    assert all(r.signed_with(SECRET) for r in got)
    assert not any(r.signed_with("another secret") for r in got)
    assert len({r.delivery for r in got}) == 3
    by_event = {r.event: r.json for r in got}
    assert by_event[events.TASK_COMPLETED]["data"]["id"] == done
    assert by_event[events.TASK_FAILED]["data"] | {"id": failed} == by_event[events.TASK_FAILED]["data"]
    assert by_event[events.MODEL_COOLDOWN]["data"]["model"] == "m:free"
    assert all(r.json["id"] == r.delivery and r.json["event"] == r.event for r in got)
    assert got[0].headers["content-type"] == "application/json"


def test_no_secret_no_signature(store: Store, clock: FakeClock, receiver: Receiver) -> None:
    target = Target(receiver.url)
    with_hooks(store, target)
    finish(store, clock)
    Rounds(store, clock, [target]).run_once()
    assert "x-ohd-signature" not in receiver.delivered()[0].headers


def test_a_receiver_down_gets_the_event_after_it_comes_back(store: Store, clock: FakeClock,
                                                                  receiver: Receiver) -> None:
    target = Target(receiver.url)
    with_hooks(store, target)
    finish(store, clock)
    receiver.stop()
    s = Rounds(store, clock, [target], random.Random(1))
    assert s.run_once() == 1                      # refused: tried again later
    [view] = Outbox(store.db).summary([target.key])
    assert view["pending"] == 1 and "ConnectError" in view["last_error"]
    clock.advance(4.9)                                  # the first backoff is 5 to 10 s
    assert s.run_once() == 0
    receiver.start()                                     # the same port again
    clock.advance(5.1)
    assert s.run_once() == 1
    assert [r.event for r in receiver.delivered()] == [events.TASK_COMPLETED]
    assert Outbox(store.db).summary([target.key])[0]["delivered"] == 1


def test_a_failing_hook_ends_dead_at_the_bound_and_never_holds_another(
        store: Store, clock: FakeClock, receiver: Receiver, other: Receiver) -> None:
    bad, good = Target(receiver.url), Target(other.url)
    receiver.answer = 500
    with_hooks(store, bad, good)
    first_task = finish(store, clock)
    s = Rounds(store, clock, [bad, good], random.Random(2))
    o = store.m.webhook_outbox
    for _ in range(100):
        s.run_once()
        if o.select().where(o.dead_at.is_null(False)).exists():
            break
        clock.advance(30)
        finish(store, clock)                             # tasks go on ending while the hook fails
    [view] = Outbox(store.db).summary([bad.key])
    assert view["dead"] >= 1 and view["last_error"] == "HTTP 500: no"
    dead = o.select().where(o.dead_at.is_null(False)).order_by(o.id).first()
    assert (dead.task_id, dead.hook) == (first_task, bad.key)
    assert dead.dead_at - dead.created_at >= RETRY.max_age    # dead only at the bound, not before
    assert len(receiver.tried()) > 5                          # tried again and again until then
    ended = store.counts()["completed"]
    assert ended > 15
    assert sorted(r.json["data"]["id"] for r in other.delivered()) == list(range(1, ended + 1))   # each once


def test_a_task_s_events_arrive_in_order(store: Store, clock: FakeClock, receiver: Receiver) -> None:
    target = Target(receiver.url)
    with_hooks(store, target)
    task_id = finish(store, clock, TaskStatus.FAILED, error="x")
    receiver.answer = 500
    s = Rounds(store, clock, [target], random.Random(3))
    s.run_once()                                   # the failure event is refused
    store.retry(task_id, clock.now())
    assert store.claim_next("w1", clock.now(), LEASE) is not None
    store.finish(task_id, "w1", TaskStatus.COMPLETED, clock.now())
    receiver.answer = 200
    for _ in range(3):
        s.run_once()                               # the completion may not overtake the failure
        clock.advance(60)
    assert [r.event for r in receiver.delivered()] == [events.TASK_FAILED, events.TASK_COMPLETED]


@pytest.mark.parametrize(("fmt", "key"), [("slack", "text"), ("discord", "content")])
def test_chat_formats(store: Store, clock: FakeClock, receiver: Receiver, fmt: str,
                            key: str) -> None:
    target = Target(receiver.url, fmt)
    with_hooks(store, target)
    task_id = finish(store, clock, output_path="tests/test_a.py")
    Rounds(store, clock, [target]).run_once()
    [body] = [r.json for r in receiver.delivered()]
    assert list(body) == [key] and f"task {task_id}" in body[key] and "tests/test_a.py" in body[key]


def test_a_hanging_hook_does_not_delay_another(tmp_path: Path, receiver: Receiver) -> None:
    """A hook that accepts the connection and never answers waits out its timeout alone: the other
    hook's event is delivered while the hung one's request is still open (not failed yet)."""
    asyncio.run(hanging_hook(tmp_path, receiver))


async def hanging_hook(tmp_path: Path, receiver: Receiver) -> None:
    store = open_store(tmp_path / "ohd.db")
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(8)
    held: list[socket.socket] = []        # connections accepted and never read or answered

    def hold() -> None:
        while True:
            try:
                held.append(hole.accept()[0])
            except OSError:
                return
    threading.Thread(target=hold, daemon=True).start()
    hang, good = Target(f"http://127.0.0.1:{hole.getsockname()[1]}/hook"), Target(receiver.url)
    clock = SystemClock()
    with_hooks(store, hang, good)
    stop = asyncio.Event()
    async with sender.http_client() as http:
        s = Sender(Outbox(store.db), http, clock, [hang, good], Retry(timeout_s=600))
        running = asyncio.ensure_future(s.run(stop))
        finish(store, FakeClock(clock.now()))
        began = time.monotonic()
        while True:     # the receiver has it, and the sender has recorded the delivery (after the answer)
            views = {v["key"]: v for v in Outbox(store.db).summary([hang.key, good.key])}
            if held and receiver.delivered() and views[good.key]["delivered"]:
                break
            await asyncio.sleep(0.05)          # a hang bound far below the hung hook's 600 s timeout
            assert time.monotonic() - began < 300, ("the good hook was not delivered", views)
        stop.set()
        running.cancel()
    for conn in held:
        conn.close()
    hole.close()
    assert views[hang.key]["pending"] == 1 and views[hang.key]["last_error"] is None, views   # still waiting
    assert views[good.key]["delivered"] == 1, views
    assert json.loads(receiver.delivered()[0].body)["event"] == events.TASK_COMPLETED


def test_each_hook_keeps_its_own_backoff(store: Store, clock: FakeClock, receiver: Receiver,
                                         other: Receiver) -> None:
    slow = Target(receiver.url, retry=Retry(first_s=1000, max_s=1000, max_age=timedelta(hours=1), timeout_s=5))
    quick = Target(other.url, retry=Retry(first_s=4, max_s=4, max_age=timedelta(hours=1), timeout_s=5))
    receiver.answer = other.answer = 500
    with_hooks(store, slow, quick)
    finish(store, clock)
    s = Rounds(store, clock, [slow, quick], random.Random(4))     # the sender's own: RETRY, 10 s first
    assert s.run_once() == 2
    clock.advance(4.5)                   # past quick's backoff (2 to 4 s), before the sender's and slow's
    assert s.run_once() == 1
    assert (len(receiver.tried()), len(other.tried())) == (1, 2)
    clock.advance(60)                    # past the sender's 5-10 s, before slow's 500-1000 s
    s.run_once()
    assert len(receiver.tried()) == 1


def test_a_hook_with_a_short_timeout_of_its_own_gives_up_on_a_hung_receiver(tmp_path: Path) -> None:
    asyncio.run(own_timeout(tmp_path))


async def own_timeout(tmp_path: Path) -> None:
    store = open_store(tmp_path / "ohd.db")
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(8)                       # accepted by the kernel, never answered
    hung = Target(f"http://127.0.0.1:{hole.getsockname()[1]}/hook", retry=Retry(timeout_s=0.5))
    with_hooks(store, hung)
    clock = SystemClock()
    finish(store, FakeClock(clock.now()))
    try:
        async with sender.http_client() as http:
            s = Sender(Outbox(store.db), http, clock, [hung], Retry(timeout_s=600))
            assert await asyncio.wait_for(s.run_once(), timeout=120) == 1    # a hang bound far below 600 s
    finally:
        hole.close()
    [view] = Outbox(store.db).summary([hung.key])
    assert view["pending"] == 1 and "Timeout" in view["last_error"], view


def test_the_hooks_change_while_the_sender_runs(tmp_path: Path, receiver: Receiver, other: Receiver) -> None:
    asyncio.run(hooks_change(tmp_path, receiver, other))


async def hooks_change(tmp_path: Path, receiver: Receiver, other: Receiver) -> None:
    store = open_store(tmp_path / "ohd.db")
    old, new = Target(receiver.url), Target(other.url, "slack")
    clock = SystemClock()

    async def until(what: str, done: Any) -> None:
        began = time.monotonic()
        while not done():
            await asyncio.sleep(0.05)
            assert time.monotonic() - began < 120, what

    with_hooks(store, old)
    stop = asyncio.Event()
    async with sender.http_client() as http:
        s = Sender(Outbox(store.db), http, clock, [old], RETRY)
        running = asyncio.ensure_future(s.run(stop))
        first_task = finish(store, FakeClock(clock.now()))
        await until("the old hook's event", lambda: receiver.delivered())
        with_hooks(store, new)           # as a SIGHUP does: the store's hooks, then the sender's
        s.use([new])
        await until("the old hook's loop gone and the new one's running", lambda: s.running == {new})
        second_task = finish(store, FakeClock(clock.now()))
        await until("the new hook's event", lambda: other.delivered())
        stop.set()
        await asyncio.wait_for(running, timeout=60)
    assert [r.json["data"]["id"] for r in receiver.delivered()] == [first_task]
    assert [r.json for r in other.delivered()] and f"task {second_task}" in other.delivered()[0].json["text"]
    assert s.running == frozenset()
