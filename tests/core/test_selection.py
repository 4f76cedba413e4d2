"""Model selection: the pure score, and the selector on a real store, in the pool and in the CLI.

The pure part is checked component by component (weights, shrinkage toward priors,
specialization, exploration with a seeded Random). Then a real SQLite store where model
A's results validate and model B's are rejected: the ranking prefers A, the pool sends
`auto` tasks to A first (the real ModelClient against the fake OpenRouter server), an
explicit model list keeps its order, and `ohd select-model --json` shows the ranking.
"""

from __future__ import annotations

import asyncio
import json
import random
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from ohd.cli.commands import main
from ohd.config import load
from ohd.core import selection
from ohd.core.selection import Config, Measured, Prior
from ohd.core.taskfile import TaskSpec
from ohd.core.tasktypes import Job
from ohd.models.llm import Completion, ModelClient
from ohd.service.assemble import ranker, selection_of
from ohd.store.history import History
from ohd.store.store import Store
from ohd.work.worker import Pool
from tests.support.clock import FakeClock
from tests.support.fake_openrouter import FakeOpenRouter, ok
from tests.support.governed import GOOD

BAD = """```python
x = 1
```"""     # no test function: the validator rejects it
NO_EXPLORING = Config(epsilon=0.0)


# -- the pure score -------------------------------------------------------------------------


def test_the_weights_sum_to_one_and_a_perfect_model_scores_one() -> None:
    assert sum(selection.WEIGHTS.values()) == pytest.approx(1.0)
    assert selection.weighted(1, 1, 1, 1) == pytest.approx(1.0)
    assert selection.weighted(1, 0, 0, 0) == pytest.approx(0.4)
    assert selection.weighted(0, 1, 0, 0) == pytest.approx(0.3)
    assert selection.weighted(0, 0, 1, 0) == pytest.approx(0.2)
    assert selection.weighted(0, 0, 0, 1) == pytest.approx(0.1)


def test_a_model_without_history_scores_its_prior_and_the_default_prior_is_neutral() -> None:
    plain = selection.score("m", "unit_test", Measured(), Config())
    assert (plain.quality, plain.success, plain.latency, plain.specialization) == (0.5, 0.5, 0.5, 0.5)
    assert plain.total == pytest.approx(0.5)
    config = Config(priors={"m": Prior(quality=0.9, success=0.8, latency_ms=10_000)}, latency_ref_ms=10_000)
    primed = selection.score("m", "unit_test", Measured(), config)
    assert (primed.quality, primed.success, primed.latency) == (0.9, 0.8, 0.5)
    assert primed.total == pytest.approx(0.4 * 0.9 + 0.3 * 0.8 + 0.2 * 0.5 + 0.1 * 0.5)


def test_few_calls_are_shrunk_toward_the_prior_many_calls_speak_for_themselves() -> None:
    assert selection.shrink(1.0, 1, 0.5, 5) == pytest.approx((1.0 + 2.5) / 6)
    assert selection.shrink(None, 0, 0.3, 5) == 0.3
    assert selection.shrink(0.8, 3, 0.5, 0) == 0.8
    lucky = selection.score("m", "review", Measured(calls=2, accepted=2, scored=2, score_sum=2.0), Config())
    proven = selection.score("m", "review", Measured(calls=100, accepted=95, scored=100, score_sum=92.0), Config())
    assert lucky.success == pytest.approx((2 + 5 * 0.5) / 7)
    assert proven.success == pytest.approx((95 + 2.5) / 105)
    assert proven.total > lucky.total


def test_latency_faster_is_better_and_is_measured_from_the_median() -> None:
    assert selection.latency_score(0, 1000) == 1.0
    assert selection.latency_score(1000, 1000) == 0.5
    assert selection.latency_score(500, 1000) > selection.latency_score(3000, 1000)
    config = Config(prior_calls=0, latency_ref_ms=1000)
    fast = selection.score("f", "docstring", Measured(calls=4, answered=4, latency_p50_ms=250), config)
    slow = selection.score("s", "docstring", Measured(calls=4, answered=4, latency_p50_ms=4000), config)
    assert fast.latency == pytest.approx(0.8) and slow.latency == pytest.approx(0.2)


def test_specialization_matches_tags_to_the_task_type() -> None:
    assert selection.specialization(["quality"], "unit_test") == 1.0
    assert selection.specialization(["Reasoning"], "unit_test") == 1.0
    assert selection.specialization(["speed"], "unit_test") == 0.0
    assert selection.specialization(["speed"], "docstring") == 1.0
    assert selection.specialization(["balanced"], "custom") == 1.0
    assert selection.specialization([], "review") == 0.5
    config = Config(tags={"fast": ["speed"], "deep": ["quality", "reasoning"]}, epsilon=0)
    assert selection.order(selection.rank(["fast", "deep"], "unit_test", {}, config)) == ["deep", "fast"]
    assert selection.order(selection.rank(["deep", "fast"], "docstring", {}, config)) == ["fast", "deep"]


def test_ties_keep_the_configured_order_and_repeats_are_dropped() -> None:
    assert selection.order(selection.rank(["b", "a", "b", "c"], "review", {}, NO_EXPLORING)) == ["b", "a", "c"]


def test_the_ranking_has_every_component_and_the_total() -> None:
    [row] = [r.as_dict() for r in selection.rank(["m"], "review", {}, Config())]
    assert set(row) == {"model", "total", "quality", "success", "latency", "specialization", "calls",
                        "latency_p50_ms", "explored"}


def test_exploration_puts_the_least_measured_other_model_first_with_probability_epsilon() -> None:
    measured = {"old": Measured(calls=50, accepted=50, scored=50, score_sum=50.0),
                "used": Measured(calls=9, accepted=3, scored=9, score_sum=4.0), "new": Measured()}
    models = ["old", "used", "new"]
    never = selection.rank(models, "review", measured, Config(epsilon=0.0), random.Random(1))
    assert never[0].model == "old" and not any(r.explored for r in never)
    always = selection.rank(models, "review", measured, Config(epsilon=1.0), random.Random(1))
    assert [r.model for r in always][0] == "new" and always[0].explored
    assert sorted(r.model for r in always) == sorted(models)
    rng = random.Random(42)
    firsts = [selection.rank(models, "review", measured, Config(epsilon=0.05), rng)[0].model for _ in range(2000)]
    share = firsts.count("new") / len(firsts)
    assert 0.02 < share < 0.09 and firsts.count("used") == 0
    again = random.Random(42)
    assert firsts == [selection.rank(models, "review", measured, Config(epsilon=0.05), again)[0].model
                      for _ in range(2000)]


# -- a real store ---------------------------------------------------------------------------


def record(store: Store, repo: Path, clock: FakeClock, model: str, outcome: str, score: float | None,
           task_type: str = "unit_test", latency_s: float = 1.0) -> None:
    task_id = store.enqueue(str(repo), TaskSpec.model_validate({"type": task_type, "target": "shop/pricing.py",
                                                                 "output": "tests/test_x.py"}), clock.now())
    store.record_execution(task_id, 1, model, clock.now(), clock.now() + timedelta(seconds=latency_s), 10, 5, 0.0,
                           outcome, score=score)


def test_the_selector_prefers_the_model_whose_results_validate(repo: Path, store: Store, clock: FakeClock) -> None:
    for _ in range(4):
        record(store, repo, clock, "model-a", "accepted", 0.9, latency_s=2.0)
        record(store, repo, clock, "model-b", "rejected", 0.3, latency_s=1.0)
    record(store, repo, clock, "model-b", "rate_limited", None)      # a 429 is not the model's work
    record(store, repo, clock, "model-b", "accepted", 1.0, task_type="docstring")   # another task type
    measured = History(store.db, store.m).measured("unit_test")
    assert measured["model-a"] == Measured(calls=4, accepted=4, scored=4, score_sum=pytest.approx(3.6),
                                           answered=4, latency_p50_ms=2000)
    assert measured["model-b"].calls == 4 and measured["model-b"].accepted == 0
    ranking = selection.rank(["model-b", "model-a", "model-c"], "unit_test", measured, NO_EXPLORING)
    assert [r.model for r in ranking] == ["model-a", "model-c", "model-b"]
    best = ranking[0]
    assert best.quality == pytest.approx((3.6 + 2.5) / 9) and best.success == pytest.approx((4 + 2.5) / 9)
    assert [e.score for e in store.executions(1)] == [0.9]


def test_only_the_newest_executions_are_weighed(repo: Path, store: Store, clock: FakeClock) -> None:
    for _ in range(6):
        record(store, repo, clock, "model-a", "rejected", 0.2)       # model-a used to be bad
    for _ in range(4):
        record(store, repo, clock, "model-a", "accepted", 1.0)       # ... and is good now
        record(store, repo, clock, "model-b", "accepted", 0.8, task_type="docstring")
    history = History(store.db, store.m)
    assert history.measured("unit_test")["model-a"].calls == 10
    recent = history.measured("unit_test", recent=8)                 # the newest 8 of all 14
    assert recent["model-a"] == Measured(calls=4, accepted=4, scored=4, score_sum=pytest.approx(4.0),
                                         answered=4, latency_p50_ms=1000)
    assert history.measured("unit_test", recent=1) == {}             # the newest is model-b's docstring
    assert selection_of(load(None, env={"OHD_SELECTION_HISTORY": "8"})).history == 8


def run_pool(store: Store, server: FakeOpenRouter, clock: FakeClock, rank: selection.Rank | None) -> None:
    async def main() -> None:
        async with httpx.AsyncClient() as http:
            client = ModelClient(http, server.url, "sk-test", clock, retries=0)

            async def call(model: str, messages: list[dict[str, str]], timeout_s: float, job: Job) -> Completion:
                return await client.complete(model, messages, timeout_s)

            await Pool(store, call, clock, models=["model-b", "model-a"], size=1, rank=rank).run_until_idle()

    asyncio.run(main())


def submit(store: Store, repo: Path, clock: FakeClock, name: str, **fields: Any) -> int:
    return store.enqueue(str(repo), TaskSpec.model_validate(
        {"type": "unit_test", "target": "shop/pricing.py", "output": f"tests/test_{name}.py", **fields}), clock.now())


def test_the_pool_sends_auto_tasks_to_the_model_whose_results_validate(
        repo: Path, store: Store, clock: FakeClock) -> None:
    with FakeOpenRouter() as server:
        server.script("model-a", [ok(GOOD)] * 20)
        server.script("model-b", [ok(BAD)] * 20)
        rank = ranker(History(store.db, store.m), NO_EXPLORING)
        first = submit(store, repo, clock, "first", models=["model-b", "model-a"], max_attempts=2)
        run_pool(store, server, clock, rank)
        assert [(e.model, e.outcome) for e in store.executions(first)] == [("model-b", "rejected"),
                                                                           ("model-b", "rejected")]
        assert all(e.score is not None and e.score < 0.9 for e in store.executions(first))
        taught = submit(store, repo, clock, "taught", models=["model-a"])
        run_pool(store, server, clock, rank)
        assert store.get_task(taught).status == "completed"
        assert store.executions(taught)[0].score == pytest.approx(1.0, abs=0.2)

        autos = [submit(store, repo, clock, f"auto{i}") for i in range(3)]
        explicit = submit(store, repo, clock, "explicit", models=["model-b", "model-a"], max_attempts=1)
        run_pool(store, server, clock, rank)
        for task_id in autos:
            assert store.get_task(task_id).status == "completed"
            assert [e.model for e in store.executions(task_id)] == ["model-a"]
        assert [e.model for e in store.executions(explicit)] == ["model-b"]   # an explicit list keeps its order


def test_without_a_ranking_auto_keeps_the_configured_order(repo: Path, store: Store, clock: FakeClock) -> None:
    for _ in range(3):
        record(store, repo, clock, "model-b", "rejected", 0.2)
    with FakeOpenRouter() as server:
        server.script("model-b", [ok(GOOD)])
        task_id = submit(store, repo, clock, "plain")
        run_pool(store, server, clock, None)
    assert [e.model for e in store.executions(task_id)] == ["model-b"]


def test_select_model_prints_the_ranking_with_each_component(
        repo: Path, store: Store, clock: FakeClock, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-test")
    monkeypatch.setenv("OHD_MODELS", "model-b,model-a,model-c")
    monkeypatch.setenv("OHD_MODEL_TAGS", json.dumps({"model-c": ["speed"]}))
    for _ in range(3):
        record(store, repo, clock, "model-a", "accepted", 0.9)
        record(store, repo, clock, "model-b", "rejected", 0.3)
    assert main(["select-model", "--type", "unit_test", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["task_type"] == "unit_test" and data["weights"] == {"quality": 0.4, "success": 0.3,
                                                                    "latency": 0.2, "specialization": 0.1}
    assert [row["model"] for row in data["ranking"]] == ["model-a", "model-c", "model-b"]
    a = data["ranking"][0]
    assert a["calls"] == 3 and a["success"] == pytest.approx((3 + 2.5) / 8, abs=1e-4)
    assert a["total"] == pytest.approx(0.4 * a["quality"] + 0.3 * a["success"] + 0.2 * a["latency"]
                                       + 0.1 * a["specialization"], abs=1e-3)
    assert data["ranking"][1]["specialization"] == 0.0
    assert {row["state"] for row in data["ranking"]} == {"ready"}
    assert main(["select-model", "--type", "unit_test"]) == 0
    text = capsys.readouterr().out
    assert "quality" in text and text.index("model-a") < text.index("model-b")


def test_selection_settings_become_the_config(tmp_path: Path) -> None:
    path = tmp_path / "sel.toml"
    path.write_text('selection_epsilon = 0.1\nselection_prior_calls = 3\n'
                    '[model_priors."model-a"]\nquality = 0.8\nlatency_ms = 2000\n'
                    '[model_tags]\n"model-a" = ["quality"]\n')
    config = selection_of(load(path, env={}))
    assert config.epsilon == 0.1 and config.prior_calls == 3
    assert config.priors["model-a"] == Prior(quality=0.8, success=0.5, latency_ms=2000)
    assert config.tags["model-a"] == ("quality",)


def test_select_model_with_a_discovered_list_ranks_the_measured_models(
        repo: Path, store: Store, clock: FakeClock, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-test")
    monkeypatch.setenv("OHD_MODELS", '["auto"]')
    record(store, repo, clock, "found-b", "rejected", 0.3)
    record(store, repo, clock, "found-a", "accepted", 0.95)
    assert main(["select-model", "--type", "unit_test", "--json"]) == 0
    assert [row["model"] for row in json.loads(capsys.readouterr().out)["ranking"]] == ["found-a", "found-b"]
