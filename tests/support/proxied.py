"""An agent's path to models for one test: the real pool (the `governed_call` means) with the real
ModelClient against the fake OpenRouter, on a real SQLite store, and the real agent proxy in front.

    async with Rig(store, server, clock, models=["m-a", "m-b"]) as rig:
        grant = rig.open()                       # one agent run's session (token)
        answer = await rig.post(grant.token, {"messages": [...]})

`rig.task` is the task the requests are filed under; `rig.http` a real HTTP client for the proxy. As
in the daemon, the requests are relayed whole (`ModelClient.relay`: tools, parameters, tool calls back);
`relay=False` sends only their text through the pool's caller (as offline).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

import httpx

from ohd.clock import Clock
from ohd.core.routing import Policy
from ohd.core.taskfile import TaskSpec
from ohd.core.tasktypes import Job
from ohd.models.llm import Completion, ModelClient
from ohd.models.proxy import Grant, Proxy
from ohd.store.store import Store, Task
from ohd.work.governed import governed_call
from ohd.work.worker import Pool
from tests.support.fake_openrouter import FakeOpenRouter

KEY = "sk-or-v1-proxytestsecret-9f3c2a7e"   # ohd's key for the fake server: nothing the agent gets may hold it
HELLO = [{"role": "system", "content": "You are a coding agent."}, {"role": "user", "content": "Say hello."}]


class Rig:
    """Store, fake server, pool and proxy for one test (an async context: the proxy runs in its loop)."""

    def __init__(self, store: Store, server: FakeOpenRouter, clock: Clock, models: list[str], *,
                 policy: Policy | None = None, hold_s: float = 1.0, repo: str = "/tmp/ohd-proxy-test-repo",
                 relay: bool = True) -> None:
        self.store, self.server, self.clock, self.models = store, server, clock, models
        self.relaying = relay
        self.policy = policy or Policy(free_rpm=None, free_rpd=None)
        self.hold_s = hold_s
        self.task_id = store.enqueue(repo, TaskSpec.model_validate(
            {"type": "unit_test", "target": "shop/pricing.py", "output": "tests/test_p.py"}), clock.now())
        self.proxy = Proxy(clock)

    @property
    def task(self) -> Task:
        return self.store.get_task(self.task_id)

    async def __aenter__(self) -> Self:
        self._upstream = httpx.AsyncClient()
        client = ModelClient(self._upstream, self.server.url, KEY, self.clock, retries=0)

        async def call(model: str, messages: list[dict[str, str]], timeout_s: float, job: Job) -> Completion:
            return await client.complete(model, messages, timeout_s)

        self.relay = client.relay if self.relaying else None
        self.pool = Pool(self.store, call, self.clock, models=self.models, size=1, policy=self.policy,
                         hold_s=self.hold_s)
        await self.proxy.start()
        self.http = httpx.AsyncClient(base_url=self.proxy.base_url, timeout=30)
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.http.aclose()
        await self.proxy.stop()
        await self._upstream.aclose()

    def open(self, models: list[str] | None = None) -> Grant:
        """A session whose requests go through `governed_call` for the rig's task."""
        candidates = list(models or self.models)
        task = self.task

        async def forward(messages: list[dict[str, Any]], params: dict[str, Any]) -> Completion:
            return await governed_call(self.pool, task, candidates, messages, params, 30.0, relay=self.relay)

        return self.proxy.open(forward, candidates)

    async def post(self, token: str | None, body: Any, path: str = "/chat/completions",
                   headers: dict[str, str] | None = None) -> httpx.Response:
        sent = dict(headers or {})
        if token is not None:
            sent.setdefault("authorization", f"Bearer {token}")
        if isinstance(body, bytes):
            return await self.http.post(path, content=body, headers=sent)
        return await self.http.post(path, json=body, headers=sent)
