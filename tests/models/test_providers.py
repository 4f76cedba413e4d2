"""Servers you run (Ollama, vLLM, LM Studio) through `base_url`: no key, no price, no OpenRouter quotas.

Against the fake OpenRouter (a real HTTP server on 127.0.0.1) standing in for a local
OpenAI-compatible server, with a real SQLite store; the last test runs a real daemon.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ohd.config import Settings, is_openrouter, load
from ohd.core.routing import refused
from ohd.core.tasktypes import Job
from ohd.errors import ConfigError
from ohd.models.catalogue import Catalogue
from ohd.models.llm import Completion, ModelClient
from ohd.service.assemble import policy_of
from ohd.service.live import Live
from ohd.store.store import Store
from ohd.work.worker import Pool
from tests.support.clock import FakeClock
from tests.support.fake_openrouter import Answer, FakeOpenRouter, ok, slow
from tests.support.governed import submit

OLLAMA = "http://127.0.0.1:11434/v1"
LOCAL_MODEL = "llama3.1:8b"          # an Ollama tag: no `:free`, no price anywhere
# What Ollama's OpenAI-compatible `GET /v1/models` answers: ids, no pricing.
OLLAMA_MODELS = Answer(json={"object": "list", "data": [
    {"id": LOCAL_MODEL, "object": "model", "created": 1767268800, "owned_by": "library"},
    {"id": "qwen2.5-coder:7b", "object": "model", "created": 1767268800, "owned_by": "library"}]})


class LocalServer(FakeOpenRouter):
    """The fake server answering `GET /models` as Ollama does."""

    def _catalogue(self) -> Answer:
        return OLLAMA_MODELS


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with LocalServer(models=[LOCAL_MODEL]) as fake:
        yield fake


def local_settings(url: str = OLLAMA, **env: str) -> Settings:
    return load(None, env={"OHD_BASE_URL": url, **env})


@pytest.mark.parametrize(("url", "expected"), [
    ("https://openrouter.ai/api/v1", True),
    ("https://OpenRouter.ai/api/v1/", True),
    ("https://eu.openrouter.ai/api/v1", True),
    (OLLAMA, False),
    ("http://localhost:1234/v1", False),                     # LM Studio
    ("http://gpu-box:8000/v1", False),                       # vLLM
    ("https://openrouter.ai.example.com/api/v1", False),     # not OpenRouter's host
])
def test_openrouter_is_recognised_by_its_host(url: str, expected: bool) -> None:
    assert is_openrouter(url) is expected
    assert local_settings(url).openrouter is expected


def test_provider_overrides_the_host() -> None:
    proxy = "https://llm-proxy.internal.example/api/v1"       # a proxy in front of OpenRouter
    assert not local_settings(proxy).openrouter
    assert local_settings(proxy, OHD_PROVIDER="openrouter").openrouter
    assert local_settings(proxy, OHD_PROVIDER="openrouter").use_offline      # OpenRouter: no key, offline
    assert not local_settings("https://openrouter.ai/api/v1", OHD_PROVIDER="self-hosted").openrouter
    with pytest.raises(ConfigError, match="provider"):
        local_settings(OHD_PROVIDER="ollama")


def test_without_a_key_openrouter_means_offline_but_a_server_you_run_does_not() -> None:
    assert load(None, env={}).use_offline                         # OpenRouter needs a key
    assert not load(None, env={"OPENROUTER_API_KEY": "sk-x"}).use_offline
    assert not local_settings().use_offline                       # Ollama needs none
    assert local_settings(OHD_OFFLINE="true").use_offline         # unless asked for


def test_strict_free_only_mode_refuses_an_unpriced_model_on_openrouter_but_not_on_a_server_you_run() -> None:
    openrouter = policy_of(load(None, env={"OPENROUTER_API_KEY": "sk-x"}))
    local = policy_of(local_settings())
    assert not openrouter.allow_paid and not local.allow_paid      # strict mode is on in both
    assert refused(LOCAL_MODEL, openrouter, {})                     # no `:free`, no price known: paid
    assert not refused(LOCAL_MODEL, local, {})                      # a server you run: costs nothing
    assert refused(LOCAL_MODEL, local, {LOCAL_MODEL: True})         # unless its list gives a price


def run_pool(store: Store, server: FakeOpenRouter, clock: FakeClock, repo: Path, settings: Settings,
             models: list[str]) -> tuple[list[int], Pool]:
    """A pool on the real ModelClient with no API key, the daemon's policy for `settings`; runs until idle."""

    async def main() -> tuple[list[int], Pool]:
        async with httpx.AsyncClient() as http:
            client = ModelClient(http, server.url, None, clock, retries=0)

            async def call(model: str, messages: list[dict[str, str]], timeout_s: float, job: Job) -> Completion:
                return await client.complete(model, messages, timeout_s)

            pool = Pool(store, call, clock, models=models, size=1, policy=policy_of(settings))
            ids = submit(store, repo, clock, n=3)
            await pool.run_until_idle()
            return ids, pool

    return asyncio.run(main())


def test_a_local_model_answers_without_a_key_and_is_not_paced_by_openrouters_free_quotas(
        repo: Path, store: Store, server: LocalServer, clock: FakeClock) -> None:
    settings = local_settings(server.url, OHD_FREE_RPM="1", OHD_FREE_RPD="1")   # would hold the 2nd request
    ids, pool = run_pool(store, server, clock, repo, settings, [LOCAL_MODEL])
    assert [store.get_task(i).status for i in ids] == ["completed"] * 3
    calls = server.completions()
    assert [r.model for r in calls] == [LOCAL_MODEL] * 3
    assert all("authorization" not in r.headers for r in calls)    # no key: no Authorization header
    [view] = pool.governor.views([LOCAL_MODEL], clock.now())
    assert (view.rpm, view.left_minute, view.left_today) == (None, None, None)


def test_rate_limits_still_pace_a_local_model(repo: Path, store: Store, server: LocalServer,
                                              clock: FakeClock) -> None:
    settings = local_settings(server.url, OHD_RATE_LIMITS=f'{{"{LOCAL_MODEL}": 1}}')
    ids, _pool = run_pool(store, server, clock, repo, settings, [LOCAL_MODEL])
    assert [store.get_task(i).status for i in ids] == ["completed", "pending", "pending"]
    assert len(server.completions()) == 1


def test_the_same_model_on_openrouter_without_a_price_is_refused(repo: Path, store: Store, server: LocalServer,
                                                                  clock: FakeClock) -> None:
    settings = load(None, env={"OPENROUTER_API_KEY": "sk-x"})     # base_url: OpenRouter's
    ids, _pool = run_pool(store, server, clock, repo, settings, [LOCAL_MODEL])
    task = store.get_task(ids[0])
    assert task.status == "failed" and "strict free-only mode" in (task.error or "")
    assert server.completions() == []


@pytest.mark.parametrize(("unknown_price_paid", "models", "priced"), [
    (False, [LOCAL_MODEL, "qwen2.5-coder:7b"], False),     # a server you run: its whole list
    (True, ["configured/model:free"], True),                # OpenRouter's rules: unpriced = paid, none free
])
def test_discovery_reads_an_ollama_model_list(store: Store, server: LocalServer, clock: FakeClock,
                                              unknown_price_paid: bool, models: list[str], priced: bool) -> None:
    async def main() -> Pool:
        async with httpx.AsyncClient() as http:
            client = ModelClient(http, server.url, None, clock, retries=0)

            async def call(model: str, messages: list[dict[str, str]], timeout_s: float, job: Job) -> Completion:
                return await client.complete(model, messages, timeout_s)

            pool = Pool(store, call, clock, models=["configured/model:free"], size=1)
            catalogue = Catalogue(client.list_models, pool.governor, clock, pool, discover=True,
                                  unknown_price_paid=unknown_price_paid, use_models=Live(pool).use_models)
            assert await catalogue.refresh()
            return pool

    pool = asyncio.run(main())
    assert pool.models == models
    assert pool.governor.priced == {LOCAL_MODEL: priced, "qwen2.5-coder:7b": priced}
    assert all("authorization" not in r.headers for r in server.requests)


def run_daemon_task(repo: Path, tmp_path: Path, server: FakeOpenRouter,
                    **env: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A real `ohd daemon` on `server` (no API key anywhere) runs one dropped task; (task, status)."""
    from tests.e2e.helpers import DaemonProcess, daemon_env
    from tests.support.waiting import wait_for

    daemon = DaemonProcess(daemon_env(tmp_path, Path(os.environ["OHD_RUNTIME_DIR"]), OHD_BASE_URL=server.url,
                                      OHD_MODELS=LOCAL_MODEL, OHD_TEST_RUNS="0", **env),
                           repo, tmp_path / "daemon.log").start()
    try:
        (repo / "tasks.d" / "t.yaml").write_text("type: unit_test\ntarget: shop/pricing.py\n")
        task = wait_for(lambda: (t := daemon.json("show", "1"))["status"] in ("completed", "failed") and t,
                        timeout=60, what="task 1 to finish")
        status = daemon.json("status")
    finally:
        assert daemon.stop() == 0
    return task, status


def test_a_real_daemon_with_a_local_base_url_and_no_key_asks_that_server(repo: Path, tmp_path: Path,
                                                                           server: LocalServer) -> None:
    """`ohd daemon` with only `base_url` set: the task is answered by the server's model, not by
    the offline provider, and no request carries an Authorization header."""
    task, status = run_daemon_task(repo, tmp_path, server)
    assert task["status"] == "completed", task
    assert [e["model"] for e in task["executions"]] == [LOCAL_MODEL]
    assert status["offline"] is False
    assert status["budget"] == {"requests_today": 1, "daily_request_cap": None, "cost_today": 0.0,
                                "daily_cost_cap_usd": None, "allow_paid": False, "paid_models": []}
    assert [r.model for r in server.completions()] == [LOCAL_MODEL]
    assert all("authorization" not in r.headers for r in server.requests)
    assert "no API key sent" in (tmp_path / "daemon.log").read_text()


def test_request_timeout_s_cuts_one_request_and_the_retry_answers(repo: Path, tmp_path: Path,
                                                                  server: LocalServer) -> None:
    """The first answer would come after 30 s: with request_timeout_s = 1 that request is
    given up and retried (without the limit the task would simply wait for it)."""
    server.script(LOCAL_MODEL, [slow(30.0)])
    task, _status = run_daemon_task(repo, tmp_path, server, OHD_REQUEST_TIMEOUT_S="1")
    assert task["status"] == "completed", task
    assert len(server.completions()) == 2


def test_auto_on_a_server_you_run_means_its_own_list_even_when_it_is_down_at_start(
        repo: Path, tmp_path: Path) -> None:
    """`models = ["auto"]`, the server unreachable when the daemon starts: no OpenRouter id is sent
    to it, the task waits (it does not fail) and runs on the server's own model once it is up."""
    from tests.e2e.helpers import DaemonProcess, daemon_env
    from tests.support.waiting import wait_for

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    log = tmp_path / "daemon.log"
    daemon = DaemonProcess(daemon_env(tmp_path, Path(os.environ["OHD_RUNTIME_DIR"]),
                                      OHD_BASE_URL=f"http://127.0.0.1:{port}/api/v1", OHD_MODELS="auto",
                                      OHD_TEST_RUNS="0"), repo, log).start()
    try:
        (repo / "tasks.d" / "t.yaml").write_text("type: unit_test\ntarget: shop/pricing.py\n")
        waiting = wait_for(lambda: (t := daemon.json("show", "1"))["status"] == "pending" and t,
                           what="task 1 to wait for the server")
        assert "list of models" in waiting["error"] and waiting["executions"] == []
        with LocalServer(models=[LOCAL_MODEL], port=port) as server:
            task = wait_for(lambda: (t := daemon.json("show", "1"))["status"] in ("completed", "failed") and t,
                            timeout=120, what="task 1 to run once the server is up")
            assert task["status"] == "completed", task
            assert {e["model"] for e in task["executions"]} <= {LOCAL_MODEL, "qwen2.5-coder:7b"}
            assert {r.model for r in server.completions()} <= {LOCAL_MODEL, "qwen2.5-coder:7b"}
    finally:
        assert daemon.stop() == 0
    ready = next(line for line in log.read_text().splitlines() if " ready: " in line)
    assert ":free" not in ready and "/models lists, once it answers" in ready


def test_an_answer_is_recorded_under_the_model_the_server_says_answered(
        repo: Path, store: Store, server: LocalServer, clock: FakeClock) -> None:
    body = dict(ok().json)
    server.default = Answer(json=body | {"model": "llama3.1:8b-instruct-q4_K_M"})
    ids, _pool = run_pool(store, server, clock, repo, local_settings(server.url), [LOCAL_MODEL])
    assert [store.get_task(i).status for i in ids] == ["completed"] * 3
    assert {e.model for i in ids for e in store.executions(i)} == {"llama3.1:8b-instruct-q4_K_M"}
