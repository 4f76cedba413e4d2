"""Metrics: aggregates of real executions in a real store, the Prometheus text (parsed
strictly), `GET /metrics` over a real socket, and `ohd metrics` / `ohd models` through the CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from ohd.cli.client import UnixHTTPConnection
from ohd.cli.commands import main
from ohd.store.history import History, percentile
from ohd.service.metrics import (
    Metrics,
    collect,
    prometheus,
    with_stats,
)
from ohd.core.taskfile import TaskSpec
from ohd.service.server import ApiServer
from ohd.store.store import Store, TaskStatus

from tests.support.clock import FakeClock
from tests.support.databases import BACKENDS, store_on

MODEL_A = "vendor/model-a:free"
MODEL_B = 'we"ird\\mo\ndel'          # every character the format escapes in a label value
UPTIME_S = 125.5


# -- a strict parser of the text exposition format 0.0.4 ------------------------------

NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
VALUE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]?Inf|NaN")
TYPES = ("counter", "gauge", "summary", "histogram", "untyped")


class Series(dict[tuple[tuple[str, str], ...], float]):
    """A family's samples by their labels; the labels' order does not matter (prometheus_client
    writes them sorted by name), so keys are stored, and looked up, sorted."""

    def __getitem__(self, labels: tuple[tuple[str, str], ...]) -> float:
        return super().__getitem__(tuple(sorted(labels)))


@dataclass
class Family:
    help: str
    type: str = ""
    samples: Series = field(default_factory=Series)


def parse_exposition(text: str) -> dict[str, Family]:
    """Families by name; raises AssertionError on anything the format does not allow."""
    assert text.endswith("\n") and not text.endswith("\n\n"), "one newline at the end"
    families: dict[str, Family] = {}
    current: str | None = None
    for number, line in enumerate(text[:-1].split("\n"), start=1):
        where = f"line {number}: {line!r}"
        if line.startswith("# HELP "):
            name, _, help_text = line[len("# HELP "):].partition(" ")
            assert NAME.fullmatch(name) and name not in families, where
            families[name], current = Family(help=unescape(help_text)), name
        elif line.startswith("# TYPE "):
            name, _, kind = line[len("# TYPE "):].partition(" ")
            assert name == current and families[name].type == "" and kind in TYPES, where
            assert not families[name].samples, f"{where}: TYPE after samples"
            families[name].type = kind
        else:
            assert not line.startswith("#") and line.strip() == line and line, where
            name, labels, value = parse_sample(line)
            assert current is not None and families[current].type, f"{where}: sample outside its family"
            suffixes = ("", "_sum", "_count") if families[current].type == "summary" else ("",)
            assert name in [current + suffix for suffix in suffixes], f"{where}: sample outside its family"
            if name != current:                     # a summary's _sum and _count, keyed apart
                labels = (("__name__", name),) + labels
            labels = tuple(sorted(labels))
            assert labels not in families[current].samples, f"{where}: duplicate series"
            families[current].samples[labels] = value
    return families


def parse_sample(line: str) -> tuple[str, tuple[tuple[str, str], ...], float]:
    match = NAME.match(line)
    assert match, line
    name, rest = match.group(), line[match.end():]
    labels: list[tuple[str, str]] = []
    if rest.startswith("{"):
        rest = rest[1:]
        while not rest.startswith("}"):
            label = LABEL_NAME.match(rest)
            assert label and rest[label.end():label.end() + 2] == '="', line
            value, rest = read_label_value(rest[label.end() + 2:], line)
            assert label.group() not in dict(labels), f"{line}: label twice"
            labels.append((label.group(), value))
            if rest.startswith(","):
                rest = rest[1:]
                assert not rest.startswith("}"), f"{line}: trailing comma"
        rest = rest[1:]
    assert rest.startswith(" ") and VALUE.fullmatch(rest[1:]), f"{line}: bad value (or a timestamp)"
    return name, tuple(labels), float(rest[1:].replace("Inf", "inf"))


def read_label_value(rest: str, line: str) -> tuple[str, str]:
    """The unescaped value up to its closing quote, and what follows it."""
    out: list[str] = []
    i = 0
    while True:
        assert i < len(rest), f"{line}: unterminated label value"
        char = rest[i]
        if char == '"':
            return "".join(out), rest[i + 1:]
        if char == "\\":
            escaped = rest[i + 1:i + 2]
            assert escaped in ("\\", '"', "n"), f"{line}: bad escape \\{escaped}"
            out.append("\n" if escaped == "n" else escaped)
            i += 2
            continue
        out.append(char)
        i += 1


def unescape(text: str) -> str:
    """HELP text: backslash-n is a newline, any other escaped character stands for itself."""
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), text)


def test_the_strict_parser_refuses_what_the_format_forbids() -> None:
    good = '# HELP x_total X.\n# TYPE x_total counter\nx_total{a="1"} 2\n'
    assert parse_exposition(good)["x_total"].samples == {(("a", "1"),): 2.0}
    for bad in (good[:-1], good + "\n", good.replace('"1"', '"a\\tb"'), good.replace("} 2", "} 2 1700000000"),
                good.replace('a="1"', 'a="1",'), good + 'x_total{a="1"} 3\n', good + "y 1\n",
                good.replace("counter", "count"), '# TYPE x gauge\n# HELP x X.\nx 1\n'):
        with pytest.raises(AssertionError):
            parse_exposition(bad)


# -- the store, filled with executions of known shape ---------------------------------


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with store_on(request.param, tmp_path) as st:
        yield st


def add_task(store: Store, clock: FakeClock, kind: str) -> int:
    spec = TaskSpec.model_validate({"type": kind, "target": "shop/pricing.py"})
    return store.enqueue("/repo", spec, clock.now(), source="test")


def call(store: Store, clock: FakeClock, task_id: int, model: str, latency_ms: int, outcome: str,
         tokens: tuple[int, int] = (0, 0), cost: float | None = None) -> None:
    start = clock.now() - timedelta(hours=3)
    store.record_execution(task_id, 1, model, start, start + timedelta(milliseconds=latency_ms),
                           tokens[0], tokens[1], cost, outcome)


def fill(store: Store, clock: FakeClock) -> None:
    """MODEL_A: 24 unit_test calls + 2 review calls; MODEL_B: one 429. Three tasks completed."""
    unit, review = add_task(store, clock, "unit_test"), add_task(store, clock, "review")
    for i in range(1, 21):   # answered, 100..2000 ms: 12 accepted, 6 rejected, 2 malformed
        outcome = "accepted" if i <= 12 else "rejected" if i <= 18 else "malformed"
        call(store, clock, unit, MODEL_A, 100 * i, outcome, tokens=(100, 50), cost=0.001)
    for _ in range(3):
        call(store, clock, unit, MODEL_A, 10, "rate_limited")
    call(store, clock, unit, MODEL_A, 30_000, "error")
    call(store, clock, review, MODEL_A, 7000, "accepted", tokens=(400, 300), cost=None)
    call(store, clock, review, MODEL_A, 5000, "accepted", tokens=(400, 300), cost=0.01)
    call(store, clock, unit, MODEL_B, 5, "rate_limited")
    for minutes_ago in (5, 30, 120):
        store.finish(add_task(store, clock, "docstring"), None, TaskStatus.COMPLETED,
                     clock.now() - timedelta(minutes=minutes_ago))
    store.finish(add_task(store, clock, "docstring"), None, TaskStatus.FAILED, clock.now())


def snapshot(store: Store, clock: FakeClock) -> Metrics:
    return collect(History(store.db, store.m), clock.now(), UPTIME_S, window=timedelta(minutes=10))


def test_percentile_is_nearest_rank() -> None:
    values = list(range(100, 2001, 100))
    assert (percentile(values, 0.5), percentile(values, 0.95), percentile(values, 1.0)) == (1000, 1900, 2000)
    assert percentile([7], 0.5) == percentile([7], 0.95) == 7
    assert percentile([], 0.5) is None


def test_per_model_and_per_task_type_stats(store: Store, clock: FakeClock) -> None:
    fill(store, clock)
    metrics = snapshot(store, clock)
    a = metrics.model(MODEL_A)
    assert a is not None
    unit = dict(a.by_task_type)["unit_test"].as_dict()
    assert unit == {"calls": 24, "accepted": 12, "rejected": 6, "errors": 1, "malformed": 2, "rate_limited": 3,
                    "agent_requests": 0,
                    "success_rate": 0.5, "latency_p50_ms": 1000, "latency_p95_ms": 1900,
                    "prompt_tokens": 2000, "completion_tokens": 1000, "cost": pytest.approx(0.02)}
    review = dict(a.by_task_type)["review"]
    assert (review.calls, review.success_rate, review.latency_p50_ms, review.latency_p95_ms) == (2, 1.0, 5000, 7000)
    # model level: the latencies of both types together (22 answered calls; 429s and errors left out)
    assert (a.stats.calls, a.stats.count("accepted"), a.stats.latency_p50_ms, a.stats.latency_p95_ms) == (26, 14, 1100, 5000)
    assert a.stats.success_rate == pytest.approx(14 / 26)
    b = metrics.model(MODEL_B)
    assert b is not None and b.stats.as_dict()["rate_limited"] == 1 and b.stats.success_rate == 0.0
    assert b.stats.latency_p50_ms is None


def test_system_totals_tasks_and_throughput(store: Store, clock: FakeClock) -> None:
    fill(store, clock)
    data = snapshot(store, clock).as_dict()
    totals = data["totals"]
    assert (totals["calls"], totals["accepted"], totals["rate_limited"], totals["errors"]) == (27, 14, 4, 1)
    assert (totals["prompt_tokens"], totals["completion_tokens"]) == (2800, 1600)
    assert totals["cost"] == pytest.approx(0.03)
    assert data["tasks"] == {"pending": 0, "queued": 2, "running": 0, "completed": 3, "failed": 1, "cancelled": 0}
    assert data["throughput"] == {"completed_last_hour": 2, "window_s": 600.0, "completed_in_window": 1,
                                  "per_minute": 0.1}
    assert data["uptime_s"] == UPTIME_S
    assert [m["model"] for m in data["models"]] == [MODEL_A, MODEL_B]
    json.dumps(data)   # JSON-ready as it is


def test_an_empty_store_has_zero_totals_and_no_model_samples(store: Store, clock: FakeClock) -> None:
    metrics = snapshot(store, clock)
    assert metrics.totals.calls == 0 and metrics.totals.success_rate is None and metrics.models == ()
    families = parse_exposition(prometheus(metrics))
    assert families["ohd_model_calls_total"].samples == {}
    assert families["ohd_tasks"].samples[(("status", "queued"),)] == 0


def test_prometheus_text_parses_and_has_the_samples(store: Store, clock: FakeClock) -> None:
    fill(store, clock)
    families = parse_exposition(prometheus(snapshot(store, clock)))
    types = {name: family.type for name, family in families.items()}
    assert types == {"ohd_uptime_seconds": "gauge", "ohd_tasks": "gauge", "ohd_tasks_completed_last_hour": "gauge",
                     "ohd_throughput_tasks_per_minute": "gauge", "ohd_model_calls_total": "counter",
                     "ohd_model_tokens_total": "counter", "ohd_model_cost_usd_total": "counter",
                     "ohd_model_success_ratio": "gauge", "ohd_model_latency_seconds": "summary",
                     "ohd_model_requests_saved_total": "counter", "ohd_accepted_outputs_per_request": "gauge"}
    calls = families["ohd_model_calls_total"].samples
    unit = (("model", MODEL_A), ("task_type", "unit_test"))
    assert calls[unit + (("outcome", "accepted"),)] == 12
    assert calls[unit + (("outcome", "rate_limited"),)] == 3
    assert calls[(("model", MODEL_B), ("task_type", "unit_test"), ("outcome", "rate_limited"))] == 1
    assert calls[(("model", MODEL_B), ("task_type", "unit_test"), ("outcome", "accepted"))] == 0
    assert sum(calls.values()) == 27
    latency = families["ohd_model_latency_seconds"].samples
    assert latency == {(("model", MODEL_A), ("quantile", "0.5")): 1.1, (("model", MODEL_A), ("quantile", "0.95")): 5,
                       (("__name__", "ohd_model_latency_seconds_sum"), ("model", MODEL_A)): 33,
                       (("__name__", "ohd_model_latency_seconds_count"), ("model", MODEL_A)): 22}
    tokens = families["ohd_model_tokens_total"].samples
    assert tokens[unit + (("kind", "prompt"),)] == 2000 and tokens[unit + (("kind", "completion"),)] == 1000
    assert families["ohd_model_cost_usd_total"].samples[unit] == pytest.approx(0.02)
    assert families["ohd_model_success_ratio"].samples[(("model", MODEL_B),)] == 0
    assert families["ohd_tasks"].samples[(("status", "completed"),)] == 3
    assert families["ohd_uptime_seconds"].samples[()] == UPTIME_S
    assert families["ohd_tasks_completed_last_hour"].samples[()] == 2
    assert families["ohd_throughput_tasks_per_minute"].samples[()] == pytest.approx(0.1)


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool missing (.ci/run installs Debian's prometheus)")
@pytest.mark.parametrize("filled", [True, False])
def test_promtool_check_metrics_passes(store: Store, clock: FakeClock, filled: bool) -> None:
    if filled:
        fill(store, clock)
    done = subprocess.run(["promtool", "check", "metrics"], input=prometheus(snapshot(store, clock)),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stdout + done.stderr, done.stdout + done.stderr


def test_the_prometheus_client_parser_reads_every_family_and_the_latency_summary(
        store: Store, clock: FakeClock) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    fill(store, clock)
    families = {f.name: f for f in text_string_to_metric_families(prometheus(snapshot(store, clock)))}
    # the client names a counter family without its _total
    assert {name: f.type for name, f in families.items()} == {
        "ohd_uptime_seconds": "gauge", "ohd_tasks": "gauge", "ohd_tasks_completed_last_hour": "gauge",
        "ohd_throughput_tasks_per_minute": "gauge", "ohd_model_calls": "counter", "ohd_model_tokens": "counter",
        "ohd_model_cost_usd": "counter", "ohd_model_success_ratio": "gauge", "ohd_model_latency_seconds": "summary",
        "ohd_model_requests_saved": "counter", "ohd_accepted_outputs_per_request": "gauge"}
    latency = {(s.name, s.labels.get("quantile")): s.value for s in families["ohd_model_latency_seconds"].samples
               if s.labels["model"] == MODEL_A}
    assert latency == {("ohd_model_latency_seconds", "0.5"): 1.1, ("ohd_model_latency_seconds", "0.95"): 5.0,
                       ("ohd_model_latency_seconds_sum", None): 33.0, ("ohd_model_latency_seconds_count", None): 22.0}
    weird = {s.labels["model"] for s in families["ohd_model_calls"].samples}
    assert weird == {MODEL_A, MODEL_B}


def test_a_label_value_with_every_escaped_character_reads_back_whole(store: Store, clock: FakeClock) -> None:
    """MODEL_B holds a double quote, a backslash and a newline: both parsers read the same id back."""
    from prometheus_client.parser import text_string_to_metric_families

    fill(store, clock)
    text = prometheus(snapshot(store, clock))
    assert 'model="we\\"ird\\\\mo\\ndel"' in text
    assert parse_exposition(text)["ohd_model_success_ratio"].samples[(("model", MODEL_B),)] == 0
    ratios = {s.labels["model"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
              if s.name == "ohd_model_success_ratio"}
    assert ratios == {MODEL_A: pytest.approx(14 / 26), MODEL_B: 0.0}


def test_without_an_uptime_there_is_no_uptime_series(store: Store, clock: FakeClock) -> None:
    """`ohd metrics --textfile` has no daemon whose uptime it could give."""
    families = parse_exposition(prometheus(collect(History(store.db, store.m), clock.now(), None)))
    assert "ohd_uptime_seconds" not in families and "ohd_tasks" in families


def test_model_states_get_their_measured_stats(store: Store, clock: FakeClock) -> None:
    fill(store, clock)
    merged = with_stats([{"id": MODEL_A, "state": "ready"}, {"id": "new/model", "state": "cooldown"}],
                        snapshot(store, clock))
    assert merged[0]["state"] == "ready" and merged[0]["stats"]["calls"] == 26
    assert merged[0]["stats"]["by_task_type"][0]["task_type"] == "review"
    assert merged[1]["stats"]["calls"] == 0 and merged[1]["stats"]["success_rate"] is None


# -- over the socket, and through the CLI ---------------------------------------------


@pytest.fixture
def served(store: Store, clock: FakeClock, repo: Path) -> Iterator[ApiServer]:
    """The real ApiServer on the CLI's socket path, wired the way the daemon wires it."""
    fill(store, clock)

    def models() -> list[dict[str, Any]]:
        return [{"id": MODEL_A, "state": "ready", "cooldown_until": None, "requests_left_minute": 19,
                 "requests_left_today": 180}]

    server = ApiServer(Path(os.environ["OHD_RUNTIME_DIR"]) / "ohd.sock", store, repos=[repo], clock=clock,
                       status=dict, wake=lambda: None, models=models,
                       metrics=lambda: prometheus(snapshot(store, clock)),
                       metrics_json=lambda: snapshot(store, clock).as_dict(),
                       annotate_models=lambda states: with_stats(states, snapshot(store, clock)))
    server.start()
    yield server
    server.stop()


def test_get_metrics_over_the_socket_is_prometheus_text(served: ApiServer) -> None:
    conn = UnixHTTPConnection(served.socket_path, timeout=10.0)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        body = response.read().decode()
    finally:
        conn.close()
    assert response.status == 200
    assert (response.getheader("Content-Type") or "").startswith("text/plain; version=0.0.4")
    families = parse_exposition(body)
    assert families["ohd_model_calls_total"].samples[
        (("model", MODEL_A), ("task_type", "review"), ("outcome", "accepted"))] == 2


def test_ohd_metrics_json_and_prometheus_through_the_cli(served: ApiServer,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["metrics", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["totals"]["calls"] == 27 and data["totals"]["rate_limited"] == 4
    assert data["models"][0]["latency_p95_ms"] == 5000
    assert main(["metrics", "--prometheus"]) == 0
    assert "ohd_model_latency_seconds" in parse_exposition(capsys.readouterr().out)
    assert main(["metrics"]) == 0
    assert capsys.readouterr().out.startswith("# HELP ohd_uptime_seconds")
    with pytest.raises(SystemExit):
        main(["metrics", "--json", "--prometheus"])


def test_ohd_models_shows_measured_stats(served: ApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--json"]) == 0
    [model] = json.loads(capsys.readouterr().out)["models"]
    assert (model["id"], model["state"], model["stats"]["calls"], model["stats"]["rate_limited"]) == (MODEL_A, "ready", 26, 3)
    assert main(["models"]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"{MODEL_A}: ready  requests left: 19 this minute, 180 today")
    assert "calls 26, accepted 14, success 54%, 429s 3, p50 1100 ms, p95 5000 ms" in line


def test_the_daemon_serves_metrics_of_its_own_work(repo: Path, tmp_path: Path) -> None:
    """A real `ohd daemon` (offline provider) completes a task; its calls show up in the metrics."""
    from tests.e2e.helpers import DaemonProcess, daemon_env
    from tests.support.waiting import wait_for

    daemon = DaemonProcess(daemon_env(tmp_path, Path(os.environ["OHD_RUNTIME_DIR"])), repo,
                           tmp_path / "daemon.log").start()
    try:
        (repo / "tasks.d" / "review.yaml").write_text("type: review\ntarget: shop/pricing.py\n")
        wait_for(lambda: daemon.json("metrics")["tasks"]["completed"] == 1, timeout=60, what="task 1 to complete")
        data = daemon.json("metrics")
        [model] = daemon.json("models")["models"]
        text = daemon.ohd("metrics").stdout
    finally:
        assert daemon.stop() == 0
    assert data["models"][0]["model"] == "offline" and data["models"][0]["accepted"] == 1
    assert data["throughput"]["completed_last_hour"] == 1 and data["uptime_s"] > 0
    assert model["id"] == "offline" and model["stats"]["calls"] == 1
    families = parse_exposition(text)
    assert families["ohd_model_calls_total"].samples[
        (("model", "offline"), ("task_type", "review"), ("outcome", "accepted"))] == 1


# -- `ohd metrics --textfile`: node_exporter's textfile collector, no daemon ----------------


def test_the_textfile_is_written_whole_from_the_store_without_a_daemon(db_path: Path, clock: FakeClock,
                                                                        tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from tests.support.databases import open_store

    sqlite = open_store(db_path)          # the CLI's default database
    try:
        fill(sqlite, clock)
    finally:
        sqlite.close()
    collector = tmp_path / "textfile"
    collector.mkdir()
    (collector / "ohd.prom").write_text("stale\n")
    os.chmod(collector / "ohd.prom", 0o640)
    before = (collector / "ohd.prom").stat().st_ino
    assert main(["metrics", "--textfile", str(collector)]) == 0
    assert sorted(os.listdir(collector)) == ["ohd.prom"]           # no temp file left beside it
    written = collector / "ohd.prom"
    assert written.stat().st_ino != before       # a new file renamed over the old, never rewritten in place
    assert written.stat().st_mode & 0o777 == 0o640                 # a mode the user gave it is kept
    text = written.read_text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "ohd_uptime_seconds" not in families                    # no daemon, no uptime
    calls = {(s.labels["model"], s.labels["task_type"], s.labels["outcome"]): s.value
             for s in families["ohd_model_calls"].samples}
    assert calls[(MODEL_A, "unit_test", "accepted")] == 12
    assert {s.labels["status"]: s.value for s in families["ohd_tasks"].samples}["completed"] == 3
    assert parse_exposition(text)["ohd_model_latency_seconds"].type == "summary"


def test_the_textfile_needs_an_existing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["metrics", "--textfile", str(tmp_path / "missing")]) == 1
    assert "is not a directory" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()
